"""One run's training thread: it never awaits I/O and never waits for a reader.

The thread trains step after step. After each step it:

- appends the step's metrics to a bounded scalar buffer (bounded by merging
  points into min/mean/max buckets, never by dropping them);
- publishes the run's live status into a latest-value slot (a single attribute
  assignment: readers see the newest value or the one before);
- serves weight-snapshot requests (a copy of the state_dict, microseconds for
  these models) so views are built from a consistent snapshot in another
  thread, never in this one;
- hands a checkpoint snapshot to a callback every N steps or seconds (the
  callback only enqueues; writing happens elsewhere).

Control (pause, resume, stop, new hyper-parameters) arrives through a lock-held
mailbox that the thread reads between steps.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data.scalars import Bucket, ScalarBuffer

from .tasks import RunConfig, Task

log = logging.getLogger(__name__)

TERMINAL = (cpb.RUN_STATE_STOPPED, cpb.RUN_STATE_FAILED, cpb.RUN_STATE_COMPLETED)


@dataclass(frozen=True)
class TrainingState:
    """What resuming a run needs beyond its weights (private copies)."""

    optimizer: dict[str, object]
    generator: torch.Tensor
    """The batch sampler's RNG state (``torch.Generator.get_state()``)."""
    step: int


@dataclass(frozen=True)
class Snapshot:
    """The weights after ``step`` (a private copy), and when that step finished."""

    step: int
    produced_at: float
    state_dict: dict[str, torch.Tensor]
    config: RunConfig
    training: TrainingState | None = None
    """Set on checkpoint snapshots: optimizer, RNG and step, for resuming."""


@dataclass(frozen=True)
class LiveStatus:
    """What the loop last reported (the latest-value slot holds one of these)."""

    state: int
    step: int
    produced_at: float
    steps_per_second: float
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


