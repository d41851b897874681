"""The torch models of tensorwire's five tasks, shared by the trainer and inference.

Every model takes batch-first float32 tensors, one per entry of its spec's
``inputs`` (in that order), and returns one tensor per entry of ``outputs`` (a
single tensor when there is one output, else a tuple in that order). None uses
dropout or batch statistics, so eval mode is deterministic.

``MODELS`` maps a kind to its :class:`ModelSpec`; ``build_model(kind, **args)``
builds one with ``default_args`` overridden by ``args``. A spec's tensor dims
are for the default arguments and exclude the batch dim; :func:`tensor_specs`
gives the dims for other arguments.

Shapes with the default arguments (B = batch):

- ``spiral``: ``points`` [B, 2] (x, y in about [-1.2, 1.2]) -> ``logits`` [B, 2]
  (class 0 / class 1).
- ``trajectory``: ``past`` [B, 8, 2] (the last 8 positions, oldest first) ->
  ``future`` [B, 4, 2] (the next 4 positions).
- ``anomaly``: ``window`` [B, 32, 4] (32 time steps of 4 normalised sensor
  channels) -> ``reconstruction`` [B, 32, 4] and ``score`` [B, 32] (mean squared
  reconstruction error per time step; large = anomalous).
- ``fusion``: ``sensors`` [B, 10, 6] (the last 10 readings of: noisy GPS x, y;
  noisy odometry velocity vx, vy; noisy compass heading as sin, cos) ->
  ``state`` [B, 4] (estimated x, y, vx, vy at the newest reading).
- ``detection``: ``image`` [B, 1, 32, 32] (grey, in [0, 1]) -> ``objectness``
  [B, 4, 4] (logit that a shape's centre falls in each 8x8 cell), ``boxes``
  [B, 4, 4, 4] (cx, cy, w, h in image fractions [0, 1]) and ``class_logits``
  [B, 4, 4, 3] (square, circle, triangle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor of a model."""

    name: str
    datatype: str
    """Triton/Open Inference Protocol type name, e.g. ``FP32``."""
    dims: tuple[int, ...]
    """Shape without the batch dim."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build a task's model and what it consumes and produces."""

    kind: str
    build: Callable[..., nn.Module]
    """Keyword arguments are the ``model_args``."""
    default_args: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[TensorSpec, ...] = ()
    """Input tensors for ``default_args``, in forward() argument order."""
    outputs: tuple[TensorSpec, ...] = ()
    """Output tensors for ``default_args``, in the order forward() returns them."""
    shapes: Callable[..., tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] | None = None
    """(inputs, outputs) for other model_args; None = they never change."""


def _mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class SpiralNet(nn.Module):
    """A small MLP classifying 2-D points (the TensorFlow Playground problem)."""

    def __init__(self, hidden: int = 16, layers: int = 2, classes: int = 2) -> None:
        super().__init__()
        if hidden < 1 or layers < 1 or classes < 2:
            raise ValueError(f"SpiralNet needs hidden>=1, layers>=1, classes>=2, got {hidden}, {layers}, {classes}")
        self.net = _mlp([2, *([hidden] * layers), classes])

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.net(points)


