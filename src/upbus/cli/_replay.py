"""``upbus replay``: feed a recording back through the bus and print it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import click
import orjson
from pydantic import SecretStr

from upbus.cli._app import main, quiet_unless_verbose, run_until_signal, settings_from
from upbus.cli._printer import Printer
from upbus.core._bus import Bus
from upbus.core.subscriptions._specs import Spec


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--speed",
    default="max",
    show_default=True,
    help="Playback speed: 1 = as recorded, 2 = twice as fast, max (or 0) = as fast as possible.",
)
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many messages.")
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table")
def replay(path: Path, speed: str, count: int | None, fmt: str) -> None:
    """Feed a recording back through the bus and print it.

    The recording is a JSON Lines file or an SQLite store.
    """
    quiet_unless_verbose()
    pace = _speed(speed)
    specs, total = _recording_specs(path)
    if not total:
        raise click.ClickException(f"{path} holds no recorded messages")
    limit = min(total, count) if count is not None else total
    settings = settings_from()
    # Replaying must not record the replay (into the very store being replayed,
    # perhaps), and private messages in it need no real keys: nothing connects.
    quiet = {name: {"enabled": False} for name in ("sqlite", "jsonl", "console")}
    settings = settings.model_copy(
        update={
            "plugins": {
                **settings.plugins,
                **quiet,
                "replay": {"path": str(path), "speed": pace},
            },
            "heartbeat_interval": 3600.0,  # a recording answers no pings worth waiting for
            "access_key": settings.access_key or SecretStr("replay"),
            "secret_key": settings.secret_key or SecretStr("replay"),
        }
    )

    async def body() -> None:
        # The replay transport only pretends to connect: its connection events say
        # nothing true about a connection, so they are not printed.
        printer = Printer(fmt, limit, connection_events=False)
        async with Bus(settings) as bus:
            subscriber = await bus.register_component(printer, specs, overflow="block")
            async for item in subscriber:
                if printer.show(item):
                    return

    run_until_signal(body)


def _speed(text: str) -> float | None:
    if text in ("max", "0"):  # 0 spells "as fast as possible" in the setting too
        return None
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a number or 'max'", param_hint="--speed"
        ) from None
    if value <= 0:
        raise click.BadParameter("must be greater than 0, or 'max'", param_hint="--speed")
    return value


def _recording_specs(path: Path) -> tuple[list[Spec], int]:
    """Specs that cover every (type, code) in the recording, and how many messages it holds."""
    from upbus.plugins.replay import read_recording

    codes: dict[str, set[str]] = {}
    total = 0
    try:
        for _received_at, frame in read_recording(path):
            message = orjson.loads(frame)
            codes.setdefault(message["type"], set()).add(message.get("code", ""))
            total += 1
    except (OSError, ValueError, sqlite3.Error) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None
    specs = [
        Spec(kind, () if kind == "myAsset" else tuple(sorted(c for c in found if c)))
        for kind, found in sorted(codes.items())
    ]
    return specs, total
