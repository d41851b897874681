"""Triton model repositories made with the real exporters: torch.jit, torch.export, torch.onnx.

One small MLP (4 -> 16 -> 3, seeded) is written three ways; ``reference`` runs
it in torch, so tests compare what the server answers with what torch computes.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

FEATURES, CLASSES = 4, 3


def mlp(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)).eval()


def reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def pbtxt(name: str, platform: str, *, input_name: str = "x", output_name: str = "y",
          max_batch_size: int = 8, extra: str = "") -> str:
    return f"""
name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch_size}
input [ {{ name: "{input_name}" data_type: TYPE_FP32 dims: [ {FEATURES} ] }} ]
output [ {{ name: "{output_name}" data_type: TYPE_FP32 dims: [ {CLASSES} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 100 }}
{extra}
"""


def _version_dir(repo: Path, name: str, version: int) -> Path:
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_torchscript(repo: Path, name: str, model: nn.Module, version: int = 1,
                      config: str | None = None) -> Path:
    path = _version_dir(repo, name, version) / "model.pt"
    torch.jit.save(torch.jit.trace(model, torch.zeros(2, FEATURES)), str(path))
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return path


def write_export(repo: Path, name: str, model: nn.Module, version: int = 1,
                 config: str | None = None, max_batch: int = 64) -> Path:
    path = _version_dir(repo, name, version) / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(model, (torch.zeros(2, FEATURES),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return path


def write_onnx(repo: Path, name: str, model: nn.Module, version: int = 1, config: str | None = None,
               input_name: str = "x", output_name: str = "y", features: int = FEATURES) -> Path:
    path = _version_dir(repo, name, version) / "model.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    # torch.onnx prints its progress and logs warnings; keep test output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(model, (torch.zeros(2, features),), str(path), input_names=[input_name],
                          output_names=[output_name], dynamic_shapes=({0: batch},), external_data=False)
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)
    return path
