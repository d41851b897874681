"""Training beyond one process: a world-size-2 DDP run on this machine (gloo, loopback).

Two real processes rendezvous over TCP on 127.0.0.1 exactly as two pods of the
indexed Job in deploy/k8s/jobs/distributed-training do (RANK from
JOB_COMPLETION_INDEX), train the spiral task, and must end with identical weights —
and with the weights a single process gets by training on both ranks' batches at
once, which proves the gradients really were averaged across the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.trainer import distributed
from services.trainer.tasks import TASKS
from tensorwire.errors import InvalidArgumentError
from tensorwire.serving import modelrepo
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS = 25
SEED = 7


def _rank_env(rank: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
        # rank 0 as torchrun sets it, rank 1 as a Kubernetes indexed Job sets it
        **({"RANK": "0"} if rank == 0 else {"JOB_COMPLETION_INDEX": "1"}),
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
    )
    return env


def _reference_weights(world_size: int) -> dict[str, torch.Tensor]:
    """One process, one model, each step on the union of every rank's batch."""
    task = TASKS["spiral"]
    config = task.configure()
    torch.manual_seed(SEED)
    data = task.make_data(config, seed=SEED)
    model = task.build_model(config)
    optimizer = task.make_optimizer(model, config)
    gens = [distributed.batch_generator(SEED, r) for r in range(world_size)]
    for _ in range(STEPS):
        parts = [task.sample_batch(data, config, g) for g in gens]
        batch = tuple(torch.cat(tensors) for tensors in zip(*parts))
        task.train_step(model, optimizer, batch)
    return model.state_dict()


@pytest.mark.slow
def test_two_ranks_end_with_identical_averaged_weights(tmp_path: Path) -> None:
    port = free_port()
    repo = tmp_path / "models"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "services.trainer.distributed", "--task", "spiral",
             "--steps", str(STEPS), "--seed", str(SEED), "--log-every", "10",
             "--timeout-s", "120", "--model-repository", str(repo),
             "--weights-out", str(tmp_path / "rank{rank}.pt")],
            cwd=ROOT, env=_rank_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, f"rank exited {proc.returncode}:\n{err[-3000:]}"
            outputs.append(json.loads(out.strip().splitlines()[-1])["ddp_result"])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert [o["rank"] for o in outputs] == [0, 1]
    assert all(o["world_size"] == 2 and o["backend"] == "gloo" for o in outputs)
    assert outputs[0]["first_loss"] == outputs[1]["first_loss"]  # all-reduced: one value

    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and w0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"ranks disagree on {name}"

    # The ranks drew different batches, and DDP averaged their gradients: the result
    # is what one process gets on both batches together (mean loss over the union).
    reference = _reference_weights(2)
    for name in w0:
        torch.testing.assert_close(w0[name], reference[name], rtol=1e-4, atol=1e-5)
    alone = TASKS["spiral"].build_model(TASKS["spiral"].configure()).state_dict()
    assert any(not torch.allclose(w0[n], alone[n]) for n in w0), "weights never changed"

    # Rank 0 (only) wrote the checkpoint into the model repository.
    assert outputs[0]["version"] == 1 and outputs[1]["version"] is None
    assert modelrepo.list_versions(repo, "ddp-spiral") == [1]
    saved = modelrepo.load_state_dict(modelrepo.weights_path(repo, "ddp-spiral", 1))
    for name in w0:
        assert torch.equal(saved[name], w0[name])


def test_rendezvous_reads_torchrun_and_indexed_job_variables() -> None:
    base = {"MASTER_ADDR": "trainer-ddp-0.trainer-ddp", "MASTER_PORT": "29500", "WORLD_SIZE": "4"}
    assert distributed.Rendezvous.from_env({**base, "RANK": "2", "LOCAL_RANK": "1"}) == (
        distributed.Rendezvous(rank=2, world_size=4, local_rank=1)
    )
    assert distributed.Rendezvous.from_env({**base, "JOB_COMPLETION_INDEX": "3"}).rank == 3
    with pytest.raises(InvalidArgumentError, match="MASTER_PORT, RANK"):
        distributed.Rendezvous.from_env({"MASTER_ADDR": "x", "WORLD_SIZE": "2"})
    with pytest.raises(InvalidArgumentError, match=r"RANK must be in \[0, WORLD_SIZE=4\), got 4"):
        distributed.Rendezvous.from_env({**base, "RANK": "4"})
    with pytest.raises(InvalidArgumentError, match="must be integers"):
        distributed.Rendezvous.from_env({**base, "RANK": "zero"})


def test_bad_task_is_refused_before_joining_the_group(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in _rank_env(0, free_port()).items():
        monkeypatch.setenv(key, value)
    assert distributed.main(["--task", "nope"]) == 2
    assert "unknown task 'nope'; known: anomaly, detection, fusion, spiral, trajectory" in (
        capsys.readouterr().err
    )
    assert distributed.main(["--task", "spiral", "--params-json", '{"learning_rate": -1}']) == 2
    assert "learning_rate must be in" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message on a machine without CUDA")
def test_nccl_without_a_gpu_is_refused_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in _rank_env(0, free_port()).items():
        monkeypatch.setenv(key, value)
    assert distributed.main(["--backend", "nccl"]) == 2
    assert "backend nccl needs a CUDA device; use gloo on CPU" in capsys.readouterr().err
    assert distributed.pick_backend("auto") == "gloo"
