"""A generic request batcher: many concurrent callers, one batched call.

Callers ``await batcher.submit(item)``; a collector task groups queued items
into batches and runs ``batch_fn(items) -> results`` (one result per item, same
order) in an executor thread, so the event loop never runs the batched work.

Dispatch rules (the ray-serve model, with Triton's knobs):

- the collector waits for the first item, then up to ``max_queue_delay_s``
  *from that item's arrival* for more; a batch goes as soon as it reaches the
  current size limit ("size dispatch"), else when the delay runs out ("timeout
  dispatch"); it always holds at least one item;
- with ``preferred_batch_sizes``, a batch goes at once when the queue can fill
  the largest preferred size that fits the limit;
- at most ``max_concurrent_batches`` batches run at once; while they run, new
  items queue and are topped up into the next batch, so load batches itself
  without any delay;
- items keep their submission order inside a batch and results go back to
  their own callers; a caller that was cancelled, or whose deadline passed, is
  dropped before its batch runs;
- if the batched call raises, each item of that batch is retried on its own, so
  one bad request fails only itself (``batch_fn`` may also return an Exception
  instance in place of a result to fail one item);
- the queue is bounded: ``submit`` on a full queue raises
  :class:`~tensorwire.errors.ResourceExhaustedError`;
- adaptive sizing (optional): after each batch the size limit grows (x1.25)
  while the batch's latency stays within ``target_latency_s`` and shrinks (x0.8)
  when it exceeds it, between ``min_batch_size`` and ``max_batch_size``.

:class:`BatchMetrics` counts batches, requests, size and timeout dispatches,
dropped, rejected and failed requests; average batch size and efficiency (mean
fill of each batch relative to the limit in force when it was cut).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tensorwire.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorwire.rpc.histogram import BATCH_SIZE_BUCKETS, QUEUE_WAIT_BUCKETS, Histogram

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchConfig:
    """How a :class:`Batcher` forms and runs batches."""

    max_batch_size: int = 64
    """Largest batch handed to the batch function (>= 1)."""
    max_queue_delay_s: float = 0.0
    """How long the first item of a batch may wait for company; 0 = no waiting."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Sizes dispatched at once when the queue can fill them (each <= max_batch_size)."""
    max_queue_size: int = 4096
    """Queued (not yet running) items beyond which submit raises ResourceExhaustedError."""
    max_concurrent_batches: int = 1
    """Batches that may run at once in the executor."""
    adaptive: bool = False
    """Tune the size limit from measured batch latency."""
    target_latency_s: float = 0.010
    """Adaptive sizing grows the limit while a batch takes at most this long."""
    min_batch_size: int = 1
    """Adaptive sizing never shrinks the limit below this."""
    initial_batch_size: int | None = None
    """Adaptive sizing's starting limit; None = max_batch_size."""

    def __post_init__(self) -> None:
        def bad(what: str, value: Any) -> InvalidArgumentError:
            return InvalidArgumentError(f"BatchConfig.{what} got {value!r}")

        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise bad("max_batch_size must be an int >= 1;", self.max_batch_size)
        if not self.max_queue_delay_s >= 0 or math.isinf(self.max_queue_delay_s):
            raise bad("max_queue_delay_s must be a finite number >= 0;", self.max_queue_delay_s)
        for size in self.preferred_batch_sizes:
            if not isinstance(size, int) or not 1 <= size <= self.max_batch_size:
                raise bad(
                    f"preferred_batch_sizes entries must be ints in 1..{self.max_batch_size};", size
                )
        if self.max_queue_size < 1:
            raise bad("max_queue_size must be >= 1;", self.max_queue_size)
        if self.max_concurrent_batches < 1:
            raise bad("max_concurrent_batches must be >= 1;", self.max_concurrent_batches)
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise bad(f"min_batch_size must be in 1..{self.max_batch_size};", self.min_batch_size)
        if self.initial_batch_size is not None and not (
            self.min_batch_size <= self.initial_batch_size <= self.max_batch_size
        ):
            raise bad("initial_batch_size must be within min..max batch size;", self.initial_batch_size)
        if not self.target_latency_s > 0:
            raise bad("target_latency_s must be > 0;", self.target_latency_s)


