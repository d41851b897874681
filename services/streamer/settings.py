"""Streamer settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tensorwire.config import ServerSettings, setting


@dataclass(frozen=True)
class StreamerSettings(ServerSettings):
    env_prefix: ClassVar[str] = "TENSORWIRE_STREAMER_"
    service: ClassVar[str] = "streamer"

    port: int = setting(50052, env="PORT", help="gRPC port", min=0, max=65535)
    metrics_port: int = setting(
        9102, env="METRICS_PORT", help="Prometheus /metrics port (-1 disables)", min=-1, max=65535
    )
    keepalive_s: float = setting(
        1.0, env="KEEPALIVE_S", help="seconds between status frames to a subscriber", min=0.05, max=30
    )
