"""Backoff and Periodic: the one retry delay and the one owned loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tensorwire.calls.backoff import Backoff
from tensorwire.calls.periodic import Periodic
from tensorwire.errors import InvalidArgumentError


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


async def test_periodic_runs_survives_failures_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    done = asyncio.Event()

    async def tick() -> None:
        calls.append(len(calls))
        if len(calls) in (2, 3):
            raise RuntimeError("flaky")
        if len(calls) >= 5:
            done.set()

    loop = Periodic(tick, 0.001, name="test loop", immediately=True)
    with caplog.at_level(logging.INFO):
        loop.start()
        await asyncio.wait_for(done.wait(), 5)
        await loop.aclose()
    assert not loop.running
    assert loop.failures == 2
    # One traceback for the streak of two failures, one line when it works again.
    assert sum("failed" in r.message for r in caplog.records) == 1
    assert any("works again after 2" in r.message for r in caplog.records)
    count = len(calls)
    await asyncio.sleep(0.01)
    assert len(calls) == count  # nothing runs after aclose


async def test_periodic_waits_by_backoff_after_failures() -> None:
    async def fail() -> None:
        raise ValueError("down")

    loop = Periodic(fail, 60.0, name="t", immediately=True, backoff=Backoff(0.001, 0.002),
                    quiet=(ValueError,)).start()
    await asyncio.sleep(0.1)  # with interval_s alone it would have run once
    await loop.aclose()
    assert loop.calls > 3


def test_periodic_rejects_a_zero_interval() -> None:
    with pytest.raises(InvalidArgumentError, match="interval_s"):
        Periodic(lambda: asyncio.sleep(0), 0, name="x")