@dataclass
class BatchMetrics:
    """Counters of one batcher (a snapshot is a copy)."""

    batches: int = 0
    requests: int = 0
    """Items that ran in a batch."""
    size_dispatches: int = 0
    timeout_dispatches: int = 0
    dropped_cancelled: int = 0
    dropped_expired: int = 0
    rejected: int = 0
    """submit() calls refused because the queue was full."""
    failed: int = 0
    """Items that ended with an exception from the batch function."""
    split_batches: int = 0
    """Batches whose call raised and were retried item by item."""
    max_batch_size_seen: int = 0
    fill_sum: float = 0.0
    batch_time_s: float = 0.0
    """Total seconds spent in the batch function."""
    queue_time_s: float = 0.0
    """Total seconds items waited between submit and their batch starting."""
    size_counts: dict[int, int] = field(default_factory=dict)
    """How many batches had each size."""
    batch_sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    """Requests per batch."""
    queue_waits: Histogram = field(default_factory=lambda: Histogram(QUEUE_WAIT_BUCKETS))
    """Seconds each item waited between submit and its batch starting."""

    @property
    def average_batch_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0

    @property
    def efficiency(self) -> float:
        """Mean fill of a batch relative to the size limit when it was cut (0..1)."""
        return self.fill_sum / self.batches if self.batches else 0.0


class BatchResultError(RuntimeError):
    """The batch function returned a wrong number of results (a bug in it)."""


class _Item(Generic[T]):
    __slots__ = ("deadline", "enqueued", "future", "value")

    def __init__(self, value: T, future: asyncio.Future, enqueued: float, deadline: float | None) -> None:
        self.value = value
        self.future = future
        self.enqueued = enqueued
        self.deadline = deadline


