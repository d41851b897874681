"""The digits example end to end on real servers: the SDK script as a subprocess (listed,
completed, exported), and the task plugin through the trainer service (ListTasks,
StartRun); a broken plugin is reported and the trainer serves the others."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.trainer.v1 import trainer_pb2 as tpb
from tensorwire.trainer.v1 import trainer_pb2_grpc as tpb_grpc
from tests.conftest import free_port
from tests.integration.test_live import streamer_on, trainer_for
from tests.support.waiting import until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits"


async def test_the_tracked_digits_script_is_listed_and_exported(tmp_path: Path) -> None:
    port = free_port()
    async with streamer_on(port), trainer_for(tmp_path, port) as (_, server):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TENSORWIRE_STREAMER": f"127.0.0.1:{port}",
               "TENSORWIRE_TRAINER": f"127.0.0.1:{server.port}", "TENSORWIRE_INFERENCE": "",
               "TENSORWIRE_EXPORT_DIR": str(tmp_path / "models")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(DIGITS / "train_tracked.py"), "--steps", "400",
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 240)
        assert proc.returncode == 0, out.decode()
        assert "test accuracy" in out.decode()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            runs = (await tpb_grpc.TrainerServiceStub(channel).ListRuns(tpb.ListRunsRequest())).runs
        [run] = [r for r in runs if r.task == "digits-cnn"]
        assert run.state == cpb.RUN_STATE_COMPLETED and run.step == 400
        assert run.metrics["loss"] < 1.0 and run.params["batch_size"] == 64
        assert (tmp_path / "models" / "digits-cnn" / "1" / "model.pt2").is_file()
        assert 'platform: "torch_export"' in (tmp_path / "models" / "digits-cnn" / "config.pbtxt").read_text()


async def test_the_digits_task_plugin_runs_in_the_trainer(tmp_path: Path) -> None:
    broken = tmp_path / "broken_task.py"
    broken.write_text("import not_a_module_anywhere\n")
    port = free_port()
    async with streamer_on(port), trainer_for(
        tmp_path, port, task_module=(str(DIGITS / "task.py"), str(broken))
    ) as (app, server):
        assert [str(broken) in str(e) and "not_a_module_anywhere" in str(e) for e in app.plugin_errors] == [True]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            trainer = tpb_grpc.TrainerServiceStub(channel)
            tasks = {t.name: t for t in (await trainer.ListTasks(tpb.ListTasksRequest())).tasks}
            assert "spiral" in tasks and "digits" in tasks
            assert "channels" in [p.name for p in tasks["digits"].params]
            run = (await trainer.StartRun(tpb.StartRunRequest(task="digits", params={"max_steps": 150}))).run
            await until(lambda: app.runs.get_run(run.run_id).state == cpb.RUN_STATE_COMPLETED, 120)
            done = (await trainer.GetRun(tpb.GetRunRequest(run_id=run.run_id))).run
            assert done.step == 150 and done.metrics["accuracy"] > 0.2
