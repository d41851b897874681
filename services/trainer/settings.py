"""Trainer settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tensorwire.config import ServerSettings, setting


@dataclass(frozen=True)
class TrainerSettings(ServerSettings):
    env_prefix: ClassVar[str] = "TENSORWIRE_TRAINER_"
    service: ClassVar[str] = "trainer"

    port: int = setting(50051, env="PORT", help="gRPC port", min=0, max=65535)
    metrics_port: int = setting(
        9101, env="METRICS_PORT", help="Prometheus /metrics port (-1 disables)", min=-1, max=65535
    )
