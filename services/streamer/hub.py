"""UpdateHub: the streamer's core (plain Python, no gRPC)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from tensorwire.common.v1 import common_pb2


class UpdateHub:
    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self._closed = asyncio.Event()

    async def status_frames(self, run_id: str) -> AsyncIterator[tuple[float, common_pb2.RunStatus]]:
        while not self._closed.is_set():
            yield time.time(), common_pb2.RunStatus(run_id=run_id)
            try:
                await asyncio.wait_for(self._closed.wait(), self.keepalive_s)
            except TimeoutError:
                pass

    async def aclose(self) -> None:
        self._closed.set()
