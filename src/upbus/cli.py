"""The ``upbus`` command."""

from __future__ import annotations

import logging
import math
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import click
import orjson
from pydantic import SecretStr

import upbus
from upbus.core._bus import Bus
from upbus.core._errors import UpbusError
from upbus.core.delivery._buffer import Subscriber
from upbus.core.delivery._events import BusEvent, ConnectionEvent
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import CANDLE_UNITS, Spec, parse_specs
from upbus.core.wire._codec import to_default_dict
from upbus.core.wire._messages import Message, Orderbook, Ticker, Trade
from upbus.settings import Settings, explain_settings, load_settings

if TYPE_CHECKING:
    from upbus.plugins.jsonl_recorder import JsonlRecorder
    from upbus.plugins.postgres_store import PostgresStore
    from upbus.plugins.sqlite_store import SqliteStore

__all__ = ("main",)


def _run(func: Callable[[], Awaitable[None]]) -> None:
    """Run ``func`` until it returns or SIGINT/SIGTERM arrives; errors become one line."""

    async def guarded() -> None:
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as work:
                # The watcher stays outside the work's scope: a second signal while
                # the work shuts down (a double Ctrl-C) must not kill the flush.
                tg.start_soon(_stop_on_signal, work)
                await func()
            tg.cancel_scope.cancel()

    try:
        anyio.run(guarded)
    except UpbusError as exc:
        raise click.ClickException(str(exc)) from None
    except click.ClickException:
        raise
    except BaseExceptionGroup as group:
        # The bus's tasks fail inside task groups; the user needs the one line.
        error = _first_user_error(group)
        if error is None:
            raise
        if isinstance(error, click.ClickException):
            raise error from None
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        pass


def _first_user_error(
    group: BaseExceptionGroup[BaseException],
) -> UpbusError | click.ClickException | None:
    for exc in group.exceptions:
        if isinstance(exc, UpbusError | click.ClickException):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_user_error(exc)
            if found is not None:
                return found
    return None


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _signum in signals:
            click.echo(
                "upbus: already stopping (SIGKILL aborts without writing)"
                if scope.cancel_called
                else "upbus: stopping",
                err=True,
            )
            scope.cancel()


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except UpbusError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(invoke_without_command=True)
@click.version_option(upbus.__version__, prog_name="upbus")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """One merged, rate-limited set of Upbit subscriptions for many components.

    Run a command with --help for its options.
    """
    if ctx.invoked_subcommand is None:
        # Alone, the command shows what it can do: that is not an error.
        click.echo(ctx.get_help())
        ctx.exit(0)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"verbose": verbose}


def _quiet_unless_verbose() -> None:
    """Commands whose output is data keep the library's warnings off the terminal."""
    ctx = click.get_current_context()
    if not (ctx.obj or {}).get("verbose"):
        logging.getLogger("upbus").setLevel(logging.ERROR)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def sim(ctx: click.Context) -> None:
    """Run the local Upbit simulator (its options: upbus sim --help)."""
    from upbus.sim import run_cli

    sys.exit(run_cli(ctx.args))


@main.command()
def config() -> None:
    """Show the effective settings and their sources.

    Each setting is shown with its value and where the value came from; secrets are
    masked.
    """
    settings = _settings()
    rows = explain_settings(settings)
    width = max(len(name) for name, _value, _source in rows)
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value}  [{source}]")


@main.command()
def plugins() -> None:
    """List the discovered plugins and their state.

    Each plugin is shown with its state, distribution, module and hooks.
    """
    manager = PluginManager.load(_settings())
    for info in manager.report():
        where = f"{info.distribution} {info.version}" if info.distribution else "-"
        line = f"{info.name:<12} {info.state:<9} {where:<20} {info.module}"
        if info.hooks:
            line += f"  hooks: {', '.join(info.hooks)}"
        if info.error:
            line += f"\n{'':<12} error: {info.error}"
        click.echo(line)


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
@click.option("--count", type=click.IntRange(min=1), help="Exit 0 after this many messages.")
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table")
@click.option(
    "--attempts",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Give up after this many failed connects in a row.",
)
def watch(
    kind: str, codes: tuple[str, ...], url: str | None, count: int | None, fmt: str, attempts: int
) -> None:
    """Print live messages of TYPE for CODES.

    With --format json, each message is one object per line with the exchange's
    DEFAULT field names.
    """
    _quiet_unless_verbose()
    specs = _watch_specs(kind, codes)
    settings = _settings(public_url=url)
    settings = settings.model_copy(
        update={"reconnect": settings.reconnect.model_copy(update={"max_attempts": attempts})}
    )

    async def body() -> None:
        watcher = _Printer(fmt, count)
        async with Bus(settings) as bus:
            subscriber = await bus.register_component(watcher, specs, overflow="block")
            async for item in subscriber:
                if watcher.show(item):
                    return

    _run(body)


