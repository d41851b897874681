"""Trainer tasks: validated hyper-parameters, real learning, views as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.trainer import views
from services.trainer.tasks import TASKS
from tensorwire.data import arrays
from tensorwire.errors import InvalidArgumentError

VIEW_SHAPES = {
    "boundary": {"grid": 2, "points": 2, "labels": 1},
    "paths": {"past": 3, "truth": 3, "predicted": 3},
    "signal": {"signal": 2, "reconstruction": 2, "error": 1, "flagged": 1, "truth": 1},
    "fusion": {"gps": 2, "fused": 2, "truth": 2, "fused_velocity": 2, "truth_velocity": 2},
    "boxes": {"images": 3, "true_boxes": 2, "pred_boxes": 2},
}


def _train(name: str, steps: int, seed: int = 3) -> tuple[list[dict[str, float]], object]:
    task = TASKS[name]
    config = task.configure()
    data = task.make_data(config, seed)
    torch.manual_seed(seed)
    model = task.build_model(config)
    opt = task.make_optimizer(model, config)
    gen = torch.Generator().manual_seed(seed)
    history = [task.train_step(model, opt, task.sample_batch(data, config, gen)) for _ in range(steps)]
    return history, (task, model, data, config)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_learns_and_builds_its_view(name: str) -> None:
    steps = 30 if name == "detection" else 120
    history, (task, model, data, config) = _train(name, steps)
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    assert last < first, f"{name}: loss went from {first} to {last}"
    assert set(history[-1]) == set(task.metrics)
    model.eval()
    with torch.no_grad():
        view = task.build_view(model, data, config)
    assert view.kind in task.views and view.kind in views.VIEW_KINDS
    decoded = {a.name: arrays.decode(a) for a in view.arrays}
    assert {k: v.ndim for k, v in decoded.items()} == VIEW_SHAPES[view.kind]
    assert all(np.isfinite(v).all() for v in decoded.values())
    assert view.ByteSize() < 0.1 * len(views.as_json(view))


def test_spiral_datasets_reach_high_accuracy() -> None:
    task = TASKS["spiral"]
    for dataset in ("circles", "xor", "gaussian"):
        config = task.configure({"learning_rate": 0.05}, {"dataset": dataset})
        data = task.make_data(config, 1)
        torch.manual_seed(1)
        model = task.build_model(config)
        opt = task.make_optimizer(model, config)
        gen = torch.Generator().manual_seed(1)
        for _ in range(400):
            metrics = task.train_step(model, opt, task.sample_batch(data, config, gen))
        with torch.no_grad():
            acc = (model(data.points).argmax(1) == data.labels).float().mean().item()
        assert acc > 0.85, (dataset, acc, metrics)


@pytest.mark.parametrize(
    ("params", "options", "needle"),
    [
        ({"learning_rate": -0.1}, {}, "learning_rate"),
        ({"batch_size": 0}, {}, "batch_size"),
        ({"batch_size": 2.5}, {}, "integer"),
        ({"momentum": 0.9}, {}, "momentum"),
        ({"learning_rate": float("nan")}, {}, "finite"),
        ({}, {"dataset": "moons"}, "moons"),
        ({}, {"optimizer": "sgd"}, "optimizer"),
    ],
)
def test_bad_hyper_parameters_are_named(params: dict, options: dict, needle: str) -> None:
    with pytest.raises(InvalidArgumentError, match=needle):
        TASKS["spiral"].configure(params, options)


def test_model_args_flow_from_params() -> None:
    task = TASKS["spiral"]
    config = task.configure({"hidden": 8, "layers": 3})
    assert config.model_args == {"hidden": 8, "layers": 3}
    model = task.build_model(config)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 4
