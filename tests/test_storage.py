"""The SQLite store, through a real Bus against the simulator: what it accepts, it writes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from factories import make_trade
from simbus import Recorder, make_bus

import upbus
from upbus.core.wire._codec import FrameDecoder
from upbus.core.wire._messages import ErrorMessage, Status, SubscriptionList
from upbus.plugin import PRIVATE_TYPES, Message, Trade
from upbus.plugins import sqlite_store
from upbus.plugins.sqlite_store import SqliteStore, summarize
from upbus.sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio

SPECS = [
    {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
    {"type": "trade", "codes": ["KRW-BTC"]},
    {"type": "orderbook", "codes": ["KRW-BTC.5"]},
]


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=1000.0)


def sqlite_bus(sim: Simulator, **sqlite: Any) -> upbus.Bus:
    """A bus on ``sim`` storing ``SPECS`` with the ``sqlite`` plugin options."""
    sqlite_options = {"enabled": True, "specs": SPECS, **sqlite}
    return make_bus(sim, debounce=0.01, reconnect={}, plugins={"sqlite": sqlite_options})


async def stored(
    bus: upbus.Bus, until: Callable[[SqliteStore], bool]
) -> tuple[SqliteStore, Recorder]:
    """``bus``'s store once ``until(store)`` holds, and the component on ``SPECS`` that waited."""
    store = sqlite_store.store_for(bus)
    assert store is not None
    watcher = Recorder()
    await bus.register_component(watcher, SPECS)
    await watcher.wait_for(lambda: until(store))
    return store, watcher


def rows(path: Path, table: str) -> int:
    with closing(sqlite3.connect(path)) as db:
        count: int = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return count


def all_rows(path: Path) -> int:
    return sum(rows(path, table) for table in ("tickers", "trades", "orderbooks"))


async def test_every_accepted_message_is_a_row_after_the_bus_closes(
    sim: Simulator, tmp_path: Path
) -> None:
    db = tmp_path / "x.db"
    async with sqlite_bus(sim, path=str(db), batch_size=25, flush_interval=0.05) as bus:
        store, _ = await stored(bus, lambda s: s.accepted >= 300)
    assert sqlite_store.store_for(bus) is None
    stats = store.stats()
    assert stats["lost"] == stats["pending"] == 0
    assert stats["written"] == stats["accepted"] >= 300
    assert all_rows(db) == stats["accepted"]
    # Written in batches of at most 25, not a transaction per message.
    assert stats["accepted"] / 25 <= stats["batches"] < stats["accepted"] / 2
    assert min(rows(db, "tickers"), rows(db, "trades"), rows(db, "orderbooks")) > 0


async def test_shutdown_writes_what_was_still_waiting_for_its_batch(
    sim: Simulator, tmp_path: Path
) -> None:
    db = tmp_path / "x.db"
    async with sqlite_bus(sim, path=str(db), batch_size=100_000, flush_interval=3600) as bus:
        store, _ = await stored(bus, lambda s: s.accepted >= 100)
        assert store.written == 0
    assert store.written == store.accepted == all_rows(db)


