"""FakeClock: the one test clock for code that takes an injectable ``clock``
(``Callable[[], float]``) or ``sleep`` (``Callable[[float], Awaitable]``).

A test moves it with :meth:`advance`; code that sleeps through :meth:`sleep`
moves it itself (each sleep yields to the event loop once, so other tasks run,
and is recorded in ``slept``), so a loop of sleeps runs at once and the test
reads the waits it asked for instead of measuring them.
"""

from __future__ import annotations

import asyncio


class FakeClock:
    """Monotonic seconds that move only when told (``start``: the first reading)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """An ``asyncio.sleep`` that moves this clock instead of waiting."""
        self.slept.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)
