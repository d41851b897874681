"""``fusion``: fuse noisy GPS, odometry and compass readings into a state estimate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tensorwire.common.v1 import common_pb2 as cpb

from .. import views
from .base import RunConfig, Task

WINDOW, SHOWN = 10, 64
GPS_NOISE, VEL_NOISE, HEADING_NOISE = 0.05, 0.01, 0.15


def make_drive(count: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(sensors [count, length, 6], truth [count, length, 4]) for vehicles that turn and speed up."""
    start = torch.rand(count, 2, generator=gen) * 1.2 - 0.6
    speed = torch.rand(count, 1, generator=gen) * 0.03 + 0.01
    heading = torch.rand(count, 1, generator=gen) * 2 * torch.pi
    turn = (torch.rand(count, 1, generator=gen) - 0.5) * 0.15
    t = torch.arange(length, dtype=torch.float32).unsqueeze(0)
    angle = heading + turn * t + 0.3 * torch.sin(t * 0.1 + heading)
    vel = torch.stack([torch.cos(angle), torch.sin(angle)], 2) * speed.unsqueeze(2)
    pos = start.unsqueeze(1) + torch.cumsum(vel, 1)
    noisy = lambda x, s: x + torch.randn(x.shape, generator=gen) * s  # noqa: E731
    sensors = torch.cat(
        [noisy(pos, GPS_NOISE), noisy(vel, VEL_NOISE),
         torch.sin(noisy(angle, HEADING_NOISE)).unsqueeze(2),
         torch.cos(noisy(angle, HEADING_NOISE)).unsqueeze(2)], 2,
    )
    return sensors, torch.cat([pos, vel], 2)


def windows(sensors: torch.Tensor) -> torch.Tensor:
    """[N, T, 6] -> [N, T - WINDOW + 1, WINDOW, 6] sliding windows."""
    return sensors.unfold(1, WINDOW, 1).permute(0, 1, 3, 2)


class FusionTask(Task):
    name = "fusion"
    title = "Sensor fusion"
    description = "Fuse noisy GPS, velocity and heading readings into a position/velocity estimate."
    model_kind = "fusion"
    views = ("fusion",)
    metrics = ("loss", "position_error")
    main_metric = "position_error"
    defaults = {"learning_rate": 0.002, "batch_size": 128}

    def make_data(self, config: RunConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        sensors, truth = make_drive(1, SHOWN + WINDOW - 1, torch.Generator().manual_seed(seed))
        return sensors[0], truth[0]

    def sample_batch(self, data: object, config: RunConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        sensors, truth = make_drive(config.batch_size, WINDOW, gen)
        return sensors, truth[:, -1]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sensors, state = batch
        pred = model(sensors)
        error = (pred[:, :2] - state[:, :2]).norm(dim=1).mean()
        scale = torch.tensor([1.0, 1.0, 10.0, 10.0], device=pred.device)
        return F.mse_loss(pred * scale, state * scale) * 100, {"position_error": error}

    def build_view(self, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], config: RunConfig) -> cpb.View:
        sensors, truth = data
        with torch.no_grad():
            est = model(windows(sensors.unsqueeze(0))[0])
        truth = truth[WINDOW - 1:]
        gps = sensors[WINDOW - 1:, :2]
        return views.fusion(
            gps.numpy(), est[:, :2].numpy(), truth[:, :2].numpy(), est[:, 2:].numpy(),
            truth[:, 2:].numpy(),
            gps_error=float((gps - truth[:, :2]).norm(dim=1).mean()),
            fused_error=float((est[:, :2] - truth[:, :2]).norm(dim=1).mean()),
        )
