"""The one place programs wait for SIGTERM/SIGINT.

::

    async with stop_signal() as stop:
        await thing.start()
        try:
            await stop.wait()      # until SIGTERM or Ctrl-C
        finally:
            await thing.aclose()   # still inside: a second signal changes nothing
    # handlers removed here

Shut down *inside* the block. Outside it, SIGTERM has its default action again,
and a second signal is the rule, not the exception: Ctrl-C reaches every process
of the terminal's group and ``tensorwire up`` then sends its children SIGTERM
too; it would kill a service half-way through its shutdown.
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
