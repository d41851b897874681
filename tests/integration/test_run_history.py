"""Viewers and the run store: real trainer + streamer servers on real sockets.

- Subscribe to a run nobody knows -> NOT_FOUND (not empty status frames forever);
- a viewer that arrives after a trainer restart gets the run's whole stored curve
  in its snapshot, and the run's state (never "unspecified");
- Pause -> Resume rearms the live views;
- ended runs leave the trainer's and the streamer's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.streamer.app import StreamerApp
from services.streamer.app import create_app as create_streamer
from services.streamer.settings import StreamerSettings
from services.trainer.app import TrainerApp
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data.scalars import from_batch
from tensorwire.rpc.server import GrpcServer, ServerOptions
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tests.conftest import free_port, settings_for
from tests.support.waiting import until


@contextlib.asynccontextmanager
async def suite(tmp_path: Path, trainer_port: int, streamer_port: int, **trainer_overrides: Any
                ) -> AsyncIterator[tuple[TrainerApp, StreamerApp, tpb_grpc.TrainerServiceStub,
                                         spb_grpc.StreamerServiceStub]]:
    """A streamer (asking the trainer about unseen runs) and a trainer, on fixed ports
    so that a second suite in the same folder is a restart."""
    streamer = await create_streamer(dataclasses.replace(
        StreamerSettings(), trainer_target=f"127.0.0.1:{trainer_port}", release_after_s=0.5))
    s_server = GrpcServer(ServerOptions(name="streamer", host="127.0.0.1", port=streamer_port, grace_s=0.5),
                          streamer)
    await s_server.start()
    trainer = await create_trainer(settings_for(
        TrainerSettings, tmp_path, streamer_target=f"127.0.0.1:{streamer_port}", inference_target="",
        checkpoint_every_s=0.0, checkpoint_every_steps=100, **trainer_overrides))
    t_server = GrpcServer(ServerOptions(name="trainer", host="127.0.0.1", port=trainer_port, grace_s=0.5),
                          trainer)
    await t_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{trainer_port}") as tch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{streamer_port}") as sch:
            yield trainer, streamer, tpb_grpc.TrainerServiceStub(tch), spb_grpc.StreamerServiceStub(sch)
    finally:
        await t_server.stop(0.5)
        await s_server.stop(0.2)


async def first_frames(stub: spb_grpc.StreamerServiceStub, run_id: str, count: int = 2,
                       **request: Any) -> list[spb.Frame]:
    call = stub.Subscribe(spb.SubscribeRequest(run_id=run_id, **request), timeout=20)
    frames = []
    async for frame in call:
        frames.append(frame)
        if len(frames) >= count:
            break
    call.cancel()
    return frames


async def test_unknown_run_is_not_found_and_a_new_viewer_after_a_restart_sees_the_whole_curve(
    tmp_path: Path,
) -> None:
    trainer_port, streamer_port = free_port(), free_port()
    async with suite(tmp_path, trainer_port, streamer_port) as (trainer, _streamer, tstub, sstub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await first_frames(sstub, "no-such-run")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-run" in info.value.details()
        run = (await tstub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 0}))).run
        await until(lambda: trainer.runs.get_run(run.run_id).checkpoint_step >= 300)
    # Both services restarted: the streamer has never seen the run.
    async with suite(tmp_path, trainer_port, streamer_port) as (trainer, _streamer, tstub, sstub):
        stored = (await tstub.GetRun(tpb.GetRunRequest(run_id=run.run_id))).run
        assert stored.state == cpb.RUN_STATE_INTERRUPTED
        status, scalars = await first_frames(sstub, run.run_id, max_points=64)
        assert status.snapshot and status.status.state == cpb.RUN_STATE_INTERRUPTED
        assert status.status.step == stored.step
        assert scalars.snapshot
        loss = from_batch(scalars.scalars)["loss"]
        assert loss[0].first_step == 1 and loss[-1].step == stored.step  # the whole curve
        assert sum(b.count for b in loss) == stored.step
        # Resumed: the live run's viewers get its state and new steps again.
        await tstub.ResumeRun(tpb.ResumeRunRequest(run_id=run.run_id))
        call = sstub.Subscribe(spb.SubscribeRequest(run_id=run.run_id), timeout=20)
        async for frame in call:
            if frame.HasField("status") and frame.status.state == cpb.RUN_STATE_RUNNING \
                    and frame.status.step > stored.step + 50:
                break
        call.cancel()


async def test_pause_then_resume_rearms_the_live_views(tmp_path: Path) -> None:
    async with suite(tmp_path, free_port(), free_port()) as (trainer, _streamer, tstub, sstub):
        run = (await tstub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 0}))).run
        call = sstub.Subscribe(spb.SubscribeRequest(run_id=run.run_id, views=["boundary"], max_fps=10),
                               timeout=60)
        view_steps: list[int] = []
        paused = resumed = False
        async for frame in call:
            if not frame.HasField("view"):
                continue
            view_steps.append(frame.view.step)
            if not paused and len(view_steps) >= 3:
                await tstub.PauseRun(tpb.PauseRunRequest(run_id=run.run_id))
                paused = True
                await until(lambda: trainer.runs.get_run(run.run_id).loop.status.state == cpb.RUN_STATE_PAUSED)
                await asyncio.sleep(0.5)
                paused_at = trainer.runs.get_run(run.run_id).loop.status.step
                await tstub.ResumeRun(tpb.ResumeRunRequest(run_id=run.run_id))
                resumed = True
            elif resumed and frame.view.step > paused_at + 20:
                break  # a view of a step after the pause: the views are live again
        call.cancel()
        assert resumed


async def test_ended_runs_leave_trainer_and_streamer_memory(tmp_path: Path) -> None:
    # 20 runs started back to back: room for all of them at once, whatever the machine's
    # speed (the point is what is left after they end, not the active-runs cap).
    async with suite(tmp_path, free_port(), free_port(), max_active_runs=32) as (
            trainer, streamer, tstub, sstub):
        trainer.runs.release_after_s = 0.2
        ids = []
        for _ in range(20):
            run = (await tstub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 20}))).run
            ids.append(run.run_id)
        await until(lambda: not trainer.runs.list_runs(), 60)
        await until(lambda: not streamer.hub.topics, 30)
        assert not trainer.publisher._last_status and all(not link.statuses for link in trainer.publisher.links.values())
        # Still there for anyone who asks: from the store, through the streamer too.
        listed = (await tstub.ListRuns(tpb.ListRunsRequest(page_size=100))).runs
        assert {r.run_id for r in listed} == set(ids)
        assert all(r.state == cpb.RUN_STATE_COMPLETED and r.step == 20 for r in listed)
        status, scalars = await first_frames(sstub, ids[0])
        assert status.status.state == cpb.RUN_STATE_COMPLETED
        assert from_batch(scalars.scalars)["loss"][-1].step == 20
