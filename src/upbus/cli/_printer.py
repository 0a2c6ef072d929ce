"""Components that show what they receive: one line per message, or a table of the latest."""

from __future__ import annotations

from datetime import datetime

import click
import orjson
from rich.table import Table
from rich.text import Text

from upbus.core.delivery._events import BusEvent, ConnectionEvent
from upbus.core.wire._codec import to_default_dict
from upbus.core.wire._messages import (
    Candle,
    Message,
    MyAsset,
    MyOrder,
    Orderbook,
    Ticker,
    Trade,
)


class Printer:
    """A component that prints what it receives."""

    def __init__(
        self,
        fmt: str,
        count: int | None = None,
        *,
        connection_events: bool = True,
    ) -> None:
        self.fmt = fmt
        self.connection_events = connection_events
        self.left = count

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
            click.echo(table_line(item))
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
    if isinstance(message, MyOrder):
        # What a trader checks first: which order, its state, side, price and fill.
        return (
            f"{message.type:<9} {message.code:<10} {message.state:<7} {message.ask_bid:<4}"
            f"{_number(message.price):>16} x {_number(message.volume)}"
            f"  executed {_number(message.executed_volume)}  {message.uuid[:8]}"
        )
    if isinstance(message, MyAsset):
        held = ", ".join(f"{a.currency} {a.balance} ({a.locked} locked)" for a in message.assets)
        return f"{message.type:<9} {held}"
    return f"{message.type:<9} {message.code:<10} {message.stream_type}"


def _number(value: float | None) -> str:
    # A private event may carry null volumes (a market buy waiting has none).
    return "-" if value is None else f"{value:,.8g}"


class Board:
    """A component that keeps the latest message per code, shown as a table (``__rich__``).

    ``upbus watch --format table`` draws it in place on a terminal; ``show`` takes the
    same items as :meth:`Printer.show` and counts the same way.
    """

    def __init__(self, kind: str, count: int | None = None) -> None:
        self.kind = kind
        self.left = count
        self.total = 0
        self.rows: dict[str, tuple[Message, int]] = {}
        self.status = "waiting for the connection"
        self.notes: list[str] = []

    def show(self, item: Message | BusEvent) -> bool:
        """Keep ``item``; return whether the count is reached."""
        if isinstance(item, ConnectionEvent):
            self.status = f"{item.channel} {item.state}: {item.detail}"
            return False
        if isinstance(item, BusEvent):
            self.notes = [*self.notes[-2:], str(item)]  # the latest few, not a growing log
            return False
        _, seen = self.rows.get(item.code, (item, 0))
        self.rows[item.code] = (item, seen + 1)
        self.total += 1
        if self.left is not None:
            self.left -= 1
            return self.left <= 0
        return False

    def __rich__(self) -> Table:
        table = Table(
            title=f"{self.kind}: {self.total:,} messages",
            title_justify="left",
            title_style="bold",
            caption="\n".join([self.status, *self.notes]),
            caption_justify="left",
        )
        rows = [(message, seen, _cells(message)) for message, seen in self.rows.values()]
        headers = rows[0][2] if rows else [("code", "", False)]
        for header, _value, number in headers:
            table.add_column(header, justify="right" if number else "left")
        table.add_column("time", justify="right")
        table.add_column("messages", justify="right")
        for message, seen, cells in sorted(rows, key=lambda row: row[0].code):
            table.add_row(*[value for _h, value, _n in cells], _clock(message), f"{seen:,}")
        if not rows:
            table.add_row(Text("nothing yet", style="dim"), "", "")
        return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.10g}"


def _clock(message: Message) -> str:
    return datetime.fromtimestamp(message.timestamp / 1000).strftime("%H:%M:%S.%f")[:-3]


def _cells(message: Message) -> list[tuple[str, str, bool]]:
    """(header, value, is a number) of the columns one message of its type fills."""
    code = ("code", message.code, False)
    if isinstance(message, Ticker):
        return [
            code,
            ("price", f"{message.trade_price:,.2f}", True),
            ("change", f"{message.signed_change_rate * 100:+.2f}%", True),
            ("volume 24h", f"{message.acc_trade_volume_24h:,.3f}", True),
        ]
    if isinstance(message, Trade):
        return [
            code,
            ("price", f"{message.trade_price:,.2f}", True),
            ("side", message.ask_bid, False),
            ("volume", f"{message.trade_volume:.8f}", True),
        ]
    if isinstance(message, Orderbook):
        best = message.orderbook_units[0] if message.orderbook_units else None
        bid, ask = (best.bid_price, best.ask_price) if best is not None else (None, None)
        return [
            code,
            ("bid", "-" if bid is None else f"{bid:,.2f}", True),
            ("ask", "-" if ask is None else f"{ask:,.2f}", True),
            ("units", str(len(message.orderbook_units)), True),
        ]
    if isinstance(message, Candle):
        return [
            code,
            ("candle (UTC)", message.candle_date_time_utc, False),
            ("open", _num(message.opening_price), True),
            ("high", _num(message.high_price), True),
            ("low", _num(message.low_price), True),
            ("close", _num(message.trade_price), True),
            ("volume", _num(message.candle_acc_trade_volume), True),
        ]
    if isinstance(message, MyOrder):
        return [
            code,
            ("side", message.ask_bid, False),
            ("order", message.order_type, False),
            ("state", message.state, False),
            ("price", _num(message.price), True),
            ("volume", _num(message.volume), True),
            ("left", _num(message.remaining_volume), True),
        ]
    if isinstance(message, MyAsset):
        assets = ", ".join(f"{a.currency} {a.balance}" for a in message.assets)
        return [("code", message.code or "-", False), ("assets", assets, False)]
    return [code, ("stream", message.stream_type, False)]
