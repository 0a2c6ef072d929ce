"""Rows/s into PostgreSQL (plugin ``postgres``: ``COPY`` per table in the format that
costs less, all binary, all text) vs SQLite (plugin ``sqlite``), one run.

Each round feeds the same messages (trades and tickers, alternating) into a fresh
store through ``on_message``, as the bus delivers them, and times from the first
message to the store's ``flush()`` returning: every row committed. Beside rows/s it
reports CPU per row, of this process and of the PostgreSQL backend (read from
``/proc`` when the server runs on this host): on a shared host, where rows/s moves
with the load, these move much less. As on the exchange, prices
repeat while the cumulative volumes and amounts, and the trade sizes, change with
every message (a store that caches encodings gets no free ride). The contenders
alternate after a warm-up. Needs the ``postgres`` extra and a server at ``--dsn``
(default ``postgresql://postgres@127.0.0.1:5432/test``); each round writes into its
own schema, dropped afterwards.

    .venv/bin/python bench/bench_storage.py [--messages 200000] [--rounds 3] [--batch-size 500 2000]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, cast

import anyio
import psycopg

from upbus.plugin import Message, Ticker, Trade
from upbus.plugins.postgres_store import DEFAULT_BATCH_SIZE, DEFAULT_DSN, CopyFormat, PostgresStore
from upbus.plugins.recording import BatchRecorder
from upbus.plugins.sqlite_store import SqliteStore

TICKS = os.sysconf("SC_CLK_TCK")


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
                    best_ask_size=0.00012345 * (i % 1913 + 1),
                    best_bid_price=price,
                    best_bid_size=0.0011 * (i % 1777 + 1),
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
                    change_rate=0.00001 * (i % 977),
                    signed_change_rate=0.00001 * (i % 977),
                    trade_volume=0.01 * (i % 13 + 1),
                    acc_trade_volume=1234.5678 + i * 0.00012345,
                    acc_trade_volume_24h=2345.6789 + i * 0.00012345,
                    acc_trade_price=5.1e9 + i * 17.123456,
                    acc_trade_price_24h=9.9e9 + i * 17.123456,
                    trade_date="20260101",
                    trade_time="000000",
                    trade_timestamp=ts,
                    ask_bid="ASK",
                    acc_ask_volume=600.1 + i * 0.0000567,
                    acc_bid_volume=634.4 + i * 0.0000678,
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


class Result(NamedTuple):
    rate: float  # rows/s, first message to the last row committed
    client_us: float  # this process's CPU per row (feeding, the writer thread, psycopg/SQLite)
    server_us: float | None  # the PostgreSQL backend's CPU per row, when it runs here


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def backend_cpu(dsn: str, application_name: str) -> Callable[[], float | None]:
    """A reader of the CPU seconds of the store's backend, if the server runs on this host."""
    with psycopg.connect(dsn, autocommit=True) as db:
        row = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        ).fetchone()
    stat = Path(f"/proc/{row[0]}/stat") if row else None

    def read() -> float | None:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split() if stat else None
        except OSError:
            return None
        # utime and stime, in clock ticks (fields 14 and 15 of proc(5)).
        return None if fields is None else (int(fields[11]) + int(fields[12])) / TICKS

    return read


async def feed(
    store: BatchRecorder,
    batch: list[Message],
    server: Callable[[BatchRecorder], Callable[[], float | None]] | None = None,
) -> Result:
    await store.start()
    server_cpu = server(store) if server else lambda: None
    server_before, cpu_before = server_cpu(), process_cpu()
    start = time.perf_counter()
    for message in batch:
        await store.on_message(message)
    await store.flush()
    elapsed = time.perf_counter() - start
    cpu, server_after = process_cpu() - cpu_before, server_cpu()
    await store.aclose()
    if store.written != len(batch) or store.lost:
        raise RuntimeError(f"not everything was written: {store.stats()}")
    server_us = None
    if server_before is not None and server_after is not None:
        server_us = (server_after - server_before) / len(batch) * 1e6
    return Result(len(batch) / elapsed, cpu / len(batch) * 1e6, server_us)


async def postgres_round(
    dsn: str, batch: list[Message], size: int, copy_format: CopyFormat
) -> Result:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(dsn, schema=schema, batch_size=size, copy_format=copy_format)
    try:
        return await feed(store, batch, lambda _store: backend_cpu(dsn, f"upbus {schema}"))
    finally:
        with psycopg.connect(dsn, autocommit=True) as db:
            db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


async def sqlite_round(batch: list[Message], size: int) -> Result:
    with tempfile.TemporaryDirectory() as folder:
        return await feed(SqliteStore(Path(folder) / "bench.db", batch_size=size), batch)


STORES = ("postgres auto", "postgres binary", "postgres text", "sqlite")
Contender = tuple[str, int]  # a store and its batch_size


async def run(contender: Contender, dsn: str, batch: list[Message]) -> Result:
    store, size = contender
    if store == "sqlite":
        return await sqlite_round(batch, size)
    copy_format = cast(CopyFormat, store.removeprefix("postgres "))
    return await postgres_round(dsn, batch, size, copy_format)


def label(contender: Contender) -> str:
    return f"{contender[0]} @{contender[1]}"


async def main(args: argparse.Namespace) -> None:
    batch = messages(args.messages)
    contenders = [(store, size) for size in args.batch_size for store in STORES]
    for contender in contenders:  # warm-up
        await run(contender, args.dsn, batch[:5000])
    results: dict[Contender, list[Result]] = {contender: [] for contender in contenders}
    for round_ in range(args.rounds):
        # A rotating order, so that a slow spell of the host does not hit one contender.
        turn = round_ % len(contenders)
        for contender in contenders[turn:] + contenders[:turn]:
            results[contender].append(await run(contender, args.dsn, batch))
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{label(c)} {results[c][-1].rate:,.0f}" for c in contenders)
        )
    print(f"\n{args.messages:,} messages (trades and tickers); CPU in µs per row")
    print(
        f"{'store @batch_size':<24} {'rows/s':>8} {'min':>8} {'max':>8} "
        f"{'client CPU':>11} {'server CPU':>11}"
    )
    median: dict[Contender, float] = {}
    for contender, runs in results.items():
        rates = [r.rate for r in runs]
        median[contender] = statistics.median(rates)
        servers = [r.server_us for r in runs if r.server_us is not None]
        server = f"{statistics.median(servers):.1f}" if servers else "-"
        print(
            f"{label(contender):<24} {median[contender]:>8,.0f} {min(rates):>8,.0f} "
            f"{max(rates):>8,.0f} {statistics.median(r.client_us for r in runs):>11.1f} "
            f"{server:>11}"
        )
    for size in args.batch_size:
        auto, binary, text, sqlite = (median[store, size] for store in STORES)
        print(
            f"batch_size {size}: auto / text x{auto / text:.2f}, binary / text "
            f"x{binary / text:.2f}, auto / sqlite x{auto / sqlite:.2f}, "
            f"text / sqlite x{text / sqlite:.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[500, DEFAULT_BATCH_SIZE],
        help="one or more, each a contender (default: 500 and the default, 2000)",
    )
    anyio.run(main, parser.parse_args())
