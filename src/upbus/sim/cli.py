"""``upbus sim``: run the simulator until interrupted.

The first line of stdout is the public URL and the second the private URL, both
flushed at once, so a parent process can read the port chosen by ``--port 0``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from decimal import Decimal

import anyio

from upbus.sim.config import AccountConfig, Rate, SimConfig
from upbus.sim.server import Simulator

__all__ = ("build_parser", "run_cli")

_DEMO_BALANCES = {"KRW": Decimal(100_000_000), "BTC": Decimal(1)}


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
        raise argparse.ArgumentTypeError("rate must be positive, 'max' or 'flood'")
    return value


def _timeout(text: str) -> float | None:
    if text.lower() == "none":
        return None
    return float(text)


def _account(text: str) -> AccountConfig:
    access_key, sep, secret_key = text.partition(":")
    if not sep or not access_key or not secret_key:
        raise argparse.ArgumentTypeError("expected ACCESS_KEY:SECRET_KEY")
    return AccountConfig(access_key, secret_key, dict(_DEMO_BALANCES))


def build_parser() -> argparse.ArgumentParser:
    """The command-line options of the simulator."""
    parser = argparse.ArgumentParser(
        prog="upbus sim", description="Run a local Upbit-compatible WebSocket exchange."
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: free)")
    parser.add_argument(
        "--rate",
        type=_rate,
        default=50.0,
        help=(
            "realtime messages/s per connection; 'max': repeat pre-encoded frames as fast as "
            "the socket takes them; 'flood': generate every message (about 2,000/s)"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the market data")
    parser.add_argument("--idle-timeout", type=_timeout, default=120.0, help="seconds, or 'none'")
    parser.add_argument(
        "--account",
        type=_account,
        action="append",
        default=[],
        metavar="ACCESS_KEY:SECRET_KEY",
        help="a private-API account (repeatable); starts with 100,000,000 KRW and 1 BTC",
    )
    return parser


async def _serve(config: SimConfig) -> None:
    async with Simulator(config) as sim:
        print(sim.public_url, flush=True)
        print(sim.private_url, flush=True)
        await anyio.sleep_forever()


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, print the URLs and serve until interrupted; the exit status."""
    args = build_parser().parse_args(argv)
    config = SimConfig(
        port=args.port,
        rate=args.rate,
        seed=args.seed,
        idle_timeout=args.idle_timeout,
        accounts=tuple(args.account),
    )
    try:
        anyio.run(_serve, config)
    except KeyboardInterrupt:
        return 130
    return 0
