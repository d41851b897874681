"""Inference settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tensorwire.config import ServerSettings, setting


@dataclass(frozen=True)
class InferenceSettings(ServerSettings):
    env_prefix: ClassVar[str] = "TENSORWIRE_INFERENCE_"
    service: ClassVar[str] = "inference"

    port: int = setting(8001, env="PORT", help="gRPC port (Triton's default)", min=0, max=65535)
    metrics_port: int = setting(
        8002, env="METRICS_PORT", help="Prometheus /metrics port (-1 disables)", min=-1, max=65535
    )
    model_repository: Path = setting(
        Path("var/models"), env="MODEL_REPOSITORY", help="model repository directory"
    )
