"""UpdateHub: the streamer's core (plain Python, no gRPC).

Trainers ``publish`` status, scalar batches and views per run; viewers
``subscribe`` to a run and read serialized ``Frame`` bytes. Per subscriber the
hub keeps a coalescing mailbox:

- **status** (step, state, steps/s): sent first, whenever it changed (at most
  every ``status_interval_s``) and at least every ``keepalive_s`` even when
  nothing else can go out;
- **scalars**: merged, never dropped. Every run keeps one shared log of
  published batches; each subscriber has a cursor into it and, when it may send,
  gets every point since its cursor in one frame, down-sampled into min/mean/max
  buckets when there are more than its ``max_points``. Subscribers that send in
  step (the common case: one ticker) share one serialized frame;
- **views** (heavy): latest wins per kind. A view goes out only when the
  previous write finished and the subscriber's pacing allows it, so a slow link
  skips views instead of queueing them.

Views and statuses are serialized once per run (and codec) and the same bytes go
to every subscriber; only ``sent_at`` (and ``snapshot``) is appended per send,
protobuf's concatenation being a merge.

One ticker task (``tick_s``) decides what every subscriber may send and wakes
it; there is no poll loop per subscriber. It also releases the topics of runs
that ended, once nobody watches them and nothing was published for
``release_after_s``.

With a ``lookup`` (the trainer's run store, see ``lookup.py``), a run's topic is
seeded before its first subscriber reads it: an unknown run is NOT_FOUND, and the
snapshot holds the run's whole stored curve, not only what this streamer saw.

Keeping the bytes in flight small: a finished gRPC write only means HTTP/2 flow
control and the kernel took the bytes, and on a slow link the socket buffer
alone can hold seconds of data, so "latest wins" would still show old frames.
Every frame carries a sequence number (``Frame.seq``; the first frame also the
``subscription_id``), and a subscriber that acknowledges what arrived (the
``Ack`` RPC) gets heavy frames only while at most about one frame's worth is in
flight: see feedback.py, which also holds subscribers without feedback to a
conservative cap. Beside that, for subscribers without feedback:
(1) pacing, here: each subscriber's bandwidth is
estimated from how long its writes block, and views are spaced so they use at
most ``1 / headroom`` of it; (2) on the streamer's host, a small
``net.ipv4.tcp_notsent_lowat`` (``sysctl -w net.ipv4.tcp_notsent_lowat=16384``;
it is per network namespace) so the kernel accepts only ~16 KB beyond what is in
flight and writes block instead of piling up; (3) subscribers with
``grpc.http2.bdp_probe`` off, so their HTTP/2 window stays at 64 KB instead of
growing to megabytes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from tensorwire.calls.periodic import Periodic
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data import arrays
from tensorwire.data.scalars import MAX_SERIES, Bucket, ScalarBuffer, from_batch, to_batch
from tensorwire.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorwire.streamer.v1 import streamer_pb2 as spb

from . import metrics
from .feedback import AckOutcome, DeliveryWindow, FeedbackLimits

log = logging.getLogger(__name__)

SNAPSHOT_SUFFIX = spb.Frame(snapshot=True).SerializeToString()
ENDED = (cpb.RUN_STATE_STOPPED, cpb.RUN_STATE_FAILED, cpb.RUN_STATE_COMPLETED, cpb.RUN_STATE_INTERRUPTED)

RunLookup = Callable[[str, int], Awaitable[tuple[cpb.RunStatus, cpb.ScalarBatch] | None]]
"""(run_id, max_points) -> the run's status and stored history, or None if there is
no such run; raises UnavailableError when it cannot tell."""


def _sent_at(wall: float) -> bytes:
    return spb.Frame(sent_at=wall).SerializeToString()


class Outgoing(NamedTuple):
    """One frame for one subscriber: its bytes, what it is, and when its step was produced."""

    data: bytes
    kind: str
    """The frame's body: "status", "scalars" or "view" (the metrics' label)."""
    produced_at: float = 0.0

    @property
    def heavy(self) -> bool:
        return self.kind == "view"


@dataclass(frozen=True)
class AckReply:
    """What the hub answers an ack: its clock, and the subscriber's delivery state."""

    server_time: float
    delivery_bytes_per_s: float
    in_flight_bytes: int