class Batcher(Generic[T, R]):
    """Groups concurrent ``submit`` calls into calls of ``batch_fn``.

    ``batch_fn`` is synchronous and runs in ``executor`` (a thread pool of its
    own when None); it receives a list of items and returns a sequence of as many
    results. ``clock`` is injectable for tests (it must agree with the event
    loop's notion of time passing; the default is ``time.monotonic``).
    """

    def __init__(
        self,
        batch_fn: Callable[[list[T]], Sequence[R | BaseException]],
        config: BatchConfig | None = None,
        *,
        name: str = "batcher",
        executor: concurrent.futures.Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or BatchConfig()
        self.name = name
        self._fn = batch_fn
        self._clock = clock
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.max_concurrent_batches, thread_name_prefix=f"batch-{name}"
        )
        self._queue: collections.deque[_Item[T]] = collections.deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_concurrent_batches)
        self._running: set[asyncio.Task[None]] = set()
        self._limit = float(self.config.initial_batch_size or self.config.max_batch_size)
        self._metrics = BatchMetrics()
        self._closed = False
        self._collector: asyncio.Task[None] | None = None

    # -- public -------------------------------------------------------------

    @property
    def metrics(self) -> BatchMetrics:
        m = self._metrics
        return BatchMetrics(**{**m.__dict__, "size_counts": dict(m.size_counts),
                               "batch_sizes": m.batch_sizes.copy(), "queue_waits": m.queue_waits.copy()})

    @property
    def batch_size_limit(self) -> int:
        """The size limit in force now (moves only with adaptive sizing)."""
        return int(self._limit)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def __repr__(self) -> str:
        m = self._metrics
        return (
            f"<Batcher {self.name}: {len(self._queue)} queued, {len(self._running)} running, "
            f"limit {self.batch_size_limit} | {m.batches} batches, {m.requests} requests, "
            f"avg {m.average_batch_size:.1f}>"
        )

    async def submit(self, item: T, *, timeout_s: float | None = None) -> R:
        """Queue ``item`` and wait for its result.

        ``timeout_s`` is the caller's deadline: an item still queued when it
        passes is dropped and DeadlineExceededError raised.
        """
        if self._closed:
            raise UnavailableError(f"{self.name} is shutting down")
        if len(self._queue) >= self.config.max_queue_size:
            self._metrics.rejected += 1
            raise ResourceExhaustedError(
                f"{self.name}: request queue is full ({self.config.max_queue_size} waiting); retry later"
            )
        if self._collector is None:
            self._collector = asyncio.get_running_loop().create_task(
                self._collect(), name=f"batcher-{self.name}"
            )
        now = self._clock()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        deadline = None if timeout_s is None else now + timeout_s
        self._queue.append(_Item(item, future, now, deadline))
        self._arrived.set()
        if timeout_s is None:
            return await future
        # A timer, not wait_for: no extra task per request on the hot path.
        timer = loop.call_later(timeout_s, self._expire, future, timeout_s)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future, timeout_s: float) -> None:
        if not future.done():
            future.set_exception(
                DeadlineExceededError(f"{self.name}: no result within the deadline of {timeout_s:.3f}s")
            )

    async def aclose(self) -> None:
        """Stop taking items, let running batches finish, fail what is still queued."""
        self._closed = True
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(UnavailableError(f"{self.name} closed before this request ran"))
        if self._own_executor:
            self._executor.shutdown(wait=True)

    def record_external(self, size: int, elapsed_s: float, waits_s: Sequence[float], by_size: bool) -> None:
        """Count a batch that another batcher with this one's config formed and ran
        (the native inference frontend's), so the metrics cover every request;
        ``waits_s``: each request's time in the queue."""
        m = self._metrics
        if by_size:
            m.size_dispatches += 1
        else:
            m.timeout_dispatches += 1
        m.fill_sum += min(1.0, size / max(1, self.batch_size_limit))
        m.queue_time_s += float(sum(waits_s))
        m.queue_waits.observe_all(waits_s)
        self._record(size, elapsed_s)

    def record_dropped(self, cancelled: int, expired: int, rejected: int = 0) -> None:
        """Count items that another batcher with this one's config dropped from its
        queue before their batch ran (the native inference frontend's): cancelled, or
        past their deadline, as ``_take`` counts its own; and those it refused while
        its queue was full, as :meth:`submit` counts its own."""
        self._metrics.dropped_cancelled += cancelled
        self._metrics.dropped_expired += expired
        self._metrics.rejected += rejected

    # -- collector ----------------------------------------------------------

    def _target(self) -> tuple[int, bool]:
        """(size to cut at once, 0 = not yet; whether that is a size dispatch)."""
        limit = self.batch_size_limit
        depth = len(self._queue)
        if depth >= limit:
            return limit, True
        preferred = [p for p in self.config.preferred_batch_sizes if p <= limit]
        if preferred and depth >= max(preferred):
            return max(preferred), True
        return 0, False

    async def _collect(self) -> None:
        delay = self.config.max_queue_delay_s
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if delay > 0:
                cut_at = self._queue[0].enqueued + delay
                while self._target()[0] == 0:
                    remaining = cut_at - self._clock()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), remaining)
            await self._slots.acquire()
            size, by_size = self._target()
            if size == 0:
                size = self.batch_size_limit
            batch = self._take(size)
            if not batch:
                self._slots.release()
                continue
            m = self._metrics
            if by_size or len(batch) >= self.batch_size_limit:
                m.size_dispatches += 1
            else:
                m.timeout_dispatches += 1
            m.fill_sum += min(1.0, len(batch) / max(1, self.batch_size_limit))
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self, size: int) -> list[_Item[T]]:
        """Pop up to ``size`` live items, dropping cancelled and expired ones."""
        batch: list[_Item[T]] = []
        now = self._clock()
        m = self._metrics
        while self._queue and len(batch) < size:
            item = self._queue.popleft()
            if item.future.done():
                if item.deadline is not None and now >= item.deadline:
                    m.dropped_expired += 1
                else:
                    m.dropped_cancelled += 1
                continue
            if item.deadline is not None and now >= item.deadline:
                m.dropped_expired += 1
                item.future.set_exception(
                    DeadlineExceededError(f"{self.name}: deadline passed while queued")
                )
                continue
            m.queue_time_s += now - item.enqueued
            m.queue_waits.observe(now - item.enqueued)
            batch.append(item)
        return batch

    async def _execute(self, batch: list[_Item[T]]) -> None:
        loop = asyncio.get_running_loop()
        values = [item.value for item in batch]
        start = self._clock()
        try:
            try:
                results = await loop.run_in_executor(self._executor, self._fn, values)
                if len(results) != len(batch):
                    raise BatchResultError(
                        f"{self.name}: batch function returned {len(results)} results "
                        f"for {len(batch)} items"
                    )
            except Exception as exc:
                if len(batch) == 1 or isinstance(exc, BatchResultError):
                    results = [exc] * len(batch)
                else:
                    self._metrics.split_batches += 1
                    results = [await self._run_one(loop, value) for value in values]
            elapsed = self._clock() - start
            self._record(len(batch), elapsed)
            for item, result in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    self._metrics.failed += 1
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        finally:
            self._slots.release()

    async def _run_one(self, loop: asyncio.AbstractEventLoop, value: T) -> R | BaseException:
        try:
            (result,) = await loop.run_in_executor(self._executor, self._fn, [value])
            return result
        except Exception as exc:
            return exc

    def _record(self, size: int, elapsed_s: float) -> None:
        m = self._metrics
        m.batches += 1
        m.requests += size
        m.batch_time_s += elapsed_s
        m.max_batch_size_seen = max(m.max_batch_size_seen, size)
        m.size_counts[size] = m.size_counts.get(size, 0) + 1
        m.batch_sizes.observe(size)
        cfg = self.config
        if not cfg.adaptive:
            return
        if elapsed_s <= cfg.target_latency_s:
            if size >= self.batch_size_limit:  # only grow when the limit was actually reached
                self._limit = min(float(cfg.max_batch_size), max(self._limit * 1.25, self._limit + 1))
        else:
            self._limit = max(float(cfg.min_batch_size), self._limit * 0.8)
