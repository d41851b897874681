"""Publisher: streams the trainer's runs' live state to every streamer, never slowing training.

One collector task reads each run's latest-value slot and scalar buffer every
``tick_s`` and fills the outboxes of :class:`tensorwire.publishing.StreamLinks`
(one per streamer address; see there for ordering, merging and reconnects). The
streamer answers with who is watching. A view is built only for a run someone
watches, at most ``max_fps`` (and the viewers' own cap) times a second and within
a CPU budget, from a weight snapshot, in a worker thread (or a worker process, see
viewworker.py), and serialized once for every address.

Runs registered by a training script of their own (the SDK, ``external`` runs)
publish from that script; the publisher leaves them alone.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tensorwire.auth import ClientSecurity
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.periodic import Periodic
from tensorwire.publishing import Link, StreamLinks
from tensorwire.streamer.v1 import streamer_pb2 as spb

from . import metrics
from .loop import TERMINAL, LiveStatus, Snapshot, TrainingLoop
from .runs import Run, RunManager
from .viewworker import ViewWorker, draw

log = logging.getLogger(__name__)

def status_message(run: Run, status: LiveStatus) -> cpb.RunStatus:
    return cpb.RunStatus(
        run_id=run.run_id, task=run.task.name, state=run.state, step=status.step,  # type: ignore[arg-type]  # protobuf enum fields take their int values
        steps_per_second=status.steps_per_second, produced_at=status.produced_at,
        metrics=status.metrics, params=run.config.params, error=status.error,
    )


FINAL_SEND_WAIT_S = 120.0
"""How long an ended run waits in memory for a disconnected streamer link to take
its final state (connected links are always waited for)."""


class Publisher:
    """Streams every run of ``runs`` to every streamer address of ``target``."""

    def __init__(
        self,
        runs: RunManager,
        target: str,
        *,
        max_fps: float = 10.0,
        view_cpu_budget: float = 0.02,
        view_process: bool = False,
        status_interval_s: float = 0.25,
        tick_s: float = 0.05,
        max_points: int = 512,
        resolve_every_s: float = 30.0,
        backoff_max_s: float = 1.0,
        security: ClientSecurity | None = None,
        task_modules: tuple[str, ...] = (),
    ) -> None:
        self.runs = runs
        self.target = target
        self.max_fps = max_fps
        self.view_cpu_budget = view_cpu_budget
        self.view_worker = ViewWorker(task_modules) if view_process else None
        self.status_interval_s = status_interval_s
        self.tick_s = tick_s
        self.streams = StreamLinks(
            target, max_points=max_points, resolve_every_s=resolve_every_s,
            backoff_max_s=backoff_max_s, security=security, on_watched=self.views_changed,
        )
        self.views_built = 0
        self._last_status: dict[str, tuple[float, int, int]] = {}
        self._reconnects_counted: dict[str, int] = {}
        self._steps_counted: dict[str, int] = {}
        self._next_view_at: dict[str, float] = {}
        self._building: dict[str, asyncio.Task[None]] = {}
        self._view_models: dict[str, object] = {}
        self._view_cost_s: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._collector: Periodic | None = None
        self.ready = asyncio.Event()
        """Set once views can be built (the view worker process has started)."""

    @property
    def links(self) -> dict[str, Link]:
        return self.streams.links

    async def start(self) -> None:
        if not self.target:
            return
        await self.streams.start()
        self._tasks = [asyncio.create_task(self._warm_up(), name="publisher-warm-up")]
        self._collector = Periodic(self._collect_now, self.tick_s, name="publisher collect", immediately=True).start()

    async def _warm_up(self) -> None:
        if self.view_worker is not None:
            try:
                await self.view_worker.warm_up()
            except Exception:
                log.exception("view worker does not start; views will fail")
        self.ready.set()

    def watchers(self, run_id: str) -> int:
        return self.streams.watchers(run_id)

    async def aclose(self) -> None:
        if self._collector is not None:
            await self._collector.aclose()
        tasks = [*self._tasks, *self._building.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.streams.aclose()
        if self.view_worker is not None:
            self.view_worker.close()

    # -- collecting -------------------------------------------------------
    async def _collect_now(self) -> None:
        self.collect()

    def collect(self) -> None:
        """One tick: statuses, scalars and (when watched) view builds."""
        now = time.monotonic()
        active = 0
        for run in self.runs.list_runs():
            run_id = run.run_id
            if run.external:
                continue  # its own script publishes it
            series = run.loop.take_scalars()
            if series:
                self.streams.publish_scalars(run_id, series)
            status = run.loop.status
            state = run.state
            active += state not in TERMINAL
            counted = self._steps_counted.get(run_id, 0)
            if status.step > counted:
                metrics.STEPS.labels(run_id).inc(status.step - counted)
                self._steps_counted[run_id] = status.step
            last = self._last_status.get(run_id)
            if last is not None and last[2] != state:
                # Paused -> running (or any change): the views stopped at the pause
                # are built again (a paused run's view is built once, then no more).
                self.views_changed(run_id)
            if last is None or last[2] != state or (
                last[1] != status.step and now - last[0] >= self.status_interval_s
            ):
                self._last_status[run_id] = (now, status.step, state)
                msg = spb.PublishRequest(
                    run_id=run_id, step=status.step, produced_at=status.produced_at,
                    status=status_message(run, status),
                ).SerializeToString()
                self.streams.publish_status(run_id, msg)
            self._maybe_build_view(run, now, state)
        metrics.RUNS_ACTIVE.set(active)
        for link in self.links.values():
            metrics.PUBLISH_QUEUE.labels(link.address).set(link.depth())
            # Reconnects: every connect after a link's first (counted from 0, before any).
            counted = self._reconnects_counted.get(link.address, 0)
            reconnects = max(0, link.connects - 1)
            metrics.PUBLISH_RECONNECTS.labels(link.address).inc(reconnects - counted)
            self._reconnects_counted[link.address] = reconnects

    def _maybe_build_view(self, run: Run, now: float, state: int) -> None:
        run_id = run.run_id
        watchers = self.watchers(run_id)
        if not watchers or run_id in self._building or now < self._next_view_at.get(run_id, 0.0):
            return
        if state in TERMINAL and self._next_view_at.get(run_id, 0.0) == float("inf"):
            return
        fps = self.max_fps
        demand = self.streams.demand_fps(run_id)
        if demand:
            fps = min(fps, demand)
        # A terminal or paused run's weights do not change: one view is enough.
        still = state in TERMINAL or state == cpb.RUN_STATE_PAUSED
        # Views may take at most view_cpu_budget of one CPU per run: a view
        # that costs 3 ms of CPU at a 2 % budget waits at least 150 ms.
        interval = max(1.0 / fps, self._view_cost_s.get(run_id, 0.0) / self.view_cpu_budget)
        # (Starting views half a tick early, to undo the rounding up to the next tick,
        # was tried: after a streamer restart the first live view then came late in
        # 2-5 of 8 runs of test_streamer_restart_publisher_reconnects, against 0 of 6.)
        self._next_view_at[run_id] = float("inf") if still else now + interval
        task = asyncio.create_task(self._build_view(run), name=f"view-{run_id}")
        self._building[run_id] = task
        task.add_done_callback(lambda _: self._building.pop(run_id, None))

    def final_sent(self, run: Run) -> bool:
        """Whether ``run``'s current (final) state and its last points were handed to
        every streamer link: until then it must not leave memory, or the streamers
        would show it live forever (forget() drops what is still queued)."""
        if run.external or not self.target:
            return True  # its own script publishes it; or no streamer to tell
        # A streamer that stays unreachable must not keep ended runs in memory for
        # ever: after FINAL_SEND_WAIT_S a disconnected link is no longer waited for.
        overdue = bool(run.ended_at) and time.time() - run.ended_at > FINAL_SEND_WAIT_S
        last = self._last_status.get(run.run_id)
        if last is None or last[2] != run.state:
            return overdue
        return not any((link.connected or not overdue)
                       and (link.owes_status(run.run_id) or link.scalars.get(run.run_id))
                       for link in self.links.values())

    def forget(self, run_id: str) -> None:
        """A run left the trainer's memory: drop everything kept for it."""
        for table in (self._last_status, self._next_view_at, self._view_models, self._view_cost_s):
            table.pop(run_id, None)
        for link in self.links.values():
            link.forget(run_id)

    def views_changed(self, run_id: str) -> None:
        """Someone new watches: build a view at the next tick."""
        self._next_view_at.pop(run_id, None)

    async def _build_view(self, run: Run) -> None:
        loop = run.loop
        assert isinstance(loop, TrainingLoop), "a script's run builds its own views"
        try:
            snap = await asyncio.wrap_future(loop.request_snapshot())
            if self.view_worker is not None:
                data, cost = await self.view_worker.render(
                    run.run_id, run.task.name, snap.config, run.seed, snap.state_dict,
                    snap.step, snap.produced_at,
                )
                view = cpb.View.FromString(data)
                self._record_cost(run.run_id, cost)
            else:
                view = await asyncio.to_thread(self._render, run, snap)
        except Exception:
            log.exception("view of run %s failed", run.run_id)
            return
        self.views_built += 1
        data = spb.PublishRequest(
            run_id=run.run_id, step=snap.step, produced_at=snap.produced_at, view=view
        ).SerializeToString()
        self.streams.publish_view((run.run_id, view.name or view.kind), data)

    def _render(self, run: Run, snap: Snapshot) -> cpb.View:
        """In this process (no view worker): the worker's renderer, this run's live data."""
        started = time.thread_time()
        model = self._view_models.get(run.run_id)
        if model is None:
            model = self._view_models[run.run_id] = run.task.build_model(snap.config)
            model.eval()
        data = run.loop.data if isinstance(run.loop, TrainingLoop) else None
        view: cpb.View = draw(run.task, model, data, snap.config, snap.state_dict, snap.step, snap.produced_at)
        self._record_cost(run.run_id, time.thread_time() - started)
        return view

    def _record_cost(self, run_id: str, cost_s: float) -> None:
        previous = self._view_cost_s.get(run_id)
        self._view_cost_s[run_id] = cost_s if previous is None else 0.7 * previous + 0.3 * cost_s
