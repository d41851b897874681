"""Training beyond one process: a task trained with torch.distributed DDP.

Every process (a *rank*) holds a replica of the model, draws its own batches from
the task's data, and DistributedDataParallel averages the gradients across ranks
in ``backward()``; rank 0's initial weights are broadcast at construction, so all
ranks take identical optimiser steps and end with identical weights. The task
registry (:data:`services.trainer.tasks.TASKS`) supplies data, model, loss and
step unchanged — this module only adds the process group around it.

Backends: ``gloo`` on CPU, ``nccl`` on GPUs (``auto`` picks by what is present).
Rendezvous is torch's ``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``
and ``RANK`` (``LOCAL_RANK`` picks the GPU), exactly what ``torchrun`` and the
Kubeflow PyTorchJob set. A Kubernetes *indexed Job* sets ``JOB_COMPLETION_INDEX``
instead of ``RANK``; it is used as the rank when ``RANK`` is absent (see
deploy/k8s/jobs/distributed-training).

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 RANK=0 \\
        python -m services.trainer.distributed --task spiral --steps 300 &
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 RANK=1 \\
        python -m services.trainer.distributed --task spiral --steps 300

Rank 0 writes the trained weights into the model repository through
:func:`tensorwire.serving.modelrepo.write_version` (model ``--model-name``, default
``ddp-<task>``), where the inference service picks them up like any checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tensorwire.errors import InvalidArgumentError
from tensorwire.rpc import config as twconfig
from tensorwire.rpc.config import setting
from tensorwire.serving import modelrepo
from tensorwire.serving.admission import json_object

from .tasks import TASKS, Task

log = logging.getLogger("tensorwire.trainer.distributed")


@dataclass(frozen=True)
class DistributedSettings:
    """One rank of a distributed run (flags, else TENSORWIRE_DDP_<NAME>)."""

    env_prefix: ClassVar[str] = "TENSORWIRE_DDP_"
    service: ClassVar[str] = "trainer-ddp"

    task: str = setting("spiral", env="TASK", help="task to train (a key of the task registry)")
    steps: int = setting(200, env="STEPS", help="optimisation steps, the same on every rank", min=1)
    seed: int = setting(1, env="SEED", help="seed of the data and of the initial weights", min=0)
    params_json: str = setting(
        "{}", env="PARAMS_JSON", help='hyper-parameters as JSON, e.g. {"learning_rate": 0.03}'
    )
    options_json: str = setting("{}", env="OPTIONS_JSON", help="task options as JSON")
    backend: str = setting(
        "auto", env="BACKEND", help="process-group backend (auto: nccl with GPUs, else gloo)",
        choices=("auto", "gloo", "nccl"),
    )
    timeout_s: float = setting(
        300.0, env="TIMEOUT_S", help="seconds a rank waits for the others (rendezvous, collectives)",
        min=1,
    )
    model_repository: Path = setting(
        Path("var/models"), env="MODEL_REPOSITORY", help="where rank 0 writes the trained weights"
    )
    model_name: str = setting(
        "", env="MODEL_NAME", help="model name in the repository ('' = ddp-<task>; '-' = do not write)"
    )
    weights_out: str = setting(
        "", env="WEIGHTS_OUT",
        help="also save this rank's final state_dict here ({rank} is replaced; '' = no)",
    )
    log_every: int = setting(50, env="LOG_EVERY", help="log the mean loss every N steps", min=1)
    log_level: str = setting(
        "INFO", env="LOG_LEVEL", help="log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )


@dataclass(frozen=True)
class Rendezvous:
    """Where this process sits in the run, from torch's env:// variables."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Rendezvous:
        env = os.environ if env is None else env
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE") if not env.get(k)]
        raw_rank = env.get("RANK") or env.get("JOB_COMPLETION_INDEX")
        if raw_rank is None:
            missing.append("RANK (or JOB_COMPLETION_INDEX)")
        if missing:
            raise InvalidArgumentError(
                f"distributed training needs the environment variables {', '.join(missing)}"
            )
        try:
            rank, world = int(raw_rank or ""), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError:
            raise InvalidArgumentError(
                f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got RANK={raw_rank!r} "
                f"WORLD_SIZE={env['WORLD_SIZE']!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}"
            ) from None
        if world < 1 or not 0 <= rank < world:
            raise InvalidArgumentError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
        return cls(rank, world, local)


