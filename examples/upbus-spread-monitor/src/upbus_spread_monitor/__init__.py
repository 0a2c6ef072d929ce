"""An upbus plugin: watch the bid/ask spread of order books.

upbus finds this module through the ``upbus`` entry point declared in this
distribution's ``pyproject.toml`` and calls its hook implementations.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, Field

import upbus
from upbus.plugin import ConnectionEvent, Message, Orderbook, Overflow

log = logging.getLogger("upbus_spread_monitor")


class SpreadSettings(BaseModel):
    """The plugin's own settings section, ``plugins.spread_monitor``."""

    enabled: bool = False
    codes: list[str] = Field(default_factory=lambda: ["KRW-BTC"])
    max_spread_bps: float = Field(default=5.0, gt=0)


class SpreadMonitor:
    """A component: the bus calls ``on_message`` with each order book it asked for."""

    # A monitor wants the newest book, not every book: let the bus conflate.
    upbus_overflow: Overflow = "conflate"

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


# Called once per bus: each bus gets its own monitor, keeps it alive while it runs
# and drops it when it stops, so the plugin keeps no state of its own.
@upbus.hookimpl
def upbus_components(settings: upbus.Settings) -> list[tuple[object, Any]]:
    section = settings.plugin_section("spread_monitor", SpreadSettings)
    if not section.enabled:
        return []
    monitor = SpreadMonitor(section)
    return [(monitor, monitor.specs())]
