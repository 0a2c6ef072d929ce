"""SQLite storage, the embedded default (plugin ``sqlite``).

Enabled by settings; with ``plugins.sqlite.enabled`` false it contributes nothing::

    [plugins.sqlite]
    enabled = true
    path = "upbus.db"                # created if missing, appended to if not
    specs = [{type = "ticker", codes = ["KRW-BTC", "KRW-ETH"]},
             {type = "trade", codes = ["KRW-BTC"]}]
    batch_size = 500                 # messages per write transaction, at most
    flush_interval = 1.0             # seconds the writer holds a partial batch, at most
    max_pending = 10000              # accepted but unwritten messages before backpressure

Each message type has a typed table (``tickers``, ``trades``, ``orderbooks``,
``candles``, ``my_orders``, ``my_assets``) whose columns are the message's DEFAULT
field names, after ``id`` (one sequence across all tables, so the order of arrival
survives) and ``received_at`` (Unix seconds). Numbers are REAL or INTEGER, text is
TEXT, booleans INTEGER, and nested values (orderbook units, assets, an object
``delisting_date``) JSON text; every table with a ``code`` has an index on
``(code, timestamp)``. A row holds the whole message, so :mod:`upbus.plugins.replay`
can turn it back into the frame it came from.

The write path is :mod:`upbus.plugins.recording`'s, shared with the JSON Lines
recorder: lossless delivery, accepted in one step that no cancellation can split,
one writer thread that owns the database connection and writes one transaction
per batch in WAL mode, and backpressure instead of loss. The ``upbus_shutdown``
hook closes the store: it stops accepting, the writer writes everything accepted,
and the database is closed before the bus stops.
"""

from __future__ import annotations

import heapq
import logging
import sqlite3
from collections.abc import Awaitable, Generator, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.inspect as mi
import orjson
from pydantic import Field

from upbus.plugin import Message, hookimpl
from upbus.plugins.recording import (
    TABLE_LAYOUT,
    BatchRecorder,
    FileRecorderSettings,
    Item,
    RecorderPlugin,
)

if TYPE_CHECKING:
    from upbus import Bus

__all__ = (
    "BUSY_TIMEOUT",
    "SqliteSettings",
    "SqliteStore",
    "iter_frames",
    "store_for",
    "summarize",
)

log = logging.getLogger("upbus.plugins.sqlite")

NAME = "sqlite"
#: Seconds a write waits for another process's lock before the batch fails.
BUSY_TIMEOUT = 5.0


class SqliteSettings(FileRecorderSettings):
    """The ``plugins.sqlite`` section."""

    path: Path = Field(default=Path("upbus.db"), description="The database file.")


# -- tables ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    sql_type: str  # REAL, INTEGER or TEXT
    kind: str  # "plain", "bool" (stored 0/1) or "json" (stored as JSON text)
    required: bool


def _column(field: mi.Field) -> _Column:
    kind = field.type
    if isinstance(kind, mi.UnionType):
        rest = [t for t in kind.types if not isinstance(t, mi.NoneType)]
        kind = rest[0] if len(rest) == 1 else kind
    if isinstance(kind, mi.FloatType):
        return _Column(field.name, "REAL", "plain", field.required)
    if isinstance(kind, mi.BoolType):
        return _Column(field.name, "INTEGER", "bool", field.required)
    if isinstance(kind, mi.IntType):
        return _Column(field.name, "INTEGER", "plain", field.required)
    if isinstance(kind, mi.StrType | mi.LiteralType):
        return _Column(field.name, "TEXT", "plain", field.required)
    return _Column(field.name, "TEXT", "json", field.required)