class TrainingLoop:
    """Trains ``task`` in a daemon thread; every public method is thread-safe."""

    def __init__(
        self,
        task: Task,
        config: RunConfig,
        seed: int,
        *,
        name: str = "run",
        on_checkpoint: Callable[[Snapshot], None] | None = None,
        on_scalars: Callable[[int, Mapping[str, float]], None] | None = None,
        resume: tuple[dict[str, torch.Tensor], TrainingState] | None = None,
        checkpoint_every_steps: int = 0,
        checkpoint_every_s: float = 0.0,
        max_points: int = 512,
        device: torch.device | None = None,
    ) -> None:
        self.task = task
        self.device = device or torch.device("cpu")
        self.seed = seed
        self._config = config
        self._pending_config: RunConfig | None = None
        self._on_checkpoint = on_checkpoint
        self._on_scalars = on_scalars
        self._ckpt_steps = checkpoint_every_steps
        self._ckpt_s = checkpoint_every_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._paused = False
        self._stopping = False
        self._snapshot_waiters: list[Future[Snapshot]] = []
        self._finished = False
        self._scalars = ScalarBuffer(max_points)
        torch.manual_seed(seed)
        self.data = task.make_data(config, seed)
        self.model = task.build_model(config).to(self.device)
        self.optimizer = task.make_optimizer(self.model, config)
        self._gen = torch.Generator().manual_seed(seed)
        self._step = 0
        if resume is not None:
            weights, training = resume
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(training.optimizer)
            task.apply_live_params(self.optimizer, config)
            self._gen.set_state(training.generator)
            self._step = training.step
        self.status = LiveStatus(cpb.RUN_STATE_PENDING, self._step, time.time(), 0.0)
        """The latest-value slot: replaced (never mutated) by the thread."""
        self._thread = threading.Thread(target=self._run, name=f"train-{name}", daemon=True)

    # -- control (any thread) --------------------------------------------
    @property
    def config(self) -> RunConfig:
        return self._pending_config or self._config

    @property
    def state(self) -> int:
        """RUNNING/PAUSED as last requested, else what the thread reported."""
        state = self.status.state
        if state in TERMINAL or state == cpb.RUN_STATE_PENDING:
            return state
        return cpb.RUN_STATE_PAUSED if self._paused else cpb.RUN_STATE_RUNNING

    def start(self) -> None:
        self.status = replace(self.status, state=cpb.RUN_STATE_RUNNING)
        self._thread.start()

    def pause(self) -> None:
        with self._lock:
            self._paused = True
        self._wake.set()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
        self._wake.set()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()

    def update(self, config: RunConfig) -> None:
        with self._lock:
            self._pending_config = config
        self._wake.set()

    def join(self, timeout_s: float | None = None) -> bool:
        if self._thread.ident is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def error(self) -> str:
        return self.status.error

    def take_scalars(self) -> dict[str, list[Bucket]]:
        """Every metric point since the last call (merged into buckets if many)."""
        with self._lock:
            return self._scalars.take()

    def request_snapshot(self) -> Future[Snapshot]:
        """A future of the weights after the current step (served between steps)."""
        fut: Future[Snapshot] = Future()
        with self._lock:
            if self._thread.ident is not None and not self._finished:
                self._snapshot_waiters.append(fut)
                self._wake.set()
                return fut
        fut.set_result(self._snapshot())
        return fut

    # -- the thread ------------------------------------------------------
    def _snapshot(self, training: bool = False) -> Snapshot:
        # A CPU copy: views, checkpoints and the inference service read it anywhere.
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        extra = None
        if training:  # on the training thread only: optimizer and RNG are its own
            opt = copy.deepcopy(self.optimizer.state_dict())
            for per_param in opt.get("state", {}).values():
                for k, v in per_param.items():
                    if isinstance(v, torch.Tensor):
                        per_param[k] = v.detach().to("cpu")
            extra = TrainingState(opt, self._gen.get_state(), self._step)
        return Snapshot(self.status.step, self.status.produced_at, state, self._config, extra)

    def _serve_snapshots(self) -> None:
        with self._lock:
            waiters, self._snapshot_waiters = self._snapshot_waiters, []
        if waiters:
            snap = self._snapshot()
            for fut in waiters:
                if not fut.cancelled():
                    fut.set_result(snap)

    def _run(self) -> None:
        try:
            self._train()
        finally:
            with self._lock:
                self._finished = True
            self._serve_snapshots()

    def _train(self) -> None:
        gen = self._gen
        step = self._step
        rate_at, rate_step, rate = time.monotonic(), 0, 0.0
        last_ckpt_step, last_ckpt_at = step, time.monotonic()
        max_steps = int(self._config.params.get("max_steps", 0))
        state = cpb.RUN_STATE_RUNNING
        self.model.train()
        on_cpu = self.device.type == "cpu"
        try:
            while True:
                if self._snapshot_waiters:
                    self._serve_snapshots()
                if self._pending_config is not None or self._paused or self._stopping:
                    with self._lock:
                        pending, self._pending_config = self._pending_config, None
                        paused, stopping = self._paused, self._stopping
                    if pending is not None:
                        self._config = pending
                        self.task.apply_live_params(self.optimizer, pending)
                    if stopping:
                        state = cpb.RUN_STATE_STOPPED
                        break
                    if paused:
                        if self.status.state != cpb.RUN_STATE_PAUSED:
                            self.status = replace(self.status, state=cpb.RUN_STATE_PAUSED, steps_per_second=0.0)
                        self._wake.wait(0.5)
                        self._wake.clear()
                        rate_at, rate_step = time.monotonic(), step
                        continue
                batch = self.task.sample_batch(self.data, self._config, gen)
                if not on_cpu:  # the data stays on the CPU (seeded generators); batches move
                    batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
                metrics = self.task.train_step(self.model, self.optimizer, batch)
                step += 1
                self._step = step
                now = time.time()
                with self._lock:
                    self._scalars.add(step, metrics)
                if self._on_scalars is not None:
                    self._on_scalars(step, metrics)
                mono = time.monotonic()
                if mono - rate_at >= 0.5:
                    rate = (step - rate_step) / (mono - rate_at)
                    rate_at, rate_step = mono, step
                self.status = LiveStatus(cpb.RUN_STATE_RUNNING, step, now, rate, metrics)
                if self._on_checkpoint is not None and (
                    (self._ckpt_steps and step - last_ckpt_step >= self._ckpt_steps)
                    or (self._ckpt_s and mono - last_ckpt_at >= self._ckpt_s)
                ):
                    last_ckpt_step, last_ckpt_at = step, mono
                    self._on_checkpoint(self._snapshot(training=True))
                if max_steps and step >= max_steps:
                    state = cpb.RUN_STATE_COMPLETED
                    break
        except Exception as exc:  # a task bug must not kill the trainer, only the run
            log.exception("run %s failed at step %d", self._thread.name, step)
            self.status = replace(self.status, state=cpb.RUN_STATE_FAILED, steps_per_second=0.0,
                                  error=f"{type(exc).__name__}: {exc}")
            return
        self.status = replace(self.status, state=state, steps_per_second=0.0)
        if self._on_checkpoint is not None and step > last_ckpt_step:
            self._on_checkpoint(self._snapshot(training=True))
