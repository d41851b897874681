"""Prometheus metrics: the per-RPC metrics every service shares, and the endpoint."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from tensorwire.rpc.tls import ServerTls

log = logging.getLogger(__name__)

RPC_HANDLED = Counter(
    "tensorwire_rpc_handled_total",
    "RPCs completed, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "tensorwire_rpc_latency_seconds",
    "Time from the start of an RPC to its end (streams: the whole stream).",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)
SERVING = Gauge(
    "tensorwire_serving",
    "1 while the service reports SERVING on grpc.health.v1, 0 while draining.",
    ["service"],
)


class MetricsEndpoint:
    """The HTTP ``/metrics`` endpoint, on its own port, in a daemon thread."""

    def __init__(self, host: str, port: int, *, tls: ServerTls | None = None) -> None:
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._host, self._port = host, port
        self._tls = tls

    @property
    def port(self) -> int:
        return self._server.server_port if self._server else self._port

    def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        tls = self._tls
        try:
            self._server, self._thread = start_http_server(
                self._port, addr=self._host,
                certfile=str(tls.cert) if tls else None, keyfile=str(tls.key) if tls else None,
                client_cafile=str(tls.client_ca) if tls and tls.client_ca else None,
                client_auth_required=bool(tls and tls.client_ca),
            )
        except OSError as exc:
            from tensorwire.rpc.server import PortInUseError

            raise PortInUseError(
                f"cannot serve /metrics on {self._host}:{self._port}: {exc.strerror or exc}; "
                "choose another with --metrics-port (-1 turns it off)"
            ) from None
        log.info("metrics on http%s://%s:%d/metrics", "s" if tls else "", self._host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
