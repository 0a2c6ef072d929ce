"""What the simulator saw: request frames, connections and limit violations.

Tests read these lists and wait on them with :meth:`Journal.wait_until`, which wakes
on every change instead of polling.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import anyio

from upbus.sim.protocol import ListSubscriptions, Subscribe

__all__ = ("ConnectionRecord", "Journal", "RequestRecord", "Violation")

Parsed = Subscribe | ListSubscriptions | Literal["PING"] | None


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One message a client sent: ``parsed`` is None and ``error`` set when refused."""

    time: float
    connection: int
    endpoint: str
    raw: str
    parsed: Parsed
    error: str | None = None


@dataclass(slots=True)
class ConnectionRecord:
    """One upgrade attempt; ``status`` 101 when accepted, else the HTTP refusal."""

    id: int
    endpoint: str | None  # "public", "private", or None for an unknown path
    path: str
    opened: float
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()  # Authorization value redacted
    access_key: str | None = None
    closed: float | None = None
    close_reason: str | None = None

    @property
    def is_open(self) -> bool:
        return self.status == 101 and self.closed is None


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken rule: ``kind`` is e.g. ``message_rate``, ``connect_rate``, ``request_error``."""

    kind: str
    connection: int
    time: float
    detail: str


class Journal:
    """The records, plus change notification for waiters."""

    def __init__(self, keep: int) -> None:
        self.requests: deque[RequestRecord] = deque(maxlen=keep)
        self.connections: deque[ConnectionRecord] = deque(maxlen=keep)
        self.violations: deque[Violation] = deque(maxlen=keep)
        self.request_count = 0
        self.connection_count = 0
        self.violation_count = 0
        self._changed = anyio.Event()

    def changed(self) -> None:
        """Wake every waiter to re-check its condition."""
        self._changed.set()
        self._changed = anyio.Event()

    def add_request(self, record: RequestRecord) -> None:
        self.requests.append(record)
        self.request_count += 1
        self.changed()

    def add_connection(self, record: ConnectionRecord) -> None:
        self.connections.append(record)
        self.connection_count += 1
        self.changed()

    def add_violation(self, violation: Violation) -> None:
        self.violations.append(violation)
        self.violation_count += 1
        self.changed()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Return once ``predicate()`` holds; ``TimeoutError`` after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()