@dataclass
class CachedView:
    """One published view, serialized once per codec (and per set of arrays left
    out as unchanged) on first use."""

    kind: str
    step: int
    produced_at: float
    view: cpb.View
    _frames: dict[tuple[int, frozenset[str]], bytes] = field(default_factory=dict)
    _digests: dict[str, bytes] | None = None

    @property
    def digests(self) -> dict[str, bytes]:
        """Each array's content digest (BLAKE2b-128 of its message: name, dtype,
        shape, scaling and bytes), by array name."""
        if self._digests is None:
            self._digests = {
                a.name: hashlib.blake2b(a.SerializeToString(), digest_size=16).digest() for a in self.view.arrays
            }
            if len(self._digests) != len(self.view.arrays):
                self._digests = {}  # two arrays of one name: nothing can be named as unchanged
        return self._digests

    def frame(self, codec: int, unchanged: frozenset[str] = frozenset()) -> bytes:
        """The frame's bytes, arrays recoded to ``codec``; the arrays named in
        ``unchanged`` go as ``Array(name, unchanged=True)`` without their bytes."""
        data = self._frames.get((codec, unchanged))
        if data is None:
            view = self.view
            if unchanged or any(a.codec != codec for a in view.arrays):
                view = cpb.View()
                view.CopyFrom(self.view)
                del view.arrays[:]
                view.arrays.extend(
                    cpb.Array(name=a.name, unchanged=True) if a.name in unchanged else arrays.recode(a, codec)
                    for a in self.view.arrays
                )
            data = spb.Frame(step=self.step, produced_at=self.produced_at, view=view).SerializeToString()
            if len(self._frames) >= 8:  # a handful of variants at most; never grows with viewers
                self._frames.pop(next(iter(self._frames)))
            self._frames[(codec, unchanged)] = data
        return data


class Pacer:
    """Spaces a subscriber's heavy frames from how long its writes block.

    A write that blocks for ``seconds`` waited until ``nbytes`` fitted into the
    flow-control window and socket buffer, which drain at the link's rate, so
    ``nbytes / seconds`` estimates the bandwidth. Views are then spaced to use
    at most ``1 / headroom`` of it. Writes that do not block let the estimate
    creep up again, so a link that gets faster is used again.
    """

    def __init__(self, headroom: float = 2.0, blocked_s: float = 0.01) -> None:
        self.headroom = headroom
        self.blocked_s = blocked_s
        self.bytes_per_s: float | None = None

    def record(self, nbytes: int, seconds: float) -> None:
        if seconds >= self.blocked_s and nbytes > 0:
            sample = nbytes / seconds
            self.bytes_per_s = sample if self.bytes_per_s is None else min(
                0.5 * self.bytes_per_s + 0.5 * sample, 2 * sample
            )
        elif self.bytes_per_s is not None:
            self.bytes_per_s *= 1.02
            if self.bytes_per_s > 1e9:
                self.bytes_per_s = None

    def spacing_s(self, nbytes: int) -> float:
        if self.bytes_per_s is None:
            return 0.0
        return self.headroom * nbytes / self.bytes_per_s


@dataclass(eq=False)
class Subscriber:
    """One viewer's mailbox and pacing."""

    run_id: str
    views: frozenset[str]
    max_fps: float
    codec: int
    max_points: int
    topic: Topic
    id: str = ""
    """Names the subscription in acks (unguessable: only its stream's reader knows it)."""
    window: DeliveryWindow = field(default_factory=DeliveryWindow)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pacer: Pacer = field(default_factory=Pacer)
    closed: bool = False
    status_due: bool = True
    status_version: int = -1
    last_status_at: float = -math.inf
    scalar_cursor: int = 0
    overflow: ScalarBuffer | None = None
    scalars_due: bool = False
    last_scalars_at: float = -math.inf
    pending_views: dict[str, CachedView] = field(default_factory=dict)
    scalar_row_bytes: float = 40.0
    """Bytes per point in every series of a scalar frame, measured on the last one."""
    scalar_frame_bytes: int = 0
    """Size of the last scalar frame sent (its spacing on a slow link)."""
    views_due: bool = False
    next_view_at: float = 0.0
    frames_sent: int = 0
    bytes_sent: int = 0
    views_sent: int = 0
    views_skipped: int = 0
    reuse_arrays: bool = False
    """The subscriber keeps each view's last arrays (SubscribeRequest.reuse_arrays)."""
    held: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """For a ``reuse_arrays`` subscriber: per view name, the digests of the arrays
    of the last view of that name sent on this stream."""

    skipping: bool = False
    """Views were skipped for this subscriber in the last demand window: its link, not
    the trainer, sets how many views it gets."""
    skip_mark: tuple[float, int] = (-math.inf, 0)
    """(clock, views_skipped) when the demand window began."""
    view_bytes: int = 0
    """Size of the last view frame sent (with the arrays it already held left out)."""

    def wants(self, kind: str) -> bool:
        return not self.views or kind in self.views

    def demand_fps(self, now: float, limits: HubLimits) -> float:
        """Views a second worth building for this subscriber: its ``max_fps``, or, while
        its link cannot take every view (views skipped in the last ``demand_window_s``)
        and its acks measure the link, ``demand_headroom`` times the views a second the
        link carries (delivery rate over the last view's size), at least
        ``min_demand_fps``. A trainer building 20 views a second for a 32 kbit/s link
        that takes 4 spends most of that work on views nobody sees; with the headroom a
        fresh view still waits whenever the link is free. From the measured rate, not
        from the views sent: a window whose link carried the subscription's snapshot
        sends no view at all, and a demand built on that held the next views a second
        apart."""
        at, skipped = self.skip_mark
        if now - at >= limits.demand_window_s:
            self.skipping = math.isfinite(at) and self.views_skipped > skipped
            self.skip_mark = (now, self.views_skipped)
        rate = self.window.bytes_per_s if self.window.has_feedback(now) else None
        if not (self.skipping and rate and self.view_bytes):
            return self.max_fps
        return min(self.max_fps, max(limits.min_demand_fps, limits.demand_headroom * rate / self.view_bytes))

    def unchanged_arrays(self, key: str, cached: CachedView) -> frozenset[str]:
        """The arrays of ``cached`` this subscriber already holds, byte for byte."""
        held = self.held.get(key) if self.reuse_arrays else None
        if not held:
            return frozenset()
        return frozenset(name for name, digest in cached.digests.items() if held.get(name) == digest)

    def view_frame(self, key: str, cached: CachedView) -> bytes:
        """The bytes of view ``cached`` for this subscriber; from now on it holds its arrays."""
        data = cached.frame(self.codec, self.unchanged_arrays(key, cached))
        if self.reuse_arrays:
            self.held[key] = cached.digests
        return data


