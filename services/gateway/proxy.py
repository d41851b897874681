"""gRPC-Web to gRPC: one browser request becomes one call on a pooled channel.

Routing is by service name only (no per-method code): every method of the trainer,
streamer and inference services that is not client-streaming. Server streams pass
through message by message, each written once the previous one has (nearly) left
the socket, so a slow browser link makes the streamer skip frames instead of
queueing them here. The upstream call is cancelled as soon as the browser goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge

from tensorwire.calls.channels import ChannelPool
from tensorwire.errors import InvalidArgumentError, TensorwireError
from tensorwire.inference import grpc_service_pb2 as inference_pb
from tensorwire.rpc.auth import ClientSecurity
from tensorwire.streamer.v1 import streamer_pb2
from tensorwire.trainer.v1 import trainer_pb2

from . import grpcweb
from .guard import CORS_HEADERS
from .settings import GatewaySettings

log = logging.getLogger(__name__)

CALLS = Counter(
    "tensorwire_gateway_calls_total",
    "gRPC-Web calls completed, by service, method, status code and encoding.",
    ["service", "method", "code", "mode"],
)
STREAMS = Gauge("tensorwire_gateway_streams_active", "gRPC-Web calls in flight.")
SENT = Counter("tensorwire_gateway_sent_bytes_total", "Response bytes written to browsers.")

MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Upstream HTTP/2 windows stay small and fixed (no BDP growth), so a stream's
# frames wait in the streamer, where newer ones replace them, not in this process.
_UPSTREAM_OPTIONS = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
)


@dataclass(frozen=True)
class Route:
    """Where one gRPC service is forwarded, and which of its methods a browser may call."""

    service: str
    target: str
    methods: frozenset[str]


def routes_for(settings: GatewaySettings) -> dict[str, Route]:
    """The route table, from the services' descriptors (client streams left out)."""
    table: dict[str, Route] = {}
    for module, service, target in (
        (trainer_pb2, "TrainerService", settings.trainer_target),
        (streamer_pb2, "StreamerService", settings.streamer_target),
        (inference_pb, "GRPCInferenceService", settings.inference_target),
    ):
        if not target:
            continue
        desc = module.DESCRIPTOR.services_by_name[service]
        methods = frozenset(m.name for m in desc.methods if not m.client_streaming)
        table[desc.full_name] = Route(desc.full_name, target, methods)
    return table


class CallError(Exception):
    """A call that ends before reaching a service, with its gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _unsent_bytes(sock: socket.socket) -> int:
    """Bytes the kernel still holds for this socket: unsent plus unacknowledged."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


