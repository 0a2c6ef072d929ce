"""``upbus sim``: run the simulator until SIGINT or SIGTERM, then exit 0.

The first line of stdout is the public URL and the second the private URL, both
flushed at once, so a parent process can read the port chosen by ``--port 0``. One
line per account follows (the default account's with its secret key, so ``upbus
watch myOrder`` can sign in), and with ``--orders`` one line per scripted order.

The options are parsed with :mod:`argparse` (``upbus sim`` passes its arguments
through), but the help and usage errors are laid out as the other ``upbus``
commands lay out theirs: ``Usage:``, an indented description, ``Options:`` with
each default shown as ``[default: …]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shutil
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

import anyio

from upbus.sim.config import AccountConfig, Rate, SimConfig
from upbus.sim.markets import REGIONS
from upbus.sim.server import Simulator
from upbus.sim.trader import run_orders

__all__ = ("DEFAULT_ACCOUNT", "build_parser", "run_cli")

_PROG = "upbus sim"
#: The account served when no --account is given; its keys are printed at startup.
DEFAULT_ACCOUNT = AccountConfig("sim-access-key", "sim-secret-key")
_DESCRIPTION = """\
  Run a local Upbit-compatible WebSocket exchange on 127.0.0.1 until stopped.

  The first line of output is the public URL and the second the private URL,
  then one line per account. SIGINT or SIGTERM stops it with status 0."""


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
    return AccountConfig(access_key, secret_key)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be positive")
    return value


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
        help=(
            "A private-API account (repeatable), starting with 100,000,000 KRW (100,000 "
            "SGD, 1,000,000,000 IDR or 2,500,000 THB on the other regions) and 1 BTC.  "
            f"[default: {DEFAULT_ACCOUNT.access_key}:{DEFAULT_ACCOUNT.secret_key}]"
        ),
    )
    options.add_argument(
        "--region",
        choices=REGIONS,
        default="kr",
        metavar="REGION",
        help=(
            "Which venue's markets to serve: kr (KRW-…), sg (SGD-…), id (IDR-…) or th "
            "(THB-…); each also lists BTC-… and USDT-… pairs.  [default: kr]"
        ),
    )
    options.add_argument(
        "--orders",
        type=_count,
        default=0,
        metavar="N",
        help=(
            "Place N limit orders per account, once it subscribes to myOrder or myAsset, "
            "and fill or cancel each, so myOrder and myAsset events flow.  [default: 0]"
        ),
    )
    options.add_argument(
        "--order-interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="Seconds from one scripted order to the next.  [default: 1]",
    )
    options.add_argument("--help", action="help", help="Show this message and exit.")
    return parser


async def _serve(config: SimConfig, orders: int, interval: float) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Simulator(config) as sim, anyio.create_task_group() as tg:
            print(sim.public_url, flush=True)
            print(sim.private_url, flush=True)
            for account in config.accounts:
                print(_describe(account, config.region), flush=True)
            if orders:
                report = functools.partial(print, flush=True)
                tg.start_soon(
                    functools.partial(run_orders, interval=interval, report=report), sim, orders
                )
            async for _signum in signals:
                break  # the simulator closes its sockets as it leaves
            tg.cancel_scope.cancel()


def _describe(account: AccountConfig, region: str) -> str:
    funds = ", ".join(
        f"{amount:,} {currency}" for currency, amount in account.starting_balances(region).items()
    )
    if account == DEFAULT_ACCOUNT:
        # A well-known demo key pair: printing it is how a user learns it.
        keys = f"{account.access_key}, secret key {account.secret_key}"
    else:
        keys = account.access_key
    return f"account {keys}: {funds}"


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, print the URLs and serve until SIGINT or SIGTERM; the exit status."""
    args = build_parser().parse_args(argv)
    config = SimConfig(
        region=args.region,
        port=args.port,
        rate=args.rate,
        seed=args.seed,
        idle_timeout=args.idle_timeout,
        accounts=tuple(args.account) or (DEFAULT_ACCOUNT,),
    )
    # A SIGINT that arrives before the signal receiver is installed is a stop too.
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_serve, config, args.orders, args.order_interval)
    return 0