class _Table:
    """One message class's table, with the column list derived from the class's fields."""

    def __init__(
        self,
        name: str,
        cls: type[Message],
        types: tuple[str, ...],
        *,
        omit: frozenset[str] = frozenset({"type"}),
        indexes: tuple[tuple[str, ...], ...] = (("code", "timestamp"),),
    ) -> None:
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        self.name = name
        self.types = types
        self.columns = tuple(_column(f) for f in info.fields if f.name not in omit)
        self.kinds = {column.name: column.kind for column in self.columns}
        self.indexes = indexes
        fields = cls.__struct_fields__
        self._plan = [(fields.index(c.name), c.kind == "json") for c in self.columns]
        names = ", ".join(f'"{c.name}"' for c in self.columns)
        marks = ", ".join("?" for _ in range(len(self.columns) + 2))
        self.insert_sql = f'INSERT INTO "{name}" (id, received_at, {names}) VALUES ({marks})'

    def create_sql(self) -> str:
        columns = ", ".join(
            f'"{c.name}" {c.sql_type}' + (" NOT NULL" if c.required else "") for c in self.columns
        )
        return (
            f'CREATE TABLE IF NOT EXISTS "{self.name}" '
            f"(id INTEGER PRIMARY KEY, received_at REAL NOT NULL, {columns})"
        )

    def row(self, ident: int, received_at: float, message: Message) -> list[object]:
        values = msgspec.structs.astuple(message)
        out: list[object] = [ident, received_at]
        for position, as_json in self._plan:
            value = values[position]
            if as_json and value is not None:
                value = orjson.dumps(msgspec.to_builtins(value)).decode()
            out.append(value)
        return out


TABLES: tuple[_Table, ...] = tuple(
    _Table(t.name, t.cls, t.types, omit=t.omit, indexes=t.indexes) for t in TABLE_LAYOUT
)
_BY_TYPE = {kind: table for table in TABLES for kind in table.types}


def create_schema(connection: sqlite3.Connection) -> None:
    """Create the tables and indexes, adding columns that newer message classes have."""
    for table in TABLES:
        connection.execute(table.create_sql())
        present = {row[1] for row in connection.execute(f'PRAGMA table_info("{table.name}")')}
        for column in table.columns:
            if column.name not in present:
                connection.execute(
                    f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {column.sql_type}'
                )
        for index in table.indexes:
            name = f"{table.name}_{'_'.join(index)}"
            columns = ", ".join(f'"{c}"' for c in index)
            connection.execute(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table.name}" ({columns})')


class _SqliteSink:
    """The writer thread's connection; sqlite3's default ``check_same_thread`` makes any
    use from another thread (the event loop) an error rather than a silent stall."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit, one per batch.
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL survives a process crash; only power loss can cost the last batch.
            self._db.execute("PRAGMA synchronous=NORMAL")
            create_schema(self._db)
            last = max(_max_id(self._db, table.name) for table in TABLES)
        except BaseException:
            self._db.close()
            raise
        self._next_id = last + 1

    def write(self, items: list[Item]) -> None:
        rows: dict[_Table, list[list[object]]] = {}
        ident = self._next_id
        for received_at, message in items:
            table = _BY_TYPE[message.type]
            rows.setdefault(table, []).append(table.row(ident, received_at, message))
            ident += 1
        self._next_id = ident
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, table_rows in rows.items():
                self._db.executemany(table.insert_sql, table_rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


def _max_id(db: sqlite3.Connection, table: str) -> int:
    value = db.execute(f'SELECT MAX(id) FROM "{table}"').fetchone()[0]
    return int(value) if value is not None else 0


class SqliteStore(BatchRecorder):
    """Records messages into the SQLite database at ``path`` (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        self.path = Path(path)
        super().__init__(
            f"sqlite {self.path}",
            lambda: _SqliteSink(self.path),
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_pending=max_pending,
        )


# -- reading -----------------------------------------------------------------------------


def _connect_read_only(path: str | Path) -> sqlite3.Connection:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"no such database: {path}")
    # mode=ro never creates a file; check_same_thread=False because a replay reads it
    # from whichever worker thread runs the next chunk, one at a time.
    return sqlite3.connect(f"{resolved.as_uri()}?mode=ro", uri=True, check_same_thread=False)


