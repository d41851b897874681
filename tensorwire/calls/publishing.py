"""Publishing live updates to every streamer, never slowing the producer.

:class:`StreamLinks` keeps one outbox and one bidi ``Publish`` stream per
streamer address. The trainer service's publisher (``services/trainer/
publisher.py``) and the in-process SDK (:mod:`tensorwire.track`) both fill the
outboxes and let the links drain them:

- status (latest wins) first, then scalars (merged, never dropped: while a
  streamer is slow or down they accumulate, down-sampled into buckets), then
  heavy views (latest wins per run and view name, sent only when the previous
  write finished);
- a link that fails reconnects with jittered exponential backoff; on reconnect it
  re-sends the latest status and views so the streamer can give new subscribers
  a snapshot at once;
- the streamer answers with who is watching (``watchers``, ``demand_fps``), so
  the producer builds heavy views only when someone looks.

The target is ``host:port``, a comma list, or ``dns:///name:port`` (every
address, re-resolved every ``resolve_every_s``, so each streamer replica behind
a headless Service gets every update).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from tensorwire.calls.backoff import Backoff
from tensorwire.calls.channels import ChannelPool, resolve_targets
from tensorwire.calls.periodic import Periodic
from tensorwire.data.scalars import Bucket, ScalarBuffer, to_batch
from tensorwire.rpc.auth import ClientSecurity
from tensorwire.rpc.rpcnames import method_path
from tensorwire.streamer.v1 import streamer_pb2 as spb

log = logging.getLogger(__name__)

PUBLISH_METHOD = method_path(spb, "StreamerService", "Publish")

ViewKey = tuple[str, str]
"""(run id, view name): the unit of "latest wins" for heavy views."""


def channel_pool(address: str, security: ClientSecurity | None = None) -> ChannelPool:
    """The one place publishers make channels: a pool per streamer address
    (one Publish stream each; health-checked, replaced when unhealthy or old, metered)."""
    return ChannelPool(
        address, min_size=1, max_size=1, name=f"publish {address}", security=security,
        options=[("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                 ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1_000)],
    )


def _serialize(message: bytes | spb.PublishRequest) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


@dataclass
class Link:
    """One streamer address: its outbox and what it told us about watchers."""

    address: str
    max_points: int = 512
    statuses: dict[str, bytes] = field(default_factory=dict)
    scalars: dict[str, ScalarBuffer] = field(default_factory=dict)
    views: dict[ViewKey, bytes] = field(default_factory=dict)
    pending_status: set[str] = field(default_factory=set)
    writing_status: set[str] = field(default_factory=set)
    """Statuses drained and not yet written: still owed if the write fails."""
    pending_views: set[ViewKey] = field(default_factory=set)
    watchers: dict[str, int] = field(default_factory=dict)
    demand_fps: dict[str, float] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    connected: bool = False
    connects: int = 0
    sent_frames: int = 0
    task: asyncio.Task[None] | None = None
    pool: ChannelPool | None = None

    def add_scalars(self, run_id: str, series: dict[str, list[Bucket]]) -> None:
        buffer = self.scalars.get(run_id)
        if buffer is None:
            buffer = self.scalars[run_id] = ScalarBuffer(self.max_points)
        buffer.extend(series)
        self.wake.set()

    def set_status(self, run_id: str, data: bytes) -> None:
        self.statuses[run_id] = data
        self.pending_status.add(run_id)
        self.wake.set()

    def set_view(self, key: ViewKey, data: bytes) -> None:
        self.views[key] = data
        self.pending_views.add(key)
        self.wake.set()

    def forget(self, run_id: str) -> None:
        """Drop what is kept of ``run_id`` (its producer went away)."""
        self.statuses.pop(run_id, None)
        self.scalars.pop(run_id, None)
        self.pending_status.discard(run_id)
        for key in [k for k in self.views if k[0] == run_id]:
            del self.views[key]
            self.pending_views.discard(key)
        self.watchers.pop(run_id, None)
        self.demand_fps.pop(run_id, None)

    def restore_scalars(self, run_id: str, series: dict[str, list[Bucket]]) -> None:
        """Put back points that were taken but not sent, before any newer ones."""
        buffer = ScalarBuffer(self.max_points)
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
        self.writing_status |= self.pending_status
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

    def owes_status(self, run_id: str) -> bool:
        """``run_id``'s status is queued or being written (not yet handed over)."""
        return run_id in self.pending_status or run_id in self.writing_status

    def resend_all(self) -> None:
        self.writing_status.clear()
        self.pending_status = set(self.statuses)
        self.pending_views = set(self.views)
        self.wake.set()


