"""Console logger (plugin ``console``): a compact live view on stdout.

Enabled by settings; with ``plugins.console.enabled`` false it contributes nothing::

    [plugins.console]
    enabled = true
    specs = [{type = "ticker", codes = ["KRW-BTC"]}, {type = "trade", codes = ["KRW-BTC"]}]
    every = 1.0      # seconds between two lines of one (type, code); 0 prints every message

One line per message, for example::

    12:00:01.123 ticker    KRW-BTC    143,500,000 +1.25%  vol24h 2,345.6789
    12:00:01.130 trade     KRW-BTC    BID 143,500,000 x 0.0123

The view conflates (the bus keeps only the newest unprinted message per key),
which is what a live display wants.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field

from upbus import Settings
from upbus.plugin import (
    Candle,
    ConnectionEvent,
    Message,
    MyAsset,
    MyOrder,
    Orderbook,
    Overflow,
    Ticker,
    Trade,
    hookimpl,
)
from upbus.plugins.recording import SpecList

__all__ = ("ConsoleSettings", "ConsoleView", "format_line")

NAME = "console"


class ConsoleSettings(BaseModel):
    """The ``plugins.console`` section."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(default=False, description="Print a live view.")
    specs: SpecList = Field(
        default_factory=lambda: [{"type": "ticker", "codes": ["KRW-BTC"]}],
        description="What to show, as the exchange's request objects.",
    )
    every: float = Field(
        default=1.0, ge=0, description="Seconds between two lines of one (type, code)."
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.10g}"


def format_line(message: Message) -> str:
    """One compact line for ``message``, led by its exchange time (local clock)."""
    stamp = datetime.fromtimestamp(message.timestamp / 1000).strftime("%H:%M:%S.%f")[:-3]
    head = f"{stamp} {message.type:<9} {message.code:<10}"
    match message:
        case Ticker():
            return (
                f"{head} {_num(message.trade_price)} {message.signed_change_rate * 100:+.2f}%"
                f"  vol24h {message.acc_trade_volume_24h:,.4f}"
            )
        case Trade():
            price, volume = _num(message.trade_price), _num(message.trade_volume)
            return f"{head} {message.ask_bid} {price} x {volume}"
        case Orderbook():
            if not message.orderbook_units:
                return f"{head} (empty)"
            best = message.orderbook_units[0]
            return (
                f"{head} bid {_num(best.bid_price)} ({_num(best.bid_size)})"
                f"  ask {_num(best.ask_price)} ({_num(best.ask_size)})"
            )
        case Candle():
            return (
                f"{head} {message.candle_date_time_utc} O {_num(message.opening_price)}"
                f" H {_num(message.high_price)} L {_num(message.low_price)}"
                f" C {_num(message.trade_price)} V {_num(message.candle_acc_trade_volume)}"
            )
        case MyOrder():
            return (
                f"{head} {message.ask_bid} {message.order_type} {message.state}"
                f" price {_num(message.price)} volume {_num(message.volume)} {message.uuid[:8]}"
            )
        case MyAsset():
            assets = ", ".join(
                f"{a.currency} {a.balance} (locked {a.locked})" for a in message.assets
            )
            return f"{stamp} {message.type:<9} {assets}"
    raise TypeError(f"not a message: {message!r}")


class ConsoleView:
    """Prints :func:`format_line` for each message, at most one line per (type, code)
    every ``every`` seconds, and a line per connection event.

    :param out: where lines go; default ``sys.stdout`` at the time of printing.
    :param clock: seconds, for the ``every`` throttle.
    """

    upbus_overflow: Overflow = "conflate"

    def __init__(
        self,
        every: float = 1.0,
        *,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = every
        self._out = out
        self._clock = clock
        self._printed: dict[tuple[str, str], float] = {}
        self.skipped = 0

    async def on_message(self, message: Message) -> None:
        key = (message.type, message.code)
        now = self._clock()
        last = self._printed.get(key)
        if last is not None and now - last < self.every:
            self.skipped += 1
            return
        self._printed[key] = now
        self._print(format_line(message))

    async def on_connection_state(self, event: ConnectionEvent) -> None:
        self._print(f"-- {event.channel} {event.state}: {event.detail}")

    def _print(self, line: str) -> None:
        print(line, file=self._out or sys.stdout, flush=True)


# One view per bus; the bus keeps it alive while it runs, and it holds nothing to close.
@hookimpl
def upbus_components(settings: Settings) -> list[tuple[object, Any]]:
    config = settings.plugin_section(NAME, ConsoleSettings)
    if not config.enabled:
        return []
    return [(ConsoleView(config.every), config.specs)]
