"""Shared fixtures: real services on real sockets, bound to port 0."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tensorwire.server import GrpcServer, ServerOptions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(app: Any, name: str = "test", grace_s: float = 2.0,
                  **options: Any) -> AsyncIterator[GrpcServer]:
    """Run ``app`` (a tensorwire Service) in-process on 127.0.0.1:0 (``options``:
    further ServerOptions fields, e.g. an ``authorizer`` or ``tls``)."""
    server = GrpcServer(
        ServerOptions(name=name, host="127.0.0.1", port=0, metrics_port=0, grace_s=grace_s,
                      **options), app
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.5)


def settings_for(cls: type, tmp_path: Path, **overrides: Any) -> Any:
    """Settings for an in-process service: every Path field under tmp_path."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if isinstance(f.default, Path):
            values[f.name] = tmp_path / f.name
        elif f.name == "http_port":  # inference's HTTP endpoint: a free port, never 8000
            values[f.name] = 0
    if any(f.name == "create_model_repository" for f in dataclasses.fields(cls)):
        values["create_model_repository"] = True  # tmp_path/model_repository is new
    values.update(overrides)
    return dataclasses.replace(cls(), **values)


@pytest.fixture
def serve_app() -> Callable[..., Any]:
    return serving


AppFactory = Callable[[], Awaitable[Any]]
