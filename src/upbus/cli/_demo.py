"""``upbus demo``: a few components sharing one subscription, against the embedded simulator."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import click
from rich.console import Console

import upbus
from upbus.cli._app import main, run_until_signal, settings_from
from upbus.cli._live import Named, Rates, bus_view, show_live, wants_live
from upbus.cli._otel import otel_option
from upbus.cli._printer import table_line
from upbus.core._bus import Bus
from upbus.core.delivery._events import BusEvent, ConnectionEvent
from upbus.core.wire._messages import Message, Orderbook, Ticker, Trade

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


@main.command()
@click.option(
    "--seconds", type=float, help="Stop after this many seconds (default: run until Ctrl-C)."
)
@click.option("--rate", type=float, default=20.0, show_default=True, help="Simulator messages/s.")
@click.option("--plain", is_flag=True, help="Print plain lines, also on a terminal.")
@otel_option
def demo(
    seconds: float | None, rate: float, plain: bool, tracer_provider: TracerProvider | None
) -> None:
    """Watch a few components share one subscription.

    The simulator runs in the same process. On a terminal the view is redrawn in
    place; otherwise (or with --plain) each message is one line. A summary follows.
    """
    from upbus.sim import SimConfig, Simulator

    async def body() -> None:
        async with (
            Simulator(SimConfig(rate=rate)) as exchange,
            Bus(
                settings_from(public_url=exchange.public_url, private_url=exchange.private_url),
                tracer_provider=tracer_provider,
            ) as bus,
        ):
            click.echo(f"simulator at {exchange.public_url}; press Ctrl-C to stop")
            # Three components whose wishes overlap: one merged request serves them all.
            wishes = [
                [upbus.ticker("KRW-BTC", "KRW-ETH", "KRW-XRP")],
                [upbus.orderbook("KRW-BTC", depth=5)],
                [upbus.trade("KRW-BTC"), upbus.ticker("KRW-BTC")],
            ]
            live = wants_live(plain)
            console = Console()
            # Above a live view, lines go through its console so the redraw keeps them.
            say: Callable[[str], None] = (
                (lambda line: console.print(line, markup=False, highlight=False))
                if live
                else (lambda line: click.echo(line, err=True))
            )
            announcer = _Announcer(say)
            components: dict[str, _Component] = {}
            for name, specs in zip(("chart", "book", "tape"), wishes, strict=True):
                component = _Component(name, announcer, say, echo=not live)
                subscriber = await bus.register_component(component, specs)
                components[subscriber.label] = component
            try:
                with anyio.move_on_after(seconds if seconds is not None else math.inf):
                    if live:
                        rates = Rates()
                        await show_live(
                            lambda: bus_view(
                                bus,
                                rates=rates,
                                components={k: c.named() for k, c in components.items()},
                            ),
                            console=console,
                        )
                    else:
                        await anyio.sleep_forever()
            finally:
                # Runs after Ctrl-C too; the components keep receiving until the bus
                # closes, so they stop printing first and the summary stays last.
                for component in components.values():
                    component.echo = False
                for line in _summary(bus, components):
                    click.echo(line)

    run_until_signal(body)


class _Announcer:
    """Says each channel's connection changes once, although every component hears them."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self._last: dict[str, ConnectionEvent] = {}

    def tell(self, event: ConnectionEvent) -> None:
        if self._last.get(event.channel) == event:
            return
        self._last[event.channel] = event
        self._say(f"-- {event.channel} {event.state}: {event.detail}")


class _Component:
    """A demo component: it counts what it receives and keeps the latest message."""

    def __init__(
        self, name: str, announcer: _Announcer, say: Callable[[str], None], *, echo: bool
    ) -> None:
        self.name = name
        self.echo = echo
        self.count = 0
        self.last: Message | None = None
        self._announcer = announcer
        self._say = say

    async def on_message(self, message: Message) -> None:
        self.count += 1
        self.last = message
        if self.echo:
            click.echo(f"{self.name:<6}| {table_line(message)}")

    async def on_event(self, event: BusEvent) -> None:
        if isinstance(event, ConnectionEvent):
            self._announcer.tell(event)
        else:
            self._say(f"-- {self.name}: {event}")

    def named(self) -> Named:
        return Named(self.name, "" if self.last is None else last_value(self.last))


def last_value(message: Message) -> str:
    """The latest price a message tells, short enough for a table cell."""
    head = f"{message.type} {message.code}"
    if isinstance(message, Ticker):
        return f"{head} {message.trade_price:,.2f}"
    if isinstance(message, Trade):
        return f"{head} {message.trade_price:,.2f} {message.ask_bid}"
    if isinstance(message, Orderbook) and message.orderbook_units:
        best = message.orderbook_units[0]
        return f"{head} {best.bid_price:,.2f} / {best.ask_price:,.2f}"
    return head


def _summary(bus: Bus, components: dict[str, _Component]) -> list[str]:
    stats = bus.get_subscription_stats()
    dropped = {s["subscriber"]: s["dropped"] for s in stats["subscribers"]}
    lines = [
        f"{c.name}: {c.count} messages, {dropped.get(label, 0)} dropped"
        + ("" if c.last is None else f", last {last_value(c.last)}")
        for label, c in components.items()
    ]
    for channel, m in bus.get_connection_metrics().items():
        if m["messages_in"]:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(m["messages_by_type"].items()))
            lines.append(f"{channel}: {m['messages_in']} messages received ({kinds})")
    lines.append(
        f"{stats['components']} components shared {stats['public']['entries']} entries "
        f"in {bus.get_pending_task_status()['public']['requests_sent']} request(s)"
    )
    return lines
