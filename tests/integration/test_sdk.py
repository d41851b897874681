"""The SDK (tensorwire.init) against real trainer + streamer servers on real sockets,
with real torch training in a thread of its own: listed, watched and controlled."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch import nn

import tensorwire
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data.scalars import MAX_SERIES
from tensorwire.streamer.v1 import streamer_pb2 as spb
from tensorwire.streamer.v1 import streamer_pb2_grpc as spb_grpc
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tests.conftest import free_port
from tests.integration.test_live import streamer_on, trainer_for
from tests.support.waiting import until

pytestmark = pytest.mark.slow


class Script:
    """A training script in its own thread: a small real model, logged with the SDK."""

    def __init__(self, run: Any, *, max_steps: int = 1_000_000, view: Callable[[], Any] | None = None) -> None:
        self.run = run
        self.max_steps = max_steps
        self.view = view
        self.lrs: list[float] = []
        self.step = 0
        self.thread = threading.Thread(target=self.train, daemon=True)
        self.thread.start()

    def train(self) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=self.run.params["learning_rate"])
        self.run.watch(model)
        x = torch.randn(256, 4)
        y = (x[:, 0] > 0).long()
        for step in range(1, self.max_steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = self.run.params["learning_rate"]
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.run.log(step, loss=loss, lr=optimizer.param_groups[0]["lr"])
            if self.view is not None:
                self.run.view("samples", self.view)
            self.step = step
            if self.run.should_stop:
                break
            self.run.wait_if_paused()
            time.sleep(0.002)
        self.run.finish()


async def get_run(stub: tpb_grpc.TrainerServiceStub, run_id: str) -> tpb.Run:
    return (await stub.GetRun(tpb.GetRunRequest(run_id=run_id))).run


async def test_script_run_is_listed_watched_and_controlled(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port), trainer_for(tmp_path, port) as (app, server):
        run = tensorwire.init(task="my-mlp", params={"learning_rate": 0.05},
                              streamer=f"127.0.0.1:{port}", trainer=f"127.0.0.1:{server.port}")
        script = Script(run)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as tch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as sch:
            trainer = tpb_grpc.TrainerServiceStub(tch)
            await until(lambda: run.registered.is_set())
            listed = (await trainer.ListRuns(tpb.ListRunsRequest())).runs
            assert run.id in [r.run_id for r in listed]
            await until(lambda: app.runs.get_run(run.id).loop.status.step > 20)
            await until(lambda: app.runs.get_run(run.id).loop.status.steps_per_second > 0)
            got = await get_run(trainer, run.id)
            assert got.task == "my-mlp" and got.state == cpb.RUN_STATE_RUNNING
            assert got.params["learning_rate"] == pytest.approx(0.05)
            assert "loss" in got.metrics and got.steps_per_second > 0

            # The browser's view: status, scalars and the weight histograms (watched).
            frames = spb_grpc.StreamerServiceStub(sch).Subscribe(spb.SubscribeRequest(run_id=run.id))
            seen: dict[str, Any] = {}
            async for frame in frames:
                body = frame.WhichOneof("body")
                seen.setdefault(body, getattr(frame, body))
                if {"status", "scalars", "view"} <= seen.keys():
                    break
            frames.cancel()
            names = {s.name for s in seen["scalars"].series}
            assert {"loss", "lr"} <= names
            view = seen["view"]
            assert view.kind == "histograms" and view.name == "weights"
            assert list(view.labels) == ["0.weight", "0.bias", "2.weight", "2.bias"]

            # Pause: the script waits in wait_if_paused, its step stands still.
            paused = (await trainer.PauseRun(tpb.PauseRunRequest(run_id=run.id))).run
            assert paused.state == cpb.RUN_STATE_PAUSED
            await until(lambda: run.paused)
            await asyncio.sleep(0.3)
            held = script.step
            await asyncio.sleep(0.5)
            assert script.step == held
            await until(lambda: app.runs.get_run(run.id).loop.status.state == cpb.RUN_STATE_PAUSED)

            # Live params while paused, then resume: the script trains with the new rate.
            await trainer.UpdateRun(tpb.UpdateRunRequest(run_id=run.id, params={"learning_rate": 0.01}))
            await until(lambda: run.params["learning_rate"] == pytest.approx(0.01))
            await trainer.ResumeRun(tpb.ResumeRunRequest(run_id=run.id))
            await until(lambda: script.step > held + 10)
            assert (await get_run(trainer, run.id)).state == cpb.RUN_STATE_RUNNING

            # Stop: should_stop, the script finishes, the trainer shows STOPPED.
            stopped = (await trainer.StopRun(tpb.StopRunRequest(run_id=run.id))).run
            assert stopped.state == cpb.RUN_STATE_STOPPED
            await asyncio.to_thread(script.thread.join, 10)
            assert not script.thread.is_alive()
            final = await get_run(trainer, run.id)
            assert final.state == cpb.RUN_STATE_STOPPED and final.step >= held + 10


async def test_two_scripts_at_once_and_a_raising_view(tmp_path: Path) -> None:
    port = free_port()
    calls = []

    def broken() -> Any:
        calls.append(1)
        raise RuntimeError("no samples here")

    async with streamer_on(port), trainer_for(tmp_path, port) as (app, server):
        kwargs = {"streamer": f"127.0.0.1:{port}", "trainer": f"127.0.0.1:{server.port}"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = tensorwire.init(task="a", params={"learning_rate": 0.05}, **kwargs)
            second = tensorwire.init(task="b", params={"learning_rate": 0.05}, **kwargs)
            scripts = [Script(first, max_steps=300, view=broken), Script(second, max_steps=300)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as sch:
                # Someone watches the first run: its view is built, raises, is disabled.
                frames = spb_grpc.StreamerServiceStub(sch).Subscribe(spb.SubscribeRequest(run_id=first.id))
                async for frame in frames:
                    if frame.HasField("status") and "disabled" in frame.status.error:
                        break
                frames.cancel()
            assert "view 'samples' disabled: RuntimeError: no samples here" in frame.status.error
            assert frame.status.state in (cpb.RUN_STATE_RUNNING, cpb.RUN_STATE_COMPLETED)
            for script in scripts:
                await asyncio.to_thread(script.thread.join, 30)
        assert len(calls) == 1  # reported once, never called again
        assert sum("no samples here" in str(w.message) for w in caught) == 1
        for run in (first, second):
            got = app.runs.get_run(run.id)
            assert got.state == cpb.RUN_STATE_COMPLETED and got.loop.status.step == 300
        assert first.id != second.id


async def test_training_goes_on_without_services_and_catches_up(tmp_path: Path) -> None:
    port, trainer_port = free_port(), free_port()
    run = tensorwire.init(task="offline", streamer=f"127.0.0.1:{port}", trainer=f"127.0.0.1:{trainer_port}")
    started = time.perf_counter()
    for step in range(1, 20_001):
        run.log(step, loss=1.0 / step, nan=math.nan if step % 2 else 0.0)
    assert time.perf_counter() - started < 2.0  # nothing waited on the absent services
    async with streamer_on(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as sch:
            frames = spb_grpc.StreamerServiceStub(sch).Subscribe(spb.SubscribeRequest(run_id=run.id))
            async for frame in frames:  # the snapshot: every step, merged into buckets
                if frame.HasField("scalars"):
                    series = {s.name: s for s in frame.scalars.series}
                    if series and series["loss"].steps[-1] == 20_000:
                        break
            frames.cancel()
        assert series["loss"].first_steps[0] == 1 if series["loss"].first_steps else series["loss"].steps[0] == 1
        assert any(math.isnan(v) for v in series["nan"].values)  # non-finite: kept, a gap
        await asyncio.to_thread(run.finish)


async def test_bad_input_of_script_rpcs(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port), trainer_for(tmp_path, port) as (app, server):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as tch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as sch:
            trainer = tpb_grpc.TrainerServiceStub(tch)

            async def one(run_id: str) -> Any:
                async for reply in trainer.AttachRun(iter([tpb.AttachRunRequest(run_id=run_id)])):
                    return reply

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await one("nope")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()
            for bad in (tpb.RegisterRunRequest(run_id="Bad Id!", task="t"),
                        tpb.RegisterRunRequest(task=""),
                        tpb.RegisterRunRequest(task="t", params={"lr": math.nan})):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await trainer.RegisterRun(bad)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            for verb, request in (("PauseRun", tpb.PauseRunRequest), ("StopRun", tpb.StopRunRequest),
                                  ("ResumeRun", tpb.ResumeRunRequest), ("GetRun", tpb.GetRunRequest)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await getattr(trainer, verb)(request(run_id="missing"))
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
            own = (await trainer.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 1}))).run
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await one(own.run_id)  # the trainer's own run takes no script
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await trainer.RegisterRun(tpb.RegisterRunRequest(run_id=own.run_id, task="spiral"))
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            registered = (await trainer.RegisterRun(tpb.RegisterRunRequest(run_id="abc", task="t"))).run
            again = (await trainer.RegisterRun(tpb.RegisterRunRequest(run_id="abc", task="t"))).run
            assert registered.run_id == again.run_id == "abc"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await trainer.RegisterRun(tpb.RegisterRunRequest(run_id="abc", task="other"))
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

            # More than 1,000 scalar names: the streamer refuses, the SDK warns and keeps to 1,000.
            def too_many() -> Any:
                batch = cpb.ScalarBatch()
                for i in range(MAX_SERIES + 1):
                    batch.series.add(name=f"s{i}", steps=[1], values=[1.0])
                yield spb.PublishRequest(run_id="wide", scalars=batch)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in spb_grpc.StreamerServiceStub(sch).Publish(too_many()):
                    pass
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 1000 distinct scalar names" in info.value.details()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = tensorwire.init(task="wide", streamer=f"127.0.0.1:{port}", trainer=f"127.0.0.1:{server.port}")
            run.log(1, **{f"s{i}": float(i) for i in range(MAX_SERIES + 5)})
            await until(lambda: any("distinct scalar names" in str(w.message) for w in caught))
            await asyncio.to_thread(run.finish)
        assert app.runs.get_run(run.id).state == cpb.RUN_STATE_COMPLETED
        assert app.runs.get_run(run.id).loop.status.step == 1


async def test_the_script_re_registers_when_the_trainer_restarts(tmp_path: Path) -> None:
    """A trainer restart loses its runs; the script registers its run again by itself,
    with its id and its current params, and goes on being listed and controlled."""
    import dataclasses

    from services.trainer.app import create_app as create_trainer
    from services.trainer.settings import TrainerSettings
    from tensorwire.rpc.server import GrpcServer, ServerOptions
    from tests.conftest import settings_for

    sport, tport = free_port(), free_port()

    async def trainer_up() -> tuple[Any, GrpcServer]:
        settings = settings_for(TrainerSettings, tmp_path, streamer_target=f"127.0.0.1:{sport}",
                                inference_target="", checkpoint_every_s=0.0)
        app = await create_trainer(dataclasses.replace(settings))
        server = GrpcServer(ServerOptions(name="trainer", host="127.0.0.1", port=tport, grace_s=0.2), app)
        await server.start()
        return app, server

    async with streamer_on(sport):
        app, server = await trainer_up()
        run = tensorwire.init(task="restart", params={"learning_rate": 0.05},
                              streamer=f"127.0.0.1:{sport}", trainer=f"127.0.0.1:{tport}")
        script = Script(run)
        try:
            await until(lambda: run.registered.is_set())
            await until(lambda: app.runs.get_run(run.id).loop.status.step > 10)
            await server.stop(0.1)
            held = script.step
            await asyncio.sleep(0.5)
            assert script.step > held  # training goes on while the trainer is away
            app, server = await trainer_up()
            await until(lambda: any(r.run_id == run.id for r in app.runs.list_runs()), 30)
            got = app.runs.get_run(run.id)
            assert got.external and got.task.name == "restart"
            await until(lambda: app.runs.get_run(run.id).loop.status.step > script.step - 50, 30)
            app.runs.update_run(run.id, {"learning_rate": 0.02})  # control works again
            await until(lambda: run.params["learning_rate"] == pytest.approx(0.02))
            await app.runs.stop_run(run.id)
            await asyncio.to_thread(script.thread.join, 20)
            await until(lambda: app.runs.get_run(run.id).state == cpb.RUN_STATE_STOPPED)
        finally:
            run._stop = True
            await asyncio.to_thread(script.thread.join, 20)
            await server.stop(0.1)
