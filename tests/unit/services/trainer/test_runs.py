"""RunManager and the training loop: control, errors, checkpoints (real threads, no gRPC)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from services.trainer.runs import RunManager
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tensorwire.serving import modelrepo
from tensorwire.serving.models import build_model


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


async def test_lifecycle_and_errors(tmp_path: Path) -> None:
    runs = RunManager(tmp_path / "models", checkpoint_every_steps=100, checkpoint_every_s=0)
    written: list[tuple[str, int]] = []
    runs.listeners.append(lambda name, version: written.append((name, version)))
    try:
        run = runs.start_run("spiral", {"learning_rate": 0.05}, {"dataset": "xor"}, seed=7)
        assert run.seed == 7 and run.config.options["dataset"] == "xor"
        wait_for(lambda: run.loop.status.step >= 120)
        assert run.state == cpb.RUN_STATE_RUNNING

        runs.pause_run(run.run_id)
        assert run.state == cpb.RUN_STATE_PAUSED
        wait_for(lambda: run.loop.status.state == cpb.RUN_STATE_PAUSED)
        paused_at = run.loop.status.step
        snap = run.loop.request_snapshot().result(5)  # served while paused
        assert snap.step == paused_at

        runs.update_run(run.run_id, {"learning_rate": 0.2, "batch_size": 16})
        with pytest.raises(InvalidArgumentError, match="hidden cannot change"):
            runs.update_run(run.run_id, {"hidden": 64})
        with pytest.raises(InvalidArgumentError, match="learning_rate"):
            runs.update_run(run.run_id, {"learning_rate": -1})
        with pytest.raises(InvalidArgumentError, match="params is empty"):
            runs.update_run(run.run_id, {})
        await runs.resume_run(run.run_id)
        wait_for(lambda: run.loop.status.step > paused_at + 20)
        assert run.loop.optimizer.param_groups[0]["lr"] == 0.2
        assert run.config.batch_size == 16

        await runs.stop_run(run.run_id)
        assert run.state == cpb.RUN_STATE_STOPPED
        with pytest.raises(FailedPreconditionError, match="STOPPED"):
            runs.pause_run(run.run_id)
        with pytest.raises(FailedPreconditionError, match="STOPPED"):
            await runs.resume_run(run.run_id)
        with pytest.raises(FailedPreconditionError):
            runs.update_run(run.run_id, {"learning_rate": 0.1})
        with pytest.raises(NotFoundError, match="nope"):
            runs.get_run("nope")
        with pytest.raises(InvalidArgumentError, match="unknown task 'chess'"):
            runs.start_run("chess")

        assert runs.flush_checkpoints(30)
        versions = modelrepo.list_versions(tmp_path / "models", run.model_name)
        assert versions and written and written[-1][0] == run.model_name
        config = modelrepo.read_config(tmp_path / "models", run.model_name)
        assert config["kind"] == "spiral"
        state = torch.load(
            modelrepo.weights_path(tmp_path / "models", run.model_name, versions[-1]), weights_only=True
        )
        model = build_model("spiral", **config["model_args"])
        model.load_state_dict(state)  # the checkpoint is a loadable state_dict
        final = run.loop.request_snapshot().result(5)
        for name, tensor in state.items():
            assert torch.equal(tensor, final.state_dict[name])  # the last checkpoint is the final weights
    finally:
        await runs.aclose()


async def test_max_steps_completes_and_publishes_under_extra_names(tmp_path: Path) -> None:
    runs = RunManager(tmp_path, checkpoint_every_s=0)
    try:
        run = runs.start_run("trajectory", {"max_steps": 30}, publish_as=("trajectory",))
        assert run.loop.join(60)
        assert run.state == cpb.RUN_STATE_COMPLETED and run.loop.status.step == 30
        assert runs.flush_checkpoints(30)
        assert modelrepo.list_versions(tmp_path, "trajectory") == [1]
        scalars = run.loop.take_scalars()
        steps: list[int] = []
        for bucket in scalars["loss"]:
            steps.extend(range(bucket.first_step, bucket.step + 1))
        assert steps == list(range(1, 31))
        with pytest.raises(InvalidArgumentError):
            runs.start_run("spiral", publish_as=("../evil",))
    finally:
        await runs.aclose()


async def test_active_run_cap(tmp_path: Path) -> None:
    runs = RunManager(None, max_active_runs=1)
    try:
        runs.start_run("spiral")
        with pytest.raises(ResourceExhaustedError, match="limit is 1"):
            runs.start_run("spiral")
    finally:
        await runs.aclose()
