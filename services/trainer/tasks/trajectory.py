"""``trajectory``: predict where moving objects go next from where they were."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorwire.common.v1 import common_pb2 as cpb

from .. import views
from .base import RunConfig, Task

PAST, FUTURE, SHOWN = 8, 4, 8


def make_tracks(count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[count, length, 2] positions of objects that move with a turning rate and jitter."""
    start = torch.rand(count, 2, generator=gen) * 2 - 1
    speed = torch.rand(count, 1, generator=gen) * 0.08 + 0.02
    heading = torch.rand(count, 1, generator=gen) * 2 * torch.pi
    turn = (torch.rand(count, 1, generator=gen) - 0.5) * 0.4
    accel = (torch.rand(count, 1, generator=gen) - 0.5) * 0.004
    t = torch.arange(length, dtype=torch.float32).unsqueeze(0)
    angles = heading + turn * t
    speeds = (speed + accel * t).clamp(min=0.005)
    steps = torch.stack([torch.cos(angles) * speeds, torch.sin(angles) * speeds], 2)
    pos = start.unsqueeze(1) + torch.cumsum(steps, 1)
    return pos + torch.randn(pos.shape, generator=gen) * 0.002


class TrajectoryTask(Task):
    name = "trajectory"
    title = "Trajectory prediction"
    description = "Predict the next 4 positions of moving objects from their last 8."
    model_kind = "trajectory"
    views = ("paths",)
    metrics = ("loss", "ade")
    main_metric = "ade"
    defaults = {"learning_rate": 0.003, "batch_size": 128}

    def make_data(self, config: RunConfig, seed: int) -> torch.Tensor:
        return make_tracks(SHOWN, PAST + FUTURE, torch.Generator().manual_seed(seed))

    def sample_batch(self, data: torch.Tensor, config: RunConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        tracks = make_tracks(config.batch_size, PAST + FUTURE, gen)
        return tracks[:, :PAST], tracks[:, PAST:]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        past, future = batch
        pred = model(past)
        ade = (pred - future).norm(dim=2).mean()
        return F.mse_loss(pred, future) * 100, {"ade": ade}

    def build_view(self, model: nn.Module, data: torch.Tensor, config: RunConfig) -> cpb.View:
        past, truth = data[:, :PAST], data[:, PAST:]
        with torch.no_grad():
            pred = model(past)
        ade = float((pred - truth).norm(dim=2).mean())
        return views.paths(past.numpy(), truth.numpy(), pred.numpy(), ade=ade)
