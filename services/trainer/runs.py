"""RunManager: owns the training runs and their checkpoints (plain Python, no gRPC).

Each run is a :class:`~services.trainer.loop.TrainingLoop` thread. Checkpoint
snapshots go to one writer thread (latest wins per run, so a slow disk never
holds a training thread back) that writes them with
``tensorwire.modelrepo.write_version`` as model ``run-<run_id>`` (plus any
``publish_as`` names) and then reports each written version to a callback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tensorwire import modelrepo
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TensorwireError,
)

from .loop import TERMINAL, Snapshot, TrainingLoop
from .metrics import CHECKPOINTS
from .tasks import TASKS, RunConfig, Task

log = logging.getLogger(__name__)

CheckpointListener = Callable[[str, int], None]
"""Called (from the writer thread) with (model name, version) after each write."""


@dataclass
class Run:
    """One training run: its task, its loop and what was written of it."""

    run_id: str
    task: Task
    loop: TrainingLoop
    seed: int
    publish_as: tuple[str, ...] = ()
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    checkpoint_step: int = 0
    checkpoint_versions: dict[str, int] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return f"run-{self.run_id}"

    @property
    def state(self) -> int:
        return self.loop.state

    @property
    def config(self) -> RunConfig:
        return self.loop.config


class CheckpointWriter:
    """A thread that writes the newest pending checkpoint of each run."""

    def __init__(self, repository: Path, listeners: list[CheckpointListener], keep: int = 0) -> None:
        self.repository = repository
        self._listeners = listeners
        self._keep = keep
        self._pending: dict[str, tuple[Run, Snapshot]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, run: Run, snapshot: Snapshot) -> None:
        with self._cond:
            self._pending[run.run_id] = (run, snapshot)
            self._idle.clear()
            self._cond.notify()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every submitted checkpoint is written."""
        return self._idle.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._idle.set()
                    self._cond.wait()
                if not self._pending:
                    self._idle.set()
                    return
                run_id = next(iter(self._pending))
                run, snap = self._pending.pop(run_id)
            try:
                self._write(run, snap)
            except Exception:
                CHECKPOINTS.labels("failed").inc()
                log.exception("checkpoint of run %s at step %d failed", run.run_id, snap.step)
            else:
                CHECKPOINTS.labels("written").inc()

    def _write(self, run: Run, snap: Snapshot) -> None:
        for name in (run.model_name, *run.publish_as):
            version = modelrepo.write_version(
                self.repository, name, run.task.model_kind, snap.state_dict,
                model_args=snap.config.model_args or None,
            )
            run.checkpoint_versions[name] = version
            log.info("run %s: step %d written as %s version %d", run.run_id, snap.step, name, version)
            for listener in self._listeners:
                try:
                    listener(name, version)
                except Exception:
                    log.exception("checkpoint listener failed for %s/%d", name, version)
            try:
                pruned = modelrepo.prune_versions(self.repository, name, self._keep, (version,))
            except (OSError, TensorwireError) as exc:  # the checkpoint itself is written
                log.warning("model %s: pruning old versions failed: %s", name, exc)
            else:
                if pruned:
                    log.info("model %s: pruned versions %s (keeping the newest %d)", name, pruned, self._keep)
        run.checkpoint_step = snap.step