@main.command()
@click.option(
    "--seconds", type=float, help="Stop after this many seconds (default: run until Ctrl-C)."
)
@click.option("--rate", type=float, default=20.0, show_default=True, help="Simulator messages/s.")
def demo(seconds: float | None, rate: float) -> None:
    """Watch a few components share one subscription.

    The simulator runs in the same process.
    """
    from upbus.sim import SimConfig, Simulator

    async def body() -> None:
        async with (
            Simulator(SimConfig(rate=rate)) as exchange,
            Bus(_settings(public_url=exchange.public_url, private_url=exchange.private_url)) as bus,
        ):
            click.echo(f"simulator at {exchange.public_url}; press Ctrl-C to stop")
            # Three components whose wishes overlap: one merged request serves them all.
            wishes = [
                [upbus.ticker("KRW-BTC", "KRW-ETH", "KRW-XRP")],
                [upbus.orderbook("KRW-BTC", depth=5)],
                [upbus.trade("KRW-BTC"), upbus.ticker("KRW-BTC")],
            ]
            printers = [_Printer("table", label=name) for name in ("chart", "book", "tape")]
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

    _run(body)


@main.command()
@click.option("--url", help="Public WebSocket URL (default: the setting public_url).")
@click.option("--sim", "use_sim", is_flag=True, help="Run against an embedded local simulator.")
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Record into this SQLite file (default: the setting plugins.sqlite.path, upbus.db).",
)
@click.option("--no-store", is_flag=True, help="Do not record into SQLite.")
@click.option(
    "--seconds", type=float, help="Stop after this many seconds (default: until stopped)."
)
@click.option(
    "--status-every",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds between status lines.",
)
def run(
    url: str | None,
    use_sim: bool,
    db: Path | None,
    no_store: bool,
    seconds: float | None,
    status_every: float,
) -> None:
    """The main job: the configured plugins on a bus, until stopped.

    SIGINT or SIGTERM stops it. SQLite storage is on unless --no-store; every
    enabled recorder (SQLite, JSON Lines, PostgreSQL) writes everything it accepted
    before the command exits, on a signal too.
    """
    from upbus.plugins.jsonl_recorder import recorder_for
    from upbus.plugins.postgres_store import store_for as postgres_store_for
    from upbus.plugins.sqlite_store import store_for

    base = _settings(public_url=url)

    async def body() -> None:
        recorders: list[SqliteStore | JsonlRecorder | PostgresStore] = []
        try:
            async with AsyncExitStack() as stack:
                settings = base
                if use_sim:
                    from upbus.sim import SimConfig, Simulator

                    exchange = await stack.enter_async_context(Simulator(SimConfig()))
                    settings = settings.model_copy(
                        update={
                            "public_url": exchange.public_url,
                            "private_url": exchange.private_url,
                        }
                    )
                settings = _with_store(settings, db, enabled=not no_store)
                bus = await stack.enter_async_context(Bus(settings))
                store = store_for(bus)
                if store is None and not no_store:
                    raise click.ClickException(
                        "the SQLite store did not start (see the error above); "
                        "fix plugins.sqlite or run with --no-store"
                    )
                # Every recorder that runs on this bus: the stores and the JSON Lines file.
                running = (store, recorder_for(bus), postgres_store_for(bus))
                recorders.extend(r for r in running if r is not None)
                where = (
                    "recording into " + " and ".join(str(r.path) for r in recorders)
                    if recorders
                    else "not recording"
                )
                click.echo(f"upbus running against {settings.public_url}, {where}; Ctrl-C stops")
                with anyio.move_on_after(seconds if seconds is not None else math.inf):
                    while True:
                        await anyio.sleep(status_every)
                        click.echo(_status_line(bus), err=True)
        finally:
            # The bus flushed the recorders as it closed (on a signal too); report each.
            for recorder in recorders:
                stats = recorder.stats()
                click.echo(
                    f"stored {stats['written']} of {stats['accepted']} accepted messages "
                    f"in {recorder.path}"
                )

    _run(body)


