"""The PostgreSQL store against the real server: typed, exact, and what it accepts, it writes."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import socket
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import msgspec
import pytest
from clirun import run_upbus
from factories import START_MS, make_ticker, make_trade
from pgtest import DSN
from required import import_or_skip
from simbus import Recorder, make_bus

import upbus
from upbus.core.wire._codec import FrameDecoder
from upbus.core.wire._messages import ErrorMessage, Status, SubscriptionList
from upbus.plugin import Message, Trade
from upbus.plugins import postgres_store
from upbus.plugins.postgres_store import PostgresStore, PostgresUnreachable, summarize
from upbus.sim import SimConfig, Simulator

# The postgres extra is optional; the test extra installs it, so CI runs these tests.
psycopg = import_or_skip("psycopg", "the postgres extra (psycopg) is not installed")

pytestmark = pytest.mark.anyio

SPECS = [
    {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
    {"type": "trade", "codes": ["KRW-BTC"]},
    {"type": "orderbook", "codes": ["KRW-BTC.5"]},
]
TABLES = ("tickers", "trades", "orderbooks", "candles", "my_orders", "my_assets")


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=1000.0)


def query(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(DSN, autocommit=True) as db:
        return db.execute(sql.encode(), args or None).fetchall()


def count(schema: str, table: str) -> int:
    (row,) = query(f'SELECT count(*) FROM "{schema}"."{table}"')
    return int(row[0])


def all_rows(schema: str) -> int:
    return sum(count(schema, table) for table in TABLES)


def postgres_bus(sim: Simulator, schema: str, **options: Any) -> upbus.Bus:
    section = {"enabled": True, "specs": SPECS, "schema": schema, **options}
    return make_bus(sim, debounce=0.01, reconnect={}, plugins={"postgres": section})


def decode_one(message: dict[str, Any]) -> Message:
    (decoded,) = FrameDecoder().decode(json.dumps(message))
    assert not isinstance(decoded, ErrorMessage | Status | SubscriptionList)
    return decoded


async def test_startup_creates_the_schema_typed_tables_and_indexes(
    sim: Simulator, schema: str
) -> None:
    async with postgres_bus(sim, schema) as bus:
        assert postgres_store.store_for(bus) is not None
    tables = {
        row[0]
        for row in query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", schema
        )
    }
    assert tables == set(TABLES)
    types = dict(
        query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = 'trades'",
            schema,
        )
    )
    assert types["trade_price"] == types["trade_volume"] == "numeric"
    assert types["timestamp"] == types["received_at"] == "timestamp with time zone"
    assert types["sequential_id"] == "bigint"
    assert types["code"] == "text"
    indexes = {
        row[0] for row in query("SELECT indexdef FROM pg_indexes WHERE schemaname = %s", schema)
    }
    assert any('trades USING btree (code, "timestamp")' in i for i in indexes), indexes
    # A second start finds everything in place.
    async with postgres_bus(sim, schema) as bus:
        assert postgres_store.store_for(bus) is not None


async def test_every_accepted_message_is_an_exact_row_after_the_bus_closes(
    sim: Simulator, schema: str
) -> None:
    async with postgres_bus(sim, schema, batch_size=25, flush_interval=0.05) as bus:
        store = postgres_store.store_for(bus)
        assert store is not None
        watcher = Recorder()
        await bus.register_component(watcher, SPECS)
        await watcher.wait_for(lambda: store.accepted >= 300)
    assert postgres_store.store_for(bus) is None
    stats = store.stats()
    assert stats["lost"] == stats["pending"] == 0
    assert stats["written"] == stats["accepted"] >= 300
    assert all_rows(schema) == stats["accepted"]
    assert min(count(schema, t) for t in ("tickers", "trades", "orderbooks")) > 0
    # Prices are the decimal digits of the message, times the exchange's milliseconds.
    seen = {m.sequential_id: m for m in watcher.messages if isinstance(m, Trade)}
    rows = query(
        f'SELECT sequential_id, trade_price, trade_volume, timestamp FROM "{schema}".trades'
    )
    matched = [r for r in rows if r[0] in seen]
    assert matched
    for sequential_id, price, volume, stamp in matched:
        trade = seen[sequential_id]
        assert price == Decimal(repr(trade.trade_price))
        assert volume == Decimal(repr(trade.trade_volume))
        assert stamp == datetime.fromtimestamp(trade.timestamp / 1000, UTC)
    summary = summarize(DSN, schema)["tables"]
    assert summary["trades"]["rows"] == len(rows)
    assert set(summary["tickers"]["codes"]) == {"KRW-BTC", "KRW-ETH"}


def test_every_message_kind_is_stored_typed_and_exact(schema: str) -> None:
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
                "opening_price": 0.1,
                "high_price": 2.0,
                "low_price": 0.5,
                "trade_price": 1.5,
                "candle_acc_trade_volume": 10.123456789,
                "candle_acc_trade_price": 15.0,
                "timestamp": 1_700_000_000_002,
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
                "price": 100.3,
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
        msgspec.structs.replace(make_trade(), trade_price=0.1, trade_volume=0.00012345),
    ]

    async def record() -> None:
        store = PostgresStore(DSN, schema=schema)
        await store.start()
        for message in messages:
            await store.on_message(message)
        await store.aclose()
        assert store.written == len(messages)

    anyio.run(record)
    (units,) = query(f'SELECT orderbook_units, total_ask_size FROM "{schema}".orderbooks')
    assert units == (
        [{"ask_price": 101.0, "bid_price": 100.0, "ask_size": 1.5, "bid_size": 2.5}],
        Decimal("1.5"),
    )
    (candle,) = query(
        f'SELECT type, opening_price, candle_acc_trade_volume, timestamp FROM "{schema}".candles'
    )
    assert candle == (
        "candle.1m",
        Decimal("0.1"),
        Decimal("10.123456789"),
        datetime(2023, 11, 14, 22, 13, 20, 2000, tzinfo=UTC),
    )
    (order,) = query(
        f'SELECT uuid, price, is_maker, trades_count, trade_uuid FROM "{schema}".my_orders'
    )
    assert order == ("u-1", Decimal("100.3"), True, 1, None)
    (asset,) = query(f'SELECT assets FROM "{schema}".my_assets')
    assert asset[0][0]["balance"] == "1234567.123456789012"
    (trade,) = query(f'SELECT trade_price, trade_volume FROM "{schema}".trades')
    assert trade == (Decimal("0.1"), Decimal("0.00012345"))
    # One id sequence across the tables, in order of arrival.
    ids = [
        query(f'SELECT id FROM "{schema}"."{t}"')[0][0]
        for t in ("orderbooks", "candles", "my_orders", "my_assets", "trades")
    ]
    assert ids == [1, 2, 3, 4, 5]


async def test_a_killed_backend_loses_no_accepted_row(
    sim: Simulator, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "upbus.plugins.postgres")

    def kill() -> int:
        rows = query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND application_name = %s",
            f"upbus {schema}",
        )
        return sum(1 for (done,) in rows if done)

    async with postgres_bus(sim, schema, batch_size=20, flush_interval=0.02) as bus:
        store = postgres_store.store_for(bus)
        assert store is not None
        watcher = Recorder()
        await bus.register_component(watcher, SPECS)
        for round_ in range(1, 3):
            await watcher.wait_for(lambda r=round_: store.written >= 100 * r)
            assert kill() == 1
        await watcher.wait_for(lambda: store.written >= 400)
    stats = store.stats()
    assert stats["lost"] == stats["pending"] == 0
    assert stats["written"] == stats["accepted"] == all_rows(schema)
    assert "reconnected" in caplog.text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    port = closed_port()
    store = PostgresStore(f"postgresql://postgres:s3cret@127.0.0.1:{port}/test")
    with pytest.raises(PostgresUnreachable) as caught:
        await store.start()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "s3cret" not in message
    assert "\n" not in message
    assert "s3cret" not in store.name


async def test_an_unreachable_server_at_startup_isolates_the_plugin(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port()
    dsn = f"postgresql://postgres:s3cret@127.0.0.1:{port}/test"
    async with postgres_bus(sim, "unused", dsn=dsn) as bus:
        assert postgres_store.store_for(bus) is None
        assert bus.plugins.failures["postgres"] == 1
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/test" in caplog.text
    assert "s3cret" not in caplog.text


def test_the_dsn_is_a_secret_in_the_settings() -> None:
    settings = upbus.Settings(
        plugins={"postgres": {"dsn": "postgresql://u:s3cret@db.example:5433/x"}}
    )
    section = settings.plugin_section("postgres", postgres_store.PostgresSettings)
    assert "s3cret" not in repr(section)
    assert section.db_schema == "upbus"
    assert postgres_store.where(section.dsn.get_secret_value()) == "db.example:5433/x"


def test_upbus_run_records_into_postgres_and_upbus_db_summarises_it(schema: str) -> None:
    env = {
        "UPBUS_PLUGINS__POSTGRES__ENABLED": "true",
        "UPBUS_PLUGINS__POSTGRES__SCHEMA": schema,
        "UPBUS_PLUGINS__POSTGRES__FLUSH_INTERVAL": "0.1",
    }
    result = run_upbus("run", "--sim", "--seconds", "2", "--no-store", env=env)
    assert result.returncode == 0, result.stderr
    tickers = count(schema, "tickers")
    assert tickers > 0
    # The store is named at start and its count given at exit, like SQLite's.
    assert f"recording into postgresql 127.0.0.1:5432/test schema {schema}" in result.stdout
    stored = re.search(r"stored (\d+) of (\d+) accepted messages in postgresql", result.stdout)
    assert stored is not None, result.stdout
    rows = sum(count(schema, table) for table in ("tickers", "trades"))
    assert int(stored.group(1)) == int(stored.group(2)) == rows
    result = run_upbus("db", DSN, "--schema", schema)
    assert result.returncode == 0, result.stderr
    assert f"tickers: {tickers} rows" in result.stdout
    assert "  KRW-BTC " in result.stdout


def test_upbus_db_names_an_unreachable_server() -> None:
    port = closed_port()
    result = run_upbus("db", f"postgresql://postgres:s3cret@127.0.0.1:{port}/test")
    assert result.returncode == 1
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/test" in result.stderr
    assert "s3cret" not in result.stderr


def test_binary_copy_stores_each_float_as_its_shortest_decimal_as_text_copy_does(
    schema: str,
) -> None:
    rng = random.Random(7)
    edges = [0.1, 0.30000000000000004, 0.0, -0.0, -3.5, 1e-07, 1.5e-05, 1e16, 1e22, 5e-324]
    edges += [1.7976931348623157e308, 140_123_000.0, 178_427_519_318.49756, 9999.9999]
    prices = edges + [rng.uniform(-1e12, 1e12) for _ in range(300)]
    prices += [round(rng.uniform(0, 1e6), rng.randint(0, 9)) for _ in range(300)]
    volumes = [rng.choice([None, rng.random(), rng.uniform(0, 1e-6)]) for _ in prices]
    trades = [
        msgspec.structs.replace(
            make_trade(sequential_id=i),
            trade_price=price,
            trade_volume=price * 3.3,
            best_ask_size=volume,
            timestamp=1_700_000_000_000 + i,
        )
        for i, (price, volume) in enumerate(zip(prices, volumes, strict=True))
    ]
    text_schema = f"{schema}_text"

    async def record(name: str, copy_format: postgres_store.CopyFormat) -> None:
        store = PostgresStore(DSN, schema=name, batch_size=100, copy_format=copy_format)
        await store.start()
        for trade in trades:
            await store.on_message(trade)
        await store.aclose()
        assert store.written == len(trades)

    columns = "sequential_id, trade_price, trade_volume, best_ask_size, timestamp, received_at"
    try:
        before = datetime.now(UTC)
        anyio.run(record, schema, "binary")
        after = datetime.now(UTC)
        anyio.run(record, text_schema, "text")
        binary = query(f'SELECT {columns} FROM "{schema}".trades ORDER BY id')
        text = query(f'SELECT {columns} FROM "{text_schema}".trades ORDER BY id')
    finally:
        with psycopg.connect(DSN, autocommit=True) as db:
            db.execute(f'DROP SCHEMA IF EXISTS "{text_schema}" CASCADE'.encode())
    assert len(binary) == len(text) == len(trades)
    for trade, got, expected in zip(trades, binary, text, strict=True):
        assert got[0] == trade.sequential_id
        assert got[1] == Decimal(repr(trade.trade_price))
        assert got[2] == Decimal(repr(trade.trade_volume))
        size = trade.best_ask_size
        assert got[3] == (None if size is None else Decimal(repr(size)))
        assert got[4] == datetime.fromtimestamp(trade.timestamp / 1000, UTC)
        assert before <= got[5] <= after
        # The same digits and scale as the server's own parsing of the text.
        assert [str(v) for v in got[:5]] == [str(v) for v in expected[:5]]


class WireProxy:
    """A TCP proxy in front of the test server that keeps what the client sends and can
    swallow the server's answer to its n-th COMMIT, hanging up instead."""

    COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"  # CommandComplete "COMMIT"

    def __init__(self, swallow_commit: int | None = None) -> None:
        self.sent = bytearray()
        self.commits = 0
        self.swallowed = 0
        self._swallow = swallow_commit

    async def relay(self, client: anyio.abc.SocketStream) -> None:
        server = await anyio.connect_tcp("127.0.0.1", 5432)
        async with client, server, anyio.create_task_group() as group:

            async def upstream() -> None:
                with contextlib.suppress(anyio.BrokenResourceError):
                    async for chunk in client:
                        self.sent += chunk
                        await server.send(chunk)
                group.cancel_scope.cancel()

            async def downstream() -> None:
                with contextlib.suppress(anyio.BrokenResourceError):
                    async for chunk in server:
                        if self.COMMIT_DONE in chunk:
                            self.commits += 1
                            if self.commits == self._swallow:
                                self.swallowed += 1
                                break
                        await client.send(chunk)
                group.cancel_scope.cancel()

            group.start_soon(upstream)
            group.start_soon(downstream)

    async def record(self, schema: str, messages: list[Message], **options: Any) -> PostgresStore:
        """``messages`` through a store connected via this proxy, in batches of 10."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        # Plain text on the wire, so that the proxy can read it.
        dsn = f"postgresql://postgres@127.0.0.1:{port}/test?sslmode=disable&gssencmode=disable"
        async with listener, anyio.create_task_group() as group:
            group.start_soon(listener.serve, self.relay)
            store = PostgresStore(dsn, schema=schema, batch_size=10, flush_interval=0.01, **options)
            await store.start()
            for message in messages:
                await store.on_message(message)
            await store.aclose()
            group.cancel_scope.cancel()
        return store


async def test_a_lost_acknowledgement_of_a_commit_does_not_write_the_batch_twice(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The server commits a batch and its answer never arrives: the rows are in the
    # table, and the store cannot know it.
    caplog.set_level(logging.WARNING, "upbus.plugins.postgres")
    proxy = WireProxy(swallow_commit=3)  # the schema's creation commits first
    trades = [make_trade(sequential_id=i) for i in range(1, 101)]
    store = await proxy.record(schema, list(trades))
    assert proxy.swallowed == 1
    assert "retrying" in caplog.text
    stats = store.stats()
    assert stats["lost"] == 0
    assert stats["written"] == stats["accepted"] == len(trades)
    rows = query(f'SELECT id, sequential_id FROM "{schema}".trades ORDER BY id')
    assert rows == [(i, i) for i in range(1, len(trades) + 1)]


@pytest.mark.parametrize(
    ("copy_format", "expected"),
    [
        ("auto", {"tickers": "text", "trades": "binary"}),
        ("binary", {"tickers": "binary", "trades": "binary"}),
        ("text", {"tickers": "text", "trades": "text"}),
    ],
)
async def test_copy_format_chooses_the_format_of_each_table_on_the_wire(
    schema: str, copy_format: str, expected: dict[str, str]
) -> None:
    proxy = WireProxy()
    messages: list[Message] = [make_ticker(100.0 + i, at_ms=START_MS + i) for i in range(15)]
    messages += [make_trade(sequential_id=i) for i in range(15)]
    store = await proxy.record(schema, messages, copy_format=copy_format)
    assert store.written == len(messages)
    sent = bytes(proxy.sent)
    for table, kind in expected.items():
        statements = re.findall(
            rf'COPY "{schema}"."{table}" \([^)]*\) FROM STDIN([^\x00]*)\x00'.encode(), sent
        )
        assert statements, table
        assert set(statements) == {b" (FORMAT BINARY)" if kind == "binary" else b""}, table
    assert count(schema, "tickers") == count(schema, "trades") == 15


async def test_the_section_chooses_text_copy(sim: Simulator, schema: str) -> None:
    async with postgres_bus(sim, schema, copy_format="text", flush_interval=0.05) as bus:
        store = postgres_store.store_for(bus)
        assert store is not None
        assert store.copy_format == "text"
        watcher = Recorder()
        await bus.register_component(watcher, SPECS)
        await watcher.wait_for(lambda: store.written >= 50)
    assert all_rows(schema) == store.accepted == store.written


@pytest.mark.parametrize(
    "value",
    [0.1, -0.0, 5e-324, 1.7976931348623157e308, 123456.789, 1e-8, 146892000.0, 3.0, -42.5],
)
def test_numeric_binary_reads_back_as_the_float_s_shortest_decimal_without_a_server(
    value: float,
) -> None:
    # numeric_binary leans on psycopg's encoders; a psycopg upgrade that changes them
    # fails here even where no PostgreSQL server runs.
    from psycopg.postgres import types
    from psycopg.types.numeric import NumericBinaryLoader

    loaded = NumericBinaryLoader(types["numeric"].oid).load(postgres_store.numeric_binary(value))
    expected = Decimal(repr(value))
    assert loaded == expected
    # numeric has no negative zero and no positive exponent (1.8e308 is written out);
    # any other value keeps its digits and scale.
    exponent = expected.as_tuple().exponent
    if value and isinstance(exponent, int) and exponent <= 0:
        assert loaded.as_tuple() == expected.as_tuple()
