"""Wiring of the streamer service: core + servicer + server."""

from __future__ import annotations

import grpc

from tensorwire.streamer.v1 import streamer_pb2 as pb
from tensorwire.streamer.v1 import streamer_pb2_grpc as pb_grpc

from .hub import UpdateHub
from .servicer import StreamerServicer
from .settings import StreamerSettings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StreamerService"].full_name


class StreamerApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: StreamerSettings) -> None:
        self.settings = settings
        self.hub = UpdateHub(settings.keepalive_s)

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_StreamerServiceServicer_to_server(StreamerServicer(self.hub), server)

    async def drain(self) -> None:
        await self.hub.aclose()

    async def aclose(self) -> None:
        await self.hub.aclose()


async def create_app(settings: StreamerSettings) -> StreamerApp:
    return StreamerApp(settings)
