"""Gateway settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tensorwire.rpc.config import ServerSettings, setting

_WEB_DIST = Path(__file__).resolve().parents[2] / "clients" / "web" / "dist"


@dataclass(frozen=True)
class GatewaySettings(ServerSettings):
    env_prefix: ClassVar[str] = "TENSORWIRE_GATEWAY_"
    service: ClassVar[str] = "gateway"

    port: int = setting(8080, env="PORT", help="HTTP port: the web app and gRPC-Web", min=0, max=65535)
    metrics_port: int = setting(
        -1, env="METRICS_PORT",
        help="unused: the gateway serves /metrics on its own HTTP port", min=-1, max=65535,
    )
    trainer_target: str = setting(
        "127.0.0.1:50051", env="TRAINER_TARGET", help="trainer address (host:port or dns:///name:port)"
    )
    streamer_target: str = setting(
        "127.0.0.1:50052", env="STREAMER_TARGET", help="streamer address"
    )
    inference_target: str = setting(
        "127.0.0.1:8001", env="INFERENCE_TARGET", help="inference address ('' = not routed)"
    )
    static_dir: Path = setting(
        _WEB_DIST, env="STATIC_DIR", help="built web app to serve at / (clients/web/dist)"
    )
    cors_origins: tuple[str, ...] = setting(
        (), env="CORS_ORIGINS",
        help="other origins allowed to call gRPC-Web, comma separated ('*' = any); "
        "the page's own origin is always allowed",
    )
    allowed_hosts: tuple[str, ...] = setting(
        (), env="ALLOWED_HOSTS",
        help="Host header names answered besides localhost, 127.0.0.1, ::1 and --host, comma "
             "separated ('*' = any); other names get 403 (DNS rebinding guard)",
    )
    control_rate_per_s: float = setting(
        5.0, env="CONTROL_RATE_PER_S",
        help="control calls (start/stop/update runs, model loads) per second and token "
             "(or peer address without one); more get RESOURCE_EXHAUSTED",
        min=0.01, max=100000,
    )
    control_burst: int = setting(
        20, env="CONTROL_BURST", help="control calls a token may make at once before the rate "
        "applies", min=1, max=100000,
    )
    max_unsent_kb: int = setting(
        16, env="MAX_UNSENT_KB",
        help="a stream's next message waits until fewer than this many KiB sit unacknowledged "
        "in the socket, so slow links skip frames upstream instead of queueing them here",
        min=1, max=65536,
    )