def _with_store(settings: Settings, path: Path | None, *, enabled: bool) -> Settings:
    section = dict(settings.plugins.get("sqlite", {}))
    section["enabled"] = enabled
    if path is not None:
        section["path"] = str(path)
    section.setdefault("path", "upbus.db")
    return settings.model_copy(update={"plugins": {**settings.plugins, "sqlite": section}})


_DOING = {
    "connecting": "connecting",
    "backoff": "backing off",
    "gap": "disconnected",
    "reconnected": "connected",
    "closed": "closed",
}


def _status_line(bus: Bus) -> str:
    """What each channel is doing; channels that never tried to connect are left out."""
    parts = [
        _channel_status(channel, m)
        for channel, m in bus.get_connection_metrics().items()
        if m["state"] != "idle" or m["connects"] or m["connect_failures"]
    ]
    return "; ".join(parts) or "waiting for subscriptions"


def _channel_status(channel: str, m: dict[str, Any]) -> str:
    line = (
        f"{channel}: {_DOING.get(m['state'], m['state'])}, "
        f"{m['messages_in']} messages, {m['reconnects']} reconnects"
    )
    if m["state"] not in ("connected", "reconnected") and m["connect_failures"]:
        line += f", {m['connect_failures']} failed connects (last: {m['last_error']})"
    return line


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
    _quiet_unless_verbose()
    pace = _speed(speed)
    specs, total = _recording_specs(path)
    if not total:
        raise click.ClickException(f"{path} holds no recorded messages")
    limit = min(total, count) if count is not None else total
    settings = _settings()
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
        printer = _Printer(fmt, limit, connection_events=False)
        async with Bus(settings) as bus:
            subscriber = await bus.register_component(printer, specs, overflow="block")
            async for item in subscriber:
                if printer.show(item):
                    return

    _run(body)


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


@main.command()
@click.argument("path", default="upbus.db")
@click.option(
    "--schema",
    default="upbus",
    show_default=True,
    help="The schema of a PostgreSQL store.",
)
def db(path: str, schema: str) -> None:
    """Summarise an SQLite or PostgreSQL store.

    Rows per table and code, and the first and last exchange times. PATH is a file
    (default upbus.db) or a postgresql:// URL (the postgres plugin's dsn).
    """
    summary: dict[str, Any]
    if path.startswith(("postgresql://", "postgres://")):
        try:
            from upbus.plugins.postgres_store import summarize as summarize_postgres
        except ImportError:
            raise click.ClickException(
                "PostgreSQL needs the postgres extra: pip install 'upbus[postgres]'"
            ) from None
        import psycopg

        try:
            summary = summarize_postgres(path, schema)
        except (OSError, ValueError, psycopg.Error) as exc:
            raise click.ClickException(str(exc)) from None
        path = summary["path"]
    else:
        from upbus.plugins.sqlite_store import summarize

        if not Path(path).is_file():
            raise click.BadParameter(f"file {path!r} does not exist", param_hint="PATH")
        try:
            summary = summarize(path)
        except sqlite3.Error as exc:
            raise click.ClickException(f"cannot read {path}: {exc}") from None
    if not summary["tables"]:
        click.echo(f"{path}: no upbus tables")
        return
    for table, info in summary["tables"].items():
        click.echo(f"{table}: {info['rows']} rows")
        for code, per_code in info["codes"].items():
            click.echo(
                f"  {code:<12} {per_code['rows']:>8} rows  "
                f"{_ms(per_code['first_timestamp'])} .. {_ms(per_code['last_timestamp'])}"
            )


def _ms(value: int | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


class _Printer:
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
            click.echo(self.prefix + _table_line(item))
        if self.left is not None:
            self.left -= 1
            return self.left <= 0
        return False


def _table_line(message: Message) -> str:
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
