"""``upbus watch``: print live messages of one type."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import click

from upbus.cli._app import main, quiet_unless_verbose, run_until_signal, settings_from
from upbus.cli._live import show_live, wants_live
from upbus.cli._printer import Board, Printer
from upbus.core._bus import Bus
from upbus.core._errors import UpbusError
from upbus.core.subscriptions._specs import CANDLE_UNITS, Spec, parse_specs
from upbus.settings import Settings


def _watch_specs(kind: str, codes: tuple[str, ...]) -> list[Spec]:
    if kind.startswith("candle.") and kind.removeprefix("candle.") not in CANDLE_UNITS:
        raise click.BadParameter(f"unknown candle unit in {kind!r}", param_hint="TYPE")
    obj: dict[str, Any] = {"type": kind}
    if codes:
        obj["codes"] = list(codes)
    try:
        return parse_specs(obj)
    except UpbusError as exc:
        raise click.BadParameter(str(exc), param_hint="TYPE/CODES") from None


@main.command()
@click.argument("kind", metavar="TYPE")
@click.argument("codes", nargs=-1)
@click.option("--url", help="Public WebSocket URL (default: the setting public_url).")
@click.option(
    "--private-url",
    help="Private WebSocket URL, for myOrder and myAsset (default: the setting private_url).",
)
@click.option("--count", type=click.IntRange(min=1), help="Exit 0 after this many messages.")
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table")
@click.option(
    "--attempts",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Give up after this many failed connects in a row.",
)
@click.option("--plain", is_flag=True, help="With --format table: lines, also on a terminal.")
def watch(
    kind: str,
    codes: tuple[str, ...],
    url: str | None,
    private_url: str | None,
    count: int | None,
    fmt: str,
    attempts: int,
    plain: bool,
) -> None:
    """Print live messages of TYPE for CODES.

    With --format json, each message is one object per line with the exchange's
    DEFAULT field names. With --format table on a terminal, one row per code shows
    its latest message, redrawn in place.
    """
    quiet_unless_verbose()
    specs = _watch_specs(kind, codes)
    settings = settings_from(public_url=url, private_url=private_url)
    settings = settings.model_copy(
        update={"reconnect": settings.reconnect.model_copy(update={"max_attempts": attempts})}
    )

    async def body() -> None:
        if fmt == "table" and wants_live(plain):
            await _board(settings, kind, specs, count)
            return
        watcher = Printer(fmt, count)
        async with Bus(settings) as bus:
            subscriber = await bus.register_component(watcher, specs, overflow="block")
            async for item in subscriber:
                if watcher.show(item):
                    return

    run_until_signal(body)


async def _board(settings: Settings, kind: str, specs: list[Spec], count: int | None) -> None:
    board = Board(kind, count)
    async with Bus(settings) as bus, anyio.create_task_group() as tg:
        subscriber = await bus.register_component(board, specs, overflow="block")
        tg.start_soon(partial(show_live, lambda: board))
        async for item in subscriber:
            if board.show(item):
                break
        tg.cancel_scope.cancel()
