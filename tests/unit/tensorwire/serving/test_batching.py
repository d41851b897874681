"""The request batcher: seed 002's twelve named batcher tests, plus config checks.

No gRPC, no sleeps: the batch functions gate on threading events where a test
needs a batch to be in flight, and every wait is on a future with a deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tensorwire.errors import DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError
from tensorwire.serving.batching import BatchConfig, Batcher
from tests.support.clock import FakeClock


class Recorder:
    """A batch function that doubles its items and remembers every batch.

    With ``gate`` set, each call waits for the gate (so a test can hold a batch
    in flight while more requests queue)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        return [i * 2 for i in items]


async def _wait_thread_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


async def test_batch_accumulation() -> None:
    """Requests arriving while a batch runs accumulate into the next batch."""
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, BatchConfig(max_batch_size=32))
    first = asyncio.ensure_future(batcher.submit(0))
    await _wait_thread_event(fn.entered)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 11)]
    await asyncio.sleep(0)
    assert batcher.queue_depth == 10
    gate.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [i * 2 for i in range(1, 11)]
    assert fn.batches == [[0], list(range(1, 11))]
    await batcher.aclose()


async def test_timeout_dispatch() -> None:
    """An incomplete batch goes when the first item's queue delay runs out."""
    fn = Recorder()
    batcher = Batcher(fn, BatchConfig(max_batch_size=8, max_queue_delay_s=0.05))
    start = time.monotonic()
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)))
    elapsed = time.monotonic() - start
    assert results == [0, 2, 4]
    assert fn.batches == [[0, 1, 2]]
    assert 0.045 <= elapsed < 2.0
    m = batcher.metrics
    assert (m.timeout_dispatches, m.size_dispatches) == (1, 0)
    await batcher.aclose()


async def test_size_dispatch() -> None:
    """A full batch goes at once, without waiting out a long queue delay."""
    fn = Recorder()
    batcher = Batcher(fn, BatchConfig(max_batch_size=4, max_queue_delay_s=30.0))
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(8))), 5)
    assert results == [i * 2 for i in range(8)]
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batcher.metrics.size_dispatches == 2
    await batcher.aclose()


async def test_preferred_size_dispatch() -> None:
    """The queue filling a preferred size dispatches it before the delay."""
    fn = Recorder()
    batcher = Batcher(fn, BatchConfig(max_batch_size=16, max_queue_delay_s=30.0, preferred_batch_sizes=(2, 4)))
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(4))), 5)
    assert results == [0, 2, 4, 6]
    assert fn.batches == [[0, 1, 2, 3]]
    await batcher.aclose()


async def test_order_preservation() -> None:
    """Items keep submission order inside batches; each caller gets its own result."""
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, BatchConfig(max_batch_size=7))
    futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(50)]
    await _wait_thread_event(fn.entered)
    gate.set()
    assert await asyncio.gather(*futures) == [i * 2 for i in range(50)]
    flat = [i for batch in fn.batches for i in batch]
    assert flat == list(range(50))
    assert max(len(b) for b in fn.batches) <= 7
    await batcher.aclose()


async def test_error_propagation() -> None:
    """One bad item fails only its own caller; the others of its batch succeed."""

    def fn(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("13 is unlucky")
        return [i + 1 for i in items]

    batcher = Batcher(fn, BatchConfig(max_batch_size=8, max_queue_delay_s=0.01))
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10, 16)), return_exceptions=True)
    assert [r for r in results if not isinstance(r, Exception)] == [11, 12, 13, 15, 16]
    (error,) = [r for r in results if isinstance(r, Exception)]
    assert isinstance(error, ValueError) and "unlucky" in str(error)
    m = batcher.metrics
    assert m.failed == 1 and m.split_batches == 1

    # A function may also fail one item by returning an exception in its place.
    per_item = Batcher(lambda xs: [KeyError(x) if x < 0 else x for x in xs], BatchConfig(max_batch_size=4))
    good, bad = await asyncio.gather(per_item.submit(1), per_item.submit(-1), return_exceptions=True)
    assert good == 1 and isinstance(bad, KeyError)

    # A wrong number of results is a bug of the function: every caller hears of it.
    wrong = Batcher(lambda xs: xs[:-1], BatchConfig(max_batch_size=4, max_queue_delay_s=0.01))
    outcomes = await asyncio.gather(*(wrong.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and "2 results for 3 items" in str(o) for o in outcomes)
    for b in (batcher, per_item, wrong):
        await b.aclose()


async def test_adaptive_sizing() -> None:
    """The limit grows while batches are fast and shrinks when they get slow (a slow
    batch moves the batcher's clock by 30 ms, against a 20 ms target)."""
    slow = threading.Event()
    clock = FakeClock()

    def fn(items: list[int]) -> list[int]:
        if slow.is_set():
            clock.advance(0.03)
        return items

    config = BatchConfig(max_batch_size=64, adaptive=True, target_latency_s=0.02, min_batch_size=2,
                         initial_batch_size=4)
    gate = threading.Event()
    entered = threading.Event()

    def gated(items: list[int]) -> list[int]:
        entered.set()
        assert gate.wait(10)
        return fn(items)

    batcher = Batcher(gated, config, clock=clock)
    assert batcher.batch_size_limit == 4
    for _ in range(6):  # full, fast batches: grow
        entered.clear()
        gate.clear()
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(batcher.batch_size_limit + 1)]
        await _wait_thread_event(entered)
        gate.set()
        await asyncio.gather(*futures)
    grown = batcher.batch_size_limit
    assert grown > 8
    slow.set()
    gate.set()
    for _ in range(4):  # slow batches: shrink
        await asyncio.gather(*(batcher.submit(i) for i in range(3)))
    assert batcher.batch_size_limit < grown
    assert batcher.batch_size_limit >= 2
    await batcher.aclose()


