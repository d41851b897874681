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
import sys

from pathlib import Path

import grpc

from tensorwire.checkpoints import SERVICE_NAME as TRANSFER_SERVICE
from tensorwire.checkpoints import CheckpointReceiver, ModelTransferServicer
from tensorwire.server import GrpcServer, ServerOptions

SERVICE = "tensorwire.test.Echo"


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
