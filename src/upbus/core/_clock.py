"""Time as upbus sees it.

Timing logic (debounce, rate limiting, backoff) takes a :class:`Clock` so tests can
run it on virtual time. The default reads the running event loop's clock, which is
virtual under trio's ``MockClock``.
"""

from __future__ import annotations

from typing import Protocol

import anyio

__all__ = ("AnyioClock", "Clock")


class Clock(Protocol):
    """A monotonic clock with an async sleep measured on the same time base."""

    def now(self) -> float:
        """Seconds on a monotonic time base."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` (a checkpoint even when ``seconds <= 0``)."""
        ...


class AnyioClock:
    """The running event loop's clock (``anyio.current_time`` / ``anyio.sleep``)."""

    def now(self) -> float:
        return anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))
