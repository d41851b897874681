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
    accuracy_chunks = 8
    """The test set's accuracy is measured a slice at a time: each picture runs the
    model on its 32 shown images plus the next eighth of the other 328 in one forward
    (~3.5 ms of CPU, against ~12 ms for all 360), and shows the accuracy over the last
    full pass (the shown images and the latest result of every slice). Measuring all
    360 in one picture made that picture cost 5x the others, and the trainer's view
    budget (2 % of a core) then held the next pictures back for up to a second."""

    def __init__(self) -> None:
        # id(data) -> [data, next slice, {slice: (correct, count)}]; holding data keeps its id from being reused
        self._accuracy: dict[int, list[Any]] = {}
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
        _, (x, y) = data
        shown = 32
        with self._lock:
            state = self._accuracy.get(id(data))
            if state is None:
                if len(self._accuracy) >= 16:
                    self._accuracy.pop(next(iter(self._accuracy)))
                state = self._accuracy[id(data)] = [data, 0, {}]
            part = state[1]
            state[1] = (part + 1) % self.accuracy_chunks
        rest = torch.arange(shown, len(x)).tensor_split(self.accuracy_chunks)[part]
        idx = torch.cat([torch.arange(shown), rest])
        predicted = model(x[idx]).argmax(1)
        right = predicted == y[idx]
        with self._lock:
            results = state[2]
            results["shown"] = (int(right[:shown].sum()), shown)
            results[part] = (int(right[shown:].sum()), len(rest))
            correct = sum(c for c, _ in results.values())
            count = sum(n for _, n in results.values())
        view = views.images(x[:shown], name="images")
        view.meta["test_accuracy"] = correct / count
        view.labels.extend(str(int(p)) for p in predicted[:shown])
        return view
