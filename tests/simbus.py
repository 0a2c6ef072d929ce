"""A simulator with a funded test account, and a Bus pointed at it, for end-to-end tests."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import upbus
from upbus.sim import AccountConfig, SimConfig

ACCESS, SECRET = "test-access-key", "test-secret-key-0123456789"


def funded_config(rate: float, funds: int = 10_000_000) -> SimConfig:
    """``rate`` realtime messages/s per connection; the test account holds ``funds`` KRW."""
    return SimConfig(rate=rate, accounts=(AccountConfig(ACCESS, SECRET, {"KRW": Decimal(funds)}),))


def make_bus(sim: Any, **overrides: Any) -> upbus.Bus:
    """A Bus on ``sim``'s URLs, quick to send and to reconnect; ``overrides`` win."""
    options: dict[str, Any] = {
        "public_url": sim.public_url,
        "private_url": sim.private_url,
        "debounce": 0.05,
        "reconnect": {"initial": 0.05, "maximum": 0.5},
    }
    options.update(overrides)
    return upbus.Bus(upbus.Settings(**options))
