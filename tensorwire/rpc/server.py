"""Server wiring shared by every service.

``GrpcServer`` builds a grpc.aio server with grpc.health.v1 (a real status per
service that turns NOT_SERVING while draining), server reflection, the error
mapping of tensorwire.rpc.interceptor, message-size limits and a Prometheus
endpoint. ``serve`` runs one service until SIGTERM/SIGINT and then shuts down in
order: health goes NOT_SERVING, in-flight calls drain within the grace period,
the service's core closes, the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from tensorwire.rpc import metrics
from tensorwire.rpc.auth import Authorizer
from tensorwire.rpc.config import ServerSettings, SettingsError
from tensorwire.rpc.interceptor import WrappingRegistrar
from tensorwire.rpc.lifecycle import stop_signal
from tensorwire.rpc.tls import ServerTls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    """How a service's gRPC server listens and shuts down."""

    name: str
    """Short service name for logs and metrics (``trainer``)."""
    host: str = "0.0.0.0"
    port: int = 0
    """0 binds a free port; ``GrpcServer.start`` returns the bound one."""
    metrics_port: int | None = None
    """Prometheus endpoint port; None disables it, 0 picks a free one."""
    grace_s: float = 10.0
    """How long in-flight calls may run after a shutdown signal."""
    max_message_bytes: int = 64 * 1024 * 1024
    extra_options: tuple[tuple[str, int | str], ...] = field(default_factory=tuple)
    """Further grpc channel args for the server."""
    reuse_port: bool = False
    """SO_REUSEPORT, so several worker processes can share one port."""
    authorizer: Authorizer | None = None
    """Who may call what (None: everyone; only allowed on loopback, see config)."""
    tls: ServerTls | None = None
    """Certificate and key to serve TLS with (gRPC and /metrics); None = plaintext."""


def options_for(settings: ServerSettings, **extra: Any) -> ServerOptions:
    """A service's server options from its settings (``extra``: further fields)."""
    extra.setdefault("authorizer", settings.authorizer())
    return ServerOptions(
        name=settings.service,
        host=settings.host,
        port=settings.port,
        metrics_port=None if settings.metrics_port < 0 else settings.metrics_port,
        grace_s=settings.grace_s,
        max_message_bytes=settings.max_message_mb * 1024 * 1024,
        tls=settings.server_tls(),
        **extra,
    )


class PortInUseError(SettingsError):
    """The port (or address) to listen on cannot be bound."""


class Service(Protocol):
    """What a service's app hands to the server."""

    service_names: Sequence[str]
    """Full names of the gRPC services it registers (for health and reflection)."""

    def register(self, server: grpc.aio.Server) -> None: ...

    async def drain(self) -> None:
        """Shutdown has begun: end open-ended streams; keep serving unary calls."""

    async def aclose(self) -> None:
        """Release everything; called after in-flight calls have drained."""

    # Optional: ``async def until_ready(self) -> None``. When a service has it, the
    # server listens at once but reports NOT_SERVING until it returns (inference:
    # its boot scan of the model repository).


