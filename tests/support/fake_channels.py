"""A scripted stand-in for gRPC under ``ChannelPool`` (httpcore's way of testing its
pool): ``Backend.connect`` is the pool's ``connect``; every channel it opens is
recorded, answers health checks as ``health`` says, and answers other unary calls
from ``answers`` (per method, in order: a message is returned, an exception raised).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    """The error a grpc.aio call raises for a status the peer sent."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details or None)


@dataclass
class FakeChannel:
    """What the pool and its clients need of a grpc.aio.Channel: unary calls and close."""

    address: str
    options: dict[str, Any]
    backend: Backend
    closed_with: float | None = None
    closed: bool = False

    def unary_unary(self, method: str, **_: Any) -> Any:
        async def call(request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
            if method == HEALTH_CHECK:
                status = self.backend.health.get(self.address, "SERVING")
                return health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.ServingStatus.Value(status))
            self.backend.calls.append((self.address, method, request, timeout))
            script = self.backend.answers.get(method)
            assert script, f"no answer scripted for {method}"
            answer = script.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return call

    def unary_stream(self, method: str, **_: Any) -> Any:
        return None

    async def close(self, grace: float | None = None) -> None:
        self.closed, self.closed_with = True, grace


@dataclass
class Backend:
    """Records every channel the pool opens and every call made on them."""

    health: dict[str, str] = field(default_factory=dict)
    """Each address's health answer (default SERVING)."""
    answers: dict[str, list[Any]] = field(default_factory=dict)
    """Per method path, the answers still to give, in order."""
    opened: list[FakeChannel] = field(default_factory=list)
    calls: list[tuple[str, str, Any, float | None]] = field(default_factory=list)
    """(address, method, request, timeout) of every call besides health checks."""

    def connect(self, address: str, options: Sequence[tuple[str, Any]], credentials: Any,
                interceptors: Any) -> Any:
        channel = FakeChannel(address, dict(options), self)
        self.opened.append(channel)
        return channel
