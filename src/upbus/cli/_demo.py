"""``upbus demo``: a few components sharing one subscription, against the embedded simulator."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import click

import upbus
from upbus.cli._app import main, run_until_signal, settings_from
from upbus.cli._otel import otel_option
from upbus.cli._printer import Printer
from upbus.core._bus import Bus

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


@main.command()
@click.option(
    "--seconds", type=float, help="Stop after this many seconds (default: run until Ctrl-C)."
)
@click.option("--rate", type=float, default=20.0, show_default=True, help="Simulator messages/s.")
@otel_option
def demo(seconds: float | None, rate: float, tracer_provider: TracerProvider | None) -> None:
    """Watch a few components share one subscription.

    The simulator runs in the same process.
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
            printers = [Printer("table", label=name) for name in ("chart", "book", "tape")]
            async with anyio.create_task_group() as tg:
                for printer, specs in zip(printers, wishes, strict=True):
                    subscriber = await bus.register_component(printer, specs)
                    tg.start_soon(printer.drive, subscriber)
                with anyio.move_on_after(seconds if seconds is not None else float("inf")):
                    await anyio.sleep_forever()
                tg.cancel_scope.cancel()
            stats = bus.get_subscription_stats()
            click.echo(
                f"{stats['components']} components shared {stats['public']['entries']} entries "
                f"in {bus.get_pending_task_status()['public']['requests_sent']} request(s)"
            )

    run_until_signal(body)
