"""One owned periodic loop: ``Periodic(fn, interval_s).start()``, then ``await aclose()``.

Replaces the ``while True: try/sleep`` loops each component wrote for itself. A
failing call is logged (once per streak of failures, then again when it recovers)
and the loop goes on; with a ``backoff`` the wait after a failure grows by it
instead of staying at ``interval_s``. The task belongs to its owner, which cancels
and awaits it in its own ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from tensorwire.calls.backoff import Backoff
from tensorwire.errors import InvalidArgumentError

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``fn`` every ``interval_s`` seconds (first call after one interval,
    unless ``immediately``) until closed."""

    def __init__(self, fn: Callable[[], Awaitable[object]], interval_s: float, *, name: str,
                 immediately: bool = False, backoff: Backoff | None = None,
                 quiet: tuple[type[BaseException], ...] = (),
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """
        :param fn: the coroutine function called each period.
        :param interval_s: seconds between the end of one call and the next.
        :param name: the task's name, also in log lines.
        :param immediately: first call at start instead of after one interval.
        :param backoff: after failures, wait by this instead of ``interval_s``.
        :param quiet: exception types logged as one warning line, without traceback.
        :param sleep: how the loop waits (``asyncio.sleep``; tests pass a fake clock's).
        """
        if interval_s <= 0:
            raise InvalidArgumentError(f"{name}: interval_s must be > 0, got {interval_s}")
        self.fn, self.interval_s, self.name = fn, interval_s, name
        self.immediately, self.backoff, self.quiet = immediately, backoff, quiet
        self._sleep = sleep
        self.calls = self.failures = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> Periodic:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)
        return self

    async def _loop(self) -> None:
        streak = 0
        if not self.immediately:
            await self._sleep(self.interval_s)
        while True:
            self.calls += 1
            try:
                await self.fn()
            except asyncio.CancelledError:
                raise
            except self.quiet as exc:
                self._failed(streak, exc, traceback=False)
                streak += 1
            except Exception as exc:
                self._failed(streak, exc, traceback=True)
                streak += 1
            else:
                if streak:
                    log.info("%s: works again after %d failure(s)", self.name, streak)
                streak = 0
            wait = self.backoff.delay_s(streak) if streak and self.backoff else self.interval_s
            await self._sleep(wait)

    def _failed(self, streak: int, exc: BaseException, *, traceback: bool) -> None:
        self.failures += 1
        if streak:
            return  # logged at the start of this streak
        if traceback:
            log.exception("%s failed (retrying; logged once until it works again)", self.name)
        else:
            log.warning("%s failed: %s (retrying)", self.name, exc)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
