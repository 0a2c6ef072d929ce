"""An upbus plugin: watch the bid/ask spread of order books.

upbus finds this module through the ``upbus`` entry point declared in this
distribution's ``pyproject.toml`` and calls its hook implementations.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

import upbus
from upbus.core.delivery._router import ConnectionEvent
from upbus.core.wire._messages import Message, Orderbook

log = logging.getLogger("upbus_spread_monitor")


class SpreadSettings(BaseModel):
    """The plugin's own settings section, ``plugins.spread_monitor``."""

    enabled: bool = False
    codes: list[str] = Field(default_factory=lambda: ["KRW-BTC"])
    max_spread_bps: float = Field(default=5.0, gt=0)


class SpreadMonitor:
    """A component: the bus calls ``on_message`` with each order book it asked for."""

    # A monitor wants the newest book, not every book: let the bus conflate.
    upbus_overflow = "conflate"

    def __init__(self, settings: SpreadSettings) -> None:
        self.settings = settings
        self.spreads: dict[str, float] = {}
        self.alerts = 0

    def specs(self) -> list[upbus.Spec]:
        return [upbus.orderbook(*self.settings.codes, depth=1)]

    async def on_message(self, message: Message) -> None:
        if not isinstance(message, Orderbook) or not message.orderbook_units:
            return
        best = message.orderbook_units[0]
        if best.bid_price <= 0:
            return
        spread_bps = (best.ask_price - best.bid_price) / best.bid_price * 10_000
        self.spreads[message.code] = spread_bps
        if spread_bps > self.settings.max_spread_bps:
            self.alerts += 1
            log.warning("%s spread %.2f bps", message.code, spread_bps)

    async def on_connection_state(self, event: ConnectionEvent) -> None:
        if event.state == "gap":
            self.spreads.clear()  # stale until the next book arrives


# The monitors this plugin made, for inspection (the bus keeps them alive while it runs).
monitors: list[SpreadMonitor] = []


@upbus.hookimpl
def upbus_components(settings: upbus.Settings) -> list[tuple[object, Any]]:
    section = settings.plugin_section("spread_monitor", SpreadSettings)
    if not section.enabled:
        return []
    monitor = SpreadMonitor(section)
    monitors.append(monitor)
    return [(monitor, monitor.specs())]


@upbus.hookimpl
def upbus_shutdown(bus: Any) -> None:
    monitors.clear()
