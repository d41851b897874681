"""How long to wait before trying again: one ``Backoff`` for every retry loop.

Exponential growth from ``initial_s`` by ``multiplier`` up to ``max_s``, each wait
scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that many clients
that failed together do not retry together.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

from tensorwire.errors import InvalidArgumentError


@dataclass(frozen=True)
class Backoff:
    """Waits between tries; ``attempt`` counts failures from 1."""

    initial_s: float = 0.05
    """Wait after the first failure (before jitter)."""
    max_s: float = 2.0
    """Longest wait (before jitter)."""
    multiplier: float = 2.0
    """Growth per failure."""
    jitter: float = 0.2
    """Each wait is scaled by a random factor in [1 - jitter, 1 + jitter]."""

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < self.initial_s:
            raise InvalidArgumentError(
                f"need 0 <= initial_s <= max_s, got initial_s={self.initial_s}, max_s={self.max_s}"
            )
        if self.multiplier < 1:
            raise InvalidArgumentError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise InvalidArgumentError(f"jitter must be in [0, 1), got {self.jitter}")

    def delay_s(self, attempt: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        """The wait after failure number ``attempt`` (1, 2, ...)."""
        exponent = min(max(attempt, 1) - 1, 64)  # no float overflow on a long outage
        base = min(self.max_s, self.initial_s * self.multiplier ** exponent)
        return base * uniform(1 - self.jitter, 1 + self.jitter)

    async def sleep(self, attempt: int) -> None:
        await asyncio.sleep(self.delay_s(attempt))