def _tables_in(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def summarize(path: str | Path) -> dict[str, Any]:
    """Rows per table and per code, with first/last ``received_at`` and exchange ``timestamp``.

    ``{"path": ..., "tables": {"trades": {"rows": 120, "first_received_at": 1.7e9,
    "last_received_at": ..., "codes": {"KRW-BTC": {"rows": 120, "first_timestamp":
    <ms>, "last_timestamp": <ms>}}}}}``; tables the file lacks are left out.
    """
    db = _connect_read_only(path)
    try:
        present = _tables_in(db)
        tables: dict[str, Any] = {}
        for table in TABLES:
            if table.name not in present:
                continue
            name = f'"{table.name}"'
            (rows,) = db.execute(f"SELECT COUNT(*) FROM {name}").fetchone()
            # id follows arrival, so the ends of the id order are the ends in time.
            first = db.execute(f"SELECT received_at FROM {name} ORDER BY id LIMIT 1").fetchone()
            last = db.execute(f"SELECT received_at FROM {name} ORDER BY id DESC LIMIT 1").fetchone()
            codes: dict[str, Any] = {}
            if "code" in table.kinds:
                for code, count, low, high in db.execute(
                    f"SELECT code, COUNT(*), MIN(timestamp), MAX(timestamp) FROM {name} "
                    "GROUP BY code ORDER BY code"
                ):
                    codes[code] = {"rows": count, "first_timestamp": low, "last_timestamp": high}
            tables[table.name] = {
                "rows": rows,
                "first_received_at": first[0] if first else None,
                "last_received_at": last[0] if last else None,
                "codes": codes,
            }
        return {"path": str(path), "tables": tables}
    finally:
        db.close()


def iter_frames(
    path: str | Path, types: frozenset[str] | None = None
) -> Generator[tuple[float, bytes], None, None]:
    """``(received_at, frame)`` for every stored message, in order of arrival.

    Each frame is the message as a DEFAULT JSON frame, which
    :class:`~upbus.core.wire._codec.FrameDecoder` decodes into an equal message.
    ``types`` keeps only tables holding those message types.
    """
    db = _connect_read_only(path)
    try:
        present = _tables_in(db)
        streams = [
            _table_frames(db, table)
            for table in TABLES
            if table.name in present and (types is None or not types.isdisjoint(table.types))
        ]
        for _ident, received_at, frame in heapq.merge(*streams, key=itemgetter(0)):
            yield received_at, frame
    finally:
        db.close()


def _table_frames(db: sqlite3.Connection, table: _Table) -> Iterator[tuple[int, float, bytes]]:
    cursor = db.execute(f'SELECT * FROM "{table.name}" ORDER BY id')
    names = [description[0] for description in cursor.description]
    fields = [
        (position, name, table.kinds.get(name, "plain"))
        for position, name in enumerate(names)
        if name not in ("id", "received_at")
    ]
    ident_at, received_at = names.index("id"), names.index("received_at")
    lead: dict[str, Any] = {} if "type" in table.kinds else {"type": table.types[0]}
    for row in cursor:
        message = dict(lead)
        for position, name, kind in fields:
            value = row[position]
            if value is not None and kind != "plain":
                value = bool(value) if kind == "bool" else orjson.loads(value)
            message[name] = value
        yield row[ident_at], row[received_at], orjson.dumps(message)


# -- the plugin --------------------------------------------------------------------------

_plugin = RecorderPlugin(NAME, SqliteSettings, SqliteStore)


def store_for(bus: Bus) -> SqliteStore | None:
    """The store this plugin runs for ``bus``, while it runs."""
    return _plugin.recorder_for(bus)


@hookimpl
def upbus_startup(bus: Bus) -> Awaitable[None] | None:
    return _plugin.startup(bus)


@hookimpl
def upbus_shutdown(bus: Bus) -> Awaitable[None] | None:
    return _plugin.shutdown(bus)
