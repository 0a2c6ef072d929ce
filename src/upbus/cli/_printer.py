"""A component that prints what it receives, one line per message."""

from __future__ import annotations

import click
import orjson

from upbus.core.delivery._buffer import Subscriber
from upbus.core.delivery._events import BusEvent, ConnectionEvent
from upbus.core.wire._codec import to_default_dict
from upbus.core.wire._messages import Message, Orderbook, Ticker, Trade


class Printer:
    """A component that prints what it receives."""

    def __init__(
        self,
        fmt: str,
        count: int | None = None,
        label: str = "",
        *,
        connection_events: bool = True,
    ) -> None:
        self.fmt = fmt
        self.connection_events = connection_events
        self.left = count
        self.prefix = f"{label:<6}| " if label else ""

    async def drive(self, subscriber: Subscriber) -> None:
        async for item in subscriber:
            self.show(item)

    def show(self, item: Message | BusEvent) -> bool:
        """Print ``item``; return whether the count is reached."""
        if isinstance(item, ConnectionEvent):
            if not self.connection_events:
                return False
            click.echo(f"-- {item.channel} {item.state}: {item.detail}", err=True)
            return False
        if isinstance(item, BusEvent):
            click.echo(f"-- {item}", err=True)
            return False
        if self.fmt == "json":
            click.echo(orjson.dumps(to_default_dict(item)).decode())
        else:
            click.echo(self.prefix + table_line(item))
        if self.left is not None:
            self.left -= 1
            return self.left <= 0
        return False


def table_line(message: Message) -> str:
    if isinstance(message, Ticker):
        return (
            f"{message.type:<9} {message.code:<10} {message.trade_price:>16,.2f} "
            f"{message.signed_change_rate * 100:+7.2f}%  vol {message.acc_trade_volume_24h:,.3f}"
        )
    if isinstance(message, Trade):
        return (
            f"{message.type:<9} {message.code:<10} {message.trade_price:>16,.2f} "
            f"{message.ask_bid:<4} {message.trade_volume:.8f}"
        )
    if isinstance(message, Orderbook):
        best = message.orderbook_units[0] if message.orderbook_units else None
        if best is None:
            return f"{message.type:<9} {message.code:<10} (empty)"
        return (
            f"{message.type:<9} {message.code:<10} bid {best.bid_price:>14,.2f} "
            f"ask {best.ask_price:>14,.2f}  ({len(message.orderbook_units)} units)"
        )
    return f"{message.type:<9} {message.code:<10} {message.stream_type}"
