"""Sending a checkpoint to a ModelTransferService (the inference service's).

``upload_checkpoint`` streams a weights file: a header (model, kind, size), the file
as ``tensorwire.checkpoints.chunking`` chunks, a trailer (whole-file CRC32); the receiving side
is :mod:`tensorwire.checkpoints.receiver`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from tensorwire.checkpoints.chunking import ChunkConfig, ChunkSender
from tensorwire.checkpoints.receiver import UploadResult
from tensorwire.errors import DataLossError
from tensorwire.transfer.v1 import transfer_pb2 as pb
from tensorwire.transfer.v1 import transfer_pb2_grpc as pb_grpc


def _lost_status(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a client-streaming call failed on a write after the server had ended it."""
    return exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (exc.debug_error_string() or "")


def _header_request(
    model: str, kind: str, size: int, model_args: dict[str, Any] | None, version: int | None,
    triton_config: str = "",
) -> pb.UploadModelRequest:
    return pb.UploadModelRequest(
        header=pb.UploadHeader(
            model=model, kind=kind, total_bytes=size, version=version or 0,
            model_args_json=json.dumps(model_args) if model_args else "", triton_config=triton_config,
        )
    )


async def upload_requests(
    path: Path,
    *,
    model: str,
    kind: str,
    model_args: dict[str, Any] | None = None,
    version: int | None = None,
    config: ChunkConfig = ChunkConfig(),
    sender_out: list[ChunkSender] | None = None,
    triton_config: str = "",
) -> AsyncIterator[pb.UploadModelRequest]:
    """The request stream of one upload of the file at ``path``."""
    with open(path, "rb") as source:
        size = Path(path).stat().st_size
        yield _header_request(model, kind, size, model_args, version, triton_config)
        sender = ChunkSender(source, config)
        if sender_out is not None:
            sender_out.append(sender)
        async for c in sender.chunks():
            yield pb.UploadModelRequest(
                chunk=pb.Chunk(index=c.index, offset=c.offset, data=c.data,
                               compression=int(c.compression),  # type: ignore[arg-type]  # enum value
                               raw_size=c.raw_size, crc32=c.crc32)
            )
        if sender.total_bytes != size:
            raise DataLossError(f"{path} changed size while being sent ({size} -> {sender.total_bytes})")
        yield pb.UploadModelRequest(
            trailer=pb.UploadTrailer(crc32=sender.crc32, total_bytes=sender.total_bytes,
                                     chunks=sender.chunk_count)
        )


async def upload_checkpoint(
    channel: grpc.aio.Channel,
    path: Path,
    *,
    model: str,
    kind: str,
    model_args: dict[str, Any] | None = None,
    version: int | None = None,
    config: ChunkConfig = ChunkConfig(),
    timeout_s: float | None = None,
    wait_for_ready: bool | None = None,
    triton_config: str = "",
) -> UploadResult:
    """Stream the weights file at ``path`` to a ModelTransferService; returns what the
    receiver installed. ``triton_config``: the config.pbtxt of a Triton model file
    (``kind`` a platform), installed with it. gRPC errors are raised as ``grpc.aio.AioRpcError`` (use
    ``tensorwire.client`` for domain errors and pooling)."""
    # A missing file fails here, as FileNotFoundError; inside the request stream gRPC
    # would only cancel the call.
    size = Path(path).stat().st_size
    stub = pb_grpc.ModelTransferServiceStub(channel)
    try:
        reply = await stub.UploadModel(
            upload_requests(path, model=model, kind=kind, model_args=model_args, version=version,
                            config=config, triton_config=triton_config),
            timeout=timeout_s, wait_for_ready=wait_for_ready,
        )
    except grpc.aio.AioRpcError as exc:
        if not _lost_status(exc):
            raise
        # grpc/grpc#36066: the receiver refused the upload early, and a chunk written
        # as its status arrived replaced that status with INTERNAL. The header alone
        # gets the receiver's own answer (it installs nothing: no trailer follows).
        async def header_only() -> AsyncIterator[pb.UploadModelRequest]:
            yield _header_request(model, kind, size, model_args, version, triton_config)

        try:
            await stub.UploadModel(header_only(), timeout=timeout_s, wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as verdict:
            if verdict.code() not in (grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL):
                raise verdict from None  # the refusal the first call lost
        raise
    return UploadResult(reply.model, reply.version, reply.bytes, reply.crc32, reply.chunks, reply.wire_bytes)
