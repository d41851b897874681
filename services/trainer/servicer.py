"""TrainerService: protobuf <-> RunManager, a few lines per RPC."""

from __future__ import annotations

import grpc

from tensorwire.trainer.v1 import trainer_pb2 as pb
from tensorwire.trainer.v1 import trainer_pb2_grpc as pb_grpc

from .runs import RunManager


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, runs: RunManager) -> None:
        self._runs = runs

    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        return pb.ListTasksResponse(
            tasks=[
                pb.TaskInfo(name=t.name, title=t.title, description=t.description)
                for t in self._runs.list_tasks()
            ]
        )

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[])
