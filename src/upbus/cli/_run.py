"""``upbus run``: the main job, the configured plugins on a bus until stopped."""

from __future__ import annotations

import math
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click

from upbus.cli._app import embedded_simulator, main, run_until_signal, settings_from
from upbus.cli._live import Rates, bus_view, show_live, status_line, wants_live
from upbus.cli._otel import otel_option
from upbus.core._bus import Bus
from upbus.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from upbus.plugins.jsonl_recorder import JsonlRecorder
    from upbus.plugins.postgres_store import PostgresStore
    from upbus.plugins.sqlite_store import SqliteStore


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
    help="Seconds between status lines (printed without a terminal, or with --plain).",
)
@click.option("--plain", is_flag=True, help="Status lines instead of the live view on a terminal.")
@otel_option
def run(
    url: str | None,
    use_sim: bool,
    db: Path | None,
    no_store: bool,
    seconds: float | None,
    status_every: float,
    plain: bool,
    tracer_provider: TracerProvider | None,
) -> None:
    """The main job: the configured plugins on a bus, until stopped.

    SIGINT or SIGTERM stops it. SQLite storage is on unless --no-store; every
    enabled recorder (SQLite, JSON Lines, PostgreSQL) writes everything it accepted
    before the command exits, on a signal too. On a terminal a live view shows the
    connections, message rates, rate limits and what was stored.
    """
    from upbus.plugins.jsonl_recorder import recorder_for
    from upbus.plugins.postgres_store import store_for as postgres_store_for
    from upbus.plugins.sqlite_store import store_for

    base = settings_from(public_url=url)

    async def body() -> None:
        recorders: list[SqliteStore | JsonlRecorder | PostgresStore] = []
        try:
            async with AsyncExitStack() as stack:
                settings = await embedded_simulator(stack, base) if use_sim else base
                settings = _with_store(settings, db, enabled=not no_store)
                bus = await stack.enter_async_context(
                    Bus(settings, tracer_provider=tracer_provider)
                )
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
                rates = Rates()
                with anyio.move_on_after(seconds if seconds is not None else math.inf):
                    if wants_live(plain):
                        # Redrawn until the run is stopped.
                        await show_live(lambda: bus_view(bus, recorders, rates=rates))
                    else:
                        rates.observe(bus.get_connection_metrics())  # the first rate's start
                        while True:
                            await anyio.sleep(status_every)
                            click.echo(status_line(bus, rates), err=True)
        finally:
            # The bus flushed the recorders as it closed (on a signal too); report each.
            for recorder in recorders:
                stats = recorder.stats()
                click.echo(
                    f"stored {stats['written']} of {stats['accepted']} accepted messages "
                    f"in {recorder.path}"
                )

    run_until_signal(body)


def _with_store(settings: Settings, path: Path | None, *, enabled: bool) -> Settings:
    section = dict(settings.plugins.get("sqlite", {}))
    section["enabled"] = enabled
    if path is not None:
        section["path"] = str(path)
    section.setdefault("path", "upbus.db")
    return settings.model_copy(update={"plugins": {**settings.plugins, "sqlite": section}})
