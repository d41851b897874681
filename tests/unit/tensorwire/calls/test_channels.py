"""ChannelPool as a state machine, without sockets: a scripted backend stands in for
gRPC (httpcore's way of testing its pool), a fake clock drives idle, age and health."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tensorwire.calls.channels import CHANNEL_ID_ARG, ChannelPool, ChannelState
from tensorwire.errors import InvalidArgumentError, UnavailableError
from tests.support.clock import FakeClock
from tests.support.fake_channels import Backend


def make_pool(target: str = "a:1", **kwargs: Any) -> tuple[ChannelPool, Backend, FakeClock]:
    backend, clock = Backend(), FakeClock()
    kwargs.setdefault("health_check_interval_s", 0)
    pool = ChannelPool(target, connect=backend.connect, clock=clock, name="t", **kwargs)
    return pool, backend, clock


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_one_channel_per_address_then_reuse_least_busy_first() -> None:
    pool, backend, _ = make_pool("a:1,b:2", max_size=4)
    async with pool.acquire() as first:
        assert [c.address for c in backend.opened] == ["a:1", "b:2"]  # the floor at once
        async with pool.acquire() as second:
            assert second is not first  # least busy: the idle one
        async with pool.acquire() as third:
            assert third is second
    # Distinct channels: each carries its own id, so gRPC cannot fold them together.
    assert len({c.options[CHANNEL_ID_ARG] for c in backend.opened}) == 2
    assert pool.metrics.created == 2 and pool.metrics.reused == 1
    assert "2 open (0 busy, 2 idle)" in repr(pool) and "created 2, reused 1" in repr(pool)
    await pool.aclose()


async def test_grows_near_the_stream_limit_and_not_past_max_size() -> None:
    pool, backend, _ = make_pool(max_size=2, max_streams_per_channel=10)
    held: list[Any] = []
    stack = [pool.acquire() for _ in range(25)]
    for ctx in stack:
        held.append(await ctx.__aenter__())
    assert len(backend.opened) == 2  # grew once at 9 streams, then capped
    assert pool.metrics.saturated > 0
    assert "Calls: 25 in flight" in repr(pool)
    for ctx in reversed(stack):
        await ctx.__aexit__(None, None, None)
    await pool.aclose()


async def test_idle_channels_close_down_to_the_floor() -> None:
    pool, backend, clock = make_pool(max_size=3, max_streams_per_channel=1, idle_timeout_s=60)
    a, b = pool.acquire(), pool.acquire()
    await a.__aenter__()
    await b.__aenter__()
    await a.__aexit__(None, None, None)
    await b.__aexit__(None, None, None)
    assert pool.size == 2
    clock.now += 61
    await pool.maintain()
    await _settle()
    assert pool.size == 1 and pool.metrics.closed_idle == 1
    assert sum(c.closed for c in backend.opened) == 1
    await pool.aclose()


async def test_old_channels_drain_after_their_last_call_and_are_replaced() -> None:
    pool, backend, clock = make_pool(max_age_s=600)
    ctx = pool.acquire()
    await ctx.__aenter__()
    clock.now += 601
    await pool.maintain()
    await _settle()
    old = backend.opened[0]
    assert not old.closed  # a call still runs on it: it drains
    assert [c.state for c in pool.channels] == [ChannelState.DRAINING, ChannelState.OPEN]
    await ctx.__aexit__(None, None, None)
    await _settle()
    assert old.closed and pool.metrics.retired == 1 and pool.size == 1
    await pool.aclose()


async def test_unhealthy_channels_are_replaced_on_healthier_addresses() -> None:
    pool, backend, clock = make_pool("a:1,b:2", health_check_interval_s=30)
    async with pool.acquire():
        pass
    backend.health["a:1"] = "NOT_SERVING"
    clock.now += 31
    await pool.maintain()
    await _settle()
    assert pool.metrics.health_fail == 1 and pool.metrics.health_pass == 1
    assert backend.opened[0].closed
    # The replacement avoids the failing address while another is healthy.
    assert sorted(c.address for c in pool.channels) == ["b:2", "b:2"]
    await pool.aclose()


async def test_close_closes_every_channel_with_the_grace_and_refuses_new_calls() -> None:
    pool, backend, _ = make_pool("a:1,b:2", close_grace_s=2.5)
    async with pool.acquire():
        pass
    await pool.aclose()
    assert all(c.closed and c.closed_with == 2.5 for c in backend.opened)
    assert "[closed]" in repr(pool)
    with pytest.raises(UnavailableError, match="closed"):
        async with pool.acquire():
            pass


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"min_size": 3, "max_size": 2}, "min_size"),
    ({"max_streams_per_channel": 0}, "max_streams_per_channel"),
    ({"idle_timeout_s": -1}, "idle_timeout_s"),
])
def test_bad_limits_are_refused_with_the_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        ChannelPool("a:1", **kwargs)


def test_bad_targets_fail_at_construction() -> None:
    for target in ("", "nohost", "a:99999", ":1"):
        with pytest.raises(InvalidArgumentError):
            ChannelPool(target)
