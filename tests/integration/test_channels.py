"""The channel pool against real grpc.aio servers on port 0 (the seed's pool tests).

Idle and age are driven by a fake clock; held calls are released by an event, so
nothing here sleeps to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY

from tensorwire.calls.channels import ChannelPool, ChannelState, resolve_targets
from tensorwire.errors import InvalidArgumentError, UnavailableError
from tests.conftest import free_port, serving
from tests.support.clock import FakeClock
from tests.support.echo_service import EchoApp, method


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[EchoApp, int, object]]:
    app = EchoApp()
    async with serving(app, "echo") as server:
        yield app, server.port, server


async def _echo(pool: ChannelPool, payload: bytes = b"x") -> str:
    async with pool.acquire() as channel:
        reply = await method(channel, "Echo")(payload, timeout=10)
    peer, _, body = reply.partition(b"|")
    assert body == payload
    return peer.decode()


async def _hold(pool: ChannelPool) -> bytes:
    async with pool.acquire() as channel:
        return await method(channel, "Hold")(b"", timeout=30)


def test_initialization_validates_and_reports_state() -> None:
    pool = ChannelPool("127.0.0.1:1", min_size=2, max_size=4)
    assert pool.size == 0 and pool.addresses == ("127.0.0.1:1",)
    assert repr(pool) == (
        "<ChannelPool '127.0.0.1:1' [open] Channels: 0 open (0 busy, 0 idle), 0 draining | "
        "Calls: 0 in flight | created 0, reused 0, reuse 0.0%, failed 0, health 0 pass / 0 fail>"
    )
    with pytest.raises(InvalidArgumentError, match="min_size=5, max_size=2"):
        ChannelPool("127.0.0.1:1", min_size=5, max_size=2)
    with pytest.raises(InvalidArgumentError, match="max_streams_per_channel must be >= 1, got 0"):
        ChannelPool("127.0.0.1:1", max_streams_per_channel=0)
    with pytest.raises(InvalidArgumentError, match="'nohost' is not host:port"):
        ChannelPool("nohost")
    assert resolve_targets("a:1, b:2,a:1") == ["a:1", "b:2"]
    assert resolve_targets("[::1]:80") == ["[::1]:80"]
    with pytest.raises(InvalidArgumentError, match="port 1-65535"):
        resolve_targets("a:99999")
    with pytest.raises(UnavailableError, match="cannot resolve"):
        resolve_targets("dns:///no-such-host.invalid:80")


def test_dns_target_gives_every_address() -> None:
    want = sorted(
        {
            f"[{info[4][0]}]:81" if ":" in info[4][0] else f"{info[4][0]}:81"
            for info in socket.getaddrinfo("localhost", 81, type=socket.SOCK_STREAM)
        }
    )
    assert resolve_targets("dns:///localhost:81") == want
    assert resolve_targets("dns://8.8.8.8/localhost:81") == want
    assert "127.0.0.1:81" in want


async def test_channel_allocation_gives_distinct_connections() -> None:
    """Channels of one pool are distinct TCP connections (unique channel arg)."""
    async with echo_server() as (app, port, _):
        async with ChannelPool(f"127.0.0.1:{port}", min_size=1, max_size=3,
                               max_streams_per_channel=1) as pool:
            held = [asyncio.create_task(_hold(pool)) for _ in range(3)]
            await app.wait_holding(3)
            assert pool.size == 3
            assert len({c.channel for c in pool.channels}) == 3
            assert len(set(app.peers)) == 3, app.peers  # three client ports
            app.release.set()
            await asyncio.gather(*held)
            assert pool.metrics.in_use == 0


async def test_connection_reuse_under_load() -> None:
    async with echo_server() as (app, port, _):
        async with ChannelPool(f"127.0.0.1:{port}", max_size=4) as pool:
            for _ in range(200):
                await _echo(pool)
            for _ in range(5):  # 5 waves of 50 concurrent calls: below the stream limit
                await asyncio.gather(*(_echo(pool) for _ in range(50)))
            m = pool.metrics
            assert m.created == 1 and m.size == 1
            assert m.acquisitions == 450 and m.reused == 449
            assert m.reuse_rate > 0.99
            assert len(set(app.peers)) == 1
            assert "created 1, reused 449, reuse 99.8%" in repr(pool)
            labels = {"target": pool.name}
            assert REGISTRY.get_sample_value("tensorwire_channel_pool_created_total", labels) == 1
            assert REGISTRY.get_sample_value(
                "tensorwire_channel_pool_acquired_total", {**labels, "reused": "true"}
            ) == 449
            assert REGISTRY.get_sample_value("tensorwire_channel_pool_size", labels) == 1


async def test_pool_expands_near_the_stream_limit_and_saturates_at_max() -> None:
    async with echo_server() as (app, port, _):
        async with ChannelPool(f"127.0.0.1:{port}", max_size=3,
                               max_streams_per_channel=10) as pool:
            held = [asyncio.create_task(_hold(pool)) for _ in range(25)]
            await app.wait_holding(25)
            # grows at 9 of 10 streams: 9 + 9 + 7
            assert pool.size == 3
            assert sorted(c.active for c in pool.channels) == [7, 9, 9]
            assert pool.metrics.saturated == 0
            extra = [asyncio.create_task(_hold(pool)) for _ in range(5)]
            await app.wait_holding(30)
            assert pool.size == 3  # max_size: least busy channel takes the call
            assert pool.metrics.saturated >= 3
            assert sorted(c.active for c in pool.channels) == [10, 10, 10]
            assert "Channels: 3 open (3 busy, 0 idle)" in repr(pool)
            assert "Calls: 30 in flight" in repr(pool)
            app.release.set()
            results = await asyncio.gather(*held, *extra)
            assert len(results) == 30
            assert len(set(app.peers)) == 3


async def test_pool_shrinks_after_idle_timeout() -> None:
    clock = FakeClock()
    async with echo_server() as (app, port, _):
        async with ChannelPool(f"127.0.0.1:{port}", min_size=1, max_size=4,
                               max_streams_per_channel=2, idle_timeout_s=300,
                               health_check_interval_s=0, clock=clock) as pool:
            held = [asyncio.create_task(_hold(pool)) for _ in range(8)]
            await app.wait_holding(8)
            assert pool.size == 4
            app.release.set()
            await asyncio.gather(*held)
            clock.advance(299)
            await pool.maintain()
            assert pool.size == 4
            clock.advance(2)
            await pool.maintain()
            assert pool.size == 1  # back to min_size
            assert pool.metrics.closed_idle == 3
            assert "Channels: 1 open (0 busy, 1 idle), 0 draining" in repr(pool)
            await _echo(pool)  # still serves
            assert pool.metrics.created == 4


async def test_idle_timeout_closes_nothing_below_min_size_or_in_use() -> None:
    clock = FakeClock()
    async with echo_server() as (app, port, _):
        async with ChannelPool(f"127.0.0.1:{port}", min_size=2, max_size=4,
                               max_streams_per_channel=1, idle_timeout_s=60,
                               health_check_interval_s=0, clock=clock) as pool:
            await pool.maintain()  # opens min_size channels up front
            assert pool.size == 2
            held = [asyncio.create_task(_hold(pool)) for _ in range(3)]
            await app.wait_holding(3)
            assert pool.size == 3
            clock.advance(61)
            await pool.maintain()
            assert pool.size == 3  # all three are busy
            app.release.set()
            await asyncio.gather(*held)
            clock.advance(61)
            await pool.maintain()
            assert pool.size == 2
            assert pool.metrics.closed_idle == 1


async def test_max_age_retires_without_failing_in_flight_calls() -> None:
    clock = FakeClock()
    async with echo_server() as (app, port, _):
        async with ChannelPool(f"127.0.0.1:{port}", max_age_s=600, idle_timeout_s=0,
                               health_check_interval_s=0, clock=clock) as pool:
            first = asyncio.create_task(_hold(pool))
            await app.wait_holding(1)
            old = pool.channels[0]
            clock.advance(601)
            peer = await _echo(pool)  # a new call goes to a fresh channel
            assert old.state is ChannelState.DRAINING and old.reason == "max_age"
            assert [c.state for c in pool.channels] == [ChannelState.DRAINING, ChannelState.OPEN]
            assert "1 open (0 busy, 1 idle), 1 draining" in repr(pool)
            app.release.set()
            assert (await first).decode() != peer  # the held call finished on the old connection
            await pool.maintain()
            assert old.state is ChannelState.CLOSED and len(pool.channels) == 1
            assert pool.metrics.retired == 1 and pool.metrics.failed == 0


async def test_health_checks_pass() -> None:
    async with echo_server() as (_app, port, _):
        async with ChannelPool(f"127.0.0.1:{port}", min_size=2) as pool:
            await pool.maintain()  # first pass is due at once
            assert pool.size == 2
            assert (pool.metrics.health_pass, pool.metrics.health_fail) == (2, 0)
            assert await pool.check_health() == (2, 0)
            assert "health 4 pass / 0 fail" in repr(pool)


async def test_health_check_failure_replaces_the_channel() -> None:
    async with echo_server() as (_app, port, server):
        async with ChannelPool(f"127.0.0.1:{port}", min_size=1) as pool:
            await _echo(pool)
            before = pool.channels[0]
            await server.set_serving(False)  # type: ignore[attr-defined]
            assert await pool.check_health() == (0, 1)
            assert before.state is ChannelState.CLOSED and before.reason == "unhealthy"
            assert pool.size == 1 and pool.channels[0] is not before
            await server.set_serving(True)  # type: ignore[attr-defined]
            assert await pool.check_health() == (1, 0)
            m = pool.metrics
            assert (m.health_pass, m.health_fail, m.retired, m.created) == (1, 1, 1, 2)


async def test_unreachable_server_counts_failures() -> None:
    dead = free_port()  # a port nobody listens on
    async with ChannelPool(f"127.0.0.1:{dead}") as pool:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with pool.acquire() as channel:
                await method(channel, "Echo")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert pool.metrics.failed == 1
        assert await pool.check_health() == (0, 1)


async def test_static_list_spreads_channels_over_addresses() -> None:
    async with echo_server() as (app_a, port_a, _), echo_server() as (app_b, port_b, _):
        target = f"127.0.0.1:{port_a},127.0.0.1:{port_b}"
        async with ChannelPool(target, min_size=1, max_size=4) as pool:
            await pool.maintain()
            assert sorted(c.address for c in pool.channels) == sorted(
                [f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"]
            )
            await asyncio.gather(*(_echo(pool) for _ in range(20)))
            assert app_a.calls + app_b.calls == 20


async def test_closed_pool_refuses_and_closes_channels() -> None:
    async with echo_server() as (_app, port, _):
        pool = ChannelPool(f"127.0.0.1:{port}")
        await _echo(pool)
        channel = pool.channels[0]
        await pool.aclose()
        assert pool.closed and pool.size == 0 and channel.state is ChannelState.CLOSED
        assert repr(pool).startswith(f"<ChannelPool '127.0.0.1:{port}' [closed]")
        with pytest.raises(UnavailableError, match="is closed"):
            async with pool.acquire():
                pass


async def test_dns_target_pool_serves_calls() -> None:
    async with echo_server() as (_app, port, _):
        if resolve_targets(f"dns:///localhost:{port}") != [f"127.0.0.1:{port}"]:
            pytest.skip("localhost resolves to more than 127.0.0.1 here (the server binds only that)")
        async with ChannelPool(f"dns:///localhost:{port}", min_size=1) as pool:
            assert pool.addresses == ()  # resolved on first use, off the event loop
            peer = await _echo(pool)
            assert pool.addresses == (f"127.0.0.1:{port}",)
            assert peer.startswith(("ipv4:127.0.0.1:", "ipv6:"))
            await pool.maintain()  # re-resolves and health-checks
            assert pool.metrics.health_fail == 0 and pool.metrics.health_pass >= 1
