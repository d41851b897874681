"""The one place where domain errors become gRPC status codes.

Also turns a request that cannot be parsed into INVALID_ARGUMENT (gRPC's own
answer is a bare INTERNAL) and records the per-RPC metrics.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tensorwire import metrics
from tensorwire.errors import TensorwireError

log = logging.getLogger(__name__)


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"request is not a valid {type_name}: {error or 'malformed protobuf'}"


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    type_name = getattr(owner, "DESCRIPTOR", None)
    type_name = type_name.full_name if type_name is not None else "message"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return _Malformed(type_name, exc)

    return parse


async def _fail(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, TensorwireError):
        await context.abort(exc.code, str(exc) or exc.code.name)
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class _Guard:
    """Times one RPC, counts its outcome, and turns an escaping exception into a status."""

    __slots__ = ("_context", "_interceptor", "_method", "_short", "_start")

    def __init__(self, interceptor: ErrorInterceptor, method: str, short: str,
                 context: grpc.aio.ServicerContext) -> None:
        self._interceptor, self._method, self._short = interceptor, method, short
        self._context = context
        self._start = 0.0

    async def __aenter__(self) -> None:
        self._start = time.perf_counter()

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> bool:
        try:
            if isinstance(exc, Exception) and not _is_abort(exc):
                await _fail(self._context, exc, self._method)  # raises AbortError
        finally:
            service = self._interceptor._service
            metrics.RPC_LATENCY.labels(service, self._short).observe(
                time.perf_counter() - self._start
            )
            metrics.RPC_HANDLED.labels(service, self._short, _code_of(self._context)).inc()
        return False


async def _reject_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes and counts every RPC by outcome."""

    def __init__(self, service: str) -> None:
        self._service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        method = details.method
        short = method.rsplit("/", 1)[-1]
        deserialize = _safe_deserializer(handler.request_deserializer)
        serialize = handler.response_serializer

        def guard(context: grpc.aio.ServicerContext) -> _Guard:
            return _Guard(self, method, short, context)

        async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                await _reject_malformed(request, context)
                yield request

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with guard(context):
                    await _reject_malformed(request, context)
                    return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with guard(context):
                    await _reject_malformed(request, context)
                    async for item in _iterate(inner_us(request, context)):
                        yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)

        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                async with guard(context):
                    return await inner_su(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)

        inner_ss = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard(context):
                async for item in _iterate(inner_ss(checked(requests, context), context)):
                    yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


async def _iterate(result: Any) -> AsyncIterator[Any]:
    # A streaming handler either yields its responses or awaits context.write().
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        await result


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises grpc.aio.AbortError (a subclass of Exception in aio);
    # it must pass through untouched.
    return isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError"
