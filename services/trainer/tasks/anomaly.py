"""``anomaly``: an autoencoder on multichannel sensor signals flags injected anomalies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tensorwire.common.v1 import common_pb2 as cpb

from .. import views
from .base import RunConfig, Task

WINDOW, CHANNELS, SHOWN_WINDOWS = 32, 4, 8


def make_signals(count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[count, length, CHANNELS] normal signals: per-channel sine mixtures + noise."""
    t = torch.arange(length, dtype=torch.float32).view(1, length, 1)
    freq = torch.rand(count, 1, CHANNELS, generator=gen) * 0.15 + 0.05
    phase = torch.rand(count, 1, CHANNELS, generator=gen) * 2 * torch.pi
    amp = torch.rand(count, 1, CHANNELS, generator=gen) * 0.5 + 0.5
    base = amp * torch.sin(freq * t + phase) + 0.3 * torch.sin(freq * 0.37 * t + 2 * phase)
    return base + torch.randn(count, length, CHANNELS, generator=gen) * 0.05


@dataclass(frozen=True)
class Recording:
    signal: torch.Tensor  # [T, C] with anomalies
    truth: torch.Tensor  # [T] bool
    clean: torch.Tensor  # [64, WINDOW, C] normal windows for the threshold


def inject(signal: torch.Tensor, gen: torch.Generator, count: int) -> torch.Tensor:
    """Spikes and level shifts at random places; returns the truth mask."""
    length = signal.shape[0]
    truth = torch.zeros(length, dtype=torch.bool)
    for _ in range(count):
        at = int(torch.randint(2, length - 8, (1,), generator=gen))
        span = int(torch.randint(1, 6, (1,), generator=gen))
        channel = int(torch.randint(0, CHANNELS, (1,), generator=gen))
        signal[at:at + span, channel] += float(torch.rand(1, generator=gen)) * 1.5 + 1.0
        truth[at:at + span] = True
    return truth


class AnomalyTask(Task):
    name = "anomaly"
    title = "Sensor anomaly detection"
    description = "An autoencoder learns normal multichannel signals; large reconstruction error flags anomalies."
    model_kind = "anomaly"
    views = ("signal",)
    metrics = ("loss",)
    defaults = {"learning_rate": 0.002, "batch_size": 64}

    def make_data(self, config: RunConfig, seed: int) -> Recording:
        gen = torch.Generator().manual_seed(seed)
        signal = make_signals(1, WINDOW * SHOWN_WINDOWS, gen)[0]
        truth = inject(signal, gen, 5)
        return Recording(signal, truth, make_signals(64, WINDOW, gen))

    def sample_batch(self, data: Recording, config: RunConfig, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (make_signals(config.batch_size, WINDOW, gen),)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (window,) = batch
        _, score = model(window)
        return score.mean(), {}

    def build_view(self, model: nn.Module, data: Recording, config: RunConfig) -> cpb.View:
        with torch.no_grad():
            recon, error = model(data.signal.view(SHOWN_WINDOWS, WINDOW, CHANNELS))
            _, clean_error = model(data.clean)
        threshold = float(clean_error.flatten().quantile(0.995)) * 1.5
        error = error.flatten()
        flagged = error > threshold
        truth = data.truth
        hits = float((flagged & truth).sum())
        precision = hits / max(1.0, float(flagged.sum()))
        recall = hits / max(1.0, float(truth.sum()))
        return views.signal(
            data.signal.numpy(), recon.reshape(-1, CHANNELS).numpy(), error.numpy(),
            flagged.numpy().astype(np.uint8), truth.numpy().astype(np.uint8),
            threshold=threshold, precision=precision, recall=recall,
        )