class RunManager:
    """Starts, controls, lists and checkpoints training runs."""

    def __init__(
        self,
        model_repository: Path | None = None,
        *,
        checkpoint_every_steps: int = 0,
        checkpoint_every_s: float = 30.0,
        keep_checkpoints: int = 0,
        max_active_runs: int = 8,
        tasks: Mapping[str, Task] = TASKS,
        device: torch.device | None = None,
    ) -> None:
        self.tasks = dict(tasks)
        self.device = device or torch.device("cpu")
        self._runs: dict[str, Run] = {}
        self._ckpt_steps = checkpoint_every_steps
        self._ckpt_s = checkpoint_every_s
        self._max_active = max_active_runs
        self.listeners: list[CheckpointListener] = []
        self._writer = (
            CheckpointWriter(model_repository, self.listeners, keep_checkpoints) if model_repository else None
        )

    # -- queries ----------------------------------------------------------
    def list_tasks(self) -> list[Task]:
        return list(self.tasks.values())

    def list_runs(self) -> list[Run]:
        return sorted(self._runs.values(), key=lambda r: r.created_at)

    def get_run(self, run_id: str) -> Run:
        if not run_id:
            raise InvalidArgumentError("run_id is empty")
        run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}")
        return run

    def task(self, name: str) -> Task:
        task = self.tasks.get(name)
        if task is None:
            raise InvalidArgumentError(
                f"unknown task {name!r}; known: {', '.join(sorted(self.tasks))}"
            )
        return task

    # -- control ----------------------------------------------------------
    def start_run(
        self,
        task_name: str,
        params: Mapping[str, float] | None = None,
        options: Mapping[str, str] | None = None,
        seed: int = 0,
        *,
        publish_as: tuple[str, ...] = (),
    ) -> Run:
        task = self.task(task_name)
        config = task.configure(params, options)
        active = sum(1 for r in self._runs.values() if r.state not in TERMINAL)
        if active >= self._max_active:
            raise ResourceExhaustedError(
                f"{active} runs are active, the limit is {self._max_active}; stop one first"
            )
        for name in publish_as:
            modelrepo.check_name(name)
        seed = seed or (time.time_ns() % (2**31 - 1)) + 1
        run_id = uuid.uuid4().hex[:12]
        loop = TrainingLoop(
            task, config, seed, name=run_id,
            on_checkpoint=(lambda snap: self._checkpoint(run_id, snap)) if self._writer else None,
            checkpoint_every_steps=self._ckpt_steps, checkpoint_every_s=self._ckpt_s,
            device=self.device,
        )
        run = Run(run_id, task, loop, seed, publish_as)
        self._runs[run_id] = run
        loop.start()
        log.info("run %s: task %s started (seed %d, params %s, options %s)",
                 run_id, task.name, seed, config.params, config.options)
        return run

    def _checkpoint(self, run_id: str, snap: Snapshot) -> None:
        run = self._runs.get(run_id)
        if run is not None and self._writer is not None:
            self._writer.submit(run, snap)

    def _live(self, run_id: str, verb: str) -> Run:
        run = self.get_run(run_id)
        if run.state in TERMINAL:
            raise FailedPreconditionError(
                f"cannot {verb} run {run_id!r}: it is {cpb.RunState.Name(run.state)}"
            )
        return run

    def pause_run(self, run_id: str) -> Run:
        run = self._live(run_id, "pause")
        run.loop.pause()
        run.updated_at = time.time()
        return run

    def resume_run(self, run_id: str) -> Run:
        run = self._live(run_id, "resume")
        run.loop.resume()
        run.updated_at = time.time()
        return run

    async def stop_run(self, run_id: str) -> Run:
        run = self.get_run(run_id)
        if run.state not in TERMINAL:
            run.loop.stop()
            await asyncio.to_thread(run.loop.join, 30.0)
            run.updated_at = time.time()
        return run

    def update_run(self, run_id: str, params: Mapping[str, float]) -> Run:
        run = self._live(run_id, "update")
        if not params:
            raise InvalidArgumentError("params is empty: name at least one hyper-parameter to change")
        current = run.config
        values = dict(current.params)
        for name, value in params.items():
            spec = run.task.param(name)
            checked = run.task.check_param(name, value)
            if not spec.live and checked != current.params[name]:
                raise InvalidArgumentError(
                    f"{name} cannot change while run {run_id!r} is live; start a new run"
                )
            values[name] = checked
        run.loop.update(RunConfig(values, dict(current.options), dict(current.model_args)))
        run.updated_at = time.time()
        return run

    def flush_checkpoints(self, timeout_s: float | None = None) -> bool:
        return self._writer.flush(timeout_s) if self._writer else True

    async def aclose(self) -> None:
        for run in self._runs.values():
            run.loop.stop()
        for run in self._runs.values():
            await asyncio.to_thread(run.loop.join, 30.0)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
