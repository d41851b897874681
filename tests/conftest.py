"""Shared fixtures: real services on real sockets, bound to port 0."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tensorwire.rpc.server import GrpcServer, ServerOptions
from tests.support.ports import free_port as free_port  # the tests import it from here


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


_FRONTEND: list[str] = []
"""The inference frontend the running test asked for (fixture ``inference_frontend``)."""


def settings_for(cls: type, tmp_path: Path, **overrides: Any) -> Any:
    """Settings for an in-process service: every Path field under tmp_path (and the
    inference frontend of the ``inference_frontend`` fixture, when a test uses it)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if isinstance(f.default, Path):
            values[f.name] = tmp_path / f.name
        elif f.name == "http_port":  # inference's HTTP endpoint: a free port, never 8000
            values[f.name] = 0
        elif f.name == "frontend" and _FRONTEND:
            values[f.name] = _FRONTEND[-1]
    if any(f.name == "create_model_repository" for f in dataclasses.fields(cls)):
        values["create_model_repository"] = True  # tmp_path/model_repository is new
    values.update(overrides)
    return dataclasses.replace(cls(), **values)


@pytest.fixture(params=["python", "native"])
def inference_frontend(request: pytest.FixtureRequest) -> Any:
    """Runs a test once per inference frontend (settings_for picks it up). The native
    run skips, saying why, where scripts/build-native.sh could not build it."""
    if request.param == "native":
        from services.inference.native import load_module

        module, why = load_module()
        if module is None:
            pytest.skip(f"native frontend {why}")
    _FRONTEND.append(request.param)
    yield request.param
    _FRONTEND.pop()


@pytest.fixture
def serve_app() -> Callable[..., Any]:
    return serving


AppFactory = Callable[[], Awaitable[Any]]
