"""RunManager: owns the training runs and their checkpoints (plain Python, no gRPC).

Each run is a :class:`~services.trainer.loop.TrainingLoop` thread. Checkpoint
snapshots go to one writer thread (latest wins per run, so a slow disk never
holds a training thread back) that writes them with
``tensorwire.serving.modelrepo.write_version`` as model ``run-<run_id>`` (plus any
``publish_as`` names), and — with a ``state_dir`` — the optimizer, RNG and step
beside them (``<state_dir>/<run_id>.pt``) so the run can be resumed, and then
reports each written version to a callback.

With a :class:`~services.trainer.store.RunStore`, a
:class:`~services.trainer.recorder.RunRecorder` writes every run, its events and
its scalar history there; runs that ended are released from memory once stored
(``release_after_s``), queries read the store, only the newest ``keep_runs``
ended runs are kept, and a run a previous trainer left live (INTERRUPTED) can be
resumed from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tensorwire.calls.periodic import Periodic
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data.scalars import Bucket
from tensorwire.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TensorwireError,
)
from tensorwire.serving import modelrepo

from .external import ExternalLoop, ExternalTask
from .loop import TERMINAL, LiveStatus, Snapshot, TrainingLoop, TrainingState
from .metrics import CHECKPOINTS
from .recorder import RunRecorder
from .store import (
    BestMetric,
    RunEvent,
    RunPage,
    RunRecord,
    RunStore,
    RunStoreError,
    check_page_size,
    decode_page_token,
    encode_page_token,
    matches,
    parse_filter,
    parse_order_by,
)
from .tasks import TASKS, RunConfig, Task

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
"""What a script may choose as its run id (the trainer's own are 12 hex digits)."""

CheckpointListener = Callable[[str, int], None]
"""Called (from the writer thread) with (model name, version) after each write."""
ReleaseListener = Callable[[str], None]
"""Called (on the event loop) with a run id when the run leaves memory or is deleted."""

MAX_NAME = 200
MAX_TAGS = 32
MAX_TAG = 64
MAX_NOTES = 10_000


@dataclass
class Run:
    """One training run: its task, its loop and what was written of it."""

    run_id: str
    task: Task
    loop: TrainingLoop | ExternalLoop
    seed: int
    publish_as: tuple[str, ...] = ()
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    checkpoint_step: int = 0
    checkpoint_versions: dict[str, int] = field(default_factory=dict)
    name: str = ""
    tags: tuple[str, ...] = ()
    notes: str = ""
    ended_at: float = 0.0
    interrupted: bool = False
    """Stopped by the trainer's shutdown, not by a user."""

    @property
    def model_name(self) -> str:
        return f"run-{self.run_id}"

    @property
    def state(self) -> int:
        return self.loop.state

    @property
    def config(self) -> RunConfig:
        return self.loop.config

    @property
    def external(self) -> bool:
        """Trained by a script of its own (the SDK), not by this trainer."""
        return isinstance(self.loop, ExternalLoop)

    @property
    def error(self) -> str:
        return self.loop.error

    # -- what the publisher reads: it never reaches into the loop or the task --
    @property
    def task_name(self) -> str:
        return self.task.name

    @property
    def max_view_fps(self) -> float | None:
        return self.task.max_view_fps

    @property
    def status(self) -> LiveStatus:
        """The latest step, rate, metrics and error (never blocks training)."""
        return self.loop.status

    def take_scalars(self) -> dict[str, list[Bucket]]:
        """Every metric point since the last call (a script's run: none, it publishes its own)."""
        return self.loop.take_scalars()

    def request_snapshot(self) -> Future[Snapshot]:
        """A future of the weights after the current step (this trainer's runs only)."""
        if not isinstance(self.loop, TrainingLoop):
            raise FailedPreconditionError(f"run {self.run_id} is trained by a script: it builds its own views")
        return self.loop.request_snapshot()

    def view_inputs(self) -> tuple[Task, Any]:
        """The task and the run's live data, to render a view in this process."""
        return self.task, self.loop.data if isinstance(self.loop, TrainingLoop) else None

    def record(self) -> RunRecord:
        """What the store keeps of this run, now (live fields included)."""
        status = self.status
        state = self.state
        if self.interrupted and state == cpb.RUN_STATE_STOPPED:
            state = cpb.RUN_STATE_INTERRUPTED
        if (state in TERMINAL or state == cpb.RUN_STATE_INTERRUPTED) and not self.ended_at:
            self.ended_at = time.time()
        config = self.config
        return RunRecord(
            run_id=self.run_id, task=self.task.name, state=state, params=dict(config.params),
            options=dict(config.options), seed=self.seed, created_at=self.created_at,
            updated_at=max(self.updated_at, status.produced_at), step=status.step,
            metrics=dict(status.metrics), error=self.error or status.error,
            checkpoint_step=self.checkpoint_step,
            name=self.name, tags=self.tags, notes=self.notes, publish_as=self.publish_as,
            ended_at=self.ended_at, steps_per_second=status.steps_per_second,
            produced_at=status.produced_at,
        )


def state_path(state_dir: Path, run_id: str) -> Path:
    """Where a run's resumable training state lives."""
    return Path(state_dir) / f"{run_id}.pt"


def write_training_state(path: Path, snap: Snapshot) -> None:
    """Weights + optimizer + RNG + step of ``snap``, written atomically."""
    assert snap.training is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "weights": snap.state_dict, "optimizer": snap.training.optimizer,
        "generator": snap.training.generator, "step": snap.training.step,
        "params": dict(snap.config.params), "options": dict(snap.config.options),
    }
    modelrepo.write_atomic(path, lambda f: torch.save(state, f))


