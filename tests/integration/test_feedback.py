"""Delivery feedback on real servers: Subscribe numbers frames, Ack paces, bad acks get precise codes."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.live import FrameAcker
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc
from tests.conftest import free_port
from tests.integration.test_live import streamer_on, trainer_for
from tests.support.viewer import watch_target
from tests.support.waiting import until


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_an_acking_viewer_gets_fresh_views_and_the_streamer_measures_it(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port), trainer_for(tmp_path, port, demo_task="spiral") as (app, _):
        run_id = app.demo_run_id
        await until(lambda: app.runs.get_run(run_id).loop.status.step > 20)
        await asyncio.wait_for(app.publisher.ready.wait(), 60)
        acked_before = _metric("tensorwire_streamer_acks_total", outcome="accepted")
        lag_before = _metric("tensorwire_streamer_ack_lag_seconds_count", kind="view")
        stats = await watch_target(f"127.0.0.1:{port}", run_id, 3.0)
        assert not stats.error, stats.error
        assert stats.acks >= 5 and stats.views >= 10, stats.summary()
        assert stats.scalar_gaps == [] and max(stats.lags) < 1.0, stats.summary()
        assert _metric("tensorwire_streamer_acks_total", outcome="accepted") - acked_before >= 5
        assert _metric("tensorwire_streamer_ack_lag_seconds_count", kind="view") > lag_before
        assert _metric("tensorwire_streamer_frames_sent_total", kind="view") >= 10
        assert _metric("tensorwire_streamer_sent_bytes_total", kind="status") > 0
        await until(lambda: _metric("tensorwire_streamer_subscribers", run_id=run_id) == 0.0)  # it left


async def test_acks_name_a_live_subscription_and_bad_ones_get_precise_codes(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port), trainer_for(tmp_path, port, demo_task="spiral") as (app, _):
        run_id = app.demo_run_id
        await until(lambda: app.runs.get_run(run_id).loop.status.step > 5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = spb_grpc.StreamerServiceStub(channel)
            call = stub.Subscribe(spb.SubscribeRequest(run_id=run_id, accept_codecs=[cpb.CODEC_DEFLATE]))
            first = await call.read()
            assert first.seq == 1 and first.subscription_id
            second = await call.read()
            assert second.seq == 2 and not second.subscription_id
            assert _metric("tensorwire_streamer_subscribers", run_id=run_id) == 1.0
            sid = first.subscription_id

            reply = await stub.Ack(spb.AckRequest(subscription_id=sid, run_id=run_id, seq=2, received_at=1.0))
            assert reply.server_time > 1e9 and reply.in_flight_bytes >= 0

            async def code_of(request: spb.AckRequest) -> tuple[grpc.StatusCode, str]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Ack(request, timeout=5)
                return err.value.code(), err.value.details() or ""

            code, details = await code_of(spb.AckRequest(subscription_id="forged", run_id=run_id, seq=1))
            assert code == grpc.StatusCode.NOT_FOUND and "no subscription 'forged'" in details
            code, details = await code_of(spb.AckRequest(subscription_id=sid, run_id="someone-else", seq=1))
            assert code == grpc.StatusCode.NOT_FOUND and "someone-else" in details
            code, details = await code_of(spb.AckRequest(run_id=run_id, seq=1))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "subscription_id is empty" in details
            code, details = await code_of(spb.AckRequest(subscription_id=sid, seq=1, received_at=math.inf))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "received_at" in details
            # from the future, and backwards: answered, ignored, counted
            future = _metric("tensorwire_streamer_acks_total", outcome="future")
            backwards = _metric("tensorwire_streamer_acks_total", outcome="backwards")
            await stub.Ack(spb.AckRequest(subscription_id=sid, seq=2**63))
            await stub.Ack(spb.AckRequest(subscription_id=sid, seq=1))
            assert _metric("tensorwire_streamer_acks_total", outcome="future") == future + 1
            assert _metric("tensorwire_streamer_acks_total", outcome="backwards") == backwards + 1
            # garbage bytes instead of an AckRequest
            raw = channel.unary_unary("/tensorwire.streamer.v1.StreamerService/Ack")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(b"\xff\xff\xff", timeout=5)
            assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
            # the stream is still alive and numbered in order
            third = await call.read()
            assert third.seq == 3
            call.cancel()
            # after the stream ends, its id is gone
            await until(lambda: _metric("tensorwire_streamer_subscribers", run_id=run_id) == 0.0)
            code, _ = await code_of(spb.AckRequest(subscription_id=sid, seq=3))
            assert code == grpc.StatusCode.NOT_FOUND


async def test_the_acker_measures_the_clock_offset_and_stops_on_not_found(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        acker = FrameAcker(channel, "r", interval_s=0.01, wall=lambda: 1000.0)
        acker.received(spb.Frame(seq=1, subscription_id="gone"))
        await until(lambda: acker.errors == 1, 10)
        assert acker._task is not None and acker._task.done()  # NOT_FOUND: it stopped
        await acker.aclose()
        stub = spb_grpc.StreamerServiceStub(channel)
        call = stub.Subscribe(spb.SubscribeRequest(run_id="r"))
        first = await call.read()  # a status for a run that has not published yet
        acker = FrameAcker(channel, "r", interval_s=0.01)  # this clock: the offset is ~0
        acker.received(first)
        await until(lambda: acker.acks_sent == 1, 10)
        assert acker.clock_offset_s is not None and abs(acker.clock_offset_s) < 0.5
        assert "acked 1" in repr(acker)
        await acker.aclose()
        call.cancel()
