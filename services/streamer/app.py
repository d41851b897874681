"""Wiring of the streamer service: core + servicer + server."""

from __future__ import annotations

import grpc

from tensorwire.rpc.rpcnames import service_name
from tensorwire.streamer.v1 import streamer_pb2 as pb

from .feedback import FeedbackLimits
from .hub import HubLimits, UpdateHub
from .lookup import TrainerLookup
from .servicer import StreamerServicer, register
from .settings import StreamerSettings

SERVICE_NAME = service_name(pb, "StreamerService")


class StreamerApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: StreamerSettings) -> None:
        self.settings = settings
        self.lookup = (TrainerLookup(settings.trainer_target, security=settings.client_security())
                       if settings.trainer_target else None)
        self.hub = UpdateHub(
            HubLimits(
                keepalive_s=settings.keepalive_s, max_subscribers=settings.max_subscribers,
                default_fps=settings.default_fps, tick_s=settings.tick_s,
                pacing_headroom=settings.pacing_headroom, release_after_s=settings.release_after_s,
                feedback=FeedbackLimits(
                    cap_bytes=int(settings.unacked_cap_kb * 1024),
                    floor_bytes_per_s=settings.unacked_floor_kbps * 1000 / 8,
                    stale_s=settings.ack_stale_s,
                ),
            ),
            lookup=self.lookup.describe if self.lookup else None,
        )

    def register(self, server: grpc.aio.Server) -> None:
        register(StreamerServicer(self.hub), server)

    async def drain(self) -> None:
        await self.hub.aclose()

    async def aclose(self) -> None:
        await self.hub.aclose()
        if self.lookup is not None:
            await self.lookup.aclose()


async def create_app(settings: StreamerSettings) -> StreamerApp:
    app = StreamerApp(settings)
    app.hub.start()
    return app
