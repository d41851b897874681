"""Backoff and Periodic: the one retry delay and the one owned loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from tensorwire.calls.backoff import Backoff
from tensorwire.calls.periodic import Periodic
from tensorwire.errors import InvalidArgumentError
from tests.support.clock import FakeClock


def test_backoff_grows_caps_and_jitters() -> None:
    b = Backoff(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.2)
    mid = [b.delay_s(n, uniform=lambda lo, hi: (lo + hi) / 2) for n in (1, 2, 3, 4, 5, 1000)]
    assert mid == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    low = b.delay_s(3, uniform=lambda lo, hi: lo)
    high = b.delay_s(3, uniform=lambda lo, hi: hi)
    assert low == pytest.approx(0.32) and high == pytest.approx(0.48)
    assert 0.08 <= b.delay_s(1) <= 0.12


@pytest.mark.parametrize("kwargs", [{"initial_s": -1}, {"initial_s": 2, "max_s": 1},
                                    {"multiplier": 0.5}, {"jitter": 1.0}])
def test_backoff_rejects_bad_knobs_with_the_value(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidArgumentError, match=str(next(iter(kwargs.values())))):
        Backoff(**kwargs)


async def _until(predicate: Callable[[], bool], turns: int = 1000) -> None:
    """Yield to the loop until ``predicate`` holds (the fake clock makes every wait a turn)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not met")


async def test_periodic_runs_survives_failures_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    clock = FakeClock()

    async def tick() -> None:
        calls.append(len(calls))
        if len(calls) in (2, 3):
            raise RuntimeError("flaky")

    loop = Periodic(tick, 0.5, name="test loop", immediately=True, sleep=clock.sleep)
    with caplog.at_level(logging.INFO):
        loop.start()
        await _until(lambda: len(calls) >= 5)
        await loop.aclose()
    assert not loop.running
    assert loop.failures == 2
    assert set(clock.slept) == {0.5}  # without a backoff a failure waits the interval too
    # One traceback for the streak of two failures, one line when it works again.
    assert sum("failed" in r.message for r in caplog.records) == 1
    assert any("works again after 2" in r.message for r in caplog.records)
    count = len(calls)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(calls) == count  # nothing runs after aclose


async def test_periodic_waits_one_interval_before_the_first_call() -> None:
    clock = FakeClock()
    seen: list[float] = []

    async def tick() -> None:
        seen.append(clock())

    loop = Periodic(tick, 7.0, name="t", sleep=clock.sleep).start()
    await _until(lambda: len(seen) >= 2)
    await loop.aclose()
    assert seen[:2] == [1007.0, 1014.0]


async def test_periodic_waits_by_backoff_after_failures() -> None:
    clock = FakeClock()
    results = iter([ValueError("down")] * 4 + [None] * 10)

    async def flaky() -> None:
        error = next(results)
        if error is not None:
            raise error

    loop = Periodic(flaky, 60.0, name="t", immediately=True, quiet=(ValueError,), sleep=clock.sleep,
                    backoff=Backoff(0.001, 0.004, jitter=0.0)).start()
    await _until(lambda: loop.calls >= 6)
    await loop.aclose()
    # Four failures wait by the backoff (growing, capped); a success waits the interval again.
    assert clock.slept[:6] == [0.001, 0.002, 0.004, 0.004, 60.0, 60.0]
    assert loop.failures == 4


def test_periodic_rejects_a_zero_interval() -> None:
    with pytest.raises(InvalidArgumentError, match="interval_s"):
        Periodic(lambda: asyncio.sleep(0), 0, name="x")