class ViewPacer:
    """When the next heavy view of each key (a run, or one of a run's views) may be
    built: at most ``max_fps`` times a second (lowered to what the viewers asked
    for), and within ``cpu_budget`` of one CPU per key: a view that costs 3 ms of
    CPU at a 2 % budget waits at least 150 ms. The trainer's publisher and the SDK
    both pace their views here."""

    COSTS_KEPT = 9
    """View costs kept per key for :meth:`typical_cost_s`."""

    def __init__(self, max_fps: float, cpu_budget: float) -> None:
        self.max_fps = max_fps
        self.cpu_budget = cpu_budget
        self._next_at: dict[str, float] = {}
        self._costs: dict[str, deque[float]] = {}

    def due(self, key: str, now: float) -> bool:
        return now >= self._next_at.get(key, 0.0)

    def interval_s(self, key: str, demand_fps: float) -> float:
        """Seconds until the view after one built now (``demand_fps`` 0: no cap asked)."""
        fps = min(self.max_fps, demand_fps) if demand_fps else self.max_fps
        return max(1.0 / fps, self.typical_cost_s(key) / self.cpu_budget)

    def started(self, key: str, now: float, demand_fps: float, *, last: bool = False) -> None:
        """A view of ``key`` is being built now; ``last``: no more until :meth:`wake`."""
        self._next_at[key] = float("inf") if last else now + self.interval_s(key, demand_fps)

    def cost(self, key: str, cost_s: float) -> None:
        """A view of ``key`` took ``cost_s`` CPU seconds."""
        costs = self._costs.get(key)
        if costs is None:
            costs = self._costs[key] = deque(maxlen=self.COSTS_KEPT)
        costs.append(cost_s)

    def typical_cost_s(self, key: str) -> float:
        """What ``key``'s views cost, from the last few (0 before any): the larger of
        their lower median and their mean without the largest one. A view of a thread
        sharing the GIL and two cores with training costs 3-10x its median now and
        then (allocation, a cold cache, a descheduled core); an average that kept
        those spikes (weighted 0.3) held a spiral run's views to ~16 a second at 20
        asked, where its usual ~0.8 ms allows ~25, and a first view's 20 ms held the
        next ones for seconds. One spike in the window is left out; views that are
        often expensive (every other one, say) still count at their mean, so the
        budget holds for them."""
        costs = self._costs.get(key)
        if not costs:
            return 0.0
        ordered = sorted(costs)
        median = ordered[(len(ordered) - 1) // 2]
        if len(ordered) < 2:
            return median
        return max(median, (sum(ordered) - ordered[-1]) / (len(ordered) - 1))

    def wake(self, key: str) -> None:
        """Build a view of ``key`` at the next chance (someone new watches)."""
        self._next_at.pop(key, None)

    def wake_all(self) -> None:
        self._next_at.clear()

    def forget(self, key: str) -> None:
        self._next_at.pop(key, None)
        self._costs.pop(key, None)


class StreamLinks:
    """The Publish streams to every streamer address of ``target`` (asyncio, one loop).

    ``on_watched(run_id)`` is called when a run goes from no watcher to some;
    ``on_refused(error)`` when a streamer refuses what was published
    (INVALID_ARGUMENT: the refused scalars are dropped, or they would be refused
    again on every reconnect).
    """

    def __init__(
        self,
        target: str,
        *,
        max_points: int = 512,
        resolve_every_s: float = 30.0,
        backoff_max_s: float = 1.0,
        security: ClientSecurity | None = None,
        on_watched: Callable[[str], None] | None = None,
        on_refused: Callable[[grpc.aio.AioRpcError], None] | None = None,
    ) -> None:
        self.target = target
        self.max_points = max_points
        self.resolve_every_s = resolve_every_s
        self.backoff_max_s = backoff_max_s
        self.security = security
        self.on_watched = on_watched
        self.on_refused = on_refused
        self.links: dict[str, Link] = {}
        self._resolver: Periodic | None = None
        self._closed = False

    def __repr__(self) -> str:
        up = sum(1 for link in self.links.values() if link.connected)
        return f"<StreamLinks {self.target}: {up}/{len(self.links)} connected>"

    async def start(self) -> None:
        if not self.target:
            return
        await self._resolve()
        if self.target.startswith("dns:"):
            self._resolver = Periodic(self._resolve, self.resolve_every_s, name="publish resolve").start()

    async def aclose(self) -> None:
        self._closed = True
        if self._resolver is not None:
            await self._resolver.aclose()
        tasks = [link.task for link in self.links.values() if link.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self.links.values():
            if link.pool is not None:
                await link.pool.aclose()

    # -- what producers call ----------------------------------------------
    def watchers(self, run_id: str) -> int:
        return max((link.watchers.get(run_id, 0) for link in self.links.values()), default=0)

    def demand_fps(self, run_id: str) -> float:
        """The highest frame rate a viewer of ``run_id`` asked for (0 = none said)."""
        return max((link.demand_fps.get(run_id, 0.0) for link in self.links.values()), default=0.0)

    @property
    def connected(self) -> bool:
        return any(link.connected for link in self.links.values())

    def publish_status(self, run_id: str, data: bytes) -> None:
        for link in self.links.values():
            link.set_status(run_id, data)

    def publish_scalars(self, run_id: str, series: dict[str, list[Bucket]]) -> None:
        for link in self.links.values():
            link.add_scalars(run_id, series)

    def publish_view(self, key: ViewKey, data: bytes) -> None:
        for link in self.links.values():
            link.set_view(key, data)

    # -- addresses --------------------------------------------------------
    async def _resolve(self) -> None:
        try:
            addresses = await asyncio.to_thread(resolve_targets, self.target)
        except Exception as exc:
            log.warning("cannot resolve streamer target %s: %s", self.target, exc)
            return
        for address in addresses:
            if address not in self.links:
                link = Link(address, self.max_points, pool=channel_pool(address, self.security))
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

    # -- links ------------------------------------------------------------
    async def _link_forever(self, link: Link) -> None:
        backoff = Backoff(initial_s=min(0.05, self.backoff_max_s), max_s=self.backoff_max_s, jitter=0.5)
        failures = 0
        while not self._closed:
            started = time.monotonic()
            try:
                assert link.pool is not None
                async with link.pool.acquire() as channel:
                    await self._stream(link, channel)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    log.warning("streamer %s refused an update: %s", link.address, exc.details())
                    link.scalars.clear()
                    if self.on_refused is not None:
                        self.on_refused(exc)
                else:
                    log.info("publish to %s ended: %s %s", link.address, exc.code().name, exc.details())
            except Exception:
                log.exception("publish to %s failed", link.address)
            finally:
                link.connected = False
                link.watchers.clear()
            if time.monotonic() - started > 5.0:
                failures = 0  # it was up a while: this is a new outage
            failures += 1
            await backoff.sleep(failures)

    async def _stream(self, link: Link, channel: grpc.aio.Channel) -> None:
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
            while True:
                if not (link.pending_status or link.pending_views or link.scalars_ready()):
                    link.wake.clear()
                    waiter = asyncio.create_task(link.wake.wait())
                    try:
                        done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if reader in done:
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
                link.writing_status.clear()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            call.cancel()

    async def _read(self, link: Link, call: grpc.aio.StreamStreamCall) -> None:
        async for reply in call:
            before = dict(link.watchers)
            link.watchers = dict(reply.watchers)
            link.demand_fps = {run_id: d.max_fps for run_id, d in reply.demand.items()}
            if self.on_watched is not None:
                for run_id, count in link.watchers.items():
                    if count and not before.get(run_id, 0):
                        # Watched again after nobody was: build a fresh view now. (New
                        # viewers of a watched run get the streamer's latest view.)
                        self.on_watched(run_id)