def read_training_state(path: Path) -> tuple[dict[str, torch.Tensor], TrainingState, RunConfig]:
    """What :func:`write_training_state` wrote (tensors only: no code runs)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    training = TrainingState(data["optimizer"], data["generator"], int(data["step"]))
    return data["weights"], training, RunConfig(dict(data["params"]), dict(data["options"]))


class CheckpointWriter:
    """A thread that writes the newest pending checkpoint of each run."""

    def __init__(self, repository: Path, listeners: list[CheckpointListener], keep: int = 0,
                 state_dir: Path | None = None) -> None:
        self.repository = repository
        self.state_dir = state_dir
        self._listeners = listeners
        self._keep = keep
        self.step_listeners: list[Callable[[Run, int], None]] = []
        self._pending: dict[str, tuple[Run, Snapshot]] = {}
        self.writing: str | None = None
        """The run whose checkpoint is being written."""
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
                self.writing = run_id
            try:
                self._write(run, snap)
            except Exception:
                CHECKPOINTS.labels("failed").inc()
                log.exception("checkpoint of run %s at step %d failed", run.run_id, snap.step)
            else:
                CHECKPOINTS.labels("written").inc()
            finally:
                self.writing = None

    def busy_with(self, run_id: str) -> bool:
        with self._cond:
            return run_id in self._pending or self.writing == run_id

    def _write(self, run: Run, snap: Snapshot) -> None:
        if self.state_dir is not None and snap.training is not None:
            write_training_state(state_path(self.state_dir, run.run_id), snap)
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
        for notify in self.step_listeners:
            notify(run, snap.step)


class RunManager:
    """Starts, controls, lists, checkpoints, stores and resumes training runs."""

    def __init__(
        self,
        model_repository: Path | None = None,
        *,
        checkpoint_every_steps: int = 0,
        checkpoint_every_s: float = 30.0,
        keep_checkpoints: int = 0,
        max_active_runs: int = 8,
        max_external_runs: int = 256,
        tasks: Mapping[str, Task] = TASKS,
        device: torch.device | None = None,
        store: RunStore | None = None,
        state_dir: Path | None = None,
        keep_runs: int = 200,
        release_after_s: float = 10.0,
        store_flush_every_s: float = 2.0,
    ) -> None:
        """
        :param store: where runs, events and scalar history are kept (None = memory
            only: nothing survives a restart and ended runs stay in memory).
        :param state_dir: where each run's resumable training state is written with
            its checkpoints (None = runs cannot be resumed after a restart).
        :param keep_runs: ended runs kept in the store; older ones are deleted with
            their models and training state (0 = keep all).
        :param release_after_s: an ended run leaves memory this long after it ended,
            once the store holds it.
        """
        self.tasks = dict(tasks)
        self.device = device or torch.device("cpu")
        self.model_repository = model_repository
        self.state_dir = state_dir
        self.keep_runs = keep_runs
        self.release_after_s = release_after_s
        self._runs: dict[str, Run] = {}
        self._ckpt_steps = checkpoint_every_steps
        self._ckpt_s = checkpoint_every_s
        self._max_active = max_active_runs
        self._max_external = max_external_runs
        self.listeners: list[CheckpointListener] = []
        self.release_listeners: list[ReleaseListener] = []
        self.release_checks: list[Callable[[Run], bool]] = []
        """An ended run leaves memory only once each of these says its last state is
        out (the publisher: sent to the streamers), besides being stored."""
        self._writer = (
            CheckpointWriter(model_repository, self.listeners, keep_checkpoints, state_dir)
            if model_repository else None
        )
        self.recorder = (
            RunRecorder(store, self.records, flush_every_s=store_flush_every_s) if store else None
        )
        if self._writer is not None:
            self._writer.step_listeners.append(self._checkpointed)
        if self.recorder is not None:
            self.recorder.start(mark_interrupted_at=time.time())
        self._housekeeper: Periodic | None = None
        self._housekeeping_ticks = 0

    def __repr__(self) -> str:
        live = sum(1 for r in self._runs.values() if r.state not in TERMINAL)
        return f"<RunManager {live} live, {len(self._runs)} in memory | {self.recorder!r}>"

    # -- queries ----------------------------------------------------------
    def list_tasks(self) -> list[Task]:
        return list(self.tasks.values())

    def list_runs(self) -> list[Run]:
        """The runs in memory (live ones, and ended ones not yet released)."""
        return sorted(self._runs.values(), key=lambda r: r.created_at)

    def records(self) -> list[RunRecord]:
        """Current records of the runs in memory (the recorder's source)."""
        return [run.record() for run in list(self._runs.values())]

    def get_run(self, run_id: str) -> Run:
        """A run in memory; NotFoundError otherwise (see :meth:`find_run`)."""
        if not run_id:
            raise InvalidArgumentError("run_id is empty")
        run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r}")
        return run

    def find_run(self, run_id: str) -> RunRecord:
        """Any run, in memory or stored (blocking: may read the store)."""
        if not run_id:
            raise InvalidArgumentError("run_id is empty")
        run = self._runs.get(run_id)
        if run is not None:
            return run.record()
        if self.recorder is not None:
            record = self.recorder.store.get_run(run_id)
            if record is not None:
                return record
        raise NotFoundError(f"no run {run_id!r}")

    def query_runs(self, filter_: str = "", order_by: str = "", page_size: int = 0,
                   page_token: str = "") -> RunPage:
        """A page of runs (AIP-158/160/132; blocking). From the store, live fields
        from memory; from memory alone when there is no store or it fails."""
        if self.recorder is not None:
            self.recorder.flush(2.0)  # so a run started a moment ago is listed
            try:
                page = self.recorder.store.list_runs(filter_, order_by, page_size, page_token)
            except RunStoreError as exc:
                log.warning("listing runs from memory only: %s", exc)
            else:
                for i, rec in enumerate(page.runs):
                    run = self._runs.get(rec.run_id)
                    if run is not None:
                        page.runs[i] = run.record()
                self._add_best(page.runs)
                return page
        conditions = parse_filter(filter_)
        order = parse_order_by(order_by)
        size = check_page_size(page_size)
        offset = decode_page_token(page_token, filter_, order_by)
        found = [r for r in self.records() if matches(r, conditions)]
        found.sort(key=lambda r: r.run_id, reverse=order[-1][1])
        for column, desc in reversed(order):
            found.sort(key=operator.attrgetter(column), reverse=desc)
        chunk = found[offset:offset + size]
        more = offset + size < len(found)
        return RunPage(chunk, encode_page_token(offset + size, filter_, order_by) if more else "",
                       len(found))

    def _add_best(self, records: Sequence[RunRecord]) -> None:
        """Each run's best value of its task's main metric, from the stored history
        (blocking). A run of an unknown task (a script's) is judged by its loss."""
        if self.recorder is None or not records:
            return
        try:
            extremes = self.recorder.store.extremes([r.run_id for r in records])
        except RunStoreError as exc:
            log.warning("runs listed without their best metric: %s", exc)
            return
        for rec in records:
            task = self.tasks.get(rec.task)
            name, higher = (task.main_metric, task.higher_is_better) if task else ("loss", False)
            found = extremes.get((rec.run_id, name))
            if found is not None:
                rec.best = BestMetric(name, found[1] if higher else found[0], higher)

    def scalars(self, run_id: str, max_points: int = 1024, names: Sequence[str] = ()) -> dict[str, list]:
        """A run's stored scalar history, down-sampled (blocking)."""
        if not 2 <= max_points <= 100_000:
            raise InvalidArgumentError(f"max_points must be in 2..100000, got {max_points}")
        self.find_run(run_id)  # NOT_FOUND before an empty answer
        if self.recorder is None:
            return {}
        self.recorder.flush(2.0)
        return self.recorder.store.scalars(run_id, max_points, names)

    def events(self, run_id: str) -> list[RunEvent]:
        self.find_run(run_id)
        if self.recorder is None:
            return []
        self.recorder.flush(2.0)
        return self.recorder.store.events(run_id)

    def task(self, name: str) -> Task:
        task = self.tasks.get(name)
        if task is None:
            raise InvalidArgumentError(
                f"unknown task {name!r}; known: {', '.join(sorted(self.tasks))}"
            )
        return task

    # -- control ----------------------------------------------------------
    def _check_active(self) -> None:
        active = sum(1 for r in self._runs.values() if not r.external and r.state not in TERMINAL)
        if active >= self._max_active:
            raise ResourceExhaustedError(
                f"{active} runs are active, the limit is {self._max_active}; stop one first"
            )

    def _new_loop(self, run_id: str, task: Task, config: RunConfig, seed: int,
                  resume: tuple[dict[str, torch.Tensor], TrainingState] | None = None) -> TrainingLoop:
        recorder = self.recorder
        return TrainingLoop(
            task, config, seed, name=run_id,
            on_checkpoint=(lambda snap: self._checkpoint(run_id, snap)) if self._writer else None,
            on_scalars=(lambda step, metrics: recorder.add_scalars(run_id, step, metrics))
            if recorder is not None else None,
            resume=resume,
            checkpoint_every_steps=self._ckpt_steps, checkpoint_every_s=self._ckpt_s,
            device=self.device,
        )

    def start_run(
        self,
        task_name: str,
        params: Mapping[str, float] | None = None,
        options: Mapping[str, str] | None = None,
        seed: int = 0,
        *,
        publish_as: tuple[str, ...] = (),
        name: str = "",
        tags: Sequence[str] = (),
        notes: str = "",
    ) -> Run:
        task = self.task(task_name)
        config = task.configure(params, options)
        labels = check_labels(name, tags, notes)
        self._check_active()
        for model in publish_as:
            modelrepo.check_name(model)
        seed = seed or (time.time_ns() % (2**31 - 1)) + 1
        run_id = uuid.uuid4().hex[:12]
        loop = self._new_loop(run_id, task, config, seed)
        run = Run(run_id, task, loop, seed, publish_as, name=labels[0], tags=labels[1], notes=labels[2])
        self._runs[run_id] = run
        loop.start()
        self._record(run, RunEvent(run_id, run.created_at, "started", 0, {
            "params": dict(config.params), "options": dict(config.options), "seed": seed}))
        log.info("run %s: task %s started (seed %d, params %s, options %s)",
                 run_id, task.name, seed, config.params, config.options)
        return run

    def register_run(self, run_id: str, task_name: str, params: Mapping[str, float]) -> Run:
        """A run that a script trains itself (the SDK). The same id and task again
        re-adopt the run (a reconnecting script, or one whose trainer restarted)."""
        task_name = task_name.strip()
        if not task_name or len(task_name) > 128:
            raise InvalidArgumentError("task must be a label of 1 to 128 characters")
        if run_id and not RUN_ID.fullmatch(run_id):
            raise InvalidArgumentError(
                f"run_id must be 1 to 64 of a-z, 0-9 and '-' (starting with a letter or digit), "
                f"got {run_id[:80]!r}"
            )
        if len(params) > 256:
            raise InvalidArgumentError(f"at most 256 params, got {len(params)}")
        for name, value in params.items():
            if not name or len(name) > 128:
                raise InvalidArgumentError(f"param names must have 1 to 128 characters, got {name[:80]!r}")
            if not math.isfinite(value):
                raise InvalidArgumentError(f"param {name} must be a finite number, got {value!r}")
        existing = self._runs.get(run_id) if run_id else None
        if existing is not None:
            if not existing.external or existing.task.name != task_name:
                raise AlreadyExistsError(f"run {run_id!r} exists already (task {existing.task.name!r})")
            return existing
        active = sum(1 for r in self._runs.values() if r.external and r.state not in TERMINAL)
        if active >= self._max_external:
            raise ResourceExhaustedError(
                f"{active} script runs are registered and live, the limit is {self._max_external}"
            )
        task = ExternalTask(task_name, params)
        run = Run(run_id or uuid.uuid4().hex[:12], task, ExternalLoop(task.configure(params)), 0)
        self._runs[run.run_id] = run
        self._record(run, RunEvent(run.run_id, run.created_at, "started", 0, {"params": dict(params)}))
        log.info("run %s: registered by a script (task %s, params %s)", run.run_id, task_name, dict(params))
        return run

    def external_run(self, run_id: str) -> ExternalLoop:
        """The loop of a script's run; NOT_FOUND for an unknown id, FAILED_PRECONDITION
        for a run of this trainer."""
        run = self.get_run(run_id)
        if not isinstance(run.loop, ExternalLoop):
            raise FailedPreconditionError(f"run {run_id!r} is trained by the trainer, not by a script")
        return run.loop

    def _record(self, run: Run, event: RunEvent | None = None) -> None:
        if self.recorder is not None:
            if event is not None:
                self.recorder.add_event(event)
            self.recorder.put_run(run.record())

    def _checkpoint(self, run_id: str, snap: Snapshot) -> None:
        run = self._runs.get(run_id)
        if run is not None and self._writer is not None:
            self._writer.submit(run, snap)

    def _checkpointed(self, run: Run, step: int) -> None:
        """A checkpoint of ``run`` at ``step`` is written (writer thread)."""
        self._record(run, RunEvent(run.run_id, time.time(), "checkpoint", step,
                                   {"models": dict(run.checkpoint_versions)}))

    def _live(self, run_id: str, verb: str) -> Run:
        run = self._runs.get(run_id) if run_id else None
        if run is None:
            record = self.find_run(run_id)  # NOT_FOUND, or a stored run that ended
            raise FailedPreconditionError(
                f"cannot {verb} run {run_id!r}: it is {cpb.RunState.Name(record.state)}"
            )
        if run.state in TERMINAL:
            raise FailedPreconditionError(
                f"cannot {verb} run {run_id!r}: it is {cpb.RunState.Name(run.state)}"
            )
        return run

    def pause_run(self, run_id: str) -> Run:
        run = self._live(run_id, "pause")
        run.loop.pause()
        run.updated_at = time.time()
        self._record(run)
        return run

    async def resume_run(self, run_id: str) -> RunRecord:
        """Resume a paused run, or an INTERRUPTED one from its last checkpoint."""
        if run_id in self._runs:
            run = self._live(run_id, "resume")
            run.loop.resume()
            run.updated_at = time.time()
            self._record(run)
            return run.record()
        record = await asyncio.to_thread(self.find_run, run_id)
        if record.state != cpb.RUN_STATE_INTERRUPTED:
            raise FailedPreconditionError(
                f"cannot resume run {run_id!r}: it is {cpb.RunState.Name(record.state)}; "
                "only a paused or an INTERRUPTED run can be resumed"
            )
        run = await asyncio.to_thread(self._restore, record)
        return run.record()

    def _restore(self, record: RunRecord) -> Run:
        """A stored INTERRUPTED run, training again from its last checkpoint (blocking)."""
        run_id = record.run_id
        task = self.task(record.task)
        path = state_path(self.state_dir, run_id) if self.state_dir is not None else None
        if path is None or not path.is_file():
            raise FailedPreconditionError(
                f"cannot resume run {run_id!r}: it has no checkpoint to resume from "
                "(it was interrupted before its first one); start a new run"
            )
        self._check_active()
        try:
            weights, training, saved = read_training_state(path)
        except Exception as exc:
            raise FailedPreconditionError(
                f"cannot resume run {run_id!r}: its training state {str(path)!r} is unreadable: {exc}"
            ) from None
        config = task.configure(record.params or saved.params, record.options or saved.options)
        assert self.recorder is not None  # stored runs exist only with a store
        self.recorder.flush(2.0)
        # The points after the checkpoint belong to a future that did not happen.
        self.recorder.store.truncate_scalars(run_id, training.step)
        loop = self._new_loop(run_id, task, config, record.seed, (weights, training))
        run = Run(run_id, task, loop, record.seed, record.publish_as, created_at=record.created_at,
                  checkpoint_step=training.step, name=record.name, tags=record.tags, notes=record.notes)
        if run_id in self._runs:  # resumed twice at once: the first one won
            raise FailedPreconditionError(f"run {run_id!r} is already live")
        self._runs[run_id] = run
        loop.start()
        self._record(run, RunEvent(run_id, time.time(), "resumed", training.step,
                                   {"from_step": record.step}))
        log.info("run %s: resumed from its checkpoint at step %d (was at %d)",
                 run_id, training.step, record.step)
        return run

    async def stop_run(self, run_id: str) -> RunRecord:
        run = self._runs.get(run_id) if run_id else None
        if run is None:
            return await asyncio.to_thread(self.find_run, run_id)  # stopping a stopped run is fine
        if run.state not in TERMINAL:
            run.loop.stop()
            await asyncio.to_thread(run.loop.join, 30.0)
            run.updated_at = time.time()
        self._record(run)
        return run.record()

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
        changed = {k: v for k, v in values.items() if v != current.params.get(k)}
        self._record(run, RunEvent(run_id, run.updated_at, "params", run.loop.status.step, changed))
        return run

    def label_run(self, run_id: str, *, name: str | None = None, tags: Sequence[str] | None = None,
                  notes: str | None = None) -> RunRecord:
        """Change a run's name, tags or notes (None = unchanged); any run, live or
        stored (blocking: may write the store)."""
        record = self.find_run(run_id)
        new_name, new_tags, new_notes = check_labels(
            record.name if name is None else name, record.tags if tags is None else tags,
            record.notes if notes is None else notes,
        )
        now = time.time()
        event = RunEvent(run_id, now, "labels", record.step,
                         {"name": new_name, "tags": list(new_tags), "notes": new_notes})
        run = self._runs.get(run_id)
        if run is not None:
            run.name, run.tags, run.notes = new_name, new_tags, new_notes
            run.updated_at = now
            self._record(run, event)
            return run.record()
        assert self.recorder is not None
        record.name, record.tags, record.notes, record.updated_at = new_name, new_tags, new_notes, now
        self.recorder.add_event(event)
        self.recorder.store.put_runs([record])
        return record

    async def delete_run(self, run_id: str) -> None:
        """Delete an ended run: record, events, history, models and training state."""
        run = self._runs.get(run_id) if run_id else None
        if run is not None and run.state not in TERMINAL:
            raise FailedPreconditionError(
                f"cannot delete run {run_id!r}: it is {cpb.RunState.Name(run.state)}; stop it first"
            )
        record = await asyncio.to_thread(self.find_run, run_id)
        if run is not None:
            await asyncio.to_thread(run.loop.join, 30.0)
            await asyncio.to_thread(self.flush_checkpoints, 30.0)  # none lands after the delete
            self._runs.pop(run_id, None)
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.delete_run, run_id)
        await asyncio.to_thread(self._delete_files, run_id, record.publish_as)
        self._released(run_id)
        log.info("run %s deleted", run_id)

    def _delete_files(self, run_id: str, publish_as: Sequence[str] = ()) -> None:
        if self.model_repository is not None:
            modelrepo.delete_model(self.model_repository, f"run-{run_id}")
        if self.state_dir is not None:
            state_path(self.state_dir, run_id).unlink(missing_ok=True)

    def _released(self, run_id: str) -> None:
        for listener in self.release_listeners:
            try:
                listener(run_id)
            except Exception:
                log.exception("release listener failed for run %s", run_id)

    # -- housekeeping ------------------------------------------------------
    def start(self, every_s: float = 1.0) -> None:
        """Start releasing stored ended runs from memory and pruning old ones."""
        if self.recorder is not None and self._housekeeper is None:
            self._housekeeper = Periodic(self._housekeep, every_s, name="run housekeeping").start()

    async def _housekeep(self) -> None:
        released = self.release_ended()
        self._housekeeping_ticks += 1
        if released or self._housekeeping_ticks % 60 == 1:
            await self.prune()

    def release_ended(self, now: float | None = None) -> list[str]:
        """Forget runs that ended ``release_after_s`` ago and are stored."""
        if self.recorder is None:
            return []
        now = time.time() if now is None else now
        out = []
        for run in list(self._runs.values()):
            state = run.state
            if (state in TERMINAL and run.ended_at and now - run.ended_at >= self.release_after_s
                    and not run.loop.alive
                    and not (self._writer is not None and self._writer.busy_with(run.run_id))
                    and self.recorder.persisted(run.run_id, state)
                    and all(check(run) for check in self.release_checks)):
                self._runs.pop(run.run_id, None)
                self._released(run.run_id)
                out.append(run.run_id)
        return out

    async def prune(self) -> list[str]:
        """Delete all but the newest ``keep_runs`` ended runs (store, models, state)."""
        if self.recorder is None or self.keep_runs <= 0:
            return []
        try:
            victims = await asyncio.to_thread(self.recorder.store.prune, self.keep_runs)
        except RunStoreError as exc:
            log.debug("pruning runs skipped: %s", exc)
            return []
        for run_id in victims:
            run = self._runs.pop(run_id, None)
            await asyncio.to_thread(self._delete_files, run_id, run.publish_as if run else ())
            self._released(run_id)
        if victims:
            log.info("pruned %d old runs (keeping the newest %d): %s", len(victims), self.keep_runs,
                     ", ".join(victims))
        return victims

    def flush_checkpoints(self, timeout_s: float | None = None) -> bool:
        return self._writer.flush(timeout_s) if self._writer else True

    async def aclose(self) -> None:
        if self._housekeeper is not None:
            await self._housekeeper.aclose()
        # A shutdown, not a user, stops the live runs: they are INTERRUPTED, and the
        # loops write a last checkpoint, so the next trainer resumes them where they were.
        # A script's run goes on without this trainer (it re-registers when one is back).
        live = [r for r in self._runs.values() if r.state not in TERMINAL and not r.external]
        for run in live:
            run.interrupted = True
        own = [run for run in self._runs.values() if not run.external]
        for run in own:
            run.loop.stop()
        for run in own:
            await asyncio.to_thread(run.loop.join, 30.0)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)  # the runs' last checkpoints too
        if self.recorder is not None:
            for run in live:
                self.recorder.put_run(run.record())
            await asyncio.to_thread(self.recorder.close)


def check_labels(name: str, tags: Sequence[str], notes: str) -> tuple[str, tuple[str, ...], str]:
    """A run's name, tags and notes, checked; tags de-duplicated, order kept."""
    name = name.strip()
    if len(name) > MAX_NAME:
        raise InvalidArgumentError(f"name is {len(name)} characters long; at most {MAX_NAME}")
    if len(notes) > MAX_NOTES:
        raise InvalidArgumentError(f"notes are {len(notes)} characters long; at most {MAX_NOTES}")
    out: list[str] = []
    for tag in tags:
        tag = tag.strip()
        if not tag or len(tag) > MAX_TAG or any(c in tag for c in '",\n'):
            raise InvalidArgumentError(
                f"tag {tag!r} is not valid: 1-{MAX_TAG} characters, no quotes, commas or newlines"
            )
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise InvalidArgumentError(f"{len(out)} tags; at most {MAX_TAGS}")
    return name, tuple(out), notes
