"""Wiring of the trainer service: core + servicer + server."""

from __future__ import annotations

import grpc

from tensorwire.trainer.v1 import trainer_pb2 as pb
from tensorwire.trainer.v1 import trainer_pb2_grpc as pb_grpc

from .runs import RunManager
from .servicer import TrainerServicer
from .settings import TrainerSettings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.runs = RunManager()

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self.runs), server)

    async def drain(self) -> None:
        return None

    async def aclose(self) -> None:
        await self.runs.aclose()


async def create_app(settings: TrainerSettings) -> TrainerApp:
    return TrainerApp(settings)
