"""The web gateway's wiring: one aiohttp server on one port, and its lifecycle.

- ``/`` and ``/assets/*``: the built browser app (``static``);
- ``POST /<package.Service>/<Method>``: gRPC-Web forwarded to the services (``proxy``;
  client-streaming methods such as a trainer's ``Publish`` are not exposed);
- every request first passes the checks of ``guard`` (Host allow-list, Origin/CORS,
  control-call rate limit, security headers);
- ``/healthz`` (the gateway is up), ``/readyz`` (every upstream answers SERVING on
  grpc.health.v1) and ``/metrics`` (Prometheus; a viewer token when auth is on).
"""

from __future__ import annotations

import logging

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tensorwire.errors import TensorwireError
from tensorwire.rpc.lifecycle import stop_signal
from tensorwire.rpc.server import PortInUseError
from tensorwire.rpc.tls import ServerTls

from . import export
from .guard import Cors, Guard, RateLimiter, default_hosts
from .proxy import MAX_REQUEST_BYTES, GrpcWebProxy, routes_for
from .settings import GatewaySettings
from .static import add_static_routes

__all__ = ["PROXY", "Gateway", "GrpcWebProxy", "create_app", "routes_for", "serve"]

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> web.Application:
    """The aiohttp application; its proxy is ``app[PROXY]`` and closes with the app."""
    proxy = GrpcWebProxy(routes_for(settings), max_unsent_bytes=settings.max_unsent_kb * 1024,
                         security=settings.client_security())
    cors = Cors(settings.cors_origins)
    authorizer = settings.authorizer()
    tls = settings.server_tls()
    guard = Guard(
        allowed_hosts=(*default_hosts(settings.host), *settings.allowed_hosts),
        limiter=RateLimiter(settings.control_rate_per_s, settings.control_burst),
        on_limited=proxy.rate_limited,
        tls=tls,
    )
    app = web.Application(middlewares=[guard.middleware, cors.middleware],
                          client_max_size=MAX_REQUEST_BYTES)
    app.on_response_prepare.append(Guard.add_headers)
    app[PROXY] = proxy
    if tls is not None:
        app[TLS] = tls

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "SERVING"})

    async def readyz(request: web.Request) -> web.Response:
        upstreams = await proxy.readiness()
        ok = all(status == "SERVING" for status in upstreams.values())
        return web.json_response({"status": "SERVING" if ok else "NOT_SERVING",
                                  "upstreams": upstreams}, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        if authorizer is not None:  # the viewer role, as for every read
            try:
                authorizer.check(METRICS_ROUTE, [("authorization", request.headers.get("Authorization", ""))])
            except TensorwireError as exc:
                return web.Response(status=401 if exc.code == grpc.StatusCode.UNAUTHENTICATED else 403,
                                    text=str(exc), headers={"WWW-Authenticate": "Bearer"})
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def on_shutdown(app: web.Application) -> None:
        await proxy.aclose()

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/{service}/{method}", proxy.handle)
    export.add_routes(app, proxy.pool_for)
    add_static_routes(app, settings.static_dir)
    app.on_shutdown.append(on_shutdown)
    return app


PROXY = web.AppKey("proxy", GrpcWebProxy)
TLS = web.AppKey("tls", ServerTls)
METRICS_ROUTE = "GET /metrics"
"""The gateway's /metrics in the role table (viewer)."""


class Gateway:
    """The gateway on a real socket: ``port = await gw.start()``, then ``await gw.aclose()``."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        # handler_cancellation: a browser that goes away cancels its handler, which
        # cancels the upstream call (aiohttp's default leaves it running).
        self._runner = web.AppRunner(self.app, handler_cancellation=True,
                                     shutdown_timeout=settings.grace_s, access_log=None)
        self.port: int | None = None

    async def start(self) -> int:
        await self._runner.setup()
        tls = self.app.get(TLS)
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, reuse_address=True,
                           ssl_context=tls.ssl_context() if tls is not None else None)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise PortInUseError(
                f"gateway: cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror or exc}; choose another with --port (or --host)"
            ) from None
        sockets = getattr(site._server, "sockets", None) or ()  # aiohttp keeps the bound port there
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.port
        log.info("gateway on http://%s:%d (routes: %s)", self.settings.host, self.port,
                 ", ".join(f"{r.service} -> {r.target}" for r in self.app[PROXY].routes.values()))
        return self.port

    async def aclose(self) -> None:
        await self._runner.cleanup()


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM or SIGINT; streams end with UNAVAILABLE so browsers reconnect."""
    gateway = Gateway(settings)
    async with stop_signal() as stop:
        await gateway.start()
        try:
            await stop.wait()
            log.info("gateway: shutdown signal")
        finally:
            await gateway.aclose()
