"""Deterministic market data: a seeded random walk per code, with books and candles.

Each :class:`CodeState` owns a ``random.Random`` seeded from ``(seed, code)``, so one
code's data does not depend on which other codes are watched. Every :meth:`trade`
moves the state by one trade: last price, day and 24 h accumulators, 52-week range,
sequential trade id, candles and the orderbook. The ``*_fields`` methods render
messages as dicts keyed by DEFAULT names (see :mod:`upbus.sim.encode`).

All amounts are exact ``Decimal``; sizes have 8 decimals as on the exchange.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_FLOOR, Context, Decimal, localcontext
from typing import Any

from upbus.sim.markets import MARKETS, MarketInfo, tick_size

__all__ = ("CANDLE_UNITS", "Candle", "CodeState", "Market")

_CONTEXT = Context(prec=60)
_EIGHT = Decimal("0.00000001")
_RATE = Decimal("0.0000000001")
_FIVE = Decimal("0.00001")
_ZERO = Decimal(0)
_KST = timedelta(hours=9)
_DAY_MS = 86_400_000

# candle type suffix -> period in seconds
CANDLE_UNITS = {
    "1s": 1,
    "1m": 60,
    "3m": 180,
    "5m": 300,
    "10m": 600,
    "15m": 900,
    "30m": 1800,
    "60m": 3600,
    "240m": 14400,
}

# Typical order value in the quote currency, to size orders and trades sensibly.
_NOTIONAL = {
    "KRW": Decimal(1_000_000),
    "BTC": Decimal("0.02"),
    "USDT": Decimal(700),
    "SGD": Decimal(900),
    "IDR": Decimal(11_000_000),
    "THB": Decimal(24_000),
}

Fields = dict[str, Any]


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _day(ms: int) -> int:
    return ms // _DAY_MS


@dataclass(slots=True)
class Candle:
    """One candle period; ``version`` counts the trades that changed it."""

    start_ms: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    amount: Decimal
    version: int = 0


class CodeState:
    """The evolving market of one code."""

    def __init__(self, info: MarketInfo, seed: int, now_ms: int) -> None:
        self.info = info
        self.code = info.code
        self._rng = random.Random(f"upbus-sim/{seed}/{info.code}")
        rng = self._rng
        self._notional = _NOTIONAL.get(info.quote, Decimal(1))
        # Thin books show fewer resting orders than the depth asked for, so the
        # exchange pads them with zero units (docs/protocol.md, Messages).
        if info.quote == "KRW":
            self.native_depth = 30 if rng.random() < 0.85 else rng.randint(12, 29)
        else:
            self.native_depth = rng.randint(6, 25)
        self.market_warning = "CAUTION" if rng.random() < 0.05 else "NONE"
        with localcontext(_CONTEXT):
            price = self._snap(info.price * Decimal(repr(rng.uniform(0.97, 1.03))))
            self.prev_close = self._snap(price * Decimal(repr(rng.uniform(0.95, 1.05))))
            self.open = self.prev_close
            self.high = max(self.open, price)
            self.low = min(self.open, price)
            self.last_price = price
            self.last_volume = self._size(Decimal("0.2"))
            self.last_side = "BID" if rng.random() < 0.5 else "ASK"
            turnover = (self._notional * Decimal(repr(rng.uniform(2e3, 2e5)))).quantize(_EIGHT)
            self.acc_price = turnover
            self.acc_volume = (turnover / price).quantize(_EIGHT)
            self.acc_ask = (self.acc_volume * Decimal(repr(rng.uniform(0.3, 0.7)))).quantize(_EIGHT)
            self.acc_bid = self.acc_volume - self.acc_ask
            share = Decimal(repr(rng.uniform(1.2, 3.0)))
            self.acc_price_24h = (turnover * share).quantize(_EIGHT)
            self.acc_volume_24h = (self.acc_volume * share).quantize(_EIGHT)
            self.high_52w = self._snap(price * Decimal(repr(rng.uniform(1.1, 2.5))))
            self.low_52w = self._snap(price * Decimal(repr(rng.uniform(0.3, 0.9))))
        self.trade_ms = now_ms - rng.randint(0, 5_000)
        self.high_52w_date = _utc(self.trade_ms - rng.randint(1, 360) * _DAY_MS).date()
        self.low_52w_date = _utc(self.trade_ms - rng.randint(1, 360) * _DAY_MS).date()
        self.sequential_id = self.trade_ms * 10_000
        self._day = _day(self.trade_ms)
        self.best_bid = price
        self._spread = 1
        self._asks: dict[Decimal, Decimal] = {}
        self._bids: dict[Decimal, Decimal] = {}
        self.ask_ladder: list[tuple[Decimal, Decimal]] = []
        self.bid_ladder: list[tuple[Decimal, Decimal]] = []
        self.book_ms = self.trade_ms
        self._candles: dict[int, Candle] = {}
        with localcontext(_CONTEXT):
            self._rebuild_book()

    # -- prices and sizes -------------------------------------------------------

    def _tick(self, price: Decimal) -> Decimal:
        return tick_size(self.info.quote, price)

    def _snap(self, price: Decimal) -> Decimal:
        tick = self._tick(price)
        snapped = (price / tick).to_integral_value(rounding=ROUND_FLOOR) * tick
        return max(snapped, tick)

    def _up(self, price: Decimal) -> Decimal:
        return price + self._tick(price)

    def _down(self, price: Decimal) -> Decimal:
        # The step below a band boundary belongs to the lower band.
        return price - self._tick(price - _EIGHT)

    def _size(self, scale: Decimal) -> Decimal:
        """A random order size worth about ``scale`` typical orders."""
        value = self._notional * scale * Decimal(repr(self._rng.lognormvariate(0.0, 1.2)))
        size = (value / self.last_price).quantize(_EIGHT, rounding=ROUND_DOWN)
        if self._rng.random() < 0.12:
            # Round sizes like 0.0005 are common, and spell as 5.0E-4 in SIMPLE.
            size = Decimal(f"{float(size):.1g}").quantize(_EIGHT)
        return max(size, _EIGHT)

    # -- evolution --------------------------------------------------------------

    @property
    def best_ask(self) -> Decimal:
        price = self.best_bid
        for _ in range(self._spread):
            price = self._up(price)
        return price

    def _rebuild_book(self) -> None:
        asks: list[Decimal] = []
        price = self.best_ask
        for _ in range(self.native_depth):
            asks.append(price)
            price = self._up(price)
        bids: list[Decimal] = []
        price = self.best_bid
        for _ in range(self.native_depth):
            if price <= 0:
                break
            bids.append(price)
            price = self._down(price)
        # Resting orders keep their size while their price stays in the book.
        self._asks = {p: self._asks.get(p) or self._size(Decimal("0.5")) for p in asks}
        self._bids = {p: self._bids.get(p) or self._size(Decimal("0.5")) for p in bids}
        for side in (self._asks, self._bids):
            if side:
                key = self._rng.choice(list(side))
                side[key] = self._size(Decimal("0.5"))
        self.ask_ladder = list(self._asks.items())
        self.bid_ladder = list(self._bids.items())

    def trade(self, now_ms: int) -> None:
        """Advance by one trade at ``now_ms`` (never before the previous one)."""
        with localcontext(_CONTEXT):
            self._trade(max(now_ms, self.trade_ms))

    def _trade(self, ms: int) -> None:
        rng = self._rng
        if _day(ms) != self._day:
            # UTC midnight: yesterday's last price becomes the previous close.
            self._day = _day(ms)
            self.prev_close = self.open = self.high = self.low = self.last_price
            self.acc_price = self.acc_volume = self.acc_ask = self.acc_bid = _ZERO
        side = "BID" if rng.random() < 0.5 else "ASK"
        price = self.best_ask if side == "BID" else self.best_bid
        volume = self._size(Decimal("0.2"))
        # Price and size both have scale 8, so turnover has scale 16, as on the wire.
        amount = price * volume
        self.last_price, self.last_volume, self.last_side, self.trade_ms = price, volume, side, ms
        self.sequential_id = max(self.sequential_id + 1, ms * 10_000)
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        self.acc_volume += volume
        self.acc_price += amount
        self.acc_volume_24h += volume
        self.acc_price_24h += amount
        if side == "ASK":
            self.acc_ask += volume
        else:
            self.acc_bid += volume
        if price > self.high_52w:
            self.high_52w, self.high_52w_date = price, _utc(ms).date()
        if price < self.low_52w:
            self.low_52w, self.low_52w_date = price, _utc(ms).date()
        for unit, candle in self._candles.items():
            self._candle_add(unit, candle, ms, price, volume, amount)
        move = rng.random()
        if move < 0.2:
            self.best_bid = self._up(self.best_bid)
        elif move < 0.4 and self._down(self.best_bid) > 0:
            self.best_bid = self._down(self.best_bid)
        spread = rng.random()
        self._spread = 1 if spread < 0.8 else 2 if spread < 0.95 else 3
        self._rebuild_book()
        self.book_ms = ms

    # -- candles ----------------------------------------------------------------

    def _candle_add(
        self, unit: int, candle: Candle, ms: int, price: Decimal, volume: Decimal, amount: Decimal
    ) -> None:
        start = ms - ms % (unit * 1000)
        if start > candle.start_ms:
            self._candles[unit] = Candle(start, price, price, price, price, volume, amount, 1)
            return
        candle.high = max(candle.high, price)
        candle.low = min(candle.low, price)
        candle.close = price
        candle.volume += volume
        candle.amount += amount
        candle.version += 1

    def candle(self, unit: int) -> Candle:
        """The latest candle of ``unit`` seconds; it may be older than the current period."""
        existing = self._candles.get(unit)
        if existing is None:
            ms = self.trade_ms
            with localcontext(_CONTEXT):
                amount = self.last_price * self.last_volume
            price = self.last_price
            existing = Candle(
                ms - ms % (unit * 1000), price, price, price, price, self.last_volume, amount
            )
            self._candles[unit] = existing
        return existing

    # -- messages ---------------------------------------------------------------

    def _change(self) -> tuple[str, Decimal, Decimal, Decimal]:
        with localcontext(_CONTEXT):
            signed = self.last_price - self.prev_close
            rate = (signed / self.prev_close).quantize(_RATE)
        change = "RISE" if signed > 0 else "FALL" if signed < 0 else "EVEN"
        return change, signed, rate, abs(signed)

    def ticker_fields(self, stream_type: str, now_ms: int) -> Fields:
        change, signed, rate, price_change = self._change()
        traded = _utc(self.trade_ms)
        return {
            "type": "ticker",
            "code": self.code,
            "opening_price": self.open,
            "high_price": self.high,
            "low_price": self.low,
            "trade_price": self.last_price,
            "prev_closing_price": self.prev_close,
            "acc_trade_price": self.acc_price,
            "change": change,
            "change_price": price_change,
            "signed_change_price": signed,
            "change_rate": abs(rate),
            "signed_change_rate": rate,
            "ask_bid": self.last_side,
            "trade_volume": self.last_volume,
            "acc_trade_volume": self.acc_volume,
            "trade_date": traded.strftime("%Y%m%d"),
            "trade_time": traded.strftime("%H%M%S"),
            "trade_timestamp": self.trade_ms,
            "acc_ask_volume": self.acc_ask,
            "acc_bid_volume": self.acc_bid,
            "highest_52_week_price": self.high_52w,
            "highest_52_week_date": self.high_52w_date.isoformat(),
            "lowest_52_week_price": self.low_52w,
            "lowest_52_week_date": self.low_52w_date.isoformat(),
            "market_state": "ACTIVE",
            "is_trading_suspended": False,
            "delisting_date": None,
            "market_warning": self.market_warning,
            "timestamp": max(now_ms, self.trade_ms),
            "acc_trade_price_24h": self.acc_price_24h,
            "acc_trade_volume_24h": self.acc_volume_24h,
            "stream_type": stream_type,
        }

    def trade_fields(self, stream_type: str, now_ms: int) -> Fields:
        change, _signed, _rate, price_change = self._change()
        traded = _utc(self.trade_ms)
        best_ask_price, best_ask_size = self.ask_ladder[0]
        best_bid_price, best_bid_size = self.bid_ladder[0]
        return {
            "type": "trade",
            "code": self.code,
            "timestamp": max(now_ms, self.trade_ms),
            "trade_date": traded.strftime("%Y-%m-%d"),
            "trade_time": traded.strftime("%H:%M:%S"),
            "trade_timestamp": self.trade_ms,
            "trade_price": self.last_price,
            "trade_volume": self.last_volume,
            "ask_bid": self.last_side,
            "prev_closing_price": self.prev_close,
            "change": change,
            "change_price": price_change,
            "sequential_id": self.sequential_id,
            "best_ask_price": best_ask_price,
            "best_ask_size": best_ask_size,
            "best_bid_price": best_bid_price,
            "best_bid_size": best_bid_size,
            "stream_type": stream_type,
        }

    def _grouped(self, level: Decimal) -> tuple[list[tuple[Decimal, Decimal]], ...]:
        if level <= 0:
            return self.ask_ladder, self.bid_ladder
        sides: list[list[tuple[Decimal, Decimal]]] = []
        for ladder, rounding in ((self.ask_ladder, ROUND_CEILING), (self.bid_ladder, ROUND_FLOOR)):
            buckets: dict[Decimal, Decimal] = {}
            for price, size in ladder:
                bucket = (price / level).to_integral_value(rounding=rounding) * level
                buckets[bucket] = buckets.get(bucket, _ZERO) + size
            sides.append(list(buckets.items()))
        return sides[0], sides[1]

    def orderbook_fields(self, stream_type: str, depth: int, level: Decimal) -> Fields:
        """A whole book of ``depth`` units, zero-padded; totals sum the units sent."""
        with localcontext(_CONTEXT):
            asks, bids = self._grouped(level)
        units: list[Fields] = []
        total_ask = total_bid = _EIGHT * 0
        for index in range(depth):
            ask_price, ask_size = asks[index] if index < len(asks) else (_ZERO, _ZERO)
            bid_price, bid_size = bids[index] if index < len(bids) else (_ZERO, _ZERO)
            total_ask += ask_size
            total_bid += bid_size
            units.append(
                {
                    "ask_price": ask_price,
                    "bid_price": bid_price,
                    "ask_size": ask_size,
                    "bid_size": bid_size,
                }
            )
        return {
            "type": "orderbook",
            "code": self.code,
            "timestamp": self.book_ms,
            "total_ask_size": total_ask,
            "total_bid_size": total_bid,
            "orderbook_units": units,
            "stream_type": stream_type,
            "level": level,
        }

    def candle_fields(self, type_name: str, unit: int, stream_type: str, now_ms: int) -> Fields:
        candle = self.candle(unit)
        start = _utc(candle.start_ms)
        return {
            "type": type_name,
            "code": self.code,
            "candle_date_time_utc": start.strftime("%Y-%m-%dT%H:%M:%S"),
            "candle_date_time_kst": (start + _KST).strftime("%Y-%m-%dT%H:%M:%S"),
            "opening_price": candle.open,
            "high_price": candle.high,
            "low_price": candle.low,
            "trade_price": candle.close,
            "candle_acc_trade_volume": candle.volume,
            # The exchange rounds candle turnover to 5 decimals (samples/candle.json).
            "candle_acc_trade_price": candle.amount.quantize(_FIVE, context=_CONTEXT),
            "timestamp": max(now_ms, self.trade_ms),
            "stream_type": stream_type,
        }


class Market:
    """The codes one connection watches, on a wall clock or a seeded virtual clock.

    With ``start_ms`` set, timestamps start there and advance a seeded few
    milliseconds per trade, so two runs with one seed send identical bytes.
    """

    def __init__(
        self,
        seed: int,
        start_ms: int | None = None,
        markets: Mapping[str, MarketInfo] = MARKETS,
    ) -> None:
        self.markets = markets  # the codes this venue serves; others get no data
        self._seed = seed
        self._virtual_ms = start_ms
        self._clock_rng = random.Random(f"upbus-sim/{seed}/clock")
        self._last_ms = 0
        self._states: dict[str, CodeState] = {}

    def now_ms(self) -> int:
        """Milliseconds since the epoch on this market's clock (never decreasing)."""
        if self._virtual_ms is not None:
            return self._virtual_ms
        self._last_ms = max(self._last_ms, int(time.time() * 1000))
        return self._last_ms

    def state(self, code: str) -> CodeState:
        """The state of a known ``code`` (created on first use)."""
        state = self._states.get(code)
        if state is None:
            state = CodeState(self.markets[code], self._seed, self.now_ms())
            self._states[code] = state
        return state

    def trade(self, code: str) -> CodeState:
        """Advance the clock and ``code`` by one trade."""
        if self._virtual_ms is not None:
            self._virtual_ms += self._clock_rng.randint(5, 120)
        state = self.state(code)
        state.trade(self.now_ms())
        return state
