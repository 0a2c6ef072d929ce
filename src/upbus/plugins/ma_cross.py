"""Example strategy (plugin ``ma_cross``): a moving-average cross on live tickers.

Enabled by settings; with ``plugins.ma_cross.enabled`` false it contributes nothing::

    [plugins.ma_cross]
    enabled = true
    code = "KRW-BTC"
    fast = 5      # ticks in the fast average
    slow = 20     # ticks in the slow average; more than fast

BUY when the average of the last ``fast`` ticker prices crosses above the average
of the last ``slow``, SELL when it crosses below. Signals are printed, logged on
``upbus.plugins.ma_cross`` and kept in :attr:`MaCross.signals`. It shows the
strategy API, and is not advice.

The strategy API, end to end:

- a component is any object with ``async def on_message(self, message)``; the bus
  calls it with each message the component subscribed to (here
  ``upbus.ticker(code)``), narrowed to a typed message (:class:`upbus.Ticker` here);
- ``on_connection_state(event)``, if defined, gets the channel's ``connected``,
  ``gap`` and ``reconnected`` events in order with the data;
- ``upbus_overflow`` / ``upbus_capacity`` declare what the bus does when the
  component falls behind;
- register it with ``await bus.register_component(strategy, strategy.specs)`` and
  keep a reference: the bus holds components weakly. A plugin contributes it
  through ``upbus_components`` instead, as this one does; the bus then keeps it.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Self, TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from upbus import OptionError, Settings, Spec, ticker
from upbus.plugin import ConnectionEvent, Message, Overflow, Ticker, hookimpl

__all__ = ("MaCross", "MaCrossSettings", "Signal")

log = logging.getLogger("upbus.plugins.ma_cross")

NAME = "ma_cross"


class MaCrossSettings(BaseModel):
    """The ``plugins.ma_cross`` section."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Run the example strategy.")
    code: str = Field(default="KRW-BTC", description="The market to trade.")
    fast: int = Field(default=5, ge=1, description="Ticks in the fast average.")
    slow: int = Field(default=20, ge=2, description="Ticks in the slow average.")

    @field_validator("code")
    @classmethod
    def _market_code(cls, value: str) -> str:
        ticker(value)  # raises SpecError (a ValueError) for a malformed code
        return value

    @model_validator(mode="after")
    def _fast_below_slow(self) -> Self:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be less than slow ({self.slow})")
        return self


@dataclass(frozen=True, slots=True)
class Signal:
    """One cross: ``BUY`` (fast crossed above slow) or ``SELL``, at the ticker's price and time."""

    side: Literal["BUY", "SELL"]
    code: str
    price: float
    timestamp: int
    fast: float
    slow: float


class MaCross:
    """Signals when the fast moving average of ``code``'s ticker price crosses the slow one.

    :param out: where signal lines go; default ``sys.stdout`` at the time of printing.
    """

    # Every tick moves the averages, so conflating ticks would skew them; dropping
    # the oldest when far behind, unlike blocking, never holds back other consumers.
    upbus_overflow: Overflow = "drop_oldest"
    upbus_capacity = 4096

    def __init__(self, code: str, fast: int = 5, slow: int = 20, *, out: TextIO | None = None):
        if not 1 <= fast < slow:
            raise OptionError(f"need 1 <= fast < slow, got fast={fast}, slow={slow}")
        self.code = code
        self.signals: list[Signal] = []
        self.resets = 0
        self._out = out
        self._slow_size = slow
        self._fast: deque[float] = deque(maxlen=fast)
        self._slow: deque[float] = deque(maxlen=slow)
        self._above: bool | None = None  # fast above slow at the last tick; None: not known

    @property
    def specs(self) -> list[Spec]:
        """What to register the strategy for."""
        return [ticker(self.code)]

    async def on_message(self, message: Message) -> None:
        if not isinstance(message, Ticker) or message.code != self.code:
            return
        price = message.trade_price
        self._fast.append(price)
        self._slow.append(price)
        if len(self._slow) < self._slow_size:
            return
        fast = sum(self._fast) / len(self._fast)
        slow = sum(self._slow) / len(self._slow)
        if fast == slow:
            return  # touching is not crossing
        above = fast > slow
        if self._above is not None and above != self._above:
            side: Literal["BUY", "SELL"] = "BUY" if above else "SELL"
            self._emit(Signal(side, self.code, price, message.timestamp, fast, slow))
        self._above = above

    async def on_connection_state(self, event: ConnectionEvent) -> None:
        # Ticks missed during an outage are gone for good. Averages spanning the hole
        # would mix prices from before and after it, and a "cross" between them could
        # be an artefact of the outage rather than a move of the market: start over.
        if event.state == "gap":
            self.reset()

    def reset(self) -> None:
        """Forget every tick: the next signal needs ``slow`` fresh ticks first."""
        self._fast.clear()
        self._slow.clear()
        self._above = None
        self.resets += 1

    def _emit(self, signal: Signal) -> None:
        self.signals.append(signal)
        when = datetime.fromtimestamp(signal.timestamp / 1000).strftime("%H:%M:%S")
        line = (
            f"{when} ma_cross {signal.code} {signal.side} at {signal.price:,.10g}"
            f" (fast {signal.fast:,.2f}, slow {signal.slow:,.2f})"
        )
        log.info("%s", line)
        print(line, file=self._out or sys.stdout, flush=True)


# One strategy per bus; the bus keeps it alive while it runs, and it holds nothing to close.
@hookimpl
def upbus_components(settings: Settings) -> list[tuple[object, Any]]:
    config = settings.plugin_section(NAME, MaCrossSettings)
    if not config.enabled:
        return []
    strategy = MaCross(config.code, config.fast, config.slow)
    return [(strategy, strategy.specs)]