class GrpcWebProxy:
    """Translates one gRPC-Web request into a gRPC call on a pooled channel."""

    def __init__(self, routes: Mapping[str, Route], *, max_unsent_bytes: int,
                 security: ClientSecurity | None = None) -> None:
        self.routes = dict(routes)
        # TLS towards the services, but never a token of the gateway's own: each call
        # carries the browser's authorization header, or none.
        upstream = ClientSecurity(tls=security.tls) if security is not None else None
        self._pools = {
            route.target: ChannelPool(route.target, options=_UPSTREAM_OPTIONS, name=route.target,
                                      security=upstream)
            for route in self.routes.values()
        }
        self._max_unsent = max_unsent_bytes
        self._calls: set[grpc.aio.Call] = set()
        self._closing = False

    async def aclose(self) -> None:
        """Cancel every call in flight (browsers reconnect elsewhere), close the pools."""
        self._closing = True
        for call in list(self._calls):
            call.cancel()
        for pool in self._pools.values():
            await pool.aclose()

    def pool_for(self, service: str) -> ChannelPool | None:
        """The channel pool to ``service`` (a full name), if this gateway routes it."""
        route = self.routes.get(service)
        return self._pools[route.target] if route else None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode = grpcweb.parse_content_type(request.headers.get("Content-Type"))
        if mode is None:
            raise web.HTTPUnsupportedMediaType(
                text="expected Content-Type application/grpc-web(+proto) or "
                "application/grpc-web-text(+proto)"
            )
        service, method = request.match_info["service"], request.match_info["method"]
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        STREAMS.inc()
        try:
            return await self._forward(request, mode, service, method)
        except CallError as exc:
            code = exc.code
            return self._trailers_only(request, mode, exc.code, str(exc))
        finally:
            STREAMS.dec()
            label = service if service in self.routes else "unknown"
            CALLS.labels(label, method if label != "unknown" else "", code.name,
                         "text" if mode.text else "binary").inc()
            log.debug("%s/%s %s in %.3fs", service, method, code.name, time.perf_counter() - started)

    async def _forward(
        self, request: web.Request, mode: grpcweb.Mode, service: str, method: str
    ) -> web.StreamResponse:
        if self._closing:
            raise CallError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        route = self.routes.get(service)
        if route is None:
            raise CallError(grpc.StatusCode.UNIMPLEMENTED,
                            f"service {service} is not routed by this gateway "
                            f"(routed: {', '.join(sorted(self.routes))})")
        if method not in route.methods:
            raise CallError(grpc.StatusCode.UNIMPLEMENTED,
                            f"{service}/{method} is not available over gRPC-Web "
                            "(unknown or client-streaming method)")
        try:
            body = await request.read()
            if mode.text:
                body = grpcweb.decode_text(body)
            message = grpcweb.single_message(body)
            timeout = grpcweb.parse_timeout(request.headers.get("grpc-timeout"))
            metadata = grpcweb.request_metadata(request.headers.items())
        except InvalidArgumentError as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        path = f"/{service}/{method}"
        try:
            async with self._pools[route.target].acquire() as channel:
                # Every call is made as unary->stream: the same bytes on the wire for a
                # unary method, and the one shape that relays any response count.
                call = channel.unary_stream(path)(message, timeout=timeout, metadata=metadata)
                self._calls.add(call)
                try:
                    return await self._relay(request, mode, call)
                finally:
                    self._calls.discard(call)
                    call.cancel()  # no-op when finished; stops upstream work otherwise
        except TensorwireError as exc:  # the pool itself (closed, bad target)
            raise CallError(exc.code, str(exc)) from None

    async def _relay(
        self, request: web.Request, mode: grpcweb.Mode, call: grpc.aio.UnaryStreamCall
    ) -> web.StreamResponse:
        initial = await call.initial_metadata()
        if call.done():
            code = await call.code()
            if code != grpc.StatusCode.OK:
                raise CallError(code, await call.details() or code.name)
        response = web.StreamResponse(status=200)
        response.headers.update(self._base_headers(request, mode))
        for key, value in grpcweb.response_metadata(initial):
            response.headers.add(key, value)
        await response.prepare(request)
        try:
            async for message in call:
                await self._send(request, response, grpcweb.encode_out(grpcweb.frame(message), mode))
            code, details = grpc.StatusCode.OK, ""
        except ConnectionError:
            return response  # the browser went away: the caller cancels upstream
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.CANCELLED and self._closing:
                code, details = grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down"
        except asyncio.CancelledError:
            if not self._closing:
                raise  # the browser went away: the finally above cancels upstream
            code, details = grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down"
        trailing = grpcweb.response_metadata(await call.trailing_metadata() if call.done() else ())
        block = grpcweb.trailer_block(code.value[0], details, trailing)
        with contextlib.suppress(ConnectionError):
            await response.write(grpcweb.encode_out(grpcweb.frame(block, grpcweb.TRAILER_FLAG), mode))
            await response.write_eof()
        return response

    async def _send(self, request: web.Request, response: web.StreamResponse, data: bytes) -> None:
        await response.write(data)
        SENT.inc(len(data))
        transport = request.transport
        sock = _socket_of(transport)
        # Wait until the browser has (nearly) taken these bytes before reading the
        # next message: the kernel would otherwise buffer seconds of frames on a
        # slow link. A poll with a short, growing interval: Linux has no event for it.
        delay = 0.002
        while transport is not None and (
            transport.get_write_buffer_size() > 0
            or (sock is not None and _unsent_bytes(sock) > self._max_unsent)
        ):
            if transport.is_closing():
                raise ConnectionResetError("the browser connection closed")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    def rate_limited(self, request: web.Request) -> web.StreamResponse:
        """The answer to a control call over its token's rate."""
        mode = grpcweb.parse_content_type(request.headers.get("Content-Type"))
        if mode is None:
            return web.Response(status=429, text="too many control calls; slow down")
        CALLS.labels("limited", request.match_info.get("method", ""),
                     grpc.StatusCode.RESOURCE_EXHAUSTED.name, "text" if mode.text else "binary").inc()
        return self._trailers_only(request, mode, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   "too many control calls from this token; slow down")

    def _trailers_only(
        self, request: web.Request, mode: grpcweb.Mode, code: grpc.StatusCode, message: str
    ) -> web.Response:
        response = web.Response(status=200, headers=self._base_headers(request, mode))
        response.headers["grpc-status"] = str(code.value[0])
        response.headers["grpc-message"] = grpcweb.encode_grpc_message(message)
        return response

    @staticmethod
    def _base_headers(request: web.Request, mode: grpcweb.Mode) -> dict[str, str]:
        headers = {"Content-Type": mode.content_type, "Cache-Control": "no-store"}
        headers.update(request.get(CORS_HEADERS, {}))
        return headers

    async def readiness(self) -> dict[str, str]:
        """grpc.health.v1 status of every upstream, by service name."""

        async def check(route: Route) -> str:
            try:
                async with self._pools[route.target].acquire() as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=route.service), timeout=1.0
                    )
                return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except (grpc.aio.AioRpcError, TensorwireError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                return f"UNREACHABLE: {detail}"

        routes = list(self.routes.values())
        results = await asyncio.gather(*(check(r) for r in routes))
        return {r.service: status for r, status in zip(routes, results)}


def _socket_of(transport: asyncio.BaseTransport | None) -> socket.socket | None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


