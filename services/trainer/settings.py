"""Trainer settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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
    streamer_target: str = setting(
        "127.0.0.1:50052", env="STREAMER_TARGET",
        help="streamer address(es) to publish to: host:port, a comma list, or dns:///name:port",
    )
    inference_target: str = setting(
        "127.0.0.1:8001", env="INFERENCE_TARGET",
        help="inference service to announce checkpoints to ('' = none)",
    )
    model_repository: Path = setting(
        Path("var/models"), env="MODEL_REPOSITORY", help="where checkpoints are written"
    )
    demo_task: str = setting(
        "", env="DEMO_TASK", help="task of a run started at boot ('' = none)"
    )
