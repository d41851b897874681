"""``spiral``: 2-D point classification as TensorFlow Playground does it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.views import U8, U8Q, encoded

from .. import views
from .base import COMMON_PARAMS, Option, Param, RunConfig, Task

EXTENT = 1.2
GRID = 32
DATASETS = ("spiral", "circles", "xor", "gaussian")


@dataclass(frozen=True)
class PointSet:
    points: torch.Tensor  # [N, 2]
    labels: torch.Tensor  # [N] int64
    grid: torch.Tensor  # [GRID*GRID, 2]: where the boundary is evaluated
    points_array: cpb.Array  # the points and labels as every view sends them, encoded once
    labels_array: cpb.Array


def make_points(dataset: str, count: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` labelled points of ``dataset`` in about [-1, 1]^2."""
    g = torch.Generator().manual_seed(seed)
    half = count // 2
    labels = torch.cat([torch.zeros(half), torch.ones(count - half)]).long()
    if dataset == "spiral":
        r = torch.rand(count, generator=g) * 0.95 + 0.05
        theta = r * 3.5 * math.pi + labels * math.pi
        pts = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
    elif dataset == "circles":
        r = torch.where(labels == 0, torch.rand(count, generator=g) * 0.45,
                        torch.rand(count, generator=g) * 0.35 + 0.65)
        theta = torch.rand(count, generator=g) * 2 * math.pi
        pts = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
    elif dataset == "xor":
        pts = torch.rand(count, 2, generator=g) * 2 - 1
        pts = pts + torch.sign(pts) * 0.05
        labels = ((pts[:, 0] > 0) ^ (pts[:, 1] > 0)).long()
    elif dataset == "gaussian":
        centres = torch.tensor([[-0.5, -0.5], [0.5, 0.5]])
        pts = centres[labels] + torch.randn(count, 2, generator=g) * 0.25
    else:
        raise ValueError(dataset)
    pts = pts + torch.randn(count, 2, generator=g) * noise * 0.3
    return pts.float(), labels


class SpiralTask(Task):
    name = "spiral"
    title = "2-D classification"
    description = "Classify 2-D points (spiral, circles, XOR, gaussian); watch the decision boundary."
    model_kind = "spiral"
    views = ("boundary",)
    metrics = ("loss", "accuracy")
    main_metric = "accuracy"
    higher_is_better = True
    params = COMMON_PARAMS + (
        Param("noise", "label noise of the dataset", 0.1, 0.0, 1.0, live=False),
        Param("points", "points in the dataset", 1000, 10, 20000, integer=True, live=False),
        Param("hidden", "units per hidden layer", 16, 2, 256, integer=True, live=False, model_arg=True),
        Param("layers", "hidden layers", 2, 1, 6, integer=True, live=False, model_arg=True),
    )
    options = (Option("dataset", "which 2-D problem", "spiral", DATASETS),)
    defaults = {"learning_rate": 0.03, "batch_size": 32}

    def make_data(self, config: RunConfig, seed: int) -> PointSet:
        pts, labels = make_points(
            config.options["dataset"], int(config.params["points"]), config.params["noise"], seed
        )
        axis = (torch.arange(GRID, dtype=torch.float32) + 0.5) * (2 * EXTENT / GRID) - EXTENT
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        grid = torch.stack([xx.flatten(), yy.flatten()], 1)
        return PointSet(pts, labels, grid, encoded("points", pts.numpy(), U8Q), encoded("labels", labels.numpy(), U8))

    def sample_batch(self, data: PointSet, config: RunConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        idx = torch.randint(0, data.points.shape[0], (config.batch_size,), generator=gen)
        return data.points[idx], data.labels[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        logits = model(x)
        accuracy = (logits.argmax(1) == y).float().mean()
        return F.cross_entropy(logits, y), {"accuracy": accuracy}

    def build_view(self, model: nn.Module, data: PointSet, config: RunConfig) -> cpb.View:
        with torch.inference_mode():
            logits = model(data.grid)
            # P(class 1) of a two-way softmax, without the softmax.
            grid = torch.sigmoid(logits[:, 1] - logits[:, 0]).reshape(GRID, GRID)
        return views.boundary(grid.numpy(), data.points_array, data.labels_array, EXTENT)