@dataclass(eq=False)
class Topic:
    """Everything the hub knows about one run."""

    run_id: str
    status: cpb.RunStatus | None = None
    status_frame: bytes = b""
    status_version: int = 0
    history: ScalarBuffer = field(default_factory=lambda: ScalarBuffer(1024))
    log: list[tuple[int, dict[str, list[Bucket]]]] = field(default_factory=list)
    seq: int = 0
    views: dict[str, CachedView] = field(default_factory=dict)
    subscribers: set[Subscriber] = field(default_factory=set)
    scalar_cache: dict[tuple[int, int, int], bytes] = field(default_factory=dict)
    seeded: bool = False
    """Status and history were completed from the lookup."""
    touched_at: float = 0.0
    """Clock time of the last publish (or seeding)."""
    lookup_at: float = math.inf
    """When to ask the lookup again (it could not answer; someone waits)."""
    recheck_at: float = 0.0
    """When a live topic that went quiet may be checked against the lookup again."""


@dataclass(eq=False)
class PublisherHandle:
    """A connected trainer: the runs it sent, and a flag when their watchers change."""

    runs: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class HubLimits:
    keepalive_s: float = 1.0
    """A status frame at least this often per subscriber."""
    status_interval_s: float = 0.25
    """At most this often a changed status per subscriber."""
    scalar_interval_s: float = 0.2
    """At most this often a scalar frame per subscriber."""
    tick_s: float = 0.025
    """Period of the broadcast ticker."""
    default_fps: float = 20.0
    """Heavy frames per second when a subscriber does not say."""
    max_fps: float = 30.0
    default_max_points: int = 64
    max_points_limit: int = 4096
    history_points: int = 1024
    """Buckets per series kept for a new subscriber's snapshot (which gets them
    down-sampled to twice its ``max_points``)."""
    max_subscribers: int = 1000
    max_log_chunks: int = 4096
    """Scalar batches kept for subscribers that lag; older ones move into the
    lagging subscribers' private buffers (merged, not dropped)."""
    pacing_headroom: float = 2.0
    release_after_s: float = 30.0
    """An ended run's topic is dropped this long after its last update, once
    nobody watches it (a later subscriber gets it again from the lookup)."""
    status_share: float = 0.1
    """On a link whose rate acks measured, changed statuses are spaced to use at most
    this share of it (a 0.3 KB status: every 0.45 s at 64 kbit/s, 0.9 s at 32)."""
    scalar_share: float = 0.15
    """Scalar frames are down-sampled to use at most this share of a subscriber's
    delivery rate (measured from acks; without feedback, the cap's floor), and
    spaced so their headers fit in it too: status and views need the rest."""
    demand_window_s: float = 1.0
    demand_headroom: float = 2.0
    min_demand_fps: float = 4.0
    """A subscriber whose link cannot take every view asks the trainer for
    ``demand_headroom`` times the views a second its link carries, at least this
    many (``Subscriber.demand_fps``)."""
    feedback: FeedbackLimits = field(default_factory=FeedbackLimits)
    """In-flight limits: ack-clocked with feedback, a cap without (feedback.py)."""
    quiet_recheck_s: float = 10.0
    """A topic whose last state is live and to which nothing was published for this
    long is checked against the lookup (at most this often): a final state lost on
    its way from the trainer would otherwise show the run live for ever, and keep
    its topic in memory."""