@dataclass(frozen=True)
class DistributedResult:
    """What one rank ends with."""

    rank: int
    world_size: int
    backend: str
    steps: int
    first_loss: float
    """Mean over ranks of the first step's loss."""
    last_loss: float
    """Mean over ranks of the last step's loss."""
    state_dict: dict[str, torch.Tensor]
    version: int | None = None
    """The repository version rank 0 wrote (None elsewhere or when not written)."""


def batch_generator(seed: int, rank: int) -> torch.Generator:
    """The generator rank ``rank`` draws its batches from: distinct per rank."""
    return torch.Generator().manual_seed(seed * 100_003 + rank)


def pick_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise InvalidArgumentError("backend nccl needs a CUDA device; use gloo on CPU")
    return requested


def _task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}"
        ) from None


def train(
    settings: DistributedSettings,
    rendezvous: Rendezvous,
    *,
    params: Mapping[str, float] | None = None,
    options: Mapping[str, str] | None = None,
) -> DistributedResult:
    """Join the process group, train ``settings.steps`` steps with DDP, leave it."""
    task = _task(settings.task)
    config = task.configure(params=params, options=options)
    backend = pick_backend(settings.backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rendezvous.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method="env://", rank=rendezvous.rank, world_size=rendezvous.world_size,
        timeout=datetime.timedelta(seconds=settings.timeout_s),
    )
    try:
        return _train_in_group(task, config, settings, rendezvous, backend, device)
    finally:
        dist.destroy_process_group()


def _train_in_group(
    task: Task, config: Any, settings: DistributedSettings, rdv: Rendezvous, backend: str,
    device: torch.device,
) -> DistributedResult:
    torch.manual_seed(settings.seed)
    data = task.make_data(config, seed=settings.seed)
    model = task.build_model(config).to(device)
    # DDP broadcasts rank 0's parameters and buffers here, and averages gradients
    # across the ranks during every backward().
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = task.make_optimizer(ddp, config)
    gen = batch_generator(settings.seed, rdv.rank)
    first = last = float("nan")
    for step in range(1, settings.steps + 1):
        batch = tuple(t.to(device) for t in task.sample_batch(data, config, gen))
        metrics = task.train_step(ddp, optimizer, batch)
        if step in (1, settings.steps) or step % settings.log_every == 0:
            loss = torch.tensor([metrics["loss"]], dtype=torch.float64, device=device)
            dist.all_reduce(loss)  # every rank takes part, so the call is collective
            mean = float(loss) / rdv.world_size
            if step == 1:
                first = mean
            last = mean
            if rdv.rank == 0:
                log.info("step %d/%d: mean loss %.5f over %d ranks",
                         step, settings.steps, mean, rdv.world_size)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    version = None
    if rdv.rank == 0 and settings.model_name != "-":
        name = settings.model_name or f"ddp-{task.name}"
        version = modelrepo.write_version(
            settings.model_repository, name, task.model_kind, state, model_args=config.model_args
        )
        log.info("wrote %s version %d to %s", name, version, settings.model_repository)
    dist.barrier()  # nobody leaves while rank 0 still writes
    return DistributedResult(
        rdv.rank, rdv.world_size, backend, settings.steps, first, last, state, version
    )


def main(argv: Sequence[str] | None = None) -> int:
    """One rank: ``python -m services.trainer.distributed --task spiral --steps 300``."""
    from tensorwire.rpc import log as twlog

    try:
        settings = twconfig.load(
            DistributedSettings, argv, prog="python -m services.trainer.distributed",
            description=__doc__.split("\n\n")[0] if __doc__ else None,
        )
        rendezvous = Rendezvous.from_env()
        params = json_object("params_json", settings.params_json)
        options = json_object("options_json", settings.options_json)
        _task(settings.task).configure(params=params, options=options)  # fail before joining
        pick_backend(settings.backend)
    except (twconfig.SettingsError, InvalidArgumentError) as exc:
        print(f"trainer-ddp: {exc}", file=sys.stderr, flush=True)
        return 2
    twlog.configure(f"trainer-ddp[{rendezvous.rank}]", settings.log_level)
    log.info("rank %d of %d: %s", rendezvous.rank, rendezvous.world_size,
             twconfig.describe(settings))
    result = train(settings, rendezvous, params=params, options=options)
    if settings.weights_out:
        torch.save(result.state_dict, settings.weights_out.replace("{rank}", str(result.rank)))
    summary = {k: v for k, v in dataclasses.asdict(result).items() if k != "state_dict"}
    print(json.dumps({"ddp_result": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
