"""``tensorwire up``: the whole suite on one machine, in one command.

Starts every service as a child process, prefixes each line of their logs with
the service name, waits until each reports SERVING on grpc.health.v1, and on
Ctrl-C / SIGTERM stops them all (SIGTERM, then SIGKILL after the grace period).
Children also get SIGTERM from the kernel if this supervisor dies (PR_SET_PDEATHSIG),
so no process of the suite outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorwire.rpc import auth, config
from tensorwire.rpc.config import setting
from tensorwire.rpc.lifecycle import stop_signal

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass(frozen=True)
class SuiteSettings:
    """``tensorwire up``'s settings (flags, else ``TENSORWIRE_*`` environment, else default)."""

    env_prefix: ClassVar[str] = "TENSORWIRE_"
    service: ClassVar[str] = "up"

    host: str = setting(
        "127.0.0.1", env="HOST",
        help="address every service listens on (a non-loopback address is served with the "
             "generated admin token required on every call)",
    )
    trainer_port: int = setting(50051, env="TRAINER_PORT", help="trainer gRPC port", min=1, max=65535)
    streamer_port: int = setting(50052, env="STREAMER_PORT", help="streamer gRPC port", min=1, max=65535)
    inference_port: int = setting(
        8001, env="INFERENCE_PORT", help="inference gRPC port (Open Inference Protocol)", min=1, max=65535
    )
    inference_http_port: int = setting(
        8000, env="INFERENCE_HTTP_PORT", help="inference's HTTP/REST v2 port (-1 = off)",
        min=-1, max=65535,
    )
    web_port: int = setting(8080, env="WEB_PORT", help="the web page and gRPC-Web gateway", min=1, max=65535)
    data_dir: Path = setting(
        Path("var"), env="DATA_DIR",
        help="where the suite keeps its state: models/ (the model repository, checkpoints), "
             "admin.token and tokens.csv",
    )
    demo_task: str = setting("spiral", env="DEMO_TASK", help="task of the demo run started at boot ('' = none)")
    metrics: bool = setting(
        True, env="METRICS", help="Prometheus endpoints on the services' default metrics ports"
    )
    auth_token_file: str = setting(
        "", env="AUTH_TOKEN_FILE",
        help="bearer tokens for every service (Kubernetes static token file format); by default "
             "<data dir>/tokens.csv, made with a fresh admin token in <data dir>/admin.token",
    )
    start_timeout_s: float = setting(
        60.0, env="START_TIMEOUT_S", help="seconds every service has to report SERVING", min=1
    )
    grace_s: float = setting(
        10.0, env="GRACE_S", help="seconds services get to stop before they are killed", min=0
    )


@dataclass
class Child:
    """One service of the suite."""

    name: str
    module: str
    port: int | None
    """gRPC port whose health is awaited (None: not a gRPC service)."""
    args: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None


def plan(settings: SuiteSettings, token_file: Path, auth_file: Path) -> list[Child]:
    """The processes ``tensorwire up`` runs, in start order."""
    common = ["--host", settings.host, "--auth-token-file", str(auth_file)]
    if not settings.metrics:
        common += ["--metrics-port", "-1"]
    local = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    models = str(settings.data_dir / "models")
    children = [
        # The streamer asks the trainer about runs it has not seen (a viewer's calls).
        Child("streamer", "services.streamer", settings.streamer_port,
              [*common, "--port", str(settings.streamer_port),
               "--trainer-target", f"{local}:{settings.trainer_port}", "--token-file", str(token_file)]),
        Child("inference", "services.inference", settings.inference_port,
              [*common, "--port", str(settings.inference_port), "--model-repository", models,
               "--create-model-repository",
               "--http-port", str(settings.inference_http_port)]),
        Child("trainer", "services.trainer", settings.trainer_port,
              [*common, "--port", str(settings.trainer_port), "--model-repository", models,
               "--data-dir", str(settings.data_dir / "trainer"),
               "--streamer-target", f"{local}:{settings.streamer_port}",
               "--inference-target", f"{local}:{settings.inference_port}",
               "--token-file", str(token_file), "--demo-task", settings.demo_task]),
        # The web gateway: the page and gRPC-Web on --web-port (HTTP, not awaited on
        # grpc.health.v1; its /healthz answers once it listens). Browsers' calls carry
        # their own token through it.
        Child("gateway", "services.gateway", None,
              ["--host", settings.host, "--port", str(settings.web_port),
               "--auth-token-file", str(auth_file),
               "--trainer-target", f"{local}:{settings.trainer_port}",
               "--streamer-target", f"{local}:{settings.streamer_port}",
               "--inference-target", f"{local}:{settings.inference_port}"]),
    ]
    return children


