"""Lag probe settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tensorwire.rpc.config import ClientSettings, setting


@dataclass(frozen=True)
class ProbeSettings(ClientSettings):
    env_prefix: ClassVar[str] = "TENSORWIRE_PROBE_"
    service: ClassVar[str] = "probe"

    host: str = setting("127.0.0.1", env="HOST", help="address of the /metrics endpoint")
    port: int = setting(9103, env="PORT", help="HTTP port of /metrics", min=0, max=65535)
    trainer_target: str = setting(
        "127.0.0.1:50051", env="TRAINER_TARGET", help="trainer to list the running runs from"
    )
    streamer_target: str = setting(
        "127.0.0.1:50052", env="STREAMER_TARGET",
        help="streamer replicas to watch: host:port, a comma list, or dns:///name:port (every pod)",
    )
    interval_s: float = setting(
        5.0, env="INTERVAL_S", help="seconds between looks for new runs and replicas", min=0.1, max=3600
    )
    log_level: str = setting(
        "INFO", env="LOG_LEVEL", help="log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
