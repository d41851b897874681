"""The run store end to end: real trainer servers on real sockets, restarted over
SQLite and a real PostgreSQL server; runs, history and checkpoints survive and resume."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.trainer.app import TrainerApp
from services.trainer.app import create_app as create_trainer
from services.trainer.settings import TrainerSettings
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data.scalars import from_batch
from tensorwire.serving import modelrepo
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tests.conftest import free_port, serving, settings_for
from tests.deploy.processes import ROOT, wait_serving
from tests.support.postgres import pg_dsn, pg_server  # noqa: F401  (fixtures)
from tests.support.waiting import until


@contextlib.asynccontextmanager
async def trainer(settings: TrainerSettings) -> AsyncIterator[tuple[TrainerApp, tpb_grpc.TrainerServiceStub, grpc.aio.Channel]]:
    app = await create_trainer(settings)
    async with serving(app, "trainer") as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield app, tpb_grpc.TrainerServiceStub(channel), channel


@pytest.fixture(params=["sqlite", "postgresql"])
def store_spec(request: pytest.FixtureRequest) -> str:
    return "" if request.param == "sqlite" else request.getfixturevalue("pg_dsn")


def settings(tmp_path: Path, store_spec: str, **overrides: Any) -> TrainerSettings:
    return settings_for(TrainerSettings, tmp_path, streamer_target="", inference_target="",
                        checkpoint_every_s=0.0, checkpoint_every_steps=200, run_store=store_spec,
                        **overrides)


async def status_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


async def test_restart_interrupts_then_resume_continues_from_the_checkpoint(tmp_path: Path, store_spec: str) -> None:
    cfg = settings(tmp_path, store_spec)
    async with trainer(cfg) as (app, stub, _):
        run = (await stub.StartRun(tpb.StartRunRequest(
            task="spiral", params={"max_steps": 0}, seed=3, name="keeper", tags=["restart"]))).run
        done = (await stub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 50}))).run
        await until(lambda: app.runs.get_run(run.run_id).checkpoint_step >= 400)
        await until(lambda: app.runs.get_run(done.run_id).state == cpb.RUN_STATE_COMPLETED)
        before = (await stub.GetRun(tpb.GetRunRequest(run_id=run.run_id))).run
    # The trainer exited while the run was live: the run is INTERRUPTED, its last
    # checkpoint was written on the way out, its whole curve is stored.
    async with trainer(cfg) as (app, stub, _):
        listed = (await stub.ListRuns(tpb.ListRunsRequest())).runs
        assert {r.run_id for r in listed} >= {run.run_id, done.run_id}
        got = (await stub.GetRun(tpb.GetRunRequest(run_id=run.run_id))).run
        assert got.state == cpb.RUN_STATE_INTERRUPTED and got.name == "keeper" and list(got.tags) == ["restart"]
        assert got.checkpoint_step >= before.step and got.ended_at > 0
        assert (await stub.GetRun(tpb.GetRunRequest(run_id=done.run_id))).run.state == cpb.RUN_STATE_COMPLETED
        history = from_batch((await stub.GetRunScalars(
            tpb.GetRunScalarsRequest(run_id=run.run_id, max_points=100_000))).scalars)
        loss = history["loss"]
        assert loss[0].step == 1 and loss[-1].step >= before.step
        assert [b.step for b in loss] == list(range(1, loss[-1].step + 1))  # every step, raw
        small = from_batch((await stub.GetRunScalars(
            tpb.GetRunScalarsRequest(run_id=run.run_id, max_points=50, names=["loss"]))).scalars)
        assert set(small) == {"loss"} and len(small["loss"]) <= 50
        assert sum(b.count for b in small["loss"]) == len(loss)

        resumed = (await stub.ResumeRun(tpb.ResumeRunRequest(run_id=run.run_id))).run
        assert resumed.run_id == run.run_id and resumed.state == cpb.RUN_STATE_RUNNING
        assert resumed.step >= got.checkpoint_step  # it trains on at once
        resumed_event = [e for e in await asyncio.to_thread(app.runs.events, run.run_id) if e.kind == "resumed"]
        assert [e.step for e in resumed_event] == [got.checkpoint_step]  # from the checkpoint's step
        live = app.runs.get_run(run.run_id)
        adam = next(iter(live.loop.optimizer.state_dict()["state"].values()))
        assert int(adam["step"]) >= got.checkpoint_step  # the optimizer's state came back
        await until(lambda: live.loop.status.step > got.checkpoint_step + 100)
        # Hostile and wrong calls: precise statuses, the service stays up.
        assert await status_of(stub.ResumeRun(tpb.ResumeRunRequest(run_id=done.run_id))) == (
            grpc.StatusCode.FAILED_PRECONDITION)
        assert await status_of(stub.ResumeRun(tpb.ResumeRunRequest(run_id="nope"))) == grpc.StatusCode.NOT_FOUND
        assert await status_of(stub.DeleteRun(tpb.DeleteRunRequest(run_id="nope"))) == grpc.StatusCode.NOT_FOUND
        assert await status_of(stub.DeleteRun(tpb.DeleteRunRequest(run_id=""))) == (
            grpc.StatusCode.INVALID_ARGUMENT)
        assert await status_of(stub.DeleteRun(tpb.DeleteRunRequest(run_id=run.run_id))) == (
            grpc.StatusCode.FAILED_PRECONDITION)
        assert await status_of(stub.GetRunScalars(tpb.GetRunScalarsRequest(run_id="nope"))) == (
            grpc.StatusCode.NOT_FOUND)
        await stub.StopRun(tpb.StopRunRequest(run_id=run.run_id))
        assert app.runs.flush_checkpoints(30)
        repo = cfg.model_repository
        assert modelrepo.list_versions(repo, f"run-{run.run_id}")
        await stub.DeleteRun(tpb.DeleteRunRequest(run_id=run.run_id))
        assert not (repo / f"run-{run.run_id}").exists()
        assert not (cfg.data_path / "state" / f"{run.run_id}.pt").exists()
        assert await status_of(stub.GetRun(tpb.GetRunRequest(run_id=run.run_id))) == grpc.StatusCode.NOT_FOUND
        assert (await stub.GetRunScalars(tpb.GetRunScalarsRequest(run_id=done.run_id))).scalars.series


async def test_list_runs_pages_filters_labels_and_hostile_input(tmp_path: Path, store_spec: str) -> None:
    cfg = settings(tmp_path, store_spec)
    async with trainer(cfg) as (app, stub, _):
        ids = []
        for i, task in enumerate(["spiral", "spiral", "anomaly"]):
            r = (await stub.StartRun(tpb.StartRunRequest(task=task, params={"max_steps": 5},
                                                        name=f"sweep {i}"))).run
            ids.append(r.run_id)
        await until(lambda: all(app.runs.get_run(i).state == cpb.RUN_STATE_COMPLETED for i in ids))
        page = await stub.ListRuns(tpb.ListRunsRequest(page_size=2, order_by="created_at desc"))
        assert [r.run_id for r in page.runs] == ids[::-1][:2] and page.next_page_token and page.total_size == 3
        rest = await stub.ListRuns(tpb.ListRunsRequest(page_size=2, order_by="created_at desc",
                                                      page_token=page.next_page_token))
        assert [r.run_id for r in rest.runs] == ids[:1] and not rest.next_page_token
        spiral = await stub.ListRuns(tpb.ListRunsRequest(filter='task = "spiral" AND state = COMPLETED'))
        assert [r.run_id for r in spiral.runs] == ids[:2]
        # Labels are editable, on live and on stored runs, and searchable.
        updated = (await stub.UpdateRun(tpb.UpdateRunRequest(
            run_id=ids[2], name="the anomaly one", tags=["best", "v2"], notes="looks good",
            update_mask=FieldMask(paths=["name", "tags", "notes"])))).run
        assert (updated.name, list(updated.tags), updated.notes) == ("the anomaly one", ["best", "v2"], "looks good")
        found = await stub.ListRuns(tpb.ListRunsRequest(filter='tags:"best"'))
        assert [r.run_id for r in found.runs] == [ids[2]]
        assert [r.run_id for r in (await stub.ListRuns(tpb.ListRunsRequest(filter="good"))).runs] == [ids[2]]
        # Hostile input.
        bad = [
            stub.ListRuns(tpb.ListRunsRequest(filter="state = SLEEPING")),
            stub.ListRuns(tpb.ListRunsRequest(filter="x" * 2000)),
            stub.ListRuns(tpb.ListRunsRequest(order_by="loss")),
            stub.ListRuns(tpb.ListRunsRequest(page_token="not-a-token")),
            stub.ListRuns(tpb.ListRunsRequest(page_size=-5)),
            stub.ListRuns(tpb.ListRunsRequest(filter="task = spiral", page_token=page.next_page_token)),
            stub.UpdateRun(tpb.UpdateRunRequest(run_id=ids[0], update_mask=FieldMask(paths=["seed"]))),
            stub.UpdateRun(tpb.UpdateRunRequest(run_id=ids[0], tags=['a"b'], update_mask=FieldMask(paths=["tags"]))),
            stub.UpdateRun(tpb.UpdateRunRequest(run_id=ids[0], name="n" * 500, update_mask=FieldMask(paths=["name"]))),
            stub.StartRun(tpb.StartRunRequest(task="spiral", tags=[""])),
            stub.GetRunScalars(tpb.GetRunScalarsRequest(run_id=ids[0], max_points=1)),
        ]
        for call in bad:
            assert await status_of(call) == grpc.StatusCode.INVALID_ARGUMENT
        assert await status_of(stub.UpdateRun(tpb.UpdateRunRequest(
            run_id="nope", name="x", update_mask=FieldMask(paths=["name"])))) == grpc.StatusCode.NOT_FOUND
        # Ended runs leave memory once stored; they are still found, from the store.
        app.runs.release_after_s = 0.0
        await until(lambda: not app.runs.list_runs())
        assert (await stub.GetRun(tpb.GetRunRequest(run_id=ids[2]))).run.name == "the anomaly one"
        assert len((await stub.ListRuns(tpb.ListRunsRequest())).runs) == 3


async def test_list_runs_gives_each_run_the_best_value_of_its_main_metric(tmp_path: Path, store_spec: str) -> None:
    cfg = settings(tmp_path, store_spec)
    async with trainer(cfg) as (app, stub, _):
        # spiral is judged by its highest accuracy, anomaly by its lowest loss.
        spiral = (await stub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 300}))).run
        anomaly = (await stub.StartRun(tpb.StartRunRequest(task="anomaly", params={"max_steps": 100}))).run
        live = (await stub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 0}))).run
        ended = (spiral.run_id, anomaly.run_id)
        await until(lambda: all(app.runs.get_run(i).state == cpb.RUN_STATE_COMPLETED for i in ended))
        await until(lambda: app.runs.get_run(live.run_id).loop.status.step > 50)

        async def history(run_id: str, name: str) -> list[float]:
            series = from_batch((await stub.GetRunScalars(tpb.GetRunScalarsRequest(
                run_id=run_id, max_points=100_000, names=[name]))).scalars)[name]
            assert all(b.count == 1 for b in series)  # raw points
            return [b.mean for b in series]

        async def best() -> dict[str, tpb.BestMetric]:
            listed = (await stub.ListRuns(tpb.ListRunsRequest())).runs
            return {r.run_id: r.best for r in listed if r.HasField("best")}

        accuracy, loss = await history(spiral.run_id, "accuracy"), await history(anomaly.run_id, "loss")
        assert len(accuracy) == 300 and len(loss) == 100
        expected = {spiral.run_id: tpb.BestMetric(name="accuracy", value=max(accuracy), higher_is_better=True),
                    anomaly.run_id: tpb.BestMetric(name="loss", value=min(loss), higher_is_better=False)}
        found = await best()
        assert {r: found[r] for r in ended} == expected, found
        assert found[live.run_id].name == "accuracy" and 0 < found[live.run_id].value <= 1  # live runs too
        # Once the ended runs left memory, the same values come from the store alone.
        app.runs.release_after_s = 0.0
        await until(lambda: not any(r.run_id in ended for r in app.runs.list_runs()))
        found = await best()
        assert {r: found[r] for r in ended} == expected
        await stub.StopRun(tpb.StopRunRequest(run_id=live.run_id))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_broken_store_never_stops_training_and_is_used_again_once_back(tmp_path: Path) -> None:
    path = tmp_path / "broken.sqlite3"
    path.write_bytes(b"not a database at all " * 200)
    cfg = settings(tmp_path, str(path))
    errors_before = metric("tensorwire_run_store_errors_total", store="runs")
    async with trainer(cfg) as (app, stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == (
            health_pb2.HealthCheckResponse.SERVING)
        run = (await stub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 0}))).run
        await until(lambda: app.runs.get_run(run.run_id).loop.status.step >= 300)
        assert metric("tensorwire_run_store_errors_total", store="runs") > errors_before
        assert not app.runs.recorder.healthy and "not a database" in app.runs.recorder.last_error
        # Listing still works (from memory) while the store is down.
        assert [r.run_id for r in (await stub.ListRuns(tpb.ListRunsRequest())).runs] == [run.run_id]
        path.unlink()  # the store comes back (a fresh file)
        await until(lambda: app.runs.recorder.healthy, 20)
        await until(lambda: app.runs.recorder.store.get_run(run.run_id) is not None)
        await stub.StopRun(tpb.StopRunRequest(run_id=run.run_id))
        stopped_at = app.runs.get_run(run.run_id).loop.status.step
        history = from_batch((await stub.GetRunScalars(
            tpb.GetRunScalarsRequest(run_id=run.run_id, max_points=100_000))).scalars)
        # Nothing was lost: the points buffered during the outage were written too.
        assert [b.step for b in history["loss"]] == list(range(1, stopped_at + 1))
        assert app.runs.recorder.dropped == 0


async def test_the_demo_run_never_replaces_a_served_model_and_resumes_after_a_restart(tmp_path: Path) -> None:
    cfg = settings(tmp_path, "", demo_task="spiral", demo_models=False)
    repo = cfg.model_repository
    # A better model is served as "spiral" already.
    import torch

    from tensorwire.serving.models import build_model

    modelrepo.write_version(repo, "spiral", "spiral", build_model("spiral").state_dict())
    served = torch.load(modelrepo.weights_path(repo, "spiral", 1), weights_only=True)
    async with trainer(cfg) as (app, _stub, _):
        demo = app.runs.get_run(app.demo_run_id)
        assert demo.publish_as == () and demo.tags == ("demo",)
        await until(lambda: demo.checkpoint_step >= 400)
        assert modelrepo.list_versions(repo, "spiral") == [1]
        first_id = demo.run_id
    after = torch.load(modelrepo.weights_path(repo, "spiral", 1), weights_only=True)
    assert all(torch.equal(served[k], after[k]) for k in served)
    async with trainer(cfg) as (app, _stub, _):
        assert app.demo_run_id == first_id  # the interrupted demo run goes on
        demo = app.runs.get_run(first_id)
        assert demo.loop.status.step >= 400 and demo.state == cpb.RUN_STATE_RUNNING
        assert modelrepo.list_versions(repo, "spiral") == [1]


async def test_an_unreachable_postgresql_never_stops_training(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    cfg = settings(tmp_path, "postgresql://nobody:secret@127.0.0.1:1/none")
    errors_before = metric("tensorwire_run_store_errors_total", store="runs")
    async with trainer(cfg) as (app, stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == (
            health_pb2.HealthCheckResponse.SERVING)
        run = (await stub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 0}))).run
        await until(lambda: app.runs.get_run(run.run_id).loop.status.step >= 200)
        await until(lambda: metric("tensorwire_run_store_errors_total", store="runs") > errors_before)
        assert "secret" not in app.runs.recorder.store.description
        assert [r.run_id for r in (await stub.ListRuns(tpb.ListRunsRequest())).runs] == [run.run_id]
        assert (await stub.GetRun(tpb.GetRunRequest(run_id=run.run_id))).run.state == cpb.RUN_STATE_RUNNING
        assert await status_of(stub.GetRun(tpb.GetRunRequest(run_id="elsewhere"))) == grpc.StatusCode.UNAVAILABLE


async def test_a_second_stop_signal_while_draining_still_writes_the_last_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C on ``tensorwire up`` reaches the trainer twice: from the terminal (every
    process of its group) and from ``up`` (SIGTERM to each child). The second signal
    comes while the trainer drains; it must not kill it there: the live run's last
    checkpoint (here its only one) is written and the run recorded INTERRUPTED, and
    the next trainer resumes it from that step. (A trainer killed there left no
    checkpoint, and the page's Resume after a suite restart answered FAILED_PRECONDITION.)"""
    cfg = settings_for(TrainerSettings, tmp_path, streamer_target="", inference_target="",
                       checkpoint_every_s=0.0, checkpoint_every_steps=0)  # only the last checkpoint
    port = free_port()
    log_path = tmp_path / "trainer.log"
    argv = [sys.executable, "-m", "services.trainer", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "-1", "--grace-s", "3", "--streamer-target=", "--inference-target=",
            "--model-repository", str(cfg.model_repository), "--data-dir", str(cfg.data_path),
            "--checkpoint-every-s", "0", "--checkpoint-every-steps", "0", "--demo-task="]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    attached = asyncio.Event()
    try:
        await wait_serving(f"127.0.0.1:{port}", 60, proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tpb_grpc.TrainerServiceStub(channel)
            run = (await stub.StartRun(tpb.StartRunRequest(task="spiral", params={"max_steps": 0}))).run
            await until(lambda: _step_above(stub, run.run_id, 200))
            # A training script attached (an SDK run): its open stream holds the
            # drain for the grace period, the time a second signal has to arrive in.
            script = (await stub.RegisterRun(tpb.RegisterRunRequest(task="script"))).run

            async def requests() -> AsyncIterator[tpb.AttachRunRequest]:
                yield tpb.AttachRunRequest(run_id=script.run_id)
                await attached.wait()

            attach = stub.AttachRun(requests())
            await attach.read()  # attached
            proc.send_signal(signal.SIGTERM)  # the terminal's Ctrl-C ...
            await until(lambda: b"shutdown signal" in log_path.read_bytes(), 20)
            proc.send_signal(signal.SIGTERM)  # ... and `tensorwire up`'s SIGTERM, while it drains
            code = await asyncio.to_thread(proc.wait, 30)
            attached.set()
        log_text = log_path.read_text(errors="replace")
        assert code == 0 and "trainer stopped" in log_text, log_text[-3000:]
    finally:
        attached.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    async with trainer(cfg) as (app, stub, _):
        got = (await stub.GetRun(tpb.GetRunRequest(run_id=run.run_id))).run
        assert got.state == cpb.RUN_STATE_INTERRUPTED and got.step > 200
        assert got.checkpoint_step == got.step  # written on the way out, at the last step
        resumed = (await stub.ResumeRun(tpb.ResumeRunRequest(run_id=run.run_id))).run
        assert resumed.state == cpb.RUN_STATE_RUNNING and resumed.step >= got.step
        await until(lambda: app.runs.get_run(run.run_id).loop.status.step > got.step + 100)
        await stub.StopRun(tpb.StopRunRequest(run_id=run.run_id))


async def _step_above(stub: tpb_grpc.TrainerServiceStub, run_id: str, step: int) -> bool:
    return (await stub.GetRun(tpb.GetRunRequest(run_id=run_id))).run.step > step
