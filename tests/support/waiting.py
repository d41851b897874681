"""``until``: poll a condition on real servers and threads (integration tests).

Unit tests do not poll: they drive a fake clock (tests/support/clock.py).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


async def until(predicate: Callable[[], object], timeout_s: float = 30.0, what: str = "condition",
                interval_s: float = 0.02) -> None:
    """Wait until ``predicate()`` (a function or a coroutine function) is true,
    checking every ``interval_s``; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)