async def test_metrics_accuracy() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, BatchConfig(max_batch_size=4))
    first = asyncio.ensure_future(batcher.submit(0))
    await _wait_thread_event(fn.entered)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 10)]
    gate.set()
    await asyncio.gather(first, *rest)
    m = batcher.metrics
    sizes = [len(b) for b in fn.batches]
    assert sizes == [1, 4, 4, 1]
    assert m.batches == 4 and m.requests == 10
    assert m.average_batch_size == pytest.approx(2.5)
    assert m.size_dispatches == 2 and m.timeout_dispatches == 2
    assert m.size_counts == {1: 2, 4: 2}
    assert m.max_batch_size_seen == 4
    assert m.efficiency == pytest.approx((0.25 + 1 + 1 + 0.25) / 4)
    assert m.batch_time_s > 0 and m.queue_time_s > 0
    # The distributions, as histograms (le buckets, cumulative): sizes 1, 4, 4, 1.
    assert dict(m.batch_sizes.cumulative())["1.0"] == 2 and dict(m.batch_sizes.cumulative())["4.0"] == 4
    assert m.batch_sizes.sum == 10 and m.batch_sizes.count == 4
    assert m.queue_waits.count == 10 and m.queue_waits.sum == pytest.approx(m.queue_time_s)
    assert "4 batches, 10 requests" in repr(batcher)
    await batcher.aclose()


async def test_concurrent_batching() -> None:
    """Two batches may run at once when configured; results stay with their callers."""
    both = threading.Barrier(2, timeout=10)

    def fn(items: list[int]) -> list[int]:
        both.wait()  # only returns when two batches are in flight together
        return [-i for i in items]

    batcher = Batcher(fn, BatchConfig(max_batch_size=3, max_concurrent_batches=2))
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(6))), 10)
    assert results == [-i for i in range(6)]
    await batcher.aclose()


async def test_edge_case_single_request() -> None:
    fn = Recorder()
    batcher = Batcher(fn, BatchConfig(max_batch_size=64))
    assert await batcher.submit(21) == 42
    assert fn.batches == [[21]]
    assert batcher.metrics.timeout_dispatches == 1
    await batcher.aclose()


async def test_edge_case_batch_full() -> None:
    """A full queue answers ResourceExhaustedError; cancelled and expired items never run."""
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, BatchConfig(max_batch_size=2, max_queue_size=3))
    running = asyncio.ensure_future(batcher.submit(0))
    await _wait_thread_event(fn.entered)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    expiring = asyncio.ensure_future(batcher.submit(3, timeout_s=0.01))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhaustedError, match="queue is full"):
        await batcher.submit(4)
    queued[0].cancel()
    with pytest.raises(DeadlineExceededError):
        await expiring
    gate.set()
    assert await running == 0
    assert await queued[1] == 4
    ran = [i for b in fn.batches for i in b]
    assert ran == [0, 2]
    m = batcher.metrics
    assert m.rejected == 1 and m.dropped_cancelled == 1 and m.dropped_expired == 1
    await batcher.aclose()


async def test_stress_rapid_requests() -> None:
    """5,000 requests from 200 concurrent callers: all answered, in order, batched."""
    fn = Recorder()
    batcher = Batcher(fn, BatchConfig(max_batch_size=64, max_queue_size=10_000))

    async def caller(base: int) -> list[int]:
        return [await batcher.submit(base + i) for i in range(25)]

    results = await asyncio.wait_for(asyncio.gather(*(caller(c * 1000) for c in range(200))), 60)
    for c, values in enumerate(results):
        assert values == [(c * 1000 + i) * 2 for i in range(25)]
    m = batcher.metrics
    assert m.requests == 5000
    assert m.average_batch_size > 4  # callers overlapped, so batches formed
    await batcher.aclose()


async def test_stress_batch_explosion() -> None:
    """A burst far beyond the batch size is cut into full batches, never larger."""
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = Batcher(fn, BatchConfig(max_batch_size=16, max_queue_size=20_000))
    first = asyncio.ensure_future(batcher.submit(-1))
    await _wait_thread_event(fn.entered)
    burst = [asyncio.ensure_future(batcher.submit(i)) for i in range(10_000)]
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*burst), 60) == [i * 2 for i in range(10_000)]
    await first
    sizes = [len(b) for b in fn.batches[1:]]
    assert max(sizes) == 16 and sum(sizes) == 10_000
    assert sizes.count(16) == 625
    await batcher.aclose()


def test_config_is_validated() -> None:
    with pytest.raises(InvalidArgumentError, match="max_batch_size.*0"):
        BatchConfig(max_batch_size=0)
    with pytest.raises(InvalidArgumentError, match="preferred_batch_sizes.*9"):
        BatchConfig(max_batch_size=8, preferred_batch_sizes=(9,))
    with pytest.raises(InvalidArgumentError, match="max_queue_delay_s"):
        BatchConfig(max_queue_delay_s=-1)
