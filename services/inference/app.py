"""Wiring of the inference service: core + servicer + server."""

from __future__ import annotations

import grpc

from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc

from .server_state import ServerState
from .servicer import InferenceServicer
from .settings import InferenceSettings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class InferenceApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.state = ServerState()

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.state), server)

    async def drain(self) -> None:
        return None

    async def aclose(self) -> None:
        self.state.ready = False


async def create_app(settings: InferenceSettings) -> InferenceApp:
    return InferenceApp(settings)
