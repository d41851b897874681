"""The one place where domain errors become gRPC status codes.

Every handler a service registers is wrapped once, at registration, so that a
domain error raised by the core becomes its status code (anything else becomes
INTERNAL with a generic message and the traceback in the log), a request that
cannot be parsed becomes INVALID_ARGUMENT (gRPC's own answer is a bare INTERNAL),
and every RPC is timed and counted. Wrapping at registration instead of in a
``grpc.aio.ServerInterceptor`` matters on the inference hot path: an interceptor
runs a coroutine and rebuilds the handler on every call (~60-80 us measured).
"""

from __future__ import annotations

import inspect
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tensorwire.errors import TensorwireError
from tensorwire.rpc import metrics
from tensorwire.rpc.auth import Authorizer

log = logging.getLogger(__name__)


STREAM_MESSAGE_HEADER = "tensorwire-stream-message"
"""Metadata of a ModelStreamInfer message that the native inference frontend forwards
to this process's Python server as one unary call; its value is
:func:`stream_message_token`. Such a call is part of a stream already counted (once,
as the stream) and already role-checked (at its start): no metrics, no second check."""

_stream_message_token: str | None = None


def stream_message_token() -> str:
    """This process's secret value for :data:`STREAM_MESSAGE_HEADER` (made on first use:
    until then no call is treated as a forwarded stream message, and a client cannot
    guess it; the native frontend drops the header from what clients send)."""
    global _stream_message_token
    if _stream_message_token is None:
        _stream_message_token = secrets.token_hex(16)
    return _stream_message_token


def _is_stream_message(context: grpc.aio.ServicerContext, token: str) -> bool:
    for key, value in context.invocation_metadata() or ():
        if key == STREAM_MESSAGE_HEADER:
            return secrets.compare_digest(value.encode() if isinstance(value, str) else value, token.encode())
    return False


class _Malformed(Exception):
    """A request whose bytes did not parse. The deserializer hands it to the handler
    in the request's place (it raises nothing, so gRPC does not answer for it); the
    handler's wrapper raises it where it meets it and :func:`_fail` turns it into
    INVALID_ARGUMENT in the handler's own task. The stream handlers read their
    requests in a task of their own while the handler writes: a ``context.abort``
    from that task (it sends the status at once) raced a write in flight, seen as a
    status never sent and the client waiting until its deadline."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"request is not a valid {type_name}: {error or 'malformed protobuf'}"
        super().__init__(self.message)


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
    if isinstance(exc, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
    if isinstance(exc, TensorwireError):
        await context.abort(exc.code, str(exc) or exc.code.name)
    log.exception("unhandled error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class _Method:
    """Per-method state built once: its names and its metric children."""

    __slots__ = ("full", "handled", "latency", "service", "short")

    def __init__(self, service: str, full: str) -> None:
        self.service, self.full = service, full
        self.short = full.rsplit("/", 1)[-1]
        self.latency = metrics.RPC_LATENCY.labels(service, self.short)
        self.handled: dict[str, Any] = {}

    def count(self, code: str) -> None:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = metrics.RPC_HANDLED.labels(self.service, self.short, code)
        child.inc()

    def finish(self, context: grpc.aio.ServicerContext, start: float) -> None:
        """Record one RPC's latency and outcome."""
        self.latency.observe(time.perf_counter() - start)
        self.count(_code_of(context))


class _Guard:
    """Times one RPC, counts its outcome, and turns an escaping exception into a status."""

    __slots__ = ("_context", "_method", "_start")

    def __init__(self, method: _Method, context: grpc.aio.ServicerContext) -> None:
        self._method, self._context = method, context
        self._start = 0.0

    async def __aenter__(self) -> None:
        self._start = time.perf_counter()

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> bool:
        try:
            if isinstance(exc, Exception) and not _is_abort(exc):
                await _fail(self._context, exc, self._method.full)  # raises AbortError
        finally:
            self._method.finish(self._context, self._start)
        return False


def wrap_handler(service: str, full_method: str, handler: grpc.RpcMethodHandler,
                 authorizer: Authorizer | None = None) -> grpc.RpcMethodHandler:
    """The same handler with the role check, error mapping, malformed-request
    rejection and metrics."""
    method = _Method(service, full_method)
    authorize = authorizer.checker(full_method) if authorizer is not None else None
    deserialize = _safe_deserializer(handler.request_deserializer)
    serialize = handler.response_serializer

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if type(request) is _Malformed:
                raise request
            yield request

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        # The hot path (ModelInfer): _Guard's logic inline, no context-manager coroutines.
        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            # A stream message the native frontend forwards (only once it has a token):
            # counted with its stream, checked at the stream's start.
            token = _stream_message_token
            streamed = token is not None and _is_stream_message(context, token)
            try:
                if authorize is not None and not streamed:
                    authorize(context.invocation_metadata())
                if type(request) is _Malformed:
                    raise request
                return await inner_uu(request, context)
            except Exception as exc:
                if not _is_abort(exc):
                    await _fail(context, exc, method.full)  # raises AbortError
                raise
            finally:
                if not streamed:
                    method.finish(context, start)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)

    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Guard(method, context):
                if authorize is not None:
                    authorize(context.invocation_metadata())
                if type(request) is _Malformed:
                    raise request
                async for item in _iterate(inner_us(request, context)):
                    yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)

    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async with _Guard(method, context):
                if authorize is not None:
                    authorize(context.invocation_metadata())
                return await inner_su(checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)

    inner_ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _Guard(method, context):
            if authorize is not None:
                authorize(context.invocation_metadata())
            async for item in _iterate(inner_ss(checked(requests), context)):
                yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose handlers are wrapped on first lookup, then cached."""

    def __init__(self, service: str, inner: grpc.GenericRpcHandler,
                 authorizer: Authorizer | None = None) -> None:
        self._service, self._inner, self._authorizer = service, inner, authorizer
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        cached = self._cache.get(details.method)
        if cached is None or cached[0] is not handler:
            wrapped = wrap_handler(self._service, details.method, handler, self._authorizer)
            cached = self._cache[details.method] = (handler, wrapped)
        return cached[1]


class WrappingRegistrar:
    """Stands in for the ``grpc.aio.Server`` while a service registers its servicers
    (the generated ``add_*Servicer_to_server`` functions), wrapping every handler."""

    def __init__(self, server: grpc.aio.Server, service: str,
                 authorizer: Authorizer | None = None) -> None:
        self._server, self._service, self._authorizer = server, service, authorizer

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(self._service, h, self._authorizer) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {
                name: wrap_handler(self._service, f"/{service_name}/{name}", handler,
                                   self._authorizer)
                for name, handler in handlers.items()
            },
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


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
