"""``upbus sim``: run the simulator until SIGINT or SIGTERM, then exit 0.

The first line of stdout is the public URL and the second the private URL, both
flushed at once, so a parent process can read the port chosen by ``--port 0``.

The options are parsed with :mod:`argparse` (``upbus sim`` passes its arguments
through), but the help and usage errors are laid out as the other ``upbus``
commands lay out theirs: ``Usage:``, an indented description, ``Options:`` with
each default shown as ``[default: …]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import signal
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import NoReturn

import anyio

from upbus.sim.config import AccountConfig, Rate, SimConfig
from upbus.sim.server import Simulator

__all__ = ("build_parser", "run_cli")

_PROG = "upbus sim"
_DEMO_BALANCES = {"KRW": Decimal(100_000_000), "BTC": Decimal(1)}
_DESCRIPTION = """\
  Run a local Upbit-compatible WebSocket exchange on 127.0.0.1 until stopped.

  The first line of output is the public URL and the second the private URL.
  SIGINT or SIGTERM stops it with status 0."""


def _rate(text: str) -> Rate:
    word = text.lower()
    if word == "max":
        return "max"
    if word == "flood":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: rate must be positive, 'max' or 'flood'")
    return value


def _timeout(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be positive, or 'none'")
    return value


def _account(text: str) -> AccountConfig:
    access_key, sep, secret_key = text.partition(":")
    if not sep or not access_key or not secret_key:
        raise argparse.ArgumentTypeError("expected ACCESS_KEY:SECRET_KEY")
    return AccountConfig(access_key, secret_key, dict(_DEMO_BALANCES))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """``Usage: upbus sim [OPTIONS]`` and an ``Options:`` section, as the other commands."""

    def __init__(self, prog: str) -> None:
        width = min(shutil.get_terminal_size().columns, 80)
        super().__init__(prog, max_help_position=36, width=width)

    def add_usage(
        self,
        usage: str | None,
        actions: Sequence[argparse.Action] | object,
        groups: object,
        prefix: str | None = None,
    ) -> None:
        super().add_usage(usage, actions, groups, "Usage: ")  # type: ignore[arg-type]

    def _split_lines(self, text: str, width: int) -> list[str]:
        # "[default: …]" is never broken: after the text if it fits, else on its own line.
        text, sep, default = text.partition("  [default: ")
        lines = super()._split_lines(text, width)
        if sep:
            default = "[default: " + default
            if len(lines[-1]) + 2 + len(default) <= width:
                lines[-1] += "  " + default
            else:
                lines.append(default)
        return lines


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # The layout of a usage error of the other upbus commands.
        self.print_usage(sys.stderr)
        sys.stderr.write(f"Try '{_PROG} --help' for help.\n\nError: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of the simulator."""
    parser = _Parser(
        prog=_PROG,
        usage=f"{_PROG} [OPTIONS]",
        description=_DESCRIPTION,
        formatter_class=_Formatter,
        add_help=False,
    )
    options = parser.add_argument_group("Options")
    options.add_argument(
        "--port",
        type=int,
        default=0,
        metavar="INTEGER",
        help="TCP port on 127.0.0.1; 0 picks a free one.  [default: 0]",
    )
    options.add_argument(
        "--rate",
        type=_rate,
        default=50.0,
        metavar="RATE",
        help=(
            "Realtime messages/s per connection (a number > 0); 'flood': generate "
            "every message as fast as possible (about 2,000/s); 'max': repeat "
            "pre-encoded frames as fast as the socket takes them (for throughput "
            "tests).  [default: 50]"
        ),
    )
    options.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="INTEGER",
        help="Seed of the generated market data.  [default: 0]",
    )
    options.add_argument(
        "--idle-timeout",
        type=_timeout,
        default=120.0,
        metavar="SECONDS",
        help=(
            "Seconds without traffic before the server drops a socket, or 'none'.  [default: 120]"
        ),
    )
    options.add_argument(
        "--account",
        type=_account,
        action="append",
        default=[],
        metavar="ACCESS_KEY:SECRET_KEY",
        help=("A private-API account (repeatable), starting with 100,000,000 KRW and 1 BTC."),
    )
    options.add_argument("--help", action="help", help="Show this message and exit.")
    return parser


async def _serve(config: SimConfig) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Simulator(config) as sim:
            print(sim.public_url, flush=True)
            print(sim.private_url, flush=True)
            async for _signum in signals:
                break  # the simulator closes its sockets as it leaves


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, print the URLs and serve until SIGINT or SIGTERM; the exit status."""
    args = build_parser().parse_args(argv)
    config = SimConfig(
        port=args.port,
        rate=args.rate,
        seed=args.seed,
        idle_timeout=args.idle_timeout,
        accounts=tuple(args.account),
    )
    # A SIGINT that arrives before the signal receiver is installed is a stop too.
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_serve, config)
    return 0
