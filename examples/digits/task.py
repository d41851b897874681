"""The digits CNN as a task plugin: the trainer service trains it, the browser starts it.

    tensorwire-trainer --task-module examples/digits/task.py
    # or: TENSORWIRE_TRAINER_TASK_MODULES=examples/digits/task.py tensorwire up

It then appears in ListTasks and in the browser's new-run form as ``digits``, with
its parameters, and runs like the built-in tasks. An installed package would name
the class in its entry points instead::

    [project.entry-points."tensorwire.tasks"]
    digits = "my_package.task:DigitsTask"
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorwire import views
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.tasks import COMMON_PARAMS, Param, RunConfig, Task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits.py beside this file, loaded by path
from digits import DigitsCNN, load_digits_split


class DigitsTask(Task):
    name = "digits"
    title = "Handwritten digits (8x8)"
    description = "A small CNN on scikit-learn's bundled digits; watch its test images and weights."
    model_kind = "digits-cnn"
    views = ("images",)
    metrics = ("loss", "accuracy", "test_accuracy")
    params = COMMON_PARAMS + (
        Param("channels", "channels of the first convolution", 16, 2, 64, integer=True, live=False,
              model_arg=True),
    )
    defaults = {"learning_rate": 1e-3, "batch_size": 64}
    accuracy_every_s = 2.0
    """The test set's accuracy (a forward over all 360 images, ~20 ms: most of a
    picture's cost) is measured at most this often per run; pictures in between
    show the last figure. Every picture measured it, and at the trainer's 2 % view
    budget pictures came only every 1.2 s."""

    def __init__(self) -> None:
        # id(data) -> (data, measured at, value); holding data keeps its id from being reused
        self._accuracy: dict[int, tuple[Any, float, float]] = {}
        self._lock = threading.Lock()  # views of several runs may be drawn in threads at once

    def make_data(self, config: RunConfig, seed: int) -> Any:
        return load_digits_split(seed=seed)

    def build_model(self, config: RunConfig) -> nn.Module:
        return DigitsCNN(channels=int(config.params["channels"]))

    def sample_batch(self, data: Any, config: RunConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        (x, y), _ = data
        idx = torch.randint(0, len(x), (config.batch_size,), generator=gen)
        return x[idx], y[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean()}

    def build_view(self, model: nn.Module, data: Any, config: RunConfig) -> cpb.View:
        _, (x, _) = data
        predicted = model(x[:32]).argmax(1)
        view = views.images(x[:32], name="images")
        view.meta["test_accuracy"] = self._test_accuracy(model, data)
        view.labels.extend(str(int(p)) for p in predicted)
        return view

    def _test_accuracy(self, model: nn.Module, data: Any) -> float:
        _, (x, y) = data
        now = time.monotonic()
        with self._lock:
            _, at, value = self._accuracy.get(id(data), (None, -float("inf"), 0.0))
        if now - at >= self.accuracy_every_s:
            value = float((model(x).argmax(1) == y).float().mean())
            with self._lock:
                if len(self._accuracy) >= 16 and id(data) not in self._accuracy:
                    self._accuracy.pop(next(iter(self._accuracy)))
                self._accuracy[id(data)] = (data, now, value)
        return value
