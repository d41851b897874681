"""GRPCInferenceService: protobuf <-> the inference core, a few lines per RPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from tensorwire.data import oip
from tensorwire.errors import TensorwireError
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.inference import grpc_service_pb2_grpc as pb_grpc
from tensorwire.inference import model_config_pb2 as mc
from tensorwire.serving import admission, tritonconfig

from .records import InferRequest, InferResult, ModelInfo
from .repository import ModelRepository
from .server_state import ServerState

MAX_STREAM_IN_FLIGHT = 256
"""Requests of one ModelStreamInfer stream that may be running at once."""


def to_request(request: pb.ModelInferRequest) -> tuple[InferRequest, bool]:
    """The core request, and whether its inputs came raw. It carries no deadline: gRPC
    cancels the handler when the client's deadline passes, and with it the queued item
    (dropped before its batch runs), so a batcher timer per request would be waste."""
    inputs, raw = oip.decode_inputs(request)
    outputs = tuple(o.name for o in request.outputs) if request.outputs else ()
    return InferRequest(request.model_name, request.model_version, request.id, inputs, outputs), raw


def to_response(result: InferResult, raw: bool) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=result.id)
    return oip.encode_outputs(response, result.outputs, raw=raw)


def _config_override(parameters: dict) -> dict | None:
    if "config" not in parameters:
        return None
    param = parameters["config"]
    return admission.parse_override(param.string_param or param.bytes_param)


def _model_config(info: ModelInfo) -> mc.ModelConfig:
    return tritonconfig.model_config_of(info.config)


def _duration(d) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState, repository: ModelRepository) -> None:
        self._state = state
        self._repo = repository

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._state.live)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._state.ready and self._repo.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        # a lazy model: loaded first (answer: loaded or not); never waits for the boot scan
        await self._repo.load_on_demand(request.name, wait_for_boot=False)
        return pb.ModelReadyResponse(ready=self._repo.model_ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        meta = self._state.metadata()
        return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=list(meta.extensions))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        await self._repo.load_on_demand(request.name)
        info = self._repo.info(request.name, request.version)
        batch = (-1,) if info.max_batch_size > 0 else ()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=info.name,
            versions=[str(v) for v in info.versions],
            platform=info.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=batch + t.dims) for t in info.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=batch + t.dims) for t in info.outputs],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        infer_request, raw = to_request(request)
        return to_response(await self._repo.infer(infer_request), raw)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                infer_request, raw = to_request(request)
                result = await self._repo.infer(infer_request)
                await responses.put(pb.ModelStreamInferResponse(infer_response=to_response(result, raw)))
            except TensorwireError as exc:
                await responses.put(
                    pb.ModelStreamInferResponse(
                        error_message=f"{exc.code.name}: {exc}",
                        infer_response=pb.ModelInferResponse(
                            model_name=request.model_name, model_version=request.model_version, id=request.id
                        ),
                    )
                )
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.get_running_loop().create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                # Also when reading ended the stream (a message that does not parse
                # aborts it): the loop below stops at once and `await reader` raises,
                # so the finally cancels the tasks still queued instead of letting
                # them run on the model for a stream that is over.
                responses.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while (item := await responses.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        await self._repo.load_on_demand(request.name)
        return pb.ModelConfigResponse(config=_model_config(self._repo.info(request.name, request.version)))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        reply = pb.ModelStatisticsResponse()
        for name, version, s in self._repo.statistics(request.name, request.version):
            reply.model_stats.add(
                name=name,
                version=str(version),
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                inference_stats=pb.InferStatistics(
                    success=_duration(s.success),
                    fail=_duration(s.fail),
                    queue=_duration(s.queue),
                    compute_input=_duration(s.compute_input),
                    compute_infer=_duration(s.compute_infer),
                    compute_output=_duration(s.compute_output),
                    cache_hit=_duration(s.cache_hit),
                    cache_miss=_duration(s.cache_miss),
                ),
                batch_stats=[
                    pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(d))
                    for size, d in sorted(s.batches.items())
                ],
            )
        return reply

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self._repo.index(request.ready)
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await self._repo.load_model(request.model_name, _config_override(dict(request.parameters)))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._repo.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
