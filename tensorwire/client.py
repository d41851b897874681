"""A small Python client for backend callers of the inference service.

::

    async with InferenceClient("inference:8001") as client:
        outputs = await client.infer("spiral", {"points": np.zeros((4, 2), np.float32)})
        await client.load_model("spiral")                      # RepositoryModelLoad
        await client.upload_checkpoint("model.pt", model="spiral", kind="spiral")

Every call goes through a ``ChannelPool`` (distinct connections, least busy
first), waits for the server to be ready (``wait_for_ready``) within one overall
deadline, and retries with exponential backoff and jitter on UNAVAILABLE — only
calls that are safe to repeat (idempotent). Failures come back as the domain
errors of ``tensorwire.errors`` (``from_status``), never as raw transport errors.

``GrpcClient`` is the reusable part (pool + deadline + retries + errors) for any
service; ``InferenceClient`` adds the Open Inference Protocol calls and checkpoint
upload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from tensorwire.calls.backoff import Backoff
from tensorwire.calls.channels import ChannelPool
from tensorwire.checkpoints.chunking import ChunkConfig
from tensorwire.checkpoints.receiver import UploadResult
from tensorwire.checkpoints.upload import upload_checkpoint
from tensorwire.data.oip import decode_outputs
from tensorwire.data.tensors import NUMPY_DTYPES, datatype_of
from tensorwire.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    TensorwireError,
    from_status,
)
from tensorwire.inference import grpc_service_pb2 as pb
from tensorwire.rpc.auth import ClientSecurity, TokenSource
from tensorwire.rpc.rpcnames import method_path, service_name
from tensorwire.transfer.v1 import transfer_pb2

R = TypeVar("R", bound=Message)

_INFERENCE = service_name(pb, "GRPCInferenceService")
_UPLOAD_METHOD = method_path(transfer_pb2, "ModelTransferService", "UploadModel")



@dataclass(frozen=True)
class RetryPolicy:
    """When and how often an idempotent call is tried again."""

    attempts: int = 5
    """Tries in all, the first included."""
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    """Each wait is scaled by a random factor in [1 - jitter, 1 + jitter]."""
    retry_codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def backoff_s(self, attempt: int) -> float:
        """Wait before try ``attempt + 1`` (attempt counts from 1)."""
        return Backoff(self.initial_backoff_s, self.max_backoff_s, self.multiplier,
                       self.jitter).delay_s(attempt)


class GrpcClient:
    """Pooled unary/stream calls with deadlines, retries and domain errors."""

    def __init__(
        self,
        target: str | ChannelPool,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        wait_for_ready: bool = True,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        **pool_options: Any,
    ) -> None:
        """
        :param target: an address (``host:port``, ``a:1,b:2``, ``dns:///name:port``)
            for a pool of its own, or a ``ChannelPool`` to share (not closed by this client).
        :param token: bearer token to send (default: ``TENSORWIRE_TOKEN`` or the file
            named by ``TENSORWIRE_TOKEN_FILE``; TLS from ``TENSORWIRE_TLS_CA``).
        :param timeout_s: default overall deadline of a call, retries included.
        :param retry: retry policy for idempotent calls.
        :param wait_for_ready: calls wait for a connection instead of failing fast.
        :param clock: monotonic seconds, for deadlines (and the pool's, when created
            here); ``sleep``: waits between retries (tests pass a fake clock's).
        :param pool_options: keyword arguments of ``ChannelPool`` when it is created here.
        """
        if timeout_s <= 0:
            raise InvalidArgumentError(f"timeout_s must be > 0, got {timeout_s}")
        if retry.attempts < 1:
            raise InvalidArgumentError(f"retry.attempts must be >= 1, got {retry.attempts}")
        if isinstance(target, ChannelPool):
            self.pool, self._owns_pool = target, False
        else:
            # Scripts get their credentials from the environment (TENSORWIRE_TOKEN[_FILE],
            # TENSORWIRE_TLS_CA) unless the caller passes ``security``.
            security = pool_options.get("security") or ClientSecurity.from_env()
            if token is not None:
                security = dataclasses.replace(security, token=TokenSource(token))
            pool_options["security"] = security
            options = list(pool_options.pop("options", ()))
            options += [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                        ("grpc.max_send_message_length", 64 * 1024 * 1024)]
            self.pool = ChannelPool(target, options=options, clock=clock, **pool_options)
            self._owns_pool = True
        self.timeout_s = timeout_s
        self.retry = retry
        self._clock, self._sleep = clock, sleep
        self.wait_for_ready = wait_for_ready
        self.retries = 0
        """Tries repeated after UNAVAILABLE, over the client's life."""

    async def unary(
        self,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        idempotent: bool,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> R:
        """Call ``/package.Service/Method``; retried on UNAVAILABLE only if ``idempotent``."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = self._clock() + timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DeadlineExceededError(
                    f"{method}: no answer within {timeout:.3g}s ({attempt - 1} tries)"
                )
            try:
                async with self.pool.acquire() as channel:
                    call = channel.unary_unary(
                        method,
                        request_serializer=type(request).SerializeToString,
                        response_deserializer=response_type.FromString,
                    )
                    return await call(
                        request, timeout=remaining, wait_for_ready=self.wait_for_ready,
                        metadata=metadata,
                    )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                retryable = idempotent and code in self.retry.retry_codes
                if retryable and attempt < self.retry.attempts:
                    pause = self.retry.backoff_s(attempt)
                    if self._clock() + pause < deadline:
                        self.retries += 1
                        await self._sleep(pause)
                        continue
                raise _domain_error(method, exc) from None

    async def aclose(self) -> None:
        if self._owns_pool:
            await self.pool.aclose()

    async def __aenter__(self) -> GrpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.pool!r}, {self.retries} retries>"


def _domain_error(method: str, exc: grpc.aio.AioRpcError) -> TensorwireError:
    details = exc.details() or exc.code().name
    return from_status(exc.code(), f"{method.rsplit('/', 1)[-1]}: {details}")


def _encode_input(name: str, array: np.ndarray) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    datatype = datatype_of(array.astype(native, copy=False))
    if datatype == "BYTES":
        raise InvalidArgumentError(f"input {name!r}: BYTES inputs are not supported by this client")
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(array.shape))
    return tensor, np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


class InferenceClient(GrpcClient):
    """The Open Inference Protocol calls a backend service needs, plus checkpoint upload."""

    async def _call(self, name: str, request: Message, response_type: type[R], *,
                    idempotent: bool = True, timeout_s: float | None = None) -> R:
        return await self.unary(f"/{_INFERENCE}/{name}", request, response_type,
                                idempotent=idempotent, timeout_s=timeout_s)

    async def server_live(self, *, timeout_s: float | None = None) -> bool:
        reply = await self._call("ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse,
                                 timeout_s=timeout_s)
        return reply.live

    async def server_ready(self, *, timeout_s: float | None = None) -> bool:
        reply = await self._call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse,
                                 timeout_s=timeout_s)
        return reply.ready

    async def model_ready(self, name: str, version: str = "", *, timeout_s: float | None = None) -> bool:
        reply = await self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version),
                                 pb.ModelReadyResponse, timeout_s=timeout_s)
        return reply.ready

    async def server_metadata(self, *, timeout_s: float | None = None) -> pb.ServerMetadataResponse:
        return await self._call("ServerMetadata", pb.ServerMetadataRequest(),
                                pb.ServerMetadataResponse, timeout_s=timeout_s)

    async def model_metadata(self, name: str, version: str = "", *,
                             timeout_s: float | None = None) -> pb.ModelMetadataResponse:
        return await self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version),
                                pb.ModelMetadataResponse, timeout_s=timeout_s)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray] | None = None,
        *,
        version: str = "",
        outputs: Sequence[str] = (),
        request_id: str = "",
        timeout_s: float | None = None,
        **tensors: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """One ModelInfer (raw tensor contents); returns the outputs by name, as numpy.

        Inputs by name, as a mapping or as keywords: ``infer("spiral", points=array)``.
        Inference is idempotent, so UNAVAILABLE (loading, draining) is retried."""
        merged = {**(inputs or {}), **tensors}
        if not merged:
            raise InvalidArgumentError(f"infer({model!r}) needs at least one input tensor")
        request = self.infer_request(model, merged, version=version, outputs=outputs,
                                     request_id=request_id)
        reply = await self._call("ModelInfer", request, pb.ModelInferResponse, timeout_s=timeout_s)
        return decode_outputs(reply)

    @staticmethod
    def infer_request(model: str, inputs: Mapping[str, np.ndarray], *, version: str = "",
                      outputs: Sequence[str] = (), request_id: str = "") -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, array in inputs.items():
            tensor, raw = _encode_input(name, array)
            request.inputs.append(tensor)
            request.raw_input_contents.append(raw)
        for name in outputs:
            request.outputs.add(name=name)
        return request

    async def repository_index(self, *, ready_only: bool = False,
                               timeout_s: float | None = None) -> pb.RepositoryIndexResponse:
        return await self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready_only),
                                pb.RepositoryIndexResponse, timeout_s=timeout_s)

    async def load_model(self, name: str, *, timeout_s: float | None = None) -> None:
        """RepositoryModelLoad: (re)load ``name`` from the repository; the server
        loads the new version beside the old one and swaps atomically."""
        await self._call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name),
                         pb.RepositoryModelLoadResponse, timeout_s=timeout_s)

    async def unload_model(self, name: str, *, timeout_s: float | None = None) -> None:
        await self._call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name),
                         pb.RepositoryModelUnloadResponse, timeout_s=timeout_s)

    async def upload_checkpoint(
        self,
        path: Path | str,
        *,
        model: str,
        kind: str,
        model_args: dict[str, Any] | None = None,
        version: int | None = None,
        config: ChunkConfig = ChunkConfig(),
        timeout_s: float | None = None,
    ) -> UploadResult:
        """Stream a weights file to the server's ModelTransferService (chunked,
        checked); it is installed there as a new version. Not retried: each
        upload creates a version."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with self.pool.acquire() as channel:
                return await upload_checkpoint(
                    channel, Path(path), model=model, kind=kind, model_args=model_args,
                    version=version, config=config, timeout_s=timeout,
                    wait_for_ready=self.wait_for_ready,
                )
        except grpc.aio.AioRpcError as exc:
            raise _domain_error(_UPLOAD_METHOD, exc) from None


class SyncInferenceClient:
    """The blocking twin of ``InferenceClient``, for scripts and notebooks::

        with SyncInferenceClient("127.0.0.1:8001") as client:
            out = client.infer("spiral", points=np.zeros((4, 2), np.float32))
            print(out["logits"])

    Same arguments and errors as ``InferenceClient``; its calls run on an event loop
    in a thread of its own, so it also works where a loop is already running
    (Jupyter)."""

    def __init__(self, target: str | ChannelPool, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tensorwire-sync-client")
        self._thread.start()

        async def make() -> InferenceClient:
            return InferenceClient(target, **options)

        self._client = self._run(make())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def pool(self) -> ChannelPool:
        return self._client.pool

    def infer(self, model: str, inputs: Mapping[str, np.ndarray] | None = None,
              **kwargs: Any) -> dict[str, np.ndarray]:
        return self._run(self._client.infer(model, inputs, **kwargs))

    def server_live(self, **kwargs: Any) -> bool:
        return self._run(self._client.server_live(**kwargs))

    def server_ready(self, **kwargs: Any) -> bool:
        return self._run(self._client.server_ready(**kwargs))

    def model_ready(self, name: str, version: str = "", **kwargs: Any) -> bool:
        return self._run(self._client.model_ready(name, version, **kwargs))

    def server_metadata(self, **kwargs: Any) -> pb.ServerMetadataResponse:
        return self._run(self._client.server_metadata(**kwargs))

    def model_metadata(self, name: str, version: str = "", **kwargs: Any) -> pb.ModelMetadataResponse:
        return self._run(self._client.model_metadata(name, version, **kwargs))

    def repository_index(self, **kwargs: Any) -> pb.RepositoryIndexResponse:
        return self._run(self._client.repository_index(**kwargs))

    def load_model(self, name: str, **kwargs: Any) -> None:
        self._run(self._client.load_model(name, **kwargs))

    def unload_model(self, name: str, **kwargs: Any) -> None:
        self._run(self._client.unload_model(name, **kwargs))

    def upload_checkpoint(self, path: Path | str, **kwargs: Any) -> UploadResult:
        return self._run(self._client.upload_checkpoint(path, **kwargs))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> SyncInferenceClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
