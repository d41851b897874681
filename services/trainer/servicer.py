"""TrainerService: protobuf <-> RunManager, a few lines per RPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from tensorwire.data.scalars import to_batch
from tensorwire.errors import InvalidArgumentError
from tensorwire.trainer.v1 import trainer_pb2 as pb
from tensorwire.trainer.v1 import trainer_pb2_grpc as pb_grpc

from .runs import Run, RunManager
from .store import RunRecord
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


def run_message(run: Run | RunRecord) -> pb.Run:
    rec = run.record() if isinstance(run, Run) else run
    return pb.Run(
        run_id=rec.run_id, task=rec.task, state=rec.state, step=rec.step,  # type: ignore[arg-type]  # protobuf enum fields take their int values
        steps_per_second=rec.steps_per_second, params=rec.params, options=rec.options,
        metrics=rec.metrics, created_at=rec.created_at, updated_at=rec.updated_at,
        error=rec.error, checkpoint_step=rec.checkpoint_step, seed=rec.seed,
        produced_at=rec.produced_at or rec.updated_at, name=rec.name, tags=rec.tags,
        notes=rec.notes, ended_at=rec.ended_at,
        best=pb.BestMetric(name=rec.best.name, value=rec.best.value,
                           higher_is_better=rec.best.higher_is_better) if rec.best else None,
    )


_LABELS = ("name", "tags", "notes")


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, runs: RunManager) -> None:
        self._runs = runs

    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        return pb.ListTasksResponse(tasks=[task_info(t) for t in self._runs.list_tasks()])

    async def StartRun(self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext) -> pb.StartRunResponse:
        run = self._runs.start_run(request.task, dict(request.params), dict(request.options), request.seed,
                                   name=request.name, tags=list(request.tags), notes=request.notes)
        return pb.StartRunResponse(run=run_message(run))

    async def PauseRun(self, request: pb.PauseRunRequest, context: grpc.aio.ServicerContext) -> pb.PauseRunResponse:
        return pb.PauseRunResponse(run=run_message(self._runs.pause_run(request.run_id)))

    async def ResumeRun(self, request: pb.ResumeRunRequest, context: grpc.aio.ServicerContext) -> pb.ResumeRunResponse:
        return pb.ResumeRunResponse(run=run_message(await self._runs.resume_run(request.run_id)))

    async def StopRun(self, request: pb.StopRunRequest, context: grpc.aio.ServicerContext) -> pb.StopRunResponse:
        return pb.StopRunResponse(run=run_message(await self._runs.stop_run(request.run_id)))

    async def UpdateRun(self, request: pb.UpdateRunRequest, context: grpc.aio.ServicerContext) -> pb.UpdateRunResponse:
        paths = list(request.update_mask.paths) or ["params"]
        unknown = [p for p in paths if p not in ("params", *_LABELS)]
        if unknown:
            raise InvalidArgumentError(
                f"update_mask names {', '.join(unknown)}; it may name params, name, tags, notes"
            )
        record: Run | RunRecord | None = None
        if "params" in paths:
            record = self._runs.update_run(request.run_id, dict(request.params))
        if any(p in _LABELS for p in paths):
            record = await asyncio.to_thread(
                self._runs.label_run, request.run_id,
                name=request.name if "name" in paths else None,
                tags=list(request.tags) if "tags" in paths else None,
                notes=request.notes if "notes" in paths else None,
            )
        assert record is not None
        return pb.UpdateRunResponse(run=run_message(record))

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=run_message(await asyncio.to_thread(self._runs.find_run, request.run_id)))

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        page = await asyncio.to_thread(
            self._runs.query_runs, request.filter, request.order_by, request.page_size, request.page_token
        )
        return pb.ListRunsResponse(runs=[run_message(r) for r in page.runs],
                                   next_page_token=page.next_page_token, total_size=page.total_size)

    async def RegisterRun(
        self, request: pb.RegisterRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterRunResponse:
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

    async def DeleteRun(self, request: pb.DeleteRunRequest, context: grpc.aio.ServicerContext) -> pb.DeleteRunResponse:
        await self._runs.delete_run(request.run_id)
        return pb.DeleteRunResponse()

    async def GetRunScalars(
        self, request: pb.GetRunScalarsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRunScalarsResponse:
        series = await asyncio.to_thread(
            self._runs.scalars, request.run_id, request.max_points or 1024, list(request.names)
        )
        return pb.GetRunScalarsResponse(run_id=request.run_id, scalars=to_batch(series))
