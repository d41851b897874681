"""Live training end to end: real trainer + streamer servers, real sockets, real torch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.streamer.app import create_app as create_streamer
from services.streamer.settings import StreamerSettings
from services.trainer.app import TrainerApp
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data import arrays
from tensorwire.rpc.server import GrpcServer, ServerOptions
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tests.conftest import free_port, serving, settings_for
from tests.support.viewer import watch_target
from tests.support.waiting import until


@contextlib.asynccontextmanager
async def streamer_on(port: int, **overrides: object) -> AsyncIterator[GrpcServer]:
    app = await create_streamer(dataclasses.replace(StreamerSettings(), **overrides))
    server = GrpcServer(ServerOptions(name="streamer", host="127.0.0.1", port=port, grace_s=0.5), app)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.2)


@contextlib.asynccontextmanager
async def trainer_for(tmp_path: Path, streamer_port: int, **overrides: object) -> AsyncIterator[tuple[TrainerApp, GrpcServer]]:
    settings = settings_for(
        TrainerSettings, tmp_path, streamer_target=f"127.0.0.1:{streamer_port}", inference_target="",
        checkpoint_every_s=0.0, **overrides,
    )
    app = await create_trainer(settings)
    async with serving(app, "trainer") as server:
        yield app, server


async def test_live_frames_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port), trainer_for(tmp_path, port, demo_task="spiral") as (app, _):
        run_id = app.demo_run_id
        assert run_id
        await until(lambda: app.runs.get_run(run_id).loop.status.step > 50)
        await asyncio.wait_for(app.publisher.ready.wait(), 60)  # the view worker process is up
        stats = await watch_target(f"127.0.0.1:{port}", run_id, 3.0)
        assert not stats.error
        assert stats.views >= 5 and stats.statuses >= 2 and stats.scalar_frames >= 2
        assert stats.scalar_first == 1 and stats.scalar_last > 100 and stats.scalar_gaps == []
        assert max(stats.arrival_lags) < 2.0
        assert stats.first_live_view_s is not None and stats.first_live_view_s < 2.0
        assert app.publisher.views_built >= 5
        assert all(size < 0.1 * j for size, j in zip(stats.view_bytes, stats.json_bytes))
        # The same frames decode to the documented boundary view.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = spb_grpc.StreamerServiceStub(ch).Subscribe(
                spb.SubscribeRequest(run_id=run_id, accept_codecs=[cpb.CODEC_ZSTD], views=["boundary"])
            )
            async for frame in call:
                if frame.WhichOneof("body") == "view":
                    grid = {a.name: a for a in frame.view.arrays}["grid"]
                    assert grid.codec == cpb.CODEC_ZSTD and grid.dtype == cpb.DTYPE_U8
                    values = arrays.decode(grid)
                    assert values.shape == (32, 32) and 0.0 <= values.min() <= values.max() <= 1.0
                    assert frame.step > 0 and frame.produced_at > 0 and frame.sent_at >= frame.produced_at
                    break
            call.cancel()


async def _code(coro: object) -> tuple[grpc.StatusCode, str]:
    try:
        await coro  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_bad_inputs_get_precise_codes(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port, max_subscribers=1), trainer_for(tmp_path, port) as (_app, server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as tch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as sch:
            t = tpb_grpc.TrainerServiceStub(tch)
            s = spb_grpc.StreamerServiceStub(sch)
            INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
            cases = [
                (t.StartRun(tpb.StartRunRequest(task="chess")), INVALID, "chess"),
                (t.StartRun(tpb.StartRunRequest(task="spiral", params={"learning_rate": -0.1})), INVALID, "learning_rate"),
                (t.StartRun(tpb.StartRunRequest(task="spiral", params={"batch_size": 0})), INVALID, "batch_size"),
                (t.StartRun(tpb.StartRunRequest(task="spiral", params={"warp": 9})), INVALID, "warp"),
                (t.StartRun(tpb.StartRunRequest(task="spiral", options={"dataset": "moons"})), INVALID, "moons"),
                (t.GetRun(tpb.GetRunRequest(run_id="missing")), NOT_FOUND, "missing"),
                (t.GetRun(tpb.GetRunRequest()), INVALID, "run_id"),
                (t.PauseRun(tpb.PauseRunRequest(run_id="missing")), NOT_FOUND, "missing"),
                (t.UpdateRun(tpb.UpdateRunRequest(run_id="missing", params={"learning_rate": 1})), NOT_FOUND, "missing"),
            ]
            for call, code, needle in cases:
                got, details = await _code(call)
                assert got == code and needle in details, (got, details)

            run = (await t.StartRun(tpb.StartRunRequest(task="spiral", seed=3))).run
            assert run.state == cpb.RUN_STATE_RUNNING and run.seed == 3
            got, details = await _code(t.UpdateRun(tpb.UpdateRunRequest(run_id=run.run_id, params={"batch_size": 0})))
            assert got == INVALID and "batch_size" in details
            got, details = await _code(t.UpdateRun(tpb.UpdateRunRequest(run_id=run.run_id, params={"points": 50})))
            assert got == INVALID and "points cannot change" in details
            updated = (await t.UpdateRun(tpb.UpdateRunRequest(run_id=run.run_id, params={"learning_rate": 0.5}))).run
            assert updated.params["learning_rate"] == 0.5
            assert (await t.PauseRun(tpb.PauseRunRequest(run_id=run.run_id))).run.state == cpb.RUN_STATE_PAUSED
            assert (await t.ResumeRun(tpb.ResumeRunRequest(run_id=run.run_id))).run.state == cpb.RUN_STATE_RUNNING
            stopped = (await t.StopRun(tpb.StopRunRequest(run_id=run.run_id))).run
            assert stopped.state == cpb.RUN_STATE_STOPPED
            got, details = await _code(t.PauseRun(tpb.PauseRunRequest(run_id=run.run_id)))
            assert got == grpc.StatusCode.FAILED_PRECONDITION and "STOPPED" in details
            listed = (await t.ListRuns(tpb.ListRunsRequest())).runs
            assert [r.run_id for r in listed] == [run.run_id]
            tasks = {task.name: task for task in (await t.ListTasks(tpb.ListTasksRequest())).tasks}
            assert set(tasks) == {"spiral", "trajectory", "anomaly", "fusion", "detection"}
            assert "dataset" in {o.name for o in tasks["spiral"].options}

            async def first(request: spb.SubscribeRequest) -> spb.Frame:
                async for frame in s.Subscribe(request):
                    return frame
                raise AssertionError("stream ended")

            got, details = await _code(first(spb.SubscribeRequest(run_id=run.run_id, max_fps=-1)))
            assert got == INVALID and "max_fps" in details
            got, details = await _code(first(spb.SubscribeRequest()))
            assert got == INVALID and "run_id" in details
            holder = s.Subscribe(spb.SubscribeRequest(run_id=run.run_id))
            await holder.read()
            got, details = await _code(first(spb.SubscribeRequest(run_id=run.run_id)))
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in details
            holder.cancel()
            for ch in (tch, sch):
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_viewer_disconnect_leaves_training_alone(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port) as streamer, trainer_for(tmp_path, port, demo_task="spiral") as (app, _):
        hub = streamer.service.hub  # type: ignore[attr-defined]
        run = app.runs.get_run(app.demo_run_id or "")
        await asyncio.wait_for(app.publisher.ready.wait(), 60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = spb_grpc.StreamerServiceStub(ch).Subscribe(spb.SubscribeRequest(run_id=run.run_id))
            views = 0
            async for frame in call:
                views += frame.WhichOneof("body") == "view"
                if views >= 3:
                    break
            assert app.publisher.watchers(run.run_id) == 1
            call.cancel()  # the viewer goes away mid-stream
        await until(lambda: hub.subscriber_count == 0)
        await until(lambda: app.publisher.watchers(run.run_id) == 0)
        assert not hub.topics[run.run_id].subscribers
        built = app.publisher.views_built
        step = run.loop.status.step
        await until(lambda: run.loop.status.step > step + 100)
        assert run.state == cpb.RUN_STATE_RUNNING
        assert app.publisher.views_built <= built + 1  # nobody watches: no more views


async def test_streamer_restart_publisher_reconnects(tmp_path: Path) -> None:
    # Each phase waits for the state it needs (the link up, the link down) instead of
    # assuming it within a fixed time: on a loaded machine the first view of a new
    # stream, or the link noticing its streamer is gone, can take longer than a 1.5 s
    # window; the reconnect itself (the link's backoff: at most 1.5 s) is bounded apart.
    port = free_port()
    async with trainer_for(tmp_path, port, demo_task="spiral") as (app, _):
        run = app.runs.get_run(app.demo_run_id or "")
        await asyncio.wait_for(app.publisher.ready.wait(), 60)  # the view worker process is up
        async with streamer_on(port):
            await until(lambda: any(link.connected for link in app.publisher.links.values()))
            stats = await watch_target(f"127.0.0.1:{port}", run.run_id, 3.0)
            assert stats.views > 0
        # The streamer is gone: training goes on.
        step = run.loop.status.step
        await until(lambda: not any(link.connected for link in app.publisher.links.values()))
        await until(lambda: run.loop.status.step > step + 200)
        async with streamer_on(port):
            restarted = time.monotonic()
            await until(lambda: any(link.connected for link in app.publisher.links.values()))
            assert time.monotonic() - restarted < 10
            stats = await watch_target(f"127.0.0.1:{port}", run.run_id, 4.0)
            print(f"first live view after the restart: {stats.first_live_view_s} s, views {stats.views}")
            assert stats.first_live_view_s is not None and stats.first_live_view_s < 2.0
            assert stats.views >= 5 and stats.scalar_gaps == []
        link = next(iter(app.publisher.links.values()))
        assert link.connects >= 2
        assert run.state == cpb.RUN_STATE_RUNNING