def _holder(port: int) -> str:
    """Who listens on ``port`` (``pid 123 (python3)``), from /proc; '' if unknown."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    if not inodes:
        return ""
    wanted = {f"socket:[{i}]" for i in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    name = (proc / "comm").read_text().strip()
                    return f"pid {proc.name} ({name})"
    return ""


def busy_ports(settings: SuiteSettings) -> list[str]:
    """One line per port of the suite that cannot be bound now."""
    ports = [("--trainer-port", settings.trainer_port), ("--streamer-port", settings.streamer_port),
             ("--inference-port", settings.inference_port), ("--web-port", settings.web_port)]
    if settings.inference_http_port > 0:
        ports.append(("--inference-http-port", settings.inference_http_port))
    if settings.metrics:
        ports += [("--no-metrics", 9101), ("--no-metrics", 9102), ("--no-metrics", 8002)]
    lines = []
    for flag, port in ports:
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((settings.host, port))
            except OSError:
                holder = _holder(port)
                held = f" by {holder}" if holder else ""
                what = "metrics port" if flag == "--no-metrics" else "port"
                lines.append(f"{what} {port} on {settings.host} is in use{held}: "
                             f"{'turn metrics off with' if flag == '--no-metrics' else 'choose another with'} {flag}")
    return lines


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


async def up(settings: SuiteSettings) -> int:
    busy = busy_ports(settings)
    if busy:
        for line in busy:
            print(f"tensorwire up: {line}", flush=True)
        return 2
    if settings.auth_token_file:
        auth_file = Path(settings.auth_token_file)
        token_path = settings.data_dir / "admin.token"
        token, _ = auth.ensure_admin_token(settings.data_dir)
    else:
        token, auth_file = auth.ensure_admin_token(settings.data_dir)
        token_path = settings.data_dir / "admin.token"
    children = plan(settings, token_path, auth_file)
    async with stop_signal() as stop:
        return await _supervise(settings, children, stop, token, token_path)


async def _supervise(args: SuiteSettings, children: list[Child], stop: asyncio.Event,
                     token: str, token_path: Path) -> int:
    """Start the children, wait until they serve (or Ctrl-C), then until one exits or
    ``stop`` is set; stop them all."""
    width = max(len(c.name) for c in children)
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
        starting = asyncio.ensure_future(
            asyncio.gather(*(_wait_serving(c.port, deadline) for c in waits))  # type: ignore[arg-type]
        )
        interrupted = asyncio.create_task(stop.wait())
        early_exits = [asyncio.create_task(c.proc.wait()) for c in children if c.proc]
        racing: list[asyncio.Future[Any]] = [starting, interrupted, *early_exits]
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        for task in (interrupted, *early_exits):
            task.cancel()
        if not starting.done():  # Ctrl-C, or a service died while starting
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if stop.is_set():
                print("tensorwire up: asked to stop while starting; stopping", flush=True)
                return 0
            dead = [c.name for c in children if c.proc and c.proc.returncode is not None]
            print(f"tensorwire up: {', '.join(dead)} exited while starting (see its lines above)",
                  flush=True)
            return 1
        ready = starting.result()
        failed = [c.name for c, ok in zip(waits, ready) if not ok]
        if failed:
            print(f"tensorwire up: not serving after {args.start_timeout_s:.0f}s: {', '.join(failed)}",
                  flush=True)
            return 1
        page_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        if ":" in page_host:
            page_host = f"[{page_host}]"
        print(f"tensorwire up: all services SERVING in {time.monotonic() - started:.1f}s "
              f"(trainer :{args.trainer_port}, streamer :{args.streamer_port}, "
              f"inference :{args.inference_port}, HTTP :{args.inference_http_port}); "
              f"admin token in {token_path}", flush=True)
        # The token travels in the URL's fragment: browsers never send it to a server
        # or in a Referer; the page moves it to sessionStorage and clears the address bar.
        print(f"tensorwire up: open http://{page_host}:{args.web_port}/#token={token}", flush=True)
        exited = [asyncio.create_task(c.proc.wait()) for c in children if c.proc]
        stopper = asyncio.create_task(stop.wait())
        watched: list[asyncio.Future[Any]] = [stopper, *exited]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            dead = [c.name for c in children if c.proc and c.proc.returncode is not None]
            print(f"tensorwire up: {', '.join(dead)} exited; stopping the suite", flush=True)
            exit_code = 1
        stopper.cancel()
        return exit_code
    finally:
        await _stop_all(children, args.grace_s)
        for pump in pumps:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(pump, 2)


async def _stop_all(children: Sequence[Child], grace_s: float) -> None:
    alive = [c.proc for c in reversed(children) if c.proc and c.proc.returncode is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in alive)), grace_s + 5)
    except TimeoutError:
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.gather(*(p.wait() for p in alive))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tensorwire up [options]   (tensorwire up --help lists them)\n\n"
              "  up    run the whole suite on this machine: trainer, streamer, inference,\n"
              "        the web gateway and a demo run; the page URL is printed", flush=True)
        return 0 if argv else 2
    if argv[0] != "up":
        print(f"tensorwire: unknown command {argv[0]!r}; the command is: up", flush=True)
        return 2
    try:
        settings = config.load(SuiteSettings, argv[1:], prog="tensorwire up",
                               description="Run the whole suite on this machine.")
    except config.SettingsError as exc:
        print(f"tensorwire up: {exc}", flush=True)
        return 2
    return asyncio.run(up(settings))


if __name__ == "__main__":
    sys.exit(main())
