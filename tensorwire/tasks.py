"""What a task is: data, model, loss, one optimisation step and a live view.

This is the public API of task plugins: a subclass of :class:`Task` in a module
the trainer service loads (``--task-module my_tasks.py`` or the Python
entry-point group ``tensorwire.tasks``, see the README) appears in ``ListTasks``
and runs like the built-in tasks. A plugin module either defines
``TASKS = [MyTask(), ...]`` (Task instances) or has an entry point naming a Task
subclass, an instance, or a module with ``TASKS``.

The API is deliberately small and free of threads and I/O so that the run loop
(``services/trainer/loop.py``) and a DDP loop (``services/trainer/distributed.py``)
reuse it unchanged::

    task = TASKS["spiral"]
    config = task.configure(params={"learning_rate": 0.03}, options={"dataset": "xor"})
    data = task.make_data(config, seed=1)
    model = task.build_model(config)
    optimizer = task.make_optimizer(model, config)
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        metrics = task.train_step(model, optimizer, task.sample_batch(data, config, gen))
    view = task.build_view(model, data, config)   # a tensorwire.common.v1.View
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import InvalidArgumentError
from tensorwire.serving.models import build_model


@dataclass(frozen=True)
class Param:
    """A numeric hyper-parameter."""

    name: str
    description: str
    default: float
    min: float
    max: float
    integer: bool = False
    live: bool = True
    """Whether UpdateRun may change it while the run is live."""
    model_arg: bool = False
    """Passed to the model builder (so never live)."""


@dataclass(frozen=True)
class Option:
    """A hyper-parameter with a fixed set of string values."""

    name: str
    description: str
    default: str
    choices: tuple[str, ...]


COMMON_PARAMS = (
    Param("learning_rate", "Adam learning rate", 0.01, 1e-6, 10.0),
    Param("batch_size", "examples per optimisation step", 64, 1, 4096, integer=True),
    Param("weight_decay", "L2 penalty on the weights", 0.0, 0.0, 1.0),
    Param("max_steps", "stop after this many steps (0 = never)", 0, 0, 1e12, integer=True, live=False),
)


@dataclass(frozen=True)
class RunConfig:
    """A task's validated hyper-parameters."""

    params: dict[str, float]
    options: dict[str, str]
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.params["batch_size"])


class Task(ABC):
    """A seeded synthetic data generator + a model + a loss + a live view."""

    name: str
    title: str
    description: str
    model_kind: str
    views: tuple[str, ...]
    metrics: tuple[str, ...]
    params: tuple[Param, ...] = COMMON_PARAMS
    options: tuple[Option, ...] = ()
    defaults: Mapping[str, float] = {}
    """Task-specific defaults for COMMON_PARAMS (e.g. a learning rate)."""
    main_metric: str = "loss"
    """The metric a run is judged by: the runs table shows its best value so far."""
    higher_is_better: bool = False
    """Whether ``main_metric`` improves upwards (accuracy) or downwards (loss)."""
    max_view_fps: float | None = None
    """At most this many views a second of this task's runs (None: the trainer's
    ``--max-fps``). A view that takes milliseconds to build can ask for fewer: the
    trainer spends up to ``--view-cpu-budget`` of a core on views, and each view also
    costs the training thread a little beyond its build (the GIL, caches)."""

    # -- hyper-parameters -------------------------------------------------
    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise InvalidArgumentError(
            f"unknown parameter {name!r} for task {self.name!r}; "
            f"known: {', '.join(p.name for p in self.params)}"
        )

    def default_of(self, p: Param) -> float:
        return float(self.defaults.get(p.name, p.default))

    def check_param(self, name: str, value: float) -> float:
        p = self.param(name)
        if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
            raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
        if not p.min <= value <= p.max:
            raise InvalidArgumentError(f"{name} must be in [{p.min:g}, {p.max:g}], got {value:g}")
        if p.integer and value != int(value):
            raise InvalidArgumentError(f"{name} must be an integer, got {value:g}")
        return float(value)

    def configure(
        self, params: Mapping[str, float] | None = None, options: Mapping[str, str] | None = None
    ) -> RunConfig:
        """Defaults overridden by ``params``/``options``; the bad value named."""
        values = {p.name: self.default_of(p) for p in self.params}
        for name, value in (params or {}).items():
            values[name] = self.check_param(name, value)
        chosen: dict[str, str] = {o.name: o.default for o in self.options}
        known = {o.name: o for o in self.options}
        for name, choice in (options or {}).items():
            if name not in known:
                raise InvalidArgumentError(
                    f"unknown option {name!r} for task {self.name!r}; "
                    f"known: {', '.join(known) or 'none'}"
                )
            if choice not in known[name].choices:
                raise InvalidArgumentError(
                    f"option {name} must be one of {', '.join(known[name].choices)}, got {choice!r}"
                )
            chosen[name] = choice
        model_args = {p.name: int(values[p.name]) for p in self.params if p.model_arg}
        return RunConfig(values, chosen, model_args)

    # -- training ---------------------------------------------------------
    @abstractmethod
    def make_data(self, config: RunConfig, seed: int) -> Any:
        """Seeded fixed data (evaluation sets, a dataset); cheap to hold."""

    def build_model(self, config: RunConfig) -> nn.Module:
        return build_model(self.model_kind, **config.model_args)

    def make_optimizer(self, model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            model.parameters(), lr=config.params["learning_rate"],
            weight_decay=config.params["weight_decay"],
        )

    @staticmethod
    def apply_live_params(optimizer: torch.optim.Optimizer, config: RunConfig) -> None:
        for group in optimizer.param_groups:
            group["lr"] = config.params["learning_rate"]
            group["weight_decay"] = config.params["weight_decay"]

    @abstractmethod
    def sample_batch(self, data: Any, config: RunConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """One training batch (inputs..., targets...)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and the metrics to report (0-d tensors)."""

    def train_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]
    ) -> dict[str, float]:
        """One optimisation step; returns the metrics as floats (``loss`` first)."""
        optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.loss(model, batch)
        loss.backward()
        optimizer.step()
        out = {"loss": float(loss.detach())}
        for key, value in metrics.items():
            out[key] = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        return out

    # -- views ------------------------------------------------------------
    @abstractmethod
    def build_view(self, model: nn.Module, data: Any, config: RunConfig) -> cpb.View:
        """The live view of ``model`` (a weight snapshot, in eval mode, no grad).

        Leave the model's parameters and buffers in place (no ``.half()``, ``.to()``
        or reassigned layers): each snapshot is copied into them, listed once per
        model."""
