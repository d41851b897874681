"""Runs trained by a script of their own (the SDK, ``tensorwire.init``), not by this trainer.

The script registers its run (``RegisterRun``) and keeps an ``AttachRun`` stream
open: it sends its status up, the trainer sends the run's wanted control state
down. :class:`ExternalLoop` stands where a :class:`~services.trainer.loop.TrainingLoop`
stands for a run of this trainer, with the same control methods, so ``RunManager``,
the servicer and ``ListRuns``/``GetRun`` treat both alike. The script publishes its
own scalars and views to the streamer; the trainer's publisher leaves the run alone.

A run whose script went away without finishing (no stream for ``detach_grace_s``)
reads as FAILED ("the script disconnected"); it comes back to life if the script
attaches again.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.tasks import Param, RunConfig, Task

from .loop import TERMINAL, LiveStatus

_REPORTED_STATES = frozenset({
    cpb.RUN_STATE_RUNNING, cpb.RUN_STATE_PAUSED, cpb.RUN_STATE_STOPPED,
    cpb.RUN_STATE_FAILED, cpb.RUN_STATE_COMPLETED,
})


class ExternalTask(Task):
    """The task label and hyper-parameters a script registered (every one live)."""

    model_kind = ""
    views: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    def __init__(self, name: str, params: Mapping[str, float]) -> None:
        self.name = name
        self.title = name
        self.description = "a training script using the tensorwire SDK"
        self.params = tuple(
            Param(key, "set by the training script", float(value), -math.inf, math.inf)
            for key, value in params.items()
        )

    def _not_here(self) -> Any:
        raise NotImplementedError(f"task {self.name!r} trains in its own script, not in the trainer")

    def make_data(self, config: RunConfig, seed: int) -> Any:
        return self._not_here()

    def sample_batch(self, data: Any, config: RunConfig, gen: Any) -> Any:
        return self._not_here()

    def loss(self, model: Any, batch: Any) -> Any:
        return self._not_here()

    def build_view(self, model: Any, data: Any, config: RunConfig) -> cpb.View:
        return self._not_here()


class ExternalLoop:
    """Status and control of a script's run; the control methods of TrainingLoop."""

    def __init__(
        self,
        config: RunConfig,
        *,
        detach_grace_s: float = 60.0,
        stop_wait_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clock = clock
        self.detach_grace_s = detach_grace_s
        self.stop_wait_s = stop_wait_s
        self.status = LiveStatus(cpb.RUN_STATE_PENDING, 0, time.time(), 0.0)
        """The script's last report (replaced, never mutated)."""
        self._paused = False
        self._stopping = False
        self._attachment = 0
        self._attached = False
        self._detached_at = clock()
        self._ended = threading.Event()
        self.changed = asyncio.Event()
        """Set when the wanted control state changes (the AttachRun stream waits on it)."""

    # -- what the servicer and RunManager call ------------------------------
    @property
    def config(self) -> RunConfig:
        return self._config

    @property
    def state(self) -> int:
        state = self.status.state
        if state in TERMINAL:
            return state
        if not self._attached and self._clock() - self._detached_at > self.detach_grace_s:
            return cpb.RUN_STATE_FAILED
        if state == cpb.RUN_STATE_PENDING:
            return state
        return cpb.RUN_STATE_PAUSED if self._paused else cpb.RUN_STATE_RUNNING

    @property
    def error(self) -> str:
        if self.state == cpb.RUN_STATE_FAILED and self.status.state not in TERMINAL:
            return f"the script disconnected {self._clock() - self._detached_at:.0f} s ago"
        return self.status.error

    @property
    def alive(self) -> bool:
        return self.state not in TERMINAL

    def pause(self) -> None:
        self._paused = True
        self.changed.set()

    def resume(self) -> None:
        self._paused = False
        self.changed.set()

    def stop(self) -> None:
        self._stopping = True
        self.changed.set()

    def update(self, config: RunConfig) -> None:
        self._config = config
        self.changed.set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``stop_wait_s``) for the script to report that it ended."""
        wait = self.stop_wait_s if timeout_s is None else min(timeout_s, self.stop_wait_s)
        return self._ended.wait(wait)

    def take_scalars(self) -> dict[str, Any]:
        return {}  # the script publishes its own

    # -- what the AttachRun stream calls ------------------------------------
    def attach(self) -> int:
        """A new stream took over (an older one of a reconnecting script ends)."""
        self._attachment += 1
        self._attached = True
        self.changed.set()
        return self._attachment

    def attached_by(self, attachment: int) -> bool:
        return self._attached and self._attachment == attachment

    def detach(self, attachment: int) -> None:
        if self._attachment == attachment:
            self._attached = False
            self._detached_at = self._clock()
            if self._stopping and self.status.state not in TERMINAL:
                # Stop was asked and the script went away: it obeyed (its last word lost).
                self.mark(cpb.RUN_STATE_STOPPED)
                self._ended.set()

    def control(self) -> tuple[bool, bool, dict[str, float]]:
        """(paused, stop, params) as the script should have them."""
        return self._paused, self._stopping, dict(self._config.params)

    def report(self, status: cpb.RunStatus) -> None:
        """The script's status: its state, step, steps/s, latest metrics."""
        state = status.state if status.state in _REPORTED_STATES else cpb.RUN_STATE_RUNNING
        self.status = LiveStatus(
            state, int(status.step), status.produced_at or time.time(),
            float(status.steps_per_second), dict(status.metrics), status.error,
        )
        if state in TERMINAL:
            self._ended.set()
        elif self._ended.is_set():  # a script that reported an end and goes on
            self._ended.clear()

    def mark(self, state: int, error: str = "") -> None:
        self.status = replace(self.status, state=state, error=error)
