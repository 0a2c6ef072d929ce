"""The ``upbus`` command group and what every command shares: settings, signals, errors."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import click

import upbus
from upbus.core._errors import UpbusError
from upbus.settings import Settings, load_settings


def run_until_signal(func: Callable[[], Awaitable[None]]) -> None:
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


async def embedded_simulator(stack: AsyncExitStack, settings: Settings) -> Settings:
    """Start a local simulator in ``stack``; return ``settings`` pointing at it.

    It serves the markets of the configured region.
    """
    from upbus.sim import SimConfig, Simulator

    exchange = await stack.enter_async_context(Simulator(SimConfig(region=settings.region)))
    return settings.model_copy(
        update={"public_url": exchange.public_url, "private_url": exchange.private_url}
    )


def settings_from(**overrides: Any) -> Settings:
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


def quiet_unless_verbose() -> None:
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
