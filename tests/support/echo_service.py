"""A tiny gRPC service for channel-pool tests and benchmarks, on tensorwire's server.

``/tensorwire.test.Echo/Echo`` answers the request bytes prefixed with the caller's
peer address (so a test sees which TCP connection carried a call); ``Hold`` waits
until the test releases it (so a test keeps streams open without sleeping);
``Sleep`` answers after ``delay_s`` (an I/O-bound handler for the benchmark).
With a repository it also serves the checkpoint ModelTransferService.

Run as a process: ``python -m tests.support.echo_service --port 0 --delay-s 0.02``
prints ``PORT <n>`` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from services.inference.transfer import SERVICE_NAME as TRANSFER_SERVICE
from services.inference.transfer import ModelTransferServicer
from tensorwire.checkpoints.receiver import CheckpointReceiver
from tensorwire.rpc.server import GrpcServer, ServerOptions

SERVICE = "tensorwire.test.Echo"
ROOT = Path(__file__).resolve().parents[2]


def _identity(data: bytes) -> bytes:
    return data


class EchoApp:
    """A tensorwire Service: Echo, Hold and Sleep, with counters."""

    def __init__(self, delay_s: float = 0.0, repository: Path | None = None) -> None:
        self.delay_s = delay_s
        self.transfer = (
            ModelTransferServicer(CheckpointReceiver(repository)) if repository is not None else None
        )
        self.service_names = (SERVICE,) if repository is None else (SERVICE, TRANSFER_SERVICE)
        self.release = asyncio.Event()
        self.holding = 0
        self.held = asyncio.Condition()
        self.peers: list[str] = []
        self.calls = 0

    async def _echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        peer = context.peer()
        self.peers.append(peer)
        return peer.encode() + b"|" + request

    async def _hold(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.peers.append(context.peer())
        async with self.held:
            self.holding += 1
            self.held.notify_all()
        try:
            await self.release.wait()
        finally:
            async with self.held:
                self.holding -= 1
                self.held.notify_all()
        return context.peer().encode()

    async def _sleep(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return request

    async def wait_holding(self, n: int, timeout_s: float = 10.0) -> None:
        """Wait until ``n`` Hold calls are in the server."""
        async with self.held:
            await asyncio.wait_for(self.held.wait_for(lambda: self.holding >= n), timeout_s)

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn, _identity, _identity)
            for name, fn in (("Echo", self._echo), ("Hold", self._hold), ("Sleep", self._sleep))
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if self.transfer is not None:
            self.transfer.register(server)

    async def drain(self) -> None:
        self.release.set()

    async def aclose(self) -> None:
        self.release.set()


def method(channel: grpc.aio.Channel, name: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/{name}", _identity, _identity)


@contextlib.contextmanager
def running(*args: str) -> Iterator[tuple[int, int]]:
    """This service in a child process (``args`` as on its command line); yields (port, pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.echo_service", "--port", "0", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"echo service did not start: {line!r}")
        yield int(line.split()[1]), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def status_kib(pid: int | str, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int | str) -> None:
    """Reset a process's VmHWM to its current RSS (Linux clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--max-concurrent-streams", type=int, default=0,
                        help="HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS (0 = gRPC's default)")
    parser.add_argument("--repository", default="",
                        help="also serve ModelTransferService into this model repository")
    args = parser.parse_args(argv)
    extra: tuple[tuple[str, int | str], ...] = ()
    if args.max_concurrent_streams:
        extra = (("grpc.max_concurrent_streams", args.max_concurrent_streams),)
    if args.repository:
        import torch  # noqa: F401  (as in the inference service: checkpoints are checked with it)
    app = EchoApp(args.delay_s, Path(args.repository) if args.repository else None)
    server = GrpcServer(
        ServerOptions(name="echo", host="127.0.0.1", port=args.port, extra_options=extra), app
    )
    port = await server.start()
    print(f"PORT {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(0.5)


if __name__ == "__main__":
    try:
        asyncio.run(_main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
