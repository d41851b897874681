"""Publisher: streams the trainer's runs' live state to every streamer, never slowing training.

One collector task reads each run's status and scalar buffer every ``tick_s``
(through :class:`~services.trainer.runs.Run`'s narrow API) and fills the outboxes
of :class:`tensorwire.calls.publishing.StreamLinks` (outbox, link and transport: one per
streamer address; see there for ordering, merging and reconnects). The streamer
answers with who is watching; :class:`~services.trainer.viewbuilds.ViewBuilds`
builds views of the watched runs (scheduling there, rendering in viewworker.py).

Runs registered by a training script of their own (the SDK, ``external`` runs)
publish from that script; the publisher leaves them alone.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tensorwire.calls.periodic import Periodic
from tensorwire.calls.publishing import Link, StreamLinks
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.rpc.auth import ClientSecurity
from tensorwire.streamer.v1 import streamer_pb2 as spb

from . import metrics
from .loop import TERMINAL, LiveStatus
from .runs import Run, RunManager
from .viewbuilds import ViewBuilds
from .viewworker import ViewWorker

log = logging.getLogger(__name__)

def status_message(run: Run, status: LiveStatus) -> cpb.RunStatus:
    return cpb.RunStatus(
        run_id=run.run_id, task=run.task_name, state=run.state, step=status.step,  # type: ignore[arg-type]  # protobuf enum fields take their int values
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
        max_fps: float = 20.0,
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
        self.status_interval_s = status_interval_s
        self.tick_s = tick_s
        self.streams = StreamLinks(
            target, max_points=max_points, resolve_every_s=resolve_every_s,
            backoff_max_s=backoff_max_s, security=security, on_watched=self.views_changed,
        )
        self.views = ViewBuilds(
            self.streams, max_fps=max_fps, cpu_budget=view_cpu_budget,
            worker=ViewWorker(task_modules) if view_process else None,
        )
        self._last_status: dict[str, tuple[float, int, int]] = {}
        self._reconnects_counted: dict[str, int] = {}
        self._steps_counted: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._collector: Periodic | None = None

    @property
    def ready(self) -> asyncio.Event:
        """Set once views can be built (the view worker process has started)."""
        return self.views.ready

    @property
    def views_built(self) -> int:
        return self.views.built

    @property
    def links(self) -> dict[str, Link]:
        return self.streams.links

    async def start(self) -> None:
        if not self.target:
            return
        await self.streams.start()
        self._tasks = [asyncio.create_task(self.views.warm_up(), name="publisher-warm-up")]
        self._collector = Periodic(self._collect_now, self.tick_s, name="publisher collect", immediately=True).start()

    def watchers(self, run_id: str) -> int:
        return self.streams.watchers(run_id)

    async def aclose(self) -> None:
        if self._collector is not None:
            await self._collector.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.views.aclose()
        await self.streams.aclose()

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
            series = run.take_scalars()
            if series:
                self.streams.publish_scalars(run_id, series)
            status = run.status
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
            self.views.maybe_build(run, now, state)
        metrics.RUNS_ACTIVE.set(active)
        for link in self.links.values():
            metrics.PUBLISH_QUEUE.labels(link.address).set(link.depth())
            # Reconnects: every connect after a link's first (counted from 0, before any).
            counted = self._reconnects_counted.get(link.address, 0)
            reconnects = max(0, link.connects - 1)
            metrics.PUBLISH_RECONNECTS.labels(link.address).inc(reconnects - counted)
            self._reconnects_counted[link.address] = reconnects

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
        self._last_status.pop(run_id, None)
        self.views.forget(run_id)
        for link in self.links.values():
            link.forget(run_id)

    def views_changed(self, run_id: str) -> None:
        """Someone new watches (or the run's state changed): build a view at the next tick."""
        self.views.wake(run_id)
