"""Services as real processes, the way a pod runs them: ``python -m services.<name>``.

``running(...)`` starts one, waits (poll with a deadline) until it answers SERVING
on grpc.health.v1, and on exit sends SIGTERM, waits for the graceful shutdown and
kills it only if it overstays. Its output goes to a log file that a failing test
prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


async def wait_http_ok(url: str, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + deadline_s
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not answering 200 within {deadline_s}s")


async def wait_serving(target: str, deadline_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + deadline_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{target}: process exited with {proc.returncode}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING within {deadline_s}s")


@contextlib.asynccontextmanager
async def running(
    name: str, port: int, args: Sequence[str], log_dir: Path, *, env: dict[str, str] | None = None,
    start_timeout_s: float = 60.0, suffix: str = "", ready_path: str | None = None,
) -> AsyncIterator[ServiceProcess]:
    """``ready_path``: an HTTP service (the gateway), ready when GET path answers 200."""
    log_path = log_dir / f"{name}{suffix}.log"
    # Inference's HTTP endpoint stays off unless a test asks (its default port is fixed).
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "TENSORWIRE_INFERENCE_HTTP_PORT": "-1",
                "TENSORWIRE_INFERENCE_CREATE_MODEL_REPOSITORY": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}", "--host", "127.0.0.1", "--port", str(port),
             *args],
            cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
        )
    service = ServiceProcess(name, port, proc, log_path)
    try:
        try:
            if ready_path is None:
                await wait_serving(service.target, start_timeout_s, proc)
            else:
                await wait_http_ok(f"http://{service.target}{ready_path}", start_timeout_s, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{name}{suffix} did not start: {exc}\n{service.log_tail()}") from None
        yield service
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
