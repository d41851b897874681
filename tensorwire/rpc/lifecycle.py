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
too; it would kill a service half-way through its shutdown. A third signal means
a person wants out now (Ctrl-C pressed again on a shutdown that hangs): the
process says so in one line and exits at once with status 130.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCE_AFTER = 3
"""The signal that ends the process at once, shutdown or not (the first two do not)."""


@contextlib.asynccontextmanager
async def stop_signal() -> AsyncIterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received = 0

    def on_signal() -> None:
        nonlocal received
        received += 1
        stop.set()
        if received >= FORCE_AFTER:
            sys.stderr.write(f"{received} stop signals: exiting now, without finishing the shutdown\n")
            sys.stderr.flush()
            os._exit(130)

    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        yield stop
    finally:
        for sig in SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
