"""One wake-up at a core's next deadline, on the asyncio loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class DeadlineTimer:
    """Calls ``callback(now)`` at the earliest deadline it was armed with.

    Arming with a later deadline keeps the earlier wake-up: the core simply finds nothing
    due yet and reports its new deadline, so the hot path never reschedules.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[float], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None and not self._handle.cancelled()

    def arm(self, deadline: float | None) -> None:
        if deadline is None or (self._at is not None and deadline >= self._at):
            return
        if self._handle is not None:
            self._handle.cancel()
        self._at = deadline
        self._handle = self._loop.call_at(deadline, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._at = None

    def _fire(self) -> None:
        self._handle = None
        self._at = None
        self._callback(self._loop.time())
