"""Publisher: streams the runs' live state to every streamer, never slowing training.

One collector task reads each run's latest-value slot and scalar buffer every
``tick_s`` and fills one outbox per streamer address; one link task per address
keeps a bidi ``Publish`` stream open and drains its outbox:

- status (latest wins) first, then scalars (merged, never dropped: while a
  streamer is slow or down they accumulate, down-sampled into buckets), then
  heavy views (latest wins, sent only when the previous write finished);
- a link that fails reconnects with jittered exponential backoff; on
  reconnect it re-sends the latest status and views so the streamer can give new
  subscribers a snapshot at once;
- the streamer answers with who is watching. A view is built only for a run
  someone watches, at most ``max_fps`` (and the viewers' own cap) times a
  second and within a CPU budget, from a weight snapshot, in a worker thread
  (or a worker process, see viewworker.py), and serialized once for every
  address.

The targets are ``host:port``, a comma list, or ``dns:///name:port`` (every
address, re-resolved every ``resolve_every_s``, so each streamer replica behind a
headless Service gets every update).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import grpc

from tensorwire.auth import ClientSecurity
from tensorwire.channels import ChannelPool, resolve_targets
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.scalars import Bucket, ScalarBuffer, to_batch
from tensorwire.streamer.v1 import streamer_pb2 as spb

from . import metrics
from .loop import TERMINAL, LiveStatus, Snapshot
from .runs import Run, RunManager
from .viewworker import ViewWorker

log = logging.getLogger(__name__)

PUBLISH_METHOD = "/tensorwire.streamer.v1.StreamerService/Publish"


def channel_pool(address: str, security: ClientSecurity | None = None) -> ChannelPool:
    """The one place the publisher makes channels: a pool per streamer address
    (one Publish stream each; health-checked, replaced when unhealthy or old, metered)."""
    return ChannelPool(
        address, min_size=1, max_size=1, name=f"publish {address}", security=security,
        options=[("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                 ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1_000)],
    )


def _serialize(message: bytes | spb.PublishRequest) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def status_message(run: Run, status: LiveStatus) -> cpb.RunStatus:
    return cpb.RunStatus(
        run_id=run.run_id, task=run.task.name, state=run.state, step=status.step,
        steps_per_second=status.steps_per_second, produced_at=status.produced_at,
        metrics=status.metrics, params=run.config.params, error=status.error,
    )


@dataclass
class _Link:
    """One streamer address: its outbox and what it told us about watchers."""

    address: str
    statuses: dict[str, bytes] = field(default_factory=dict)
    scalars: dict[str, ScalarBuffer] = field(default_factory=dict)
    views: dict[tuple[str, str], bytes] = field(default_factory=dict)
    pending_status: set[str] = field(default_factory=set)
    pending_views: set[tuple[str, str]] = field(default_factory=set)
    watchers: dict[str, int] = field(default_factory=dict)
    demand_fps: dict[str, float] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool = False
    connects: int = 0
    sent_frames: int = 0
    task: asyncio.Task[None] | None = None
    pool: ChannelPool | None = None

    def add_scalars(self, run_id: str, series: dict[str, list[Bucket]], max_points: int) -> None:
        buffer = self.scalars.get(run_id)
        if buffer is None:
            buffer = self.scalars[run_id] = ScalarBuffer(max_points)
        buffer.extend(series)
        self.wake.set()

    def set_status(self, run_id: str, data: bytes) -> None:
        self.statuses[run_id] = data
        self.pending_status.add(run_id)
        self.wake.set()

    def set_view(self, key: tuple[str, str], data: bytes) -> None:
        self.views[key] = data
        self.pending_views.add(key)
        self.wake.set()

    def restore_scalars(self, run_id: str, series: dict[str, list[Bucket]]) -> None:
        """Put back points that were taken but not sent, before any newer ones."""
        buffer = ScalarBuffer(self.scalars[run_id].max_points if run_id in self.scalars else 512)
        buffer.extend(series)
        if run_id in self.scalars:
            buffer.extend(self.scalars[run_id].take())
        self.scalars[run_id] = buffer

    def scalars_ready(self) -> bool:
        return any(bool(b) for b in self.scalars.values())

    def depth(self) -> int:
        """Updates waiting: statuses, views, and runs with scalars."""
        return len(self.pending_status) + len(self.pending_views) + sum(1 for b in self.scalars.values() if b)

    def drain(self) -> list[tuple[bytes, tuple[str, dict[str, list[Bucket]]] | None]]:
        """What to write now, most urgent first: statuses, scalars, newest views.

        Scalar messages come with the points they carry, to restore on failure.
        """
        out: list[tuple[bytes, tuple[str, dict[str, list[Bucket]]] | None]] = [
            (self.statuses[r], None) for r in sorted(self.pending_status) if r in self.statuses
        ]
        self.pending_status.clear()
        for run_id, buffer in self.scalars.items():
            series = buffer.take()
            if series:
                step = max(b[-1].step for b in series.values())
                data = spb.PublishRequest(run_id=run_id, step=step, scalars=to_batch(series))
                out.append((data.SerializeToString(), (run_id, series)))
        out += [(self.views[k], None) for k in sorted(self.pending_views) if k in self.views]
        self.pending_views.clear()
        return out

    def resend_all(self) -> None:
        self.pending_status = set(self.statuses)
        self.pending_views = set(self.views)
        self.wake.set()


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
    ) -> None:
        self.runs = runs
        self.security = security
        self.target = target
        self.max_fps = max_fps
        self.view_cpu_budget = view_cpu_budget
        self.view_worker = ViewWorker() if view_process else None
        self.status_interval_s = status_interval_s
        self.tick_s = tick_s
        self.max_points = max_points
        self.resolve_every_s = resolve_every_s
        self.backoff_max_s = backoff_max_s
        self.links: dict[str, _Link] = {}
        self.views_built = 0
        self._last_status: dict[str, tuple[float, int, int]] = {}
        self._steps_counted: dict[str, int] = {}
        self._next_view_at: dict[str, float] = {}
        self._building: dict[str, asyncio.Task[None]] = {}
        self._view_models: dict[str, object] = {}
        self._view_cost_s: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.ready = asyncio.Event()
        """Set once views can be built (the view worker process has started)."""

    async def start(self) -> None:
        if not self.target:
            return
        await self._resolve()
        self._tasks = [
            asyncio.create_task(self._warm_up(), name="publisher-warm-up"),
            asyncio.create_task(self._collect_forever(), name="publisher-collect"),
            asyncio.create_task(self._resolve_forever(), name="publisher-resolve"),
        ]

    async def _warm_up(self) -> None:
        if self.view_worker is not None:
            try:
                await self.view_worker.warm_up()
            except Exception:
                log.exception("view worker does not start; views will fail")
        self.ready.set()

    def watchers(self, run_id: str) -> int:
        return max((link.watchers.get(run_id, 0) for link in self.links.values()), default=0)

    async def aclose(self) -> None:
        self._closed = True
        tasks = [*self._tasks, *self._building.values()]
        tasks += [link.task for link in self.links.values() if link.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self.links.values():
            if link.pool is not None:
                await link.pool.aclose()
        if self.view_worker is not None:
            self.view_worker.close()

    # -- addresses --------------------------------------------------------
    async def _resolve(self) -> None:
        try:
            addresses = await asyncio.to_thread(resolve_targets, self.target)
        except Exception as exc:
            log.warning("cannot resolve streamer target %s: %s", self.target, exc)
            return
        for address in addresses:
            if address not in self.links:
                link = _Link(address, pool=channel_pool(address, self.security))
                metrics.PUBLISH_RECONNECTS.labels(address)  # exported from 0, before any failure
                for run_id, data in self._latest_statuses().items():
                    link.set_status(run_id, data)
                link.task = asyncio.create_task(self._link_forever(link), name=f"publish-{address}")
                self.links[address] = link
        for address in list(self.links):
            if address not in addresses:
                link = self.links.pop(address)
                if link.task is not None:
                    link.task.cancel()
                    await asyncio.gather(link.task, return_exceptions=True)
                if link.pool is not None:
                    await link.pool.aclose()

    def _latest_statuses(self) -> dict[str, bytes]:
        for link in self.links.values():
            return dict(link.statuses)
        return {}

    async def _resolve_forever(self) -> None:
        if not self.target.startswith("dns:"):
            return
        while True:
            await asyncio.sleep(self.resolve_every_s)
            await self._resolve()

    # -- collecting -------------------------------------------------------
    async def _collect_forever(self) -> None:
        while True:
            try:
                self.collect()
            except Exception:
                log.exception("publisher collect failed")
            await asyncio.sleep(self.tick_s)

    def collect(self) -> None:
        """One tick: statuses, scalars and (when watched) view builds."""
        now = time.monotonic()
        active = 0
        for run in self.runs.list_runs():
            run_id = run.run_id
            series = run.loop.take_scalars()
            if series:
                for link in self.links.values():
                    link.add_scalars(run_id, series, self.max_points)
            status = run.loop.status
            state = run.state
            active += state not in TERMINAL
            counted = self._steps_counted.get(run_id, 0)
            if status.step > counted:
                metrics.STEPS.labels(run_id).inc(status.step - counted)
                self._steps_counted[run_id] = status.step
            last = self._last_status.get(run_id)
            if last is None or last[2] != state or (
                last[1] != status.step and now - last[0] >= self.status_interval_s
            ):
                self._last_status[run_id] = (now, status.step, state)
                msg = spb.PublishRequest(
                    run_id=run_id, step=status.step, produced_at=status.produced_at,
                    status=status_message(run, status),
                ).SerializeToString()
                for link in self.links.values():
                    link.set_status(run_id, msg)
            self._maybe_build_view(run, now, state)
        metrics.RUNS_ACTIVE.set(active)
        for link in self.links.values():
            metrics.PUBLISH_QUEUE.labels(link.address).set(link.depth())

    def _maybe_build_view(self, run: Run, now: float, state: int) -> None:
        run_id = run.run_id
        watchers = self.watchers(run_id)
        if not watchers or run_id in self._building or now < self._next_view_at.get(run_id, 0.0):
            return
        if state in TERMINAL and self._next_view_at.get(run_id, 0.0) == float("inf"):
            return
        fps = self.max_fps
        demand = [link.demand_fps.get(run_id, 0.0) for link in self.links.values()]
        if any(demand):
            fps = min(fps, max(demand))
        # A terminal or paused run's weights do not change: one view is enough.
        still = state in TERMINAL or state == cpb.RUN_STATE_PAUSED
        # Views may take at most view_cpu_budget of one CPU per run: a view
        # that costs 3 ms of CPU at a 2 % budget waits at least 150 ms.
        interval = max(1.0 / fps, self._view_cost_s.get(run_id, 0.0) / self.view_cpu_budget)
        self._next_view_at[run_id] = float("inf") if still else now + interval
        task = asyncio.create_task(self._build_view(run), name=f"view-{run_id}")
        self._building[run_id] = task
        task.add_done_callback(lambda _: self._building.pop(run_id, None))

    def views_changed(self, run_id: str) -> None:
        """Someone new watches: build a view at the next tick."""
        self._next_view_at.pop(run_id, None)

    async def _build_view(self, run: Run) -> None:
        try:
            snap = await asyncio.wrap_future(run.loop.request_snapshot())
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
        for link in self.links.values():
            link.set_view((run.run_id, view.kind), data)

    def _render(self, run: Run, snap: Snapshot) -> cpb.View:
        import torch

        started = time.thread_time()
        model = self._view_models.get(run.run_id)
        if model is None:
            model = self._view_models[run.run_id] = run.task.build_model(snap.config)
            model.eval()  # type: ignore[attr-defined]
        with torch.no_grad():  # cheaper than load_state_dict, same effect
            for name, tensor in model.state_dict().items():  # type: ignore[attr-defined]
                tensor.copy_(snap.state_dict[name])
        with torch.inference_mode():
            view = run.task.build_view(model, run.loop.data, snap.config)  # type: ignore[arg-type]
        view.step = snap.step
        view.produced_at = snap.produced_at
        self._record_cost(run.run_id, time.thread_time() - started)
        return view

    def _record_cost(self, run_id: str, cost_s: float) -> None:
        previous = self._view_cost_s.get(run_id)
        self._view_cost_s[run_id] = cost_s if previous is None else 0.7 * previous + 0.3 * cost_s

    # -- links ------------------------------------------------------------
    async def _link_forever(self, link: _Link) -> None:
        backoff = 0.05
        while not self._closed:
            started = time.monotonic()
            try:
                assert link.pool is not None
                async with link.pool.acquire() as channel:
                    await self._stream(link, channel)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.info("publish to %s ended: %s %s", link.address, exc.code().name, exc.details())
            except Exception:
                log.exception("publish to %s failed", link.address)
            finally:
                link.connected = False
                link.watchers.clear()
            if time.monotonic() - started > 5.0:
                backoff = 0.05
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(self.backoff_max_s, backoff * 2)

    async def _stream(self, link: _Link, channel: grpc.aio.Channel) -> None:
        publish = channel.stream_stream(
            PUBLISH_METHOD, request_serializer=_serialize,
            response_deserializer=spb.PublishResponse.FromString,
        )
        call = publish()
        reader = asyncio.create_task(self._read(link, call))
        try:
            link.resend_all()
            link.connected = True
            link.connects += 1
            if link.connects > 1:
                metrics.PUBLISH_RECONNECTS.labels(link.address).inc()
            while True:
                if not (link.pending_status or link.pending_views or link.scalars_ready()):
                    link.wake.clear()
                    waiter = asyncio.create_task(link.wake.wait())
                    done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if reader in done:
                        waiter.cancel()
                        reader.result()
                        return
                    continue
                outgoing = link.drain()
                for i, (message, _) in enumerate(outgoing):
                    try:
                        await call.write(message)
                    except BaseException:
                        # Scalars are never dropped: what did not go out goes back.
                        for _, taken in outgoing[i:]:
                            if taken is not None:
                                link.restore_scalars(*taken)
                        raise
                    link.sent_frames += 1
                metrics.PUBLISH_QUEUE.labels(link.address).set(link.depth())
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            call.cancel()

    async def _read(self, link: _Link, call: grpc.aio.StreamStreamCall) -> None:
        async for reply in call:
            before = dict(link.watchers)
            link.watchers = dict(reply.watchers)
            link.demand_fps = {run_id: d.max_fps for run_id, d in reply.demand.items()}
            for run_id, count in link.watchers.items():
                if count and not before.get(run_id, 0):
                    # Watched again after nobody was: build a fresh view now. (New
                    # viewers of a watched run get the streamer's latest view.)
                    self.views_changed(run_id)
