"""``upbus config``, ``upbus plugins`` and ``upbus db``: what is set, installed and stored."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from upbus.cli._app import main, settings_from
from upbus.core.hooks._manager import PluginManager
from upbus.settings import explain_settings


@main.command()
def config() -> None:
    """Show the effective settings and their sources.

    Each setting is shown with its value and where the value came from; secrets are
    masked.
    """
    settings = settings_from()
    rows = explain_settings(settings)
    width = max(len(name) for name, _value, _source in rows)
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value}  [{source}]")


@main.command()
def plugins() -> None:
    """List the discovered plugins and their state.

    Each plugin is shown with its state, distribution, module and hooks.
    """
    report = PluginManager.load(settings_from()).report()
    wheres = [f"{i.distribution} {i.version}" if i.distribution else "-" for i in report]
    # Third-party names and distributions can be of any length: size to the longest.
    name_width = max((len(info.name) for info in report), default=0)
    state_width = max((len(info.state) for info in report), default=0)
    where_width = max((len(where) for where in wheres), default=0)
    for info, where in zip(report, wheres, strict=True):
        line = (
            f"{info.name:<{name_width}}  {info.state:<{state_width}}  "
            f"{where:<{where_width}}  {info.module}"
        )
        if info.hooks:
            line += f"  hooks: {', '.join(info.hooks)}"
        if info.error:
            line += f"\n{'':<{name_width}}  error: {info.error}"
        click.echo(line)


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
