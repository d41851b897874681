"""Tell the inference service about new checkpoints (best effort, never blocking).

``announce(name)`` may be called from any thread. One task sends
``inference.GRPCInferenceService/RepositoryModelLoad`` for each announced model
(latest wins per model), retrying with exponential backoff while inference is
down, and gives up on a model after ``max_attempts`` (the next checkpoint
announces it again). Training never waits for any of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from tensorwire.inference import grpc_service_pb2 as ipb
from tensorwire.inference import grpc_service_pb2_grpc as ipb_grpc

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def connect(target: str) -> AsyncIterator[grpc.aio.Channel]:
    """The one place the announcer opens a channel to inference."""
    async with grpc.aio.insecure_channel(target) as channel:
        yield channel


class ModelAnnouncer:
    """Asks inference to (re)load models whose new versions were written."""

    def __init__(self, target: str, *, max_attempts: int = 8, timeout_s: float = 10.0,
                 backoff_max_s: float = 10.0) -> None:
        self.target = target
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.backoff_max_s = backoff_max_s
        self.loaded: dict[str, int] = {}
        """Model name -> how many loads inference acknowledged."""
        self._pending: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.target:
            self._task = asyncio.create_task(self._run(), name="announce")

    def announce(self, name: str, version: int = 0) -> None:
        """Thread-safe: schedule a RepositoryModelLoad of ``name``."""
        if self._loop is None or not self.target:
            return
        self._loop.call_soon_threadsafe(self._add, name)

    def _add(self, name: str) -> None:
        self._pending[name] = 0
        self._wake.set()

    async def _run(self) -> None:
        async with connect(self.target) as channel:
            stub = ipb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    name, attempt = next(iter(self._pending.items()))
                    del self._pending[name]
                    try:
                        await stub.RepositoryModelLoad(
                            ipb.RepositoryModelLoadRequest(model_name=name), timeout=self.timeout_s
                        )
                        self.loaded[name] = self.loaded.get(name, 0) + 1
                        log.info("inference loaded %s", name)
                    except grpc.aio.AioRpcError as exc:
                        if attempt + 1 >= self.max_attempts or exc.code() in (
                            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED,
                        ):
                            log.warning("inference did not load %s: %s %s",
                                        name, exc.code().name, exc.details())
                            continue
                        delay = min(self.backoff_max_s, 0.25 * 2**attempt)
                        asyncio.get_running_loop().call_later(delay, self._retry, name, attempt + 1)

    def _retry(self, name: str, attempt: int) -> None:
        self._pending.setdefault(name, attempt)
        self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
