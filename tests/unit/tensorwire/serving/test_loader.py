"""The async model loader: seed 002's ten named loader tests.

Load functions are real functions in worker threads; where a test needs loads
to be in flight it gates them on threading events, never on sleeps.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from tensorwire.errors import DeadlineExceededError, ResourceExhaustedError
from tensorwire.serving.loader import AsyncModelLoader, LoaderConfig


class Gated:
    """load_fn that records the order of loads and can hold them until released."""

    def __init__(self, hold: bool = False) -> None:
        self.order: list[str] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.running = 0
        self.peak = 0
        self.started = threading.Semaphore(0)
        self._lock = threading.Lock()

    def __call__(self, key: str) -> str:
        with self._lock:
            self.order.append(key)
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.started.release()
        try:
            assert self.gate.wait(10), "gate never opened"
            if key.startswith("bad"):
                raise ValueError(f"{key} has corrupt weights")
            return f"model<{key}>"
        finally:
            with self._lock:
                self.running -= 1


async def _started(fn: Gated, n: int) -> None:
    for _ in range(n):
        assert await asyncio.to_thread(fn.started.acquire, True, 10)


async def test_async_load_success() -> None:
    fn = Gated(hold=True)
    loader = AsyncModelLoader(fn)
    called: list[object] = []
    future = loader.load_async("a", callback=called.append)
    assert not future.done()  # returned at once, the load runs in the background
    assert loader.is_loading("a")
    fn.gate.set()
    assert await future == "model<a>"
    assert loader.get("a") == "model<a>"
    await asyncio.sleep(0)
    assert called == [None]
    await loader.aclose()


async def test_async_load_failure() -> None:
    loader = AsyncModelLoader(Gated())
    errors: list[object] = []
    future = loader.load_async("bad-1", callback=errors.append)
    with pytest.raises(ValueError, match="corrupt weights"):
        await future
    assert loader.get("bad-1") is None
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    m = loader.metrics
    assert m.failures == 1 and m.successes == 0
    # A failed key can be loaded again later (nothing stale is cached).
    assert not loader.is_loading("bad-1")
    await loader.aclose()


async def test_priority_handling() -> None:
    fn = Gated(hold=True)
    loader = AsyncModelLoader(fn, LoaderConfig(max_concurrent_loads=1))
    blocker = loader.load_async("blocker")
    await _started(fn, 1)
    futures = [
        loader.load_async("low", priority=-100),
        loader.load_async("normal-1"),
        loader.load_async("urgent", priority=10),
        loader.load_async("normal-2"),
    ]
    fn.gate.set()
    await asyncio.gather(blocker, *futures)
    assert fn.order == ["blocker", "urgent", "normal-1", "normal-2", "low"]
    await loader.aclose()


async def test_metrics_tracking() -> None:
    loader = AsyncModelLoader(Gated(), LoaderConfig(max_concurrent_loads=2))
    await asyncio.gather(loader.load("a"), loader.load("b"))
    with pytest.raises(ValueError):
        await loader.load("bad")
    m = loader.metrics
    assert (m.loads, m.successes, m.failures, m.timeouts) == (3, 2, 1, 0)
    assert m.average_load_time_s > 0
    assert m.load_times.count == 3 and m.load_times.sum == pytest.approx(m.total_load_time_s)
    assert m.loading == 0 and m.queue_depth == 0
    assert "2 ok, 1 failed" in repr(loader)
    await loader.aclose()


class Model:
    """Stands for a model's memory: a weakref tells whether anyone still holds it."""

    def __init__(self) -> None:
        self.weights = bytearray(8 << 20)


async def test_timed_out_load_is_cancelled_and_its_memory_freed() -> None:
    import weakref

    from tensorwire.serving.loader import check_cancelled

    built: list[weakref.ref[Model]] = []
    stopped = threading.Event()
    release = threading.Event()

    def load(key: str) -> Model:
        model = Model()
        built.append(weakref.ref(model))
        try:
            assert release.wait(10), "never released"
            check_cancelled()  # the next stage of a load: raises once it timed out
            return model
        finally:
            stopped.set()

    loader = AsyncModelLoader(load, LoaderConfig(load_timeout_s=0.05))
    with pytest.raises(DeadlineExceededError, match="load timeout of 0.05s"):
        await loader.load("big")
    assert loader.abandoned == 1
    release.set()
    assert await asyncio.to_thread(stopped.wait, 10)
    while loader.abandoned:  # the done callback runs on the loop
        await asyncio.sleep(0.01)
    assert loader.get("big") is None and built and built[0]() is None  # freed, never installed
    await loader.aclose()


async def test_late_result_of_a_timed_out_load_is_dropped_not_cached() -> None:
    import weakref

    built: list[weakref.ref[Model]] = []
    release = threading.Event()

    def load(key: str) -> Model:  # ignores cancellation: returns late
        model = Model()
        built.append(weakref.ref(model))
        assert release.wait(10)
        return model

    loader = AsyncModelLoader(load, LoaderConfig(load_timeout_s=0.05))
    with pytest.raises(DeadlineExceededError):
        await loader.load("late")
    release.set()
    while loader.abandoned:
        await asyncio.sleep(0.01)
    assert loader.get("late") is None and loader.loaded() == []
    assert built[0]() is None
    # A new load of the key runs afresh.
    release.set()
    assert isinstance(await loader.load("late"), Model)
    await loader.aclose()


async def test_enqueue_waits_for_room_instead_of_refusing() -> None:
    fn = Gated(hold=True)
    loader = AsyncModelLoader(fn, LoaderConfig(max_concurrent_loads=1, max_queue_size=2))
    first = loader.load_async("a")
    await _started(fn, 1)
    queued = [loader.load_async("b"), loader.load_async("c")]
    with pytest.raises(ResourceExhaustedError):
        loader.load_async("d")  # the refusing form says so, loudly
    waiting = asyncio.ensure_future(loader.enqueue("d"))
    for _ in range(20):  # it waits on an event, not on time: turns of the loop show it
        await asyncio.sleep(0)
    assert not waiting.done()  # no room yet: waits, is not dropped
    fn.gate.set()
    d = await asyncio.wait_for(waiting, 10)
    assert await asyncio.gather(first, *queued, d) == ["model<a>", "model<b>", "model<c>", "model<d>"]
    await loader.aclose()
