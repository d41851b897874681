"""``tensorwire up``: the whole suite on one machine, in one command.

Starts every service as a child process, prefixes each line of their logs with
the service name, waits until each reports SERVING on grpc.health.v1, and on
Ctrl-C / SIGTERM stops them all (SIGTERM, then SIGKILL after the grace period).
Children also get SIGTERM from the kernel if this supervisor dies (PR_SET_PDEATHSIG),
so no process of the suite outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    """One service of the suite."""

    name: str
    module: str
    port: int | None
    """gRPC port whose health is awaited (None: not a gRPC service)."""
    args: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None


def plan(args: argparse.Namespace) -> list[Child]:
    """The processes ``tensorwire up`` runs, in start order."""
    common = ["--host", args.host]
    if args.no_metrics:
        common += ["--metrics-port", "-1"]
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    models = str(args.data_dir / "models")
    children = [
        Child("streamer", "services.streamer", args.streamer_port,
              [*common, "--port", str(args.streamer_port),
               "--trainer-target", f"{local}:{args.trainer_port}"]),
        Child("inference", "services.inference", args.inference_port,
              [*common, "--port", str(args.inference_port), "--model-repository", models]),
        Child("trainer", "services.trainer", args.trainer_port,
              [*common, "--port", str(args.trainer_port), "--model-repository", models,
               "--data-dir", str(args.data_dir / "trainer"),
               "--streamer-target", f"{local}:{args.streamer_port}",
               "--inference-target", f"{local}:{args.inference_port}",
               "--demo-task", args.demo_task]),
        # The web gateway: the page and gRPC-Web on --web-port (HTTP, not awaited on
        # grpc.health.v1; its /healthz answers once it listens).
        Child("gateway", "services.gateway", None,
              ["--host", args.host, "--port", str(args.web_port),
               "--trainer-target", f"{local}:{args.trainer_port}",
               "--streamer-target", f"{local}:{args.streamer_port}",
               "--inference-target", f"{local}:{args.inference_port}"]),
    ]
    return children


async def _pump(name: str, stream: asyncio.StreamReader, width: int) -> None:
    prefix = f"{name:<{width}} | ".encode()
    out = sys.stdout.buffer
    while line := await stream.readline():
        out.write(prefix + line)
        out.flush()


async def _wait_serving(port: int, deadline: float) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(0.2)
    return False


async def up(args: argparse.Namespace) -> int:
    children = plan(args)
    width = max(len(c.name) for c in children)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pumps: list[asyncio.Task[None]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    exit_code = 0
    try:
        for child in children:
            child.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", child.module, *child.args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env=env, preexec_fn=_die_with_parent,
            )
            assert child.proc.stdout is not None
            pumps.append(asyncio.create_task(_pump(child.name, child.proc.stdout, width)))
        deadline = time.monotonic() + args.start_timeout_s
        waits = [c for c in children if c.port is not None]
        ready = await asyncio.gather(*(_wait_serving(c.port, deadline) for c in waits))  # type: ignore[arg-type]
        failed = [c.name for c, ok in zip(waits, ready) if not ok]
        if failed:
            print(f"tensorwire up: not serving after {args.start_timeout_s:.0f}s: {', '.join(failed)}",
                  flush=True)
            return 1
        print(f"tensorwire up: all services SERVING in {time.monotonic() - started:.1f}s "
              f"(trainer :{args.trainer_port}, streamer :{args.streamer_port}, "
              f"inference :{args.inference_port}); open http://{args.host}:{args.web_port}",
              flush=True)
        exited = [asyncio.create_task(c.proc.wait()) for c in children if c.proc]  # type: ignore[union-attr]
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *exited], return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            dead = [c.name for c in children if c.proc and c.proc.returncode is not None]
            print(f"tensorwire up: {', '.join(dead)} exited; stopping the suite", flush=True)
            exit_code = 1
        stopper.cancel()
        return exit_code
    finally:
        await _stop_all(children, args.grace_s)
        for task in pumps:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 2)


async def _stop_all(children: Sequence[Child], grace_s: float) -> None:
    alive = [c.proc for c in reversed(children) if c.proc and c.proc.returncode is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in alive)), grace_s + 5)
    except asyncio.TimeoutError:
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.gather(*(p.wait() for p in alive))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"tensorwire up: {name} must be an integer, got {raw!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorwire", description="tensorwire suite")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run the whole suite on this machine")
    p_up.add_argument("--host", default=os.environ.get("TENSORWIRE_HOST", "127.0.0.1"),
                      help="address every service listens on (env TENSORWIRE_HOST)")
    p_up.add_argument("--trainer-port", type=int,
                      default=_env_int("TENSORWIRE_TRAINER_PORT", 50051))
    p_up.add_argument("--streamer-port", type=int,
                      default=_env_int("TENSORWIRE_STREAMER_PORT", 50052))
    p_up.add_argument("--inference-port", type=int,
                      default=_env_int("TENSORWIRE_INFERENCE_PORT", 8001))
    p_up.add_argument("--web-port", type=int, default=_env_int("TENSORWIRE_WEB_PORT", 8080))
    p_up.add_argument("--data-dir", type=Path,
                      default=Path(os.environ.get("TENSORWIRE_DATA_DIR", "var")),
                      help="model repository and checkpoints (env TENSORWIRE_DATA_DIR)")
    p_up.add_argument("--demo-task", default=os.environ.get("TENSORWIRE_DEMO_TASK", "spiral"),
                      help="task of the demo run started at boot ('' = none)")
    p_up.add_argument("--no-metrics", action="store_true",
                      help="no Prometheus endpoints (e.g. when their ports are taken)")
    p_up.add_argument("--start-timeout-s", type=float, default=60.0)
    p_up.add_argument("--grace-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.command == "up":
        return asyncio.run(up(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
