"""Whole, valid messages for tests that need one without a simulator."""

from __future__ import annotations

from upbus.core.wire._messages import Ticker, Trade

START_MS = 1_735_689_600_000  # 2025-01-01 00:00:00 UTC


def make_ticker(
    price: float,
    at_ms: int = START_MS,
    code: str = "KRW-BTC",
    stream_type: str = "REALTIME",
    signed_change_rate: float = 0.0125,
) -> Ticker:
    """A ticker for ``code`` at ``price``; every other field a plausible constant."""
    return Ticker(
        code=code,
        opening_price=price,
        high_price=price,
        low_price=price,
        trade_price=price,
        prev_closing_price=price,
        change="EVEN",
        change_price=0.0,
        signed_change_price=0.0,
        change_rate=0.0,
        signed_change_rate=signed_change_rate,
        trade_volume=1.0,
        acc_trade_volume=1.0,
        acc_trade_volume_24h=2345.6789,
        acc_trade_price=price,
        acc_trade_price_24h=price,
        trade_date="20250101",
        trade_time="000000",
        trade_timestamp=at_ms,
        ask_bid="BID",
        acc_ask_volume=0.5,
        acc_bid_volume=0.5,
        highest_52_week_price=price,
        highest_52_week_date="2025-01-01",
        lowest_52_week_price=price,
        lowest_52_week_date="2025-01-01",
        market_state="ACTIVE",
        timestamp=at_ms,
        stream_type=stream_type,
    )


def make_trade(code: str = "KRW-BTC", sequential_id: int = 1) -> Trade:
    """A realtime trade on ``code``; ``sequential_id`` tells trades apart."""
    return Trade(
        code=code,
        trade_price=1.0,
        trade_volume=1.0,
        ask_bid="BID",
        prev_closing_price=1.0,
        change="EVEN",
        change_price=0.0,
        trade_date="2026-01-01",
        trade_time="00:00:00",
        trade_timestamp=START_MS,
        timestamp=START_MS,
        sequential_id=sequential_id,
        stream_type="REALTIME",
    )
