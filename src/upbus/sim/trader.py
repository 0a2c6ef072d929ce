"""Scripted trading: orders placed, filled and cancelled over time, for trying myOrder.

:func:`run_orders` is what ``upbus sim --orders N`` runs. For each account it waits
until a connection of that account subscribes to myOrder or myAsset (private events
are realtime only, so nobody would see orders placed before that), then places
``count`` limit orders, one every ``interval`` seconds, on the venue's busiest
markets. Each one ends filled at once, filled in two trades, cancelled, or partly
filled and then cancelled, so every myOrder state (``wait``, ``trade``, ``done``,
``cancel``) and the myAsset changes they cause come by. The choices are seeded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from decimal import ROUND_DOWN, ROUND_FLOOR, Decimal

import anyio

from upbus.sim.config import DEFAULT_FUNDS
from upbus.sim.markets import QUOTES, MarketInfo, markets_for, tick_size
from upbus.sim.orders import OrderError
from upbus.sim.server import Simulator

__all__ = ("run_orders",)

_EIGHT = Decimal("0.00000001")
_BASES = ("BTC", "ETH", "XRP", "SOL", "DOGE", "ADA")
_OUTCOMES = ("filled", "filled in two trades", "cancelled", "partly filled, then cancelled")
# A share of the default funds per order: many orders fit before the money runs out.
_SHARE = (0.001, 0.005)


async def run_orders(
    sim: Simulator,
    count: int,
    *,
    interval: float = 1.0,
    report: Callable[[str], None] | None = None,
) -> None:
    """Place ``count`` orders for each of ``sim``'s accounts, one every ``interval`` s.

    ``report`` is called with one line per order once it has ended (or was refused).
    Returns when every account has had its orders.
    """
    if count < 1 or not interval > 0:
        raise ValueError("count must be at least 1 and interval positive")
    async with anyio.create_task_group() as tg:
        for account in sim.config.accounts:
            tg.start_soon(_trade, sim, account.access_key, count, interval, report)


async def _trade(
    sim: Simulator,
    access_key: str,
    count: int,
    interval: float,
    report: Callable[[str], None] | None,
) -> None:
    await sim.wait_until(lambda: sim.has_private_subscriber(access_key), timeout=math.inf)
    region = sim.config.region
    quote = QUOTES[region]
    markets = markets_for(region)
    choices = [markets[f"{quote}-{base}"] for base in _BASES]
    rng = random.Random(f"upbus-sim/{sim.config.seed}/script/{access_key}")
    step = interval / 3
    for number in range(1, count + 1):
        info = rng.choice(choices)
        outcome = rng.choice(_OUTCOMES)
        price = _snap(info, info.price * Decimal(repr(rng.uniform(0.98, 1.02))))
        budget = DEFAULT_FUNDS[quote] * Decimal(repr(rng.uniform(*_SHARE)))
        volume = (budget / price).quantize(_EIGHT, rounding=ROUND_DOWN)
        held = sim.balances(access_key).get(info.base)
        # Sell what the account holds now and then, so both sides show up.
        side = "ASK" if held is not None and held.balance > 0 and rng.random() < 0.4 else "BID"
        if side == "ASK" and held is not None:
            volume = min(volume, held.balance)
        what = f"{side} {volume} {info.code} at {price}"
        try:
            order_id = sim.place_order(access_key, info.code, side, price=price, volume=volume)
        except OrderError as exc:
            _say(report, f"order {number}/{count} {access_key}: {what}: refused ({exc})")
            await anyio.sleep(interval)
            continue
        try:
            outcome = await _settle(sim, order_id, volume, outcome, step)
        except OrderError as exc:
            # One order gone wrong must not end the script, nor the simulator it runs in.
            _say(report, f"order {number}/{count} {access_key}: {what}: stopped ({exc})")
            await anyio.sleep(interval)
            continue
        _say(report, f"order {number}/{count} {access_key}: {what}: {outcome}")
        await anyio.sleep(interval - step if outcome in ("filled", "cancelled") else step)


async def _settle(sim: Simulator, order_id: str, volume: Decimal, outcome: str, step: float) -> str:
    """Fill or cancel the order as ``outcome`` says; return what was done."""
    await anyio.sleep(step)
    half = (volume / 2).quantize(_EIGHT, rounding=ROUND_DOWN)
    if outcome == "filled" or half <= 0:
        outcome = "filled"
        sim.fill_order(order_id)
    elif outcome == "filled in two trades":
        sim.fill_order(order_id, half)
        await anyio.sleep(step)
        sim.fill_order(order_id)
    elif outcome == "cancelled":
        sim.cancel_order(order_id)
    else:
        sim.fill_order(order_id, half)
        await anyio.sleep(step)
        sim.cancel_order(order_id)
    return outcome


def _snap(info: MarketInfo, price: Decimal) -> Decimal:
    tick = tick_size(info.quote, price)
    snapped = (price / tick).to_integral_value(rounding=ROUND_FLOOR) * tick
    return snapped.quantize(min(tick, Decimal(1)))  # 132870, not 1.3287E+5


def _say(report: Callable[[str], None] | None, line: str) -> None:
    if report is not None:
        report(line)