class GrpcServer:
    """One grpc.aio server with health, reflection, error mapping and metrics."""

    def __init__(self, options: ServerOptions, service: Service) -> None:
        self.options = options
        self.service = service
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self._frontend: Any = None
        self._metrics = (
            metrics.MetricsEndpoint(options.host, options.metrics_port, tls=options.tls)
            if options.metrics_port is not None
            else None
        )
        grpc_options = [
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 1 if options.reuse_port else 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            *options.extra_options,
        ]
        self.server = grpc.aio.server(options=grpc_options)
        # Every handler of the service is wrapped once here (role check, error
        # mapping, metrics); reflection too. Health stays open (probes).
        registrar = WrappingRegistrar(self.server, options.name, options.authorizer)
        service.register(registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (
            *service.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(names), registrar
        )

    @property
    def metrics_port(self) -> int | None:
        return self._metrics.port if self._metrics else None

    async def start(self) -> int:
        """Bind, start, report SERVING (or NOT_SERVING until the service is ready);
        returns the bound port."""
        host = self.options.host
        address = f"[{host}]:{self.options.port}" if ":" in host else f"{host}:{self.options.port}"
        frontend = getattr(self.service, "frontend", None)
        if frontend is not None and self.options.tls is None:
            port = await self._start_behind(frontend, address)
        else:
            port = await self._listen(address)
        self.port = port
        if self._metrics is not None:
            self._metrics.start()
        until_ready = getattr(self.service, "until_ready", None)
        waiting = None
        if until_ready is not None:
            waiting = asyncio.get_running_loop().create_task(until_ready())
            await asyncio.sleep(0)  # one step: a service that is ready already is done here
        if waiting is None or waiting.done():
            await self.set_serving(True)
        else:  # listening (probes answer) but NOT_SERVING until the service says it is ready
            await self.set_serving(False)
            self._ready_task = asyncio.get_running_loop().create_task(self._serve_when_ready(waiting))
        log.info("%s listening on %s:%d", self.options.name, self.options.host, port)
        return port

    async def _listen(self, address: str) -> int:
        try:
            if self.options.tls is not None:
                port = self.server.add_secure_port(address, self.options.tls.grpc_credentials())
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise PortInUseError(
                f"{self.options.name}: cannot listen on {address}: the port is in use or the "
                "address is not this machine's; choose another with --port (or --host)"
            )
        await self.server.start()
        return port

    async def _serve_when_ready(self, waiting: asyncio.Task[None]) -> None:
        try:
            await waiting
        finally:
            waiting.cancel()
        await self.set_serving(True)
        log.info("%s ready: SERVING", self.options.name)

    async def _start_behind(self, frontend: Any, address: str) -> int:
        """A service with a native ``frontend`` (the inference service's): that frontend
        listens on the port and forwards what it does not serve itself to this
        server, which listens on a loopback port only."""
        backend = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        port = await asyncio.to_thread(
            frontend.start, address, backend, name=self.options.name,
            max_message_bytes=self.options.max_message_bytes, reuse_port=self.options.reuse_port,
            authorizer=self.options.authorizer,
        )
        if port == 0:
            await self.server.stop(0)
            raise PortInUseError(
                f"{self.options.name}: cannot listen on {address}: the port is in use or the "
                "address is not this machine's; choose another with --port (or --host)"
            )
        self._frontend = frontend
        log.info("%s: native frontend on %s:%d, Python server behind it on 127.0.0.1:%d",
                 self.options.name, self.options.host, port, backend)
        return port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service.service_names):
            await self.health.set(name, status)
        metrics.SERVING.labels(self.options.name).set(1 if serving else 0)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, let in-flight calls finish, then close the core."""
        grace = self.options.grace_s if grace_s is None else grace_s
        if self._ready_task is not None:
            self._ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ready_task
        await self.set_serving(False)
        await self.health.enter_graceful_shutdown()
        if self._frontend is not None:  # first: its forwarded calls need this server
            await asyncio.to_thread(self._frontend.stop, grace)
        stopping = asyncio.create_task(self.server.stop(grace))
        await self.service.drain()
        await stopping
        await self.service.aclose()
        if self._metrics is not None:
            self._metrics.stop()
        log.info("%s stopped", self.options.name)


async def serve(
    options: ServerOptions,
    make_service: Callable[[], Awaitable[Any]],
    *,
    on_started: Callable[[GrpcServer], Awaitable[None]] | None = None,
) -> None:
    """Run one service until SIGTERM or SIGINT, then shut it down gracefully."""
    service = await make_service()
    server = GrpcServer(options, service)
    # The handlers stay installed until the shutdown is done: a second signal while
    # draining is common (Ctrl-C reaches every process of the terminal's group, and
    # `tensorwire up` then sends its children SIGTERM too), and with the default
    # action back it would kill the service half-way, e.g. a trainer before it wrote
    # its live runs' last checkpoints and marked them INTERRUPTED. A third signal
    # exits at once (lifecycle.FORCE_AFTER); `tensorwire up` sends SIGKILL after grace + 5 s.
    async with stop_signal() as stop:
        try:
            await server.start()
            if on_started is not None:
                await on_started(server)
            await stop.wait()
            log.info("%s: shutdown signal, draining (grace %.1fs)", options.name, options.grace_s)
        finally:
            await server.stop()


def run_program(
    settings_cls: Any,
    run: Callable[[Any], Coroutine[Any, Any, None]],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
) -> int:
    """A console entry point: settings (a bad value exits 2, named), logging, then
    ``asyncio.run(run(settings))``. A SettingsError raised while starting (e.g. a
    missing CUDA device) also exits 2 with its reason."""
    from tensorwire.rpc import config
    from tensorwire.rpc import log as twlog

    prog = prog or f"tensorwire-{settings_cls.service}"
    try:
        settings = config.load(settings_cls, argv, prog=prog, description=description)
        logger = twlog.configure(settings.service, settings.log_level)
        logger.info("settings: %s", config.describe(settings))
        asyncio.run(run(settings))
    except config.SettingsError as exc:
        print(f"{prog}: {exc}", flush=True)
        return 2
    return 0


def run_main(
    settings_cls: type,
    make_service: Callable[[Any], Awaitable[Any]],
    argv: Sequence[str] | None = None,
    description: str | None = None,
) -> int:
    """A gRPC service's console entry point (``run_program`` + ``serve``)."""
    return run_program(
        settings_cls,
        lambda settings: serve(options_for(settings), lambda: make_service(settings)),
        argv,
        description=description,
    )
