"""tensorwire.transfer.v1.ModelTransferService: protobuf <-> the library's
:class:`~tensorwire.checkpoints.receiver.CheckpointReceiver` (a few lines per message)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

from tensorwire.checkpoints.chunking import Chunk, Compression
from tensorwire.checkpoints.receiver import CheckpointReceiver, UploadHeader, UploadPart, UploadTrailer
from tensorwire.errors import InvalidArgumentError
from tensorwire.rpc.rpcnames import service_name
from tensorwire.serving import admission
from tensorwire.transfer.v1 import transfer_pb2 as pb
from tensorwire.transfer.v1 import transfer_pb2_grpc as pb_grpc

SERVICE_NAME = service_name(pb, "ModelTransferService")


def _chunk_from_pb(msg: pb.Chunk) -> Chunk:
    return Chunk(msg.index, msg.offset, msg.data, Compression(msg.compression), msg.raw_size, msg.crc32)


async def _parts_from_pb(requests: AsyncIterator[pb.UploadModelRequest]) -> AsyncIterator[UploadPart]:
    async for request in requests:
        which = request.WhichOneof("part")
        if which == "chunk":
            yield _chunk_from_pb(request.chunk)
        elif which == "header":
            h = request.header
            try:
                args = json.loads(h.model_args_json) if h.model_args_json else None
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"header.model_args_json is not JSON: {exc}") from None
            if args is not None and not isinstance(args, dict):
                raise InvalidArgumentError(
                    f"header.model_args_json must be a JSON object, got {admission.echo(h.model_args_json)}"
                )
            yield UploadHeader(h.model, h.kind, h.total_bytes, args, h.version or None, h.triton_config)
        elif which == "trailer":
            t = request.trailer
            yield UploadTrailer(t.crc32, t.total_bytes, t.chunks)
        else:
            raise InvalidArgumentError("an UploadModelRequest must hold a header, chunk or trailer")


class ModelTransferServicer(pb_grpc.ModelTransferServiceServicer):
    """tensorwire.transfer.v1.ModelTransferService over a CheckpointReceiver."""

    def __init__(self, receiver: CheckpointReceiver) -> None:
        self._receiver = receiver

    async def UploadModel(
        self, request_iterator: AsyncIterator[pb.UploadModelRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadModelResponse:
        result = await self._receiver.receive(_parts_from_pb(request_iterator))
        return pb.UploadModelResponse(
            model=result.model, version=result.version, bytes=result.bytes, crc32=result.crc32,
            chunks=result.chunks, wire_bytes=result.wire_bytes,
        )

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ModelTransferServiceServicer_to_server(self, server)
