"""An async model loader: background loads, a few at once, by priority.

``AsyncModelLoader(load_fn)`` loads models by key (for inference: ``(name,
version)``) with a synchronous ``load_fn(key) -> model`` that runs in a worker
thread, so serving never pauses while a model loads:

- ``load_async(key, priority, callback)`` queues a load and returns a future at
  once; ``await load(key)`` waits for it; a key already loaded, queued or loading
  is never loaded twice (the same future comes back);
- at most ``max_concurrent_loads`` loads run at once; the queue is ordered by
  priority (higher first), then by arrival;
- a load that takes longer than ``load_timeout_s`` fails with
  DeadlineExceededError naming the key and the limit, and is cancelled: a thread
  cannot be killed, so its cancellation flag is set, ``check_cancelled()`` (which a
  ``load_fn`` calls between its stages) raises from then on, and whatever it still
  returns is dropped at once, never cached (its memory is freed when the thread
  lets go of it);
- ``load_async`` refuses a load when ``max_queue_size`` loads are queued
  (RESOURCE_EXHAUSTED, for callers that would rather fail than wait); ``enqueue``
  waits for room instead (the repository's scans and loads: no load is ever
  dropped by a full queue);
- loaded models stay in a cache (``get``, ``evict``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tensorwire.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from tensorwire.rpc.histogram import LOAD_TIME_BUCKETS, Histogram

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
M = TypeVar("M")

_local = threading.local()


def check_cancelled() -> None:
    """In a ``load_fn``: raise DeadlineExceededError if this load was cancelled (timed
    out), so the thread stops building a model nobody will use. A no-op elsewhere."""
    token = getattr(_local, "token", None)
    if token is not None and token.is_set():
        raise DeadlineExceededError("the load was cancelled (it ran past its timeout)")


def _cancellable(load_fn: Callable[[K], M], key: K, token: threading.Event) -> M | None:
    """Run ``load_fn(key)`` in this thread with ``token`` as its cancellation flag; a
    result that comes back after cancellation is dropped here, not handed on."""
    _local.token = token
    try:
        model = load_fn(key)
    except Exception:
        if token.is_set():  # it stopped at a check (or failed) after timing out: nobody
            return None  # waits for the error, and its traceback would hold the half-built model
        raise
    finally:
        _local.token = None
    if token.is_set():
        del model  # the load timed out: nobody holds it past this line
        return None
    return model


@dataclass(frozen=True)
class LoaderConfig:
    """Limits of an :class:`AsyncModelLoader`."""

    max_concurrent_loads: int = 3
    """Loads that may run at the same time."""
    load_timeout_s: float = 30.0
    """A load running longer fails with DeadlineExceededError."""
    max_queue_size: int = 256
    """Queued loads beyond which load_async raises ResourceExhaustedError."""

    def __post_init__(self) -> None:
        for name in ("max_concurrent_loads", "max_queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"LoaderConfig.{name} must be an int >= 1, got {value!r}")
        if not self.load_timeout_s > 0:
            raise InvalidArgumentError(f"LoaderConfig.load_timeout_s must be > 0, got {self.load_timeout_s!r}")


@dataclass
class LoaderMetrics:
    loads: int = 0
    """Loads started."""
    successes: int = 0
    failures: int = 0
    timeouts: int = 0
    total_load_time_s: float = 0.0
    load_times: Histogram = field(default_factory=lambda: Histogram(LOAD_TIME_BUCKETS))
    """Seconds each finished load took (success or failure)."""
    queue_depth: int = 0
    loading: int = 0

    @property
    def average_load_time_s(self) -> float:
        done = self.successes + self.failures
        return self.total_load_time_s / done if done else 0.0


class AsyncModelLoader(Generic[K, M]):
    """Loads models in background threads; see the module docstring."""

    def __init__(
        self,
        load_fn: Callable[[K], M],
        config: LoaderConfig | None = None,
        *,
        name: str = "loader",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or LoaderConfig()
        self.name = name
        self._load_fn = load_fn
        self._clock = clock
        # Spare threads: a timed-out load keeps its thread until it returns.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.max_concurrent_loads * 2, thread_name_prefix=f"load-{name}"
        )
        self._heap: list[tuple[int, int, K]] = []
        self._order = itertools.count()
        self._pending: dict[K, asyncio.Future[M]] = {}
        self._callbacks: dict[K, list[Callable[[BaseException | None], Any]]] = {}
        self._cache: dict[K, M] = {}
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        """Set when a queued load was taken off the queue (``enqueue`` waits on it)."""
        self.abandoned = 0
        """Timed-out loads whose thread is still running (it stops at its next check)."""
        self._workers: list[asyncio.Task[None]] = []
        self._metrics = LoaderMetrics()
        self._closed = False

    def __repr__(self) -> str:
        m = self._metrics
        return (
            f"<AsyncModelLoader {self.name}: {len(self._heap)} queued, {m.loading} loading, "
            f"{len(self._cache)} loaded | {m.successes} ok, {m.failures} failed>"
        )

    @property
    def metrics(self) -> LoaderMetrics:
        m = LoaderMetrics(**{**self._metrics.__dict__, "load_times": self._metrics.load_times.copy()})
        m.queue_depth = len(self._heap)
        return m

    # -- cache ----------------------------------------------------------------

    def get(self, key: K) -> M | None:
        return self._cache.get(key)

    def loaded(self) -> list[K]:
        return list(self._cache)

    def is_loading(self, key: K) -> bool:
        return key in self._pending

    def evict(self, key: K) -> M | None:
        """Forget a loaded model (the caller releases it); returns it if it was loaded."""
        return self._cache.pop(key, None)

    # -- loading --------------------------------------------------------------

    def load_async(
        self,
        key: K,
        priority: int = 0,
        callback: Callable[[BaseException | None], Any] | None = None,
    ) -> asyncio.Future[M]:
        """Queue a load (unless loaded or under way) and return its future at once.

        ``callback(error_or_None)`` runs on the event loop when the load ends.
        """
        if self._closed:
            raise UnavailableError(f"{self.name} is shutting down")
        loop = asyncio.get_running_loop()
        if key in self._cache:
            future: asyncio.Future[M] = loop.create_future()
            future.set_result(self._cache[key])
            if callback is not None:
                loop.call_soon(callback, None)
            return future
        if key in self._pending:
            if callback is not None:
                self._callbacks.setdefault(key, []).append(callback)
            return self._pending[key]
        if len(self._heap) >= self.config.max_queue_size:
            raise ResourceExhaustedError(
                f"{self.name}: {len(self._heap)} loads already queued (limit {self.config.max_queue_size})"
            )
        self._ensure_workers()
        future = loop.create_future()
        # Nobody may await a failed background load; do not warn about it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending[key] = future
        if callback is not None:
            self._callbacks.setdefault(key, []).append(callback)
        heapq.heappush(self._heap, (-priority, next(self._order), key))
        self._wakeup.set()
        return future

    async def enqueue(
        self,
        key: K,
        priority: int = 0,
        callback: Callable[[BaseException | None], Any] | None = None,
    ) -> asyncio.Future[M]:
        """Like ``load_async``, but a full queue makes it wait for room instead of raising."""
        while len(self._heap) >= self.config.max_queue_size and key not in self._pending and key not in self._cache:
            self._room.clear()
            await self._room.wait()
        return self.load_async(key, priority, callback)

    async def load(self, key: K, priority: int = 0) -> M:
        """Load ``key`` (or join its load under way) and return the model."""
        return await asyncio.shield(self.load_async(key, priority))

    def _ensure_workers(self) -> None:
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [
                loop.create_task(self._work(), name=f"{self.name}-worker-{i}")
                for i in range(self.config.max_concurrent_loads)
            ]

    async def _work(self) -> None:
        while True:
            while not self._heap:
                self._wakeup.clear()
                await self._wakeup.wait()
            _, _, key = heapq.heappop(self._heap)
            self._room.set()
            await self._run(key)

    async def _run(self, key: K) -> None:
        loop = asyncio.get_running_loop()
        m = self._metrics
        m.loads += 1
        m.loading += 1
        start = self._clock()
        error: BaseException | None = None
        model: Any = None
        token = threading.Event()
        thread = loop.run_in_executor(self._executor, _cancellable, self._load_fn, key, token)
        thread.add_done_callback(lambda f: f.cancelled() or f.exception())  # abandoned: retrieved here
        try:
            model = await asyncio.wait_for(asyncio.shield(thread), self.config.load_timeout_s)
        except TimeoutError:
            token.set()  # the thread stops at its next check; its result is dropped
            self.abandoned += 1
            thread.add_done_callback(self._thread_ended)
            m.timeouts += 1
            error = DeadlineExceededError(
                f"loading {key!r} took longer than the load timeout of {self.config.load_timeout_s:g}s"
            )
        except asyncio.CancelledError:
            token.set()
            error = UnavailableError(f"{self.name} closed while loading {key!r}")
            raise
        except Exception as exc:
            error = exc
        finally:
            m.loading -= 1
            elapsed = self._clock() - start
            m.total_load_time_s += elapsed
            m.load_times.observe(elapsed)
            future = self._pending.pop(key, None)
            if error is None:
                m.successes += 1
                self._cache[key] = model
            else:
                m.failures += 1
                log.warning("%s: loading %r failed: %s", self.name, key, error)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(model)
                else:
                    future.set_exception(error)
            for callback in self._callbacks.pop(key, []):
                try:
                    callback(error)
                except Exception:
                    log.exception("%s: load callback for %r failed", self.name, key)

    def _thread_ended(self, thread: asyncio.Future[Any]) -> None:
        self.abandoned -= 1

    async def aclose(self) -> None:
        """Stop the workers, fail queued loads, drop the cache."""
        self._closed = True
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        for key, future in list(self._pending.items()):
            if not future.done():
                future.set_exception(UnavailableError(f"{self.name} closed before {key!r} loaded"))
        self._pending.clear()
        self._heap.clear()
        self._cache.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
