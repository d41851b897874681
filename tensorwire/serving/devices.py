"""Which torch device a service computes on: one parser for the ``--device`` settings.

``auto`` takes the first CUDA device when torch sees one, else the CPU; ``cpu``;
``cuda`` or ``cuda:N`` demand that device and refuse to start without it (a pod
scheduled onto a GPU node that silently computes on its CPU is worse than one that
fails its start-up with a reason).

The spelling is checked with the other settings (``check_device_spec``, no torch
needed); whether the device exists, when the service starts (``resolve_device``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tensorwire.rpc.config import ServerSettings, SettingsError, setting

if TYPE_CHECKING:
    import torch

_SPEC = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")


def _label(env_prefix: str) -> str:
    return f"device (--device / {env_prefix}DEVICE)" if env_prefix else "device"


def check_device_spec(spec: str, env_prefix: str = "") -> None:
    """SettingsError unless ``spec`` is auto, cpu, cuda or cuda:N (the message names
    the flag and the variable ``env_prefix`` + DEVICE)."""
    setting = _label(env_prefix)
    if not _SPEC.match(spec):
        raise SettingsError(f"{setting} must be auto, cpu, cuda or cuda:N, got {spec!r}")


def resolve_device(spec: str, env_prefix: str = "") -> torch.device:
    """The device ``spec`` names, or SettingsError saying why it cannot be used here."""
    import torch

    check_device_spec(spec, env_prefix)
    setting = _label(env_prefix)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(spec.partition(":")[2] or 0)
    if index >= count:
        seen = f"{count} CUDA device(s)" if count else "no CUDA device (torch.cuda.is_available() is False)"
        raise SettingsError(f"{setting} {spec!r} cannot be used: torch sees {seen}")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class TorchServiceSettings(ServerSettings):
    """The settings of a service that computes with torch (trainer, inference)."""

    device: str = setting(
        "auto", env="DEVICE",
        help="torch device to compute on: auto (first CUDA device if any, else cpu), cpu, cuda, "
             "cuda:N (refuses to start without that device)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_device_spec(self.device, self.env_prefix)
