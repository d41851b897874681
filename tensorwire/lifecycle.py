"""The one place programs wait for SIGTERM/SIGINT.

::

    async with stop_signal() as stop:
        await thing.start()
        await stop.wait()          # until SIGTERM or Ctrl-C
    # handlers removed here; the caller shuts ``thing`` down in order
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.asynccontextmanager
async def stop_signal() -> AsyncIterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
