"""Streamer settings: the only place its flags and environment are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tensorwire.rpc.config import ServerSettings, setting


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
    max_subscribers: int = setting(
        1000, env="MAX_SUBSCRIBERS", help="subscribers at once; more get RESOURCE_EXHAUSTED",
        min=1, max=1_000_000,
    )
    default_fps: float = setting(
        20.0, env="DEFAULT_FPS", help="heavy frames per second when a subscriber does not say",
        min=0.1, max=60,
    )
    tick_s: float = setting(
        0.025, env="TICK_S", help="period of the broadcast ticker, seconds", min=0.005, max=1
    )
    pacing_headroom: float = setting(
        2.0, env="PACING_HEADROOM",
        help="views use at most 1/this of a subscriber's measured bandwidth", min=1, max=20,
    )
    trainer_target: str = setting(
        "", env="TRAINER_TARGET",
        help="trainer to ask about runs this streamer has not seen: an unknown run id is "
             "NOT_FOUND and a new subscriber's snapshot holds the run's whole stored curve "
             "('' = none: a subscriber to an unseen run waits for it to publish)",
    )
    release_after_s: float = setting(
        30.0, env="RELEASE_AFTER_S",
        help="an ended run's state leaves memory this long after its last update, once "
             "nobody watches it", min=0,
    )
    unacked_cap_kb: float = setting(
        6.0, env="UNACKED_CAP_KB",
        help="subscribers that send no Ack get no view while more than this many KB are "
             "estimated in flight", min=1, max=100_000,
    )
    unacked_floor_kbps: float = setting(
        48.0, env="UNACKED_FLOOR_KBPS",
        help="without Acks, bytes in flight are assumed to drain at least this fast (kbit/s): "
             "a little below the slowest link the cap holds to its bound", min=1, max=10_000_000,
    )
    ack_stale_s: float = setting(
        3.0, env="ACK_STALE_S",
        help="a subscriber whose last Ack is older than this is held to the cap again",
        min=0.5, max=60,
    )
