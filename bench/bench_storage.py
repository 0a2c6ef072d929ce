"""Rows/s into PostgreSQL (plugin ``postgres``) vs SQLite (plugin ``sqlite``), one run.

Each round feeds the same messages (trades and tickers, alternating, varied prices)
into a fresh store through ``on_message``, as the bus delivers them, and times from
the first message to ``aclose()`` returning: every row committed. The contenders
alternate after a warm-up. Needs the ``postgres`` extra and a server at
``--dsn`` (default ``postgresql://postgres@127.0.0.1:5432/test``); each round writes
into its own schema, dropped afterwards.

    .venv/bin/python bench/bench_storage.py [--messages 200000] [--rounds 3] [--batch-size 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import anyio
import psycopg

from upbus.plugin import Message, Ticker, Trade
from upbus.plugins.postgres_store import DEFAULT_DSN, PostgresStore
from upbus.plugins.recording import BatchRecorder
from upbus.plugins.sqlite_store import SqliteStore


def messages(n: int) -> list[Message]:
    out: list[Message] = []
    for i in range(n):
        price = 140_000_000 + (i % 997) * 1000.0
        ts = 1_700_000_000_000 + i
        if i % 2:
            out.append(
                Trade(
                    code="KRW-BTC",
                    trade_price=price,
                    trade_volume=0.0001 * (i % 89 + 1),
                    ask_bid="BID",
                    prev_closing_price=139_000_000.0,
                    change="RISE",
                    change_price=price - 139_000_000.0,
                    trade_date="2026-01-01",
                    trade_time="00:00:00",
                    trade_timestamp=ts,
                    timestamp=ts,
                    sequential_id=i,
                    best_ask_price=price + 1000.0,
                    best_ask_size=0.5,
                    best_bid_price=price,
                    best_bid_size=0.25,
                    stream_type="REALTIME",
                )
            )
        else:
            out.append(
                Ticker(
                    code="KRW-ETH",
                    opening_price=4_000_000.0,
                    high_price=4_100_000.0,
                    low_price=3_900_000.0,
                    trade_price=price / 35,
                    prev_closing_price=4_000_000.0,
                    change="RISE",
                    change_price=1000.0,
                    signed_change_price=1000.0,
                    change_rate=0.00025,
                    signed_change_rate=0.00025,
                    trade_volume=0.01 * (i % 13 + 1),
                    acc_trade_volume=1234.5678,
                    acc_trade_volume_24h=2345.6789,
                    acc_trade_price=5.1e9,
                    acc_trade_price_24h=9.9e9,
                    trade_date="20260101",
                    trade_time="000000",
                    trade_timestamp=ts,
                    ask_bid="ASK",
                    acc_ask_volume=600.1,
                    acc_bid_volume=634.4,
                    highest_52_week_price=5_000_000.0,
                    highest_52_week_date="2025-06-01",
                    lowest_52_week_price=2_000_000.0,
                    lowest_52_week_date="2025-02-01",
                    market_state="ACTIVE",
                    timestamp=ts,
                    stream_type="REALTIME",
                )
            )
    return out


async def feed(store: BatchRecorder, batch: list[Message]) -> float:
    await store.start()
    start = time.perf_counter()
    for message in batch:
        await store.on_message(message)
    await store.aclose()
    elapsed = time.perf_counter() - start
    if store.written != len(batch) or store.lost:
        raise RuntimeError(f"not everything was written: {store.stats()}")
    return len(batch) / elapsed


async def postgres_round(dsn: str, batch: list[Message], size: int) -> float:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        return await feed(PostgresStore(dsn, schema=schema, batch_size=size), batch)
    finally:
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


async def sqlite_round(batch: list[Message], size: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        return await feed(SqliteStore(Path(folder) / "bench.db", batch_size=size), batch)


async def main(args: argparse.Namespace) -> None:
    batch = messages(args.messages)
    await postgres_round(args.dsn, batch[:5000], args.batch_size)  # warm-up
    await sqlite_round(batch[:5000], args.batch_size)
    results: dict[str, list[float]] = {"postgres": [], "sqlite": []}
    for round_ in range(args.rounds):
        results["postgres"].append(await postgres_round(args.dsn, batch, args.batch_size))
        results["sqlite"].append(await sqlite_round(batch, args.batch_size))
        print(
            f"round {round_ + 1}: postgres {results['postgres'][-1]:,.0f} rows/s, "
            f"sqlite {results['sqlite'][-1]:,.0f} rows/s"
        )
    print(f"\n{args.messages:,} messages (trades and tickers), batch_size {args.batch_size}")
    print(f"{'store':<10} {'median rows/s':>14} {'min':>10} {'max':>10}")
    for name, rates in results.items():
        print(
            f"{name:<10} {statistics.median(rates):>14,.0f} {min(rates):>10,.0f} "
            f"{max(rates):>10,.0f}"
        )
    ratio = statistics.median(results["postgres"]) / statistics.median(results["sqlite"])
    print(f"postgres / sqlite: x{ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2000)
    anyio.run(main, parser.parse_args())