class TrajectoryNet(nn.Module):
    """Predicts the next positions of an object from its past positions.

    Works on displacements relative to the newest position, so it is invariant
    to where the object is; returns absolute positions.
    """

    def __init__(self, past: int = 8, future: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.past, self.future = past, future
        self.net = _mlp([(past - 1) * 2, hidden, hidden, future * 2], nn.ReLU)

    def forward(self, past: torch.Tensor) -> torch.Tensor:
        last = past[:, -1:, :]
        deltas = (past[:, 1:, :] - past[:, :-1, :]).flatten(1)
        steps = self.net(deltas).view(-1, self.future, 2)
        return last + torch.cumsum(steps, dim=1)


class AnomalyAutoencoder(nn.Module):
    """A dense autoencoder over windows of multivariate sensor signals."""

    def __init__(self, window: int = 32, channels: int = 4, hidden: int = 64, latent: int = 8) -> None:
        super().__init__()
        self.window, self.channels = window, channels
        size = window * channels
        self.encoder = _mlp([size, hidden, latent], nn.ReLU)
        self.decoder = _mlp([latent, hidden, size], nn.ReLU)

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon = self.decoder(torch.relu(self.encoder(window.flatten(1)))).view_as(window)
        score = (recon - window).pow(2).mean(dim=2)
        return recon, score


class FusionNet(nn.Module):
    """Fuses a window of noisy position, velocity and heading readings into a state."""

    def __init__(self, window: int = 10, features: int = 6, hidden: int = 64) -> None:
        super().__init__()
        self.window, self.features = window, features
        self.net = _mlp([window * features, hidden, hidden, 4], nn.ReLU)

    def forward(self, sensors: torch.Tensor) -> torch.Tensor:
        # Predict the state relative to the newest GPS fix, so the net learns a
        # correction rather than absolute coordinates.
        anchor = torch.cat([sensors[:, -1, 0:2], sensors.new_zeros(sensors.shape[0], 2)], dim=1)
        return anchor + self.net(sensors.flatten(1))


class DetectionNet(nn.Module):
    """A small single-shot CNN: per grid cell, objectness, a box and a class."""

    def __init__(self, size: int = 32, grid: int = 4, classes: int = 3, width: int = 16) -> None:
        super().__init__()
        if size % grid or (size // grid) & (size // grid - 1):
            raise ValueError(f"size/grid must be a power of two, got size={size} grid={grid}")
        self.size, self.grid, self.classes = size, grid, classes
        blocks: list[nn.Module] = []
        channels, current = 1, size
        while current > grid:
            blocks += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, current = width, current // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Conv2d(channels, 1 + 4 + classes, 1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(self.features(image)).permute(0, 2, 3, 1)  # B, G, G, 1+4+C
        objectness = out[..., 0]
        offsets = torch.sigmoid(out[..., 1:3])
        sizes = torch.sigmoid(out[..., 3:5])
        cells = torch.arange(self.grid, device=image.device, dtype=image.dtype)
        cy, cx = torch.meshgrid(cells, cells, indexing="ij")
        centre_x = (cx + offsets[..., 0]) / self.grid
        centre_y = (cy + offsets[..., 1]) / self.grid
        boxes = torch.stack([centre_x, centre_y, sizes[..., 0], sizes[..., 1]], dim=-1)
        return objectness, boxes, out[..., 5:]


def _fp32(name: str, *dims: int) -> TensorSpec:
    return TensorSpec(name, "FP32", tuple(dims))


def _spiral_shapes(hidden: int = 16, layers: int = 2, classes: int = 2) -> Any:
    return (_fp32("points", 2),), (_fp32("logits", classes),)


def _trajectory_shapes(past: int = 8, future: int = 4, hidden: int = 64) -> Any:
    return (_fp32("past", past, 2),), (_fp32("future", future, 2),)


def _anomaly_shapes(window: int = 32, channels: int = 4, hidden: int = 64, latent: int = 8) -> Any:
    return (_fp32("window", window, channels),), (
        _fp32("reconstruction", window, channels),
        _fp32("score", window),
    )


def _fusion_shapes(window: int = 10, features: int = 6, hidden: int = 64) -> Any:
    return (_fp32("sensors", window, features),), (_fp32("state", 4),)


def _detection_shapes(size: int = 32, grid: int = 4, classes: int = 3, width: int = 16) -> Any:
    return (_fp32("image", 1, size, size),), (
        _fp32("objectness", grid, grid),
        _fp32("boxes", grid, grid, 4),
        _fp32("class_logits", grid, grid, classes),
    )


def _spec(kind: str, build: Callable[..., nn.Module], defaults: dict[str, Any], shapes: Any) -> ModelSpec:
    inputs, outputs = shapes(**defaults)
    return ModelSpec(kind, build, defaults, inputs, outputs, shapes)


MODELS: dict[str, ModelSpec] = {
    "spiral": _spec("spiral", SpiralNet, {"hidden": 16, "layers": 2, "classes": 2}, _spiral_shapes),
    "trajectory": _spec(
        "trajectory", TrajectoryNet, {"past": 8, "future": 4, "hidden": 64}, _trajectory_shapes
    ),
    "anomaly": _spec(
        "anomaly", AnomalyAutoencoder,
        {"window": 32, "channels": 4, "hidden": 64, "latent": 8}, _anomaly_shapes,
    ),
    "fusion": _spec("fusion", FusionNet, {"window": 10, "features": 6, "hidden": 64}, _fusion_shapes),
    "detection": _spec(
        "detection", DetectionNet, {"size": 32, "grid": 4, "classes": 3, "width": 16},
        _detection_shapes,
    ),
}
"""Every model kind tensorwire can train and serve."""


def _spec_for(kind: str) -> ModelSpec:
    try:
        return MODELS[kind]
    except KeyError:
        raise KeyError(f"unknown model kind {kind!r}; known: {', '.join(sorted(MODELS))}") from None


def _merged_args(spec: ModelSpec, model_args: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(model_args) - set(spec.default_args))
    if unknown:
        raise ValueError(
            f"unknown model_args {', '.join(unknown)} for {spec.kind!r}; "
            f"known: {', '.join(sorted(spec.default_args))}"
        )
    return {**spec.default_args, **model_args}


def build_model(kind: str, **model_args: Any) -> nn.Module:
    """A fresh model of ``kind`` with ``default_args`` overridden by ``model_args``."""
    spec = _spec_for(kind)
    return spec.build(**_merged_args(spec, model_args))


def tensor_specs(kind: str, **model_args: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of ``kind`` built with ``model_args``."""
    spec = _spec_for(kind)
    if spec.shapes is None:
        return spec.inputs, spec.outputs
    return spec.shapes(**_merged_args(spec, model_args))


def example_inputs(kind: str, batch: int = 2, **model_args: Any) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes (for smoke tests and tracing)."""
    inputs, _ = tensor_specs(kind, **model_args)
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.rand((batch, *t.dims), generator=gen) for t in inputs)