class UpdateHub:
    """Fan-out of runs' updates to coalescing per-subscriber mailboxes."""

    def __init__(
        self,
        limits: HubLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        lookup: RunLookup | None = None,
    ) -> None:
        self.limits = limits or HubLimits()
        self.lookup = lookup
        self._lookups: dict[str, asyncio.Future[None]] = {}
        self._rechecks: dict[str, asyncio.Future[None]] = {}  # apart: a seed never waits on one
        self._clock = clock
        self._wall = wall
        self.topics: dict[str, Topic] = {}
        self.publishers: set[PublisherHandle] = set()
        self.subscriber_count = 0
        self.subscriptions: dict[str, Subscriber] = {}
        self._ticker: Periodic | None = None
        self._closed = False

    # -- lifecycle --------------------------------------------------------
    def start(self) -> None:
        if self._ticker is None:
            self._ticker = Periodic(self._tick_now, self.limits.tick_s, name="hub ticker", immediately=True).start()

    async def aclose(self) -> None:
        self._closed = True
        for topic in self.topics.values():
            for sub in topic.subscribers:
                sub.closed = True
                sub.wake.set()
        for pub in self.publishers:
            pub.changed.set()
        if self._ticker is not None:
            await self._ticker.aclose()
            self._ticker = None
        for task in list(self._rechecks.values()):
            task.cancel()

    @property
    def closed(self) -> bool:
        return self._closed

    def _topic(self, run_id: str) -> Topic:
        topic = self.topics.get(run_id)
        if topic is None:
            topic = self.topics[run_id] = Topic(run_id, history=ScalarBuffer(self.limits.history_points))
        return topic

    # -- publishing -------------------------------------------------------
    def add_publisher(self) -> PublisherHandle:
        pub = PublisherHandle()
        self.publishers.add(pub)
        return pub

    def remove_publisher(self, pub: PublisherHandle) -> None:
        self.publishers.discard(pub)

    def publish(self, req: spb.PublishRequest, pub: PublisherHandle | None = None) -> None:
        """Take one update from a trainer (synchronous, cheap, never blocks)."""
        if not req.run_id:
            raise InvalidArgumentError("PublishRequest.run_id is empty")
        topic = self._topic(req.run_id)
        topic.touched_at = self._clock()
        if pub is not None and req.run_id not in pub.runs:
            pub.runs.add(req.run_id)
            pub.changed.set()
        body = req.WhichOneof("body")
        if body == "status":
            status = req.status
            if not status.run_id:
                status.run_id = req.run_id
            topic.status = status
            topic.status_frame = spb.Frame(
                step=status.step, produced_at=status.produced_at, status=status
            ).SerializeToString()
            topic.status_version += 1
        elif body == "scalars":
            series = from_batch(req.scalars)
            new = [name for name in series if name not in topic.history]
            if new and topic.history.series_count + len(new) > MAX_SERIES:
                raise InvalidArgumentError(
                    f"run {req.run_id!r} would have {topic.history.series_count + len(new)} scalar "
                    f"series (new: {', '.join(new[:3])}{', ...' if len(new) > 3 else ''}); "
                    f"a run may have at most {MAX_SERIES} distinct scalar names"
                )
            topic.history.extend(series)
            topic.seq += 1
            topic.log.append((topic.seq, series))
            self._trim_log(topic)
        elif body == "view":
            view = req.view
            # Latest wins per view: a run's views are told apart by name (SDK scripts
            # may show several of one kind), else by kind.
            key = view.name or view.kind
            marked = [a.name for a in view.arrays if a.unchanged]
            if marked:
                raise InvalidArgumentError(
                    f"view {key!r} of run {req.run_id!r}: array {marked[0]!r} is marked unchanged; only "
                    "the streamer sets Array.unchanged (towards its subscribers): publish every array's bytes"
                )
            cached = CachedView(view.kind, view.step or req.step, view.produced_at or req.produced_at, view)
            topic.views[key] = cached
            now = self._clock()
            for sub in topic.subscribers:
                if sub.wants(view.kind):
                    if key in sub.pending_views:
                        sub.views_skipped += 1
                        _VIEWS_SKIPPED.inc()
                    sub.pending_views[key] = cached
                    if not sub.views_due and now >= sub.next_view_at and self._window_open(sub, now):
                        # The link is free: the view goes now, not at the next tick (up to
                        # tick_s later; at 20 views/s half of the on-screen age's saw-tooth).
                        sub.views_due = True
                        sub.wake.set()
        else:
            raise InvalidArgumentError(f"PublishRequest for run {req.run_id!r} has no body")

    def _trim_log(self, topic: Topic) -> None:
        if not topic.subscribers:
            topic.log.clear()
            return
        low = min(s.scalar_cursor for s in topic.subscribers)
        while topic.log and topic.log[0][0] <= low:
            topic.log.pop(0)
        excess = len(topic.log) - self.limits.max_log_chunks
        if excess > 0:
            moved = topic.log[:excess]
            del topic.log[:excess]
            last = moved[-1][0]
            for sub in topic.subscribers:
                if sub.scalar_cursor < last:
                    if sub.overflow is None:
                        sub.overflow = ScalarBuffer(sub.max_points)
                    for seq, series in moved:
                        if seq > sub.scalar_cursor:
                            sub.overflow.extend(series)
                    sub.scalar_cursor = last

    def watchers(self, run_ids: Iterable[str]) -> spb.PublishResponse:
        """Subscriber counts and view demand of ``run_ids`` (for a publisher)."""
        reply = spb.PublishResponse()
        for run_id in run_ids:
            topic = self.topics.get(run_id)
            subs = topic.subscribers if topic else set()
            reply.watchers[run_id] = len(subs)
            if subs:
                kinds: set[str] = set()
                for s in subs:
                    kinds |= s.views or {"*"}
                demand = reply.demand[run_id]
                demand.views.extend(sorted(kinds))
                now = self._clock()
                demand.max_fps = max(s.demand_fps(now, self.limits) for s in subs)
        return reply

    def _watchers_changed(self, run_id: str) -> None:
        for pub in self.publishers:
            if run_id in pub.runs:
                pub.changed.set()

    # -- seeding from the lookup ------------------------------------------
    async def prepare(self, run_id: str) -> None:
        """Before a subscription: NotFoundError if the lookup knows no such run (and
        no trainer published it); else the topic's status and history completed
        from the lookup (once per topic). Without a lookup, or when it cannot
        answer, nothing happens (the subscriber waits for the run to publish)."""
        if self.lookup is None or not run_id:
            return
        topic = self.topics.get(run_id)
        if topic is not None and topic.seeded:
            return
        pending = self._lookups.get(run_id)
        if pending is None:
            pending = self._lookups[run_id] = asyncio.ensure_future(self._seed(run_id))
            pending.add_done_callback(lambda _: self._lookups.pop(run_id, None))
        await asyncio.shield(pending)

    async def _seed(self, run_id: str) -> None:
        assert self.lookup is not None
        try:
            found = await self.lookup(run_id, self.limits.history_points)
        except UnavailableError as exc:
            log.info("run %s: no lookup (%s); asking again while someone waits", run_id, exc)
            self._topic(run_id).lookup_at = self._clock() + 1.0
            return
        topic = self.topics.get(run_id)
        if found is None:
            if topic is not None and topic.status is not None:
                return  # a trainer the lookup does not know publishes it
            raise NotFoundError(f"no run {run_id!r}")
        status, stored = found
        topic = self._topic(run_id)
        if topic.status is None:  # a live status published meanwhile is newer
            self.publish(spb.PublishRequest(run_id=run_id, status=status))
        # The stored curve up to where this streamer's own history starts.
        live = topic.history.peek()
        history = ScalarBuffer(self.limits.history_points)
        for name, buckets in from_batch(stored).items():
            start = live[name][0].first_step if name in live else math.inf
            history.extend({name: [b for b in buckets if b.step < start]})
        history.extend(live)
        topic.history = history
        topic.seeded = True
        topic.touched_at = self._clock()

    # -- subscribing ------------------------------------------------------
    def subscribe(
        self,
        run_id: str,
        *,
        max_fps: float = 0.0,
        views: Iterable[str] = (),
        accept_codecs: Iterable[int] = (),
        max_points: int = 0,
        reuse_arrays: bool = False,
        acks: bool = False,
    ) -> Subscriber:
        """A new mailbox for ``run_id`` (a run may publish later: the stream waits);
        ``acks``: the subscriber will acknowledge frames (``SubscribeRequest.acks``)."""
        limits = self.limits
        if self._closed:
            from tensorwire.errors import UnavailableError

            raise UnavailableError("the streamer is shutting down")
        if not run_id:
            raise InvalidArgumentError("run_id is empty")
        if math.isnan(max_fps) or max_fps < 0:
            raise InvalidArgumentError(f"max_fps must be >= 0, got {max_fps}")
        if max_fps > limits.max_fps:
            raise InvalidArgumentError(f"max_fps must be <= {limits.max_fps:g}, got {max_fps:g}")
        if max_points == 1 or max_points > limits.max_points_limit:
            raise InvalidArgumentError(
                f"max_points must be 0 (default) or 2..{limits.max_points_limit}, got {max_points}"
            )
        if self.subscriber_count >= limits.max_subscribers:
            raise ResourceExhaustedError(
                f"the streamer has {self.subscriber_count} subscribers, its limit; try again later"
            )
        accepted = set(accept_codecs)
        codec = cpb.CODEC_DEFLATE if cpb.CODEC_DEFLATE in accepted else arrays.best_codec(accepted)
        topic = self._topic(run_id)
        sub = Subscriber(
            run_id, frozenset(views), max_fps or limits.default_fps, codec,
            max_points or limits.default_max_points, topic,
            id=secrets.token_urlsafe(12), window=DeliveryWindow(limits.feedback, expects_acks=acks, now=self._clock()),
            reuse_arrays=reuse_arrays,
        )
        sub.pacer.headroom = limits.pacing_headroom
        sub.scalar_cursor = topic.seq
        topic.subscribers.add(sub)
        self.subscriptions[sub.id] = sub
        self.subscriber_count += 1
        metrics.SUBSCRIBERS.labels(run_id).set(len(topic.subscribers))
        self._watchers_changed(run_id)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in sub.topic.subscribers:
            sub.topic.subscribers.discard(sub)
            self.subscriptions.pop(sub.id, None)
            self.subscriber_count -= 1
            self._watchers_changed(sub.run_id)
            if sub.topic.subscribers:
                metrics.SUBSCRIBERS.labels(sub.run_id).set(len(sub.topic.subscribers))
            else:
                metrics.SUBSCRIBERS.remove(sub.run_id)
        sub.closed = True
        sub.pending_views.clear()
        sub.held.clear()
        sub.overflow = None
        topic = sub.topic
        if not topic.subscribers and topic.status is None and not topic.views:
            self.topics.pop(topic.run_id, None)

    def snapshot(self, sub: Subscriber) -> list[bytes]:
        """The frames a new subscriber gets first: status, history, latest views."""
        return [out.data for out in self._snapshot(sub)]

    def _snapshot(self, sub: Subscriber) -> list[Outgoing]:
        topic = sub.topic
        suffix = SNAPSHOT_SUFFIX + _sent_at(self._wall())
        out: list[Outgoing] = []
        if topic.status_frame:
            assert topic.status is not None
            out.append(Outgoing(topic.status_frame + suffix, "status", topic.status.produced_at))
            sub.status_version = topic.status_version
            sub.last_status_at = self._clock()
            sub.status_due = False
        history = topic.history.peek()
        if history and max(len(b) for b in history.values()) > 2 * sub.max_points:
            # The first screen needs the curve's shape, not 1024 buckets: at 64 kbit/s
            # those alone would hold every live frame back for seconds.
            coarse = ScalarBuffer(2 * sub.max_points)
            coarse.extend(history)
            history = coarse.take()
        if history:
            step = max(b[-1].step for b in history.values())
            out.append(Outgoing(
                spb.Frame(step=step, scalars=to_batch(history)).SerializeToString() + suffix, "scalars"
            ))
        for key, cached in topic.views.items():
            if sub.wants(cached.kind):
                out.append(Outgoing(sub.view_frame(key, cached) + suffix, "view", cached.produced_at))
                sub.pending_views.pop(key, None)
        return out

    # -- the ticker -------------------------------------------------------
    async def _tick_now(self) -> None:
        self.tick()

    def tick(self, now: float | None = None) -> None:
        """Decide, for every subscriber, what it may send now, and wake it."""
        now = self._clock() if now is None else now
        limits = self.limits
        self._release_ended(now)
        self._retry_lookups(now)
        self._recheck_quiet(now)
        for topic in self.topics.values():
            topic.scalar_cache.clear()
            for sub in topic.subscribers:
                wake = False
                since = now - sub.last_status_at
                # On a link whose rate acks measured, light frames are spaced to use at
                # most their share of it: each frame costs its headers whatever it holds
                # (and until acks measure it, for a slow link: DeliveryWindow.light_rate).
                rate = sub.window.light_rate(now)
                interval = self._spacing(limits.status_interval_s, len(topic.status_frame), limits.status_share, rate)
                if since >= limits.keepalive_s or (
                    sub.status_version != topic.status_version and since >= interval
                ):
                    sub.status_due = wake = True
                scalar_interval = self._spacing(limits.scalar_interval_s, sub.scalar_frame_bytes,
                                                limits.scalar_share, rate)
                if (topic.seq > sub.scalar_cursor or sub.overflow) and (
                    now - sub.last_scalars_at >= scalar_interval
                ):
                    sub.scalars_due = wake = True
                if sub.pending_views and now >= sub.next_view_at and self._window_open(sub, now):
                    sub.views_due = wake = True
                if wake:
                    sub.wake.set()

    def _spacing(self, base_s: float, nbytes: int, share: float, rate: float | None) -> float:
        """Seconds between light frames of ``nbytes`` so that they use at most ``share``
        of a link delivering ``rate`` bytes/s: ``base_s`` at least, the keepalive at most."""
        if not rate:
            return base_s
        wire = nbytes + self.limits.feedback.frame_overhead_bytes
        return min(self.limits.keepalive_s, max(base_s, wire / (share * rate)))

    def _retry_lookups(self, now: float) -> None:
        for topic in self.topics.values():
            if (now >= topic.lookup_at and topic.subscribers and not topic.seeded
                    and topic.status is None and topic.run_id not in self._lookups):
                topic.lookup_at = math.inf
                run_id = topic.run_id
                task = self._lookups[run_id] = asyncio.ensure_future(self._seed(run_id))
                task.add_done_callback(functools.partial(self._retried, run_id))

    def _recheck_quiet(self, now: float) -> None:
        if self.lookup is None:
            return
        quiet_s = self.limits.quiet_recheck_s
        for topic in self.topics.values():
            if (topic.status is not None and topic.status.state not in ENDED
                    and now - topic.touched_at >= quiet_s and now >= topic.recheck_at
                    and topic.run_id not in self._rechecks):
                topic.recheck_at = now + quiet_s
                run_id = topic.run_id
                task = self._rechecks[run_id] = asyncio.ensure_future(self._recheck(run_id))
                task.add_done_callback(functools.partial(self._retried, run_id, tasks=self._rechecks))

    async def _recheck(self, run_id: str) -> None:
        """A quiet live topic: if the run store says the run ended, take its final
        state from there (a paused run stays as it is)."""
        assert self.lookup is not None
        topic = self.topics.get(run_id)
        if topic is None:
            return
        asked = topic.touched_at
        try:
            found = await self.lookup(run_id, 1)
        except UnavailableError as exc:
            log.info("run %s: could not check its quiet live state (%s)", run_id, exc)
            return
        topic = self.topics.get(run_id)
        if (found is None or topic is None or topic.touched_at != asked  # published meanwhile: newer
                or topic.status is None or topic.status.state in ENDED):
            return
        status, _ = found
        if status.state in ENDED:
            log.warning("run %s: its final state never reached this streamer; %s at step %d "
                        "taken from the run store", run_id, cpb.RunState.Name(status.state), status.step)
            self.publish(spb.PublishRequest(run_id=run_id, step=status.step, status=status))

    def _retried(self, run_id: str, task: asyncio.Future[None], tasks: dict[str, asyncio.Future[None]]
                 | None = None) -> None:
        (self._lookups if tasks is None else tasks).pop(run_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.info("run %s: %s", run_id, task.exception())

    def _release_ended(self, now: float) -> None:
        doomed = [
            t for t in self.topics.values()
            if not t.subscribers and t.status is not None and t.status.state in ENDED
            and now - t.touched_at >= self.limits.release_after_s
        ]
        for topic in doomed:
            del self.topics[topic.run_id]
            for pub in self.publishers:
                pub.runs.discard(topic.run_id)

    def _window_open(self, sub: Subscriber, now: float) -> bool:
        """May ``sub``'s pending views go out, given the bytes in flight to it?"""
        nbytes = max(len(cached.frame(sub.codec, sub.unchanged_arrays(key, cached)))
                     for key, cached in sub.pending_views.items())
        if sub.window.may_send(nbytes, now, sub.pacer.bytes_per_s):
            return True
        acked = sub.window.has_feedback(now) or sub.window.awaiting_first_ack(now)
        (_HELD_ACKED if acked else _HELD_CAP).inc()
        return False

    # -- feedback ---------------------------------------------------------
    def ack(self, subscription_id: str, run_id: str, seq: int, received_at: float) -> AckReply:
        """A subscriber received every frame up to ``seq`` (see feedback.py).

        Sequence numbers never sent or older than one acknowledged already are
        ignored and counted, not errors: acks may be reordered on the way.
        """
        if not subscription_id:
            raise InvalidArgumentError("subscription_id is empty (it comes in the first frame of Subscribe)")
        if math.isnan(received_at) or math.isinf(received_at) or received_at < 0:
            raise InvalidArgumentError(f"received_at must be Unix seconds >= 0, got {received_at}")
        sub = self.subscriptions.get(subscription_id)
        if sub is None or (run_id and run_id != sub.run_id):
            raise NotFoundError(
                f"no subscription {subscription_id!r}"
                + (f" to run {run_id!r}" if run_id else "")
                + " on this streamer (it ended, or another replica serves it)"
            )
        now = self._clock()
        result = sub.window.ack(seq, received_at, now)
        _ACKS[result.outcome].inc()
        if result.outcome is AckOutcome.ACCEPTED:
            wall = self._wall()
            for kind, produced_at in result.produced_at:
                if produced_at > 0:
                    _ACK_LAG[kind].observe(max(0.0, wall - produced_at))
            if result.rate_sample is not None:
                metrics.DELIVERY_RATE.observe(result.rate_sample)
            if (sub.pending_views and not sub.views_due and now >= sub.next_view_at
                    and self._window_open(sub, now)):
                sub.views_due = True  # the view waited for this ack: send it now, not at the next tick
                sub.wake.set()
        return AckReply(
            server_time=self._wall(), delivery_bytes_per_s=sub.window.bytes_per_s or 0.0,
            in_flight_bytes=sub.window.unacked_bytes,
        )

    # -- sending ----------------------------------------------------------
    def due_frames(self, sub: Subscriber) -> list[Outgoing]:
        """What ``sub`` sends now, most urgent first."""
        topic = sub.topic
        now = self._clock()
        suffix = _sent_at(self._wall())
        out: list[Outgoing] = []
        if sub.status_due:
            sub.status_due = False
            sub.last_status_at = now
            sub.status_version = topic.status_version
            frame = topic.status_frame or spb.Frame(
                status=cpb.RunStatus(run_id=sub.run_id, state=cpb.RUN_STATE_UNSPECIFIED)
            ).SerializeToString()
            out.append(Outgoing(frame + suffix, "status", topic.status.produced_at if topic.status else 0.0))
        if sub.scalars_due:
            sub.scalars_due = False
            sub.last_scalars_at = now
            frame = self._scalar_frame(sub)
            if frame:
                out.append(Outgoing(frame + suffix, "scalars"))
        if sub.views_due:
            sub.views_due = False
            for key in list(sub.pending_views):
                cached = sub.pending_views.pop(key)
                out.append(Outgoing(sub.view_frame(key, cached) + suffix, "view", cached.produced_at))
        return out

    def _scalar_points(self, sub: Subscriber) -> int:
        """Points per series in ``sub``'s next scalar frame: its ``max_points``, fewer
        when its link is known to be slow (merged into buckets, never dropped)."""
        now = self._clock()
        rate = sub.window.bytes_per_s if sub.window.has_feedback(now) else None
        if not rate:
            # No feedback, or acks that have not measured the rate yet (their samples
            # need 0.25 s): as slow as the floor the cap assumes. Full frames five
            # times a second before the first rate sample held 18 KB in front of a
            # new 32 kbit/s subscriber, and its first live view came 6-9 s late.
            rate = sub.window.fallback_rate(sub.pacer.bytes_per_s)
        budget = self.limits.scalar_share * rate * self.limits.scalar_interval_s
        return max(2, min(sub.max_points, int(budget / sub.scalar_row_bytes)))

    def _scalar_frame(self, sub: Subscriber) -> bytes:
        topic = sub.topic
        start, end = sub.scalar_cursor, topic.seq
        sub.scalar_cursor = end
        points = self._scalar_points(sub)
        if sub.overflow is None:
            key = (start, end, points)
            cached = topic.scalar_cache.get(key)
            if cached is not None:
                sub.scalar_frame_bytes = len(cached)
                return cached
        private = sub.overflow is not None
        buffer = ScalarBuffer(points)
        if sub.overflow is not None:
            buffer.extend(sub.overflow.take())
        sub.overflow = None
        for seq, series in topic.log:
            if seq > start:
                buffer.extend(series)
        series_out = buffer.take()
        if not series_out:
            return b""
        step = max(b[-1].step for b in series_out.values())
        frame = spb.Frame(step=step, scalars=to_batch(series_out)).SerializeToString()
        sub.scalar_row_bytes = max(8.0, len(frame) / max(len(b) for b in series_out.values()))
        sub.scalar_frame_bytes = len(frame)
        if not private:
            topic.scalar_cache[(start, end, points)] = frame
        self._trim_log(topic)
        return frame

    def numbered(self, sub: Subscriber, out: Outgoing) -> bytes:
        """``out``'s bytes with its sequence number (and, first, the subscription id),
        recorded as in flight: call it as the frame goes to the transport."""
        now = self._clock()
        seq = sub.window.sent(len(out.data), out.kind, out.produced_at, now, sub.pacer.bytes_per_s)
        suffix = spb.Frame(seq=seq, subscription_id=sub.id if seq == 1 else "").SerializeToString()
        if out.produced_at > 0:
            _SEND_LAG[out.kind].observe(max(0.0, self._wall() - out.produced_at))
        return out.data + suffix

    def record_write(self, sub: Subscriber, nbytes: int, seconds: float, kind: str) -> None:
        """A frame took ``seconds`` to write: feed pacing and the stats."""
        sub.pacer.record(nbytes, seconds)
        sub.frames_sent += 1
        sub.bytes_sent += nbytes
        _SENT[kind].inc()
        _SENT_BYTES[kind].inc(nbytes)
        if kind == "view":
            sub.views_sent += 1
            sub.view_bytes = nbytes
            now = self._clock()
            # A quarter early: the trainer builds views on its own clock at the same
            # max_fps, and a view landing just before 1 / max_fps was up waited for the
            # next tick (a beat between two 100 ms clocks: ~half the views, up to 25 ms).
            spacing = 0.75 / sub.max_fps
            if not sub.window.has_feedback(now):  # acks pace it better than blocking writes
                spacing = max(spacing, sub.pacer.spacing_s(nbytes))
            sub.next_view_at = now - seconds + spacing

    async def frames(self, sub: Subscriber) -> AsyncIterator[Outgoing]:
        """The subscriber's stream: snapshot, then what the ticker lets through."""
        for out in self._snapshot(sub):
            yield out
        while not sub.closed:
            await sub.wake.wait()
            sub.wake.clear()
            if sub.closed:
                return
            for out in self.due_frames(sub):
                yield out


_KINDS = ("status", "scalars", "view")
_SENT = {kind: metrics.FRAMES_SENT.labels(kind) for kind in _KINDS}
_SENT_BYTES = {kind: metrics.SENT_BYTES.labels(kind) for kind in _KINDS}
_VIEWS_SKIPPED = metrics.FRAMES_SKIPPED.labels("view")
_HELD_ACKED = metrics.HEAVY_HELD.labels("acked")
_HELD_CAP = metrics.HEAVY_HELD.labels("cap")
_SEND_LAG = {kind: metrics.SEND_LAG.labels(kind) for kind in _KINDS}
_ACK_LAG = {kind: metrics.ACK_LAG.labels(kind) for kind in _KINDS}
_ACKS = {outcome: metrics.ACKS.labels(outcome.value) for outcome in AckOutcome}
