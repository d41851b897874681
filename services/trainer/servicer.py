"""TrainerService: protobuf <-> RunManager, a few lines per RPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from tensorwire.trainer.v1 import trainer_pb2 as pb
from tensorwire.trainer.v1 import trainer_pb2_grpc as pb_grpc

from .runs import Run, RunManager
from .tasks import Task


def task_info(task: Task) -> pb.TaskInfo:
    return pb.TaskInfo(
        name=task.name, title=task.title, description=task.description,
        params=[
            pb.ParamSpec(name=p.name, description=p.description, default_value=task.default_of(p),
                         min=p.min, max=p.max, integer=p.integer, live=p.live)
            for p in task.params
        ],
        options=[
            pb.OptionSpec(name=o.name, description=o.description, default_value=o.default,
                          choices=list(o.choices))
            for o in task.options
        ],
        views=list(task.views), metrics=list(task.metrics),
    )


def run_message(run: Run) -> pb.Run:
    status = run.loop.status
    config = run.config
    return pb.Run(
        run_id=run.run_id, task=run.task.name, state=run.state, step=status.step,
        steps_per_second=status.steps_per_second, params=config.params, options=config.options,
        metrics=status.metrics, created_at=run.created_at, updated_at=run.updated_at,
        error=run.error, checkpoint_step=run.checkpoint_step, seed=run.seed,
        produced_at=status.produced_at,
    )


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, runs: RunManager) -> None:
        self._runs = runs

    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        return pb.ListTasksResponse(tasks=[task_info(t) for t in self._runs.list_tasks()])

    async def StartRun(self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext) -> pb.StartRunResponse:
        run = self._runs.start_run(request.task, dict(request.params), dict(request.options), request.seed)
        return pb.StartRunResponse(run=run_message(run))

    async def PauseRun(self, request: pb.PauseRunRequest, context: grpc.aio.ServicerContext) -> pb.PauseRunResponse:
        return pb.PauseRunResponse(run=run_message(self._runs.pause_run(request.run_id)))

    async def ResumeRun(self, request: pb.ResumeRunRequest, context: grpc.aio.ServicerContext) -> pb.ResumeRunResponse:
        return pb.ResumeRunResponse(run=run_message(self._runs.resume_run(request.run_id)))

    async def StopRun(self, request: pb.StopRunRequest, context: grpc.aio.ServicerContext) -> pb.StopRunResponse:
        return pb.StopRunResponse(run=run_message(await self._runs.stop_run(request.run_id)))

    async def UpdateRun(self, request: pb.UpdateRunRequest, context: grpc.aio.ServicerContext) -> pb.UpdateRunResponse:
        run = self._runs.update_run(request.run_id, dict(request.params))
        return pb.UpdateRunResponse(run=run_message(run))

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=run_message(self._runs.get_run(request.run_id)))

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[run_message(r) for r in self._runs.list_runs()])

    async def RegisterRun(self, request: pb.RegisterRunRequest, context: grpc.aio.ServicerContext) -> pb.RegisterRunResponse:
        run = self._runs.register_run(request.run_id, request.task, dict(request.params))
        return pb.RegisterRunResponse(run=run_message(run))

    async def AttachRun(
        self, requests: AsyncIterator[pb.AttachRunRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AttachRunResponse]:
        first = await anext(aiter(requests), None)
        if first is None:
            return
        loop = self._runs.external_run(first.run_id)
        attachment = loop.attach()
        if first.HasField("status"):
            loop.report(first.status)

        async def consume() -> None:
            async for request in requests:
                if request.HasField("status"):
                    loop.report(request.status)

        reader = asyncio.create_task(consume())
        sent: tuple[bool, bool, dict[str, float]] | None = None
        try:
            while loop.attached_by(attachment):
                loop.changed.clear()
                control = loop.control()
                if control != sent:
                    sent = control
                    paused, stop, params = control
                    yield pb.AttachRunResponse(paused=paused, stop=stop, params=params)
                waiter = asyncio.create_task(loop.changed.wait())
                try:
                    done, _ = await asyncio.wait({reader, waiter}, timeout=1.0,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if reader in done:
                    reader.result()  # raises what the reader raised
                    return
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            loop.detach(attachment)