async def test_writes_happen_off_the_event_loop(sim: Simulator, tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    async with sqlite_bus(sim, path=str(db), batch_size=10, flush_interval=0.02) as bus:
        store, watcher = await stored(bus, lambda s: s.written >= 20)
        assert store.writer.ident != threading.get_ident()

        # Another connection takes the write lock: the writer thread waits for it.
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        await anyio.to_thread.run_sync(blocker.execute, "BEGIN IMMEDIATE")
        try:
            accepted = store.accepted
            # Meanwhile the loop delivers and the store accepts; what it cannot write waits.
            await watcher.wait_for(lambda: store.accepted >= accepted + 100)
            assert store.stats()["pending"] >= 50
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await store.flush()
        assert store.written >= accepted + 100
    assert store.stats()["lost"] == 0
    assert all_rows(db) == store.accepted


async def test_tables_are_typed_and_the_database_is_in_wal_mode(
    sim: Simulator, tmp_path: Path
) -> None:
    db = tmp_path / "x.db"
    async with sqlite_bus(sim, path=str(db), flush_interval=0.05) as bus:
        await stored(bus, lambda s: s.accepted >= 30)

    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = {row[1]: row[2] for row in conn.execute("PRAGMA table_info(trades)")}
        assert columns["id"] == "INTEGER"
        assert columns["received_at"] == "REAL"
        assert columns["code"] == "TEXT"
        assert columns["trade_price"] == columns["trade_volume"] == "REAL"
        assert columns["trade_timestamp"] == columns["sequential_id"] == "INTEGER"
        assert "type" not in columns
        assert conn.execute(
            "SELECT DISTINCT typeof(trade_price), typeof(sequential_id), typeof(code) FROM trades"
        ).fetchall() == [("real", "integer", "text")]
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(trades)")}
        assert "trades_code_timestamp" in indexes

        units, total_ask, total_bid = conn.execute(
            "SELECT orderbook_units, total_ask_size, total_bid_size FROM orderbooks LIMIT 1"
        ).fetchone()
        book = json.loads(units)
        assert len(book) == 5
        assert set(book[0]) == {"ask_price", "bid_price", "ask_size", "bid_size"}
        assert total_ask == pytest.approx(sum(unit["ask_size"] for unit in book))
        assert total_bid == pytest.approx(sum(unit["bid_size"] for unit in book))

        # One id sequence across tables keeps the order of arrival.
        ids = [
            row[0]
            for t in ("tickers", "trades", "orderbooks")
            for row in conn.execute(f"SELECT id FROM {t}")
        ]
        assert sorted(ids) == list(range(1, len(ids) + 1))


async def test_summarize_counts_rows_per_table_and_code(sim: Simulator, tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    async with sqlite_bus(sim, path=str(db), flush_interval=0.05) as bus:
        store, _ = await stored(bus, lambda s: s.accepted >= 60)

    summary = summarize(db)
    tables = summary["tables"]
    assert set(tables) == {"tickers", "trades", "orderbooks", "candles", "my_orders", "my_assets"}
    assert sum(table["rows"] for table in tables.values()) == store.accepted
    assert set(tables["tickers"]["codes"]) == {"KRW-BTC", "KRW-ETH"}
    trades = tables["trades"]
    assert trades["rows"] == rows(db, "trades")
    assert trades["codes"]["KRW-BTC"]["rows"] == trades["rows"]
    btc = trades["codes"]["KRW-BTC"]
    assert 0 < btc["first_timestamp"] <= btc["last_timestamp"]
    assert trades["first_received_at"] <= trades["last_received_at"]
    assert tables["candles"] == {
        "rows": 0,
        "first_received_at": None,
        "last_received_at": None,
        "codes": {},
    }
    with pytest.raises(FileNotFoundError):
        summarize(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


async def test_disabled_by_default_it_contributes_nothing(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = upbus.Settings(public_url=sim.public_url, private_url=sim.private_url)
    async with upbus.Bus(settings) as bus:
        assert sqlite_store.store_for(bus) is None
        assert bus.get_subscription_stats()["components"] == 0
    assert not (tmp_path / "upbus.db").exists()


async def test_a_store_that_cannot_open_is_isolated(sim: Simulator, tmp_path: Path) -> None:
    # A directory is not a database: the plugin fails, logged and counted; the bus runs on.
    async with sqlite_bus(sim, path=str(tmp_path)) as bus:
        assert sqlite_store.store_for(bus) is None
        assert bus.plugins.failures["sqlite"] == 1
        watcher = Recorder()
        await bus.register_component(watcher, upbus.ticker("KRW-BTC"))
        await watcher.wait_for(lambda: len(watcher.messages) >= 3)


def test_an_exiting_interpreter_still_writes_what_was_accepted(tmp_path: Path) -> None:
    # No aclose(): the writer notices the main thread ending, writes and closes.
    db = tmp_path / "x.db"
    script = f"""
import anyio
from upbus import Trade
from upbus.plugins.sqlite_store import SqliteStore

async def main():
    store = SqliteStore({str(db)!r}, flush_interval=3600)
    await store.start()
    for i in range(5):
        await store.on_message(Trade(
            code="KRW-BTC", trade_price=1.0 + i, trade_volume=0.1, ask_bid="BID",
            prev_closing_price=1.0, change="RISE", change_price=0.0, trade_date="2025-01-01",
            trade_time="00:00:00", trade_timestamp=i, timestamp=i, sequential_id=i,
            stream_type="REALTIME"))

anyio.run(main)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=20)
    assert rows(db, "trades") == 5


def test_a_store_appends_to_an_existing_database(tmp_path: Path) -> None:
    db = tmp_path / "x.db"

    async def record(prices: list[float]) -> None:
        store = SqliteStore(db)
        await store.start()
        for price in prices:
            await store.on_message(trade(price))
        await store.aclose()

    anyio.run(record, [1.0, 2.0])
    anyio.run(record, [3.0])
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT id, trade_price FROM trades ORDER BY id").fetchall() == [
            (1, 1.0),
            (2, 2.0),
            (3, 3.0),
        ]


def trade(price: float) -> Trade:
    return msgspec.structs.replace(make_trade(), trade_price=price, trade_volume=0.1)


def test_backpressure_waits_for_the_writer_and_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "x.db"

    async def main() -> None:
        store = SqliteStore(db, batch_size=2, flush_interval=0.01, max_pending=3)
        await store.start()
        blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")  # the writer cannot write until we let go
        try:
            async with anyio.create_task_group() as tg:

                async def produce() -> None:
                    for i in range(20):
                        await store.on_message(trade(float(i)))

                tg.start_soon(produce)
                await anyio.wait_all_tasks_blocked()
                # Queue full, writer stuck: the producer waits instead of dropping.
                assert store.accepted < 20
                blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        await store.aclose()
        assert store.stats() == {
            "accepted": 20,
            "written": 20,
            "batches": store.batches,
            "lost": 0,
            "refused": 0,
            "pending": 0,
        }

    anyio.run(main)
    with closing(sqlite3.connect(db)) as conn:
        prices = [row[0] for row in conn.execute("SELECT trade_price FROM trades ORDER BY id")]
    assert prices == [float(i) for i in range(20)]


def test_every_message_type_round_trips_through_its_table(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    messages = [
        decode_one(
            {
                "type": "orderbook",
                "code": "KRW-BTC",
                "total_ask_size": 1.5,
                "total_bid_size": 2.5,
                "orderbook_units": [
                    {"ask_price": 101.0, "bid_price": 100.0, "ask_size": 1.5, "bid_size": 2.5}
                ],
                "timestamp": 1,
                "level": 0.0,
                "stream_type": "SNAPSHOT",
            }
        ),
        decode_one(
            {
                "type": "candle.1m",
                "code": "KRW-ETH",
                "candle_date_time_utc": "2025-01-01T00:00:00",
                "candle_date_time_kst": "2025-01-01T09:00:00",
                "opening_price": 1.0,
                "high_price": 2.0,
                "low_price": 0.5,
                "trade_price": 1.5,
                "candle_acc_trade_volume": 10.0,
                "candle_acc_trade_price": 15.0,
                "timestamp": 2,
                "stream_type": "REALTIME",
            }
        ),
        decode_one(
            {
                "type": "myOrder",
                "code": "KRW-BTC",
                "uuid": "u-1",
                "ask_bid": "BID",
                "order_type": "limit",
                "state": "trade",
                "price": 100.0,
                "volume": 0.5,
                "is_maker": True,
                "trades_count": 1,
                "timestamp": 3,
                "stream_type": "REALTIME",
            }
        ),
        decode_one(
            {
                "type": "myAsset",
                "asset_uuid": "a-1",
                "assets": [{"currency": "KRW", "balance": "1234567.123456789012", "locked": "0.0"}],
                "asset_timestamp": 4,
                "timestamp": 4,
                "stream_type": "REALTIME",
            }
        ),
        trade(1.0),
    ]

    async def record() -> None:
        store = SqliteStore(db)
        await store.start()
        for message in messages:
            await store.on_message(message)
        await store.aclose()

    anyio.run(record)
    decoder = FrameDecoder()
    replayed = [decoder.decode(frame)[0] for _, frame in sqlite_store.iter_frames(db)]
    assert replayed == messages
    only_private = [
        m.type for _, f in sqlite_store.iter_frames(db, PRIVATE_TYPES) for m in decoder.decode(f)
    ]
    assert only_private == ["myOrder", "myAsset"]


def test_a_table_from_an_older_version_gains_the_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, received_at REAL, code TEXT)")

    async def record() -> None:
        store = SqliteStore(db)
        await store.start()
        await store.on_message(trade(5.0))
        await store.aclose()

    anyio.run(record)
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT code, trade_price FROM trades").fetchall() == [("KRW-BTC", 5.0)]


def decode_one(message: dict[str, Any]) -> Message:
    (decoded,) = FrameDecoder().decode(json.dumps(message))
    assert not isinstance(decoded, ErrorMessage | Status | SubscriptionList)
    return decoded
