"""A simulator with a funded test account, a Bus pointed at it, and a component to wait on.

For end-to-end tests; the ``sim`` fixture (tests/conftest.py) runs the simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio

import upbus
from upbus.sim import AccountConfig, SimConfig

ACCESS, SECRET = "test-access-key", "test-secret-key-0123456789"


def funded_config(rate: float, funds: int = 10_000_000) -> SimConfig:
    """``rate`` realtime messages/s per connection; the test account holds ``funds`` KRW."""
    return SimConfig(rate=rate, accounts=(AccountConfig(ACCESS, SECRET, {"KRW": Decimal(funds)}),))


def settings_for(sim: Any, **overrides: Any) -> upbus.Settings:
    """Settings on ``sim``'s URLs, quick to send and to reconnect; ``overrides`` win."""
    options: dict[str, Any] = {
        "public_url": sim.public_url,
        "private_url": sim.private_url,
        "debounce": 0.05,
        "reconnect": {"initial": 0.05, "maximum": 0.5},
    }
    options.update(overrides)
    return upbus.Settings(**options)


def make_bus(sim: Any, **overrides: Any) -> upbus.Bus:
    """A Bus with :func:`settings_for` ``(sim, **overrides)``."""
    return upbus.Bus(settings_for(sim, **overrides))


class Recorder:
    """A component that keeps what reaches it, so a test can wait for a condition on it.

    ``order`` holds ``"msg"`` and connection states in arrival order. Waits re-check
    their condition whenever something arrives, so they follow the data, not a clock.
    """

    def __init__(self) -> None:
        self.messages: list[upbus.Message] = []
        self.events: list[upbus.ConnectionEvent] = []
        self.order: list[str] = []
        self._changed = anyio.Event()

    def changed(self) -> None:
        """Wake the waiters; a subclass that records more calls this too."""
        self._changed.set()

    async def on_message(self, message: upbus.Message) -> None:
        self.messages.append(message)
        self.order.append("msg")
        self.changed()

    async def on_connection_state(self, event: upbus.ConnectionEvent) -> None:
        self.events.append(event)
        self.order.append(event.state)
        self.changed()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Return once ``predicate()`` holds; ``TimeoutError`` after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while not predicate():
                self._changed = anyio.Event()
                await self._changed.wait()
