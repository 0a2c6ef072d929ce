"""PostgreSQL storage (plugin ``postgres``), beside the embedded SQLite store.

Needs the ``postgres`` extra (psycopg 3). Enabled by settings; with
``plugins.postgres.enabled`` false it contributes nothing::

    [plugins.postgres]
    enabled = true
    dsn = "postgresql://postgres@127.0.0.1:5432/test"
    schema = "upbus"                 # created if missing, with its tables
    specs = [{type = "ticker", codes = ["KRW-BTC", "KRW-ETH"]}]
    batch_size = 2000                # messages per COPY and transaction, at most
    flush_interval = 1.0
    max_pending = 10000
    write_retries = 8                # reconnects for one batch before it is lost
    copy_format = "auto"             # per table; or "binary", "text"

Each message type has a typed table in ``schema`` (``tickers``, ``trades``,
``orderbooks``, ``candles``, ``my_orders``, ``my_assets``) whose columns are the
message's DEFAULT field names after ``id`` (one sequence across all tables, in order
of arrival) and ``received_at``. Prices and volumes are ``numeric`` (a float is
stored by its shortest decimal form, the digits the exchange sent), times
(``timestamp``, ``trade_timestamp``, ``order_timestamp``, ``asset_timestamp``,
``received_at``) are ``timestamptz``, other integers ``bigint``, booleans
``boolean``, nested values ``jsonb``. Every table with a ``code`` has an index on
``(code, timestamp)``.

Rows are written with ``COPY``, one per table and one transaction per batch, by the
writer thread of :class:`~upbus.plugins.recording.BatchRecorder`, with its guarantees:
accepted == written + lost once closed. With ``copy_format = "auto"`` (the default)
each table gets the format that costs the writer less: binary for trades, orders and
assets, text for tickers, orderbooks and candles (``_TEXT_WHEN_AUTO``). A binary row
is the message's own values, picked in C: dumpers on the store's connection
(:func:`register_dumpers`) turn exchange milliseconds and ``received_at`` seconds into
``timestamptz`` and nested values into ``jsonb``, and a float is the ``numeric`` of
its ``repr`` (the shortest decimal that reads back as the same float: 0.1 is 0.1),
encoded once per distinct value, since prices repeat. When a batch fails because the
connection is lost (a server restart, a terminated backend), the writer reconnects
and writes the same batch again, up to ``write_retries`` times with a doubling
back-off; if the failure came after the server committed, the rows are found by
their ids and not written twice.
"""

from __future__ import annotations

import functools
import logging
import operator
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import anyio
import msgspec
import msgspec.inspect as mi
import orjson
from pydantic import Field, SecretStr

from upbus.plugin import Message, hookimpl
from upbus.plugins.recording import TABLE_LAYOUT, BatchRecorder, Item, RecorderSettings

if TYPE_CHECKING:
    import psycopg

    from upbus import Bus

__all__ = (
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DSN",
    "PostgresSettings",
    "PostgresStore",
    "PostgresUnreachable",
    "store_for",
    "summarize",
)

log = logging.getLogger("upbus.plugins.postgres")

NAME = "postgres"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_BATCH_SIZE = 2000
#: Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5
_TIME_FIELDS = frozenset({"timestamp", "trade_timestamp", "order_timestamp", "asset_timestamp"})


CopyFormat = Literal["auto", "binary", "text"]
# What "auto" writes each table with: the format that costs the writer thread less
# (bench/README.md). A ticker carries six floats that are new in every message (its
# cumulative volumes and amounts), an orderbook two (its totals); text COPY formats a
# float in C, while its exact binary numeric costs Python about a microsecond more.
# A trade's floats mostly repeat (prices, kept encoded), and binary then costs less:
# no text escaping, no datetime objects.
_TEXT_WHEN_AUTO = frozenset({"tickers", "orderbooks", "candles"})


class PostgresSettings(RecorderSettings):
    """The ``plugins.postgres`` section."""

    dsn: SecretStr = Field(
        default=SecretStr(DEFAULT_DSN),
        description="libpq connection string or URL; may hold a password, never logged.",
    )
    db_schema: str = Field(
        default="upbus", alias="schema", min_length=1, description="The schema of the tables."
    )
    # Larger than SQLite's: every batch pays a fixed cost here (a COPY per table, a
    # commit with its WAL flush, the server finishing the last rows while the writer
    # waits). A batch is written when full or once its oldest message has waited
    # flush_interval, so the cap only matters in bursts and adds no latency.
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE, ge=1, description="Messages per COPY and transaction, at most."
    )
    write_retries: int = Field(
        default=8, ge=0, description="Reconnects for one failed batch before it is lost."
    )
    copy_format: CopyFormat = Field(
        default="auto",
        description=(
            "'auto': per table, the COPY format that costs the writer less (binary for "
            "trades, text for tickers); or 'binary' or 'text' for every table."
        ),
    )


class PostgresUnreachable(ConnectionError):
    """The server could not be reached; the message names host and port, never a password."""


def where(dsn: str) -> str:
    """``host:port/dbname`` of ``dsn``, without credentials."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(dsn)
    except Exception:
        return "(unparsable dsn)"
    host = info.get("host") or "localhost"
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or info.get('user') or ''}"


def connect(dsn: str, application_name: str = "upbus") -> psycopg.Connection[Any]:
    """A connection to ``dsn``, or :class:`PostgresUnreachable` naming host and port."""
    import psycopg

    try:
        return psycopg.connect(
            dsn,
            connect_timeout=CONNECT_TIMEOUT,
            autocommit=True,
            application_name=application_name,
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.rsplit(" failed: ", 1)[-1]
        raise PostgresUnreachable(
            f"cannot connect to PostgreSQL at {where(dsn)}: {reason}"
        ) from None


# -- binary values -----------------------------------------------------------------------

# PostgreSQL's binary timestamptz counts microseconds from 2000-01-01 UTC.
_PG_EPOCH_S = 946_684_800
_PG_EPOCH_MS = _PG_EPOCH_S * 1000
_INT8 = struct.Struct(">q").pack


# Powers of ten that widen a decimal fraction to whole base-10000 digits.
_WIDEN = (1, 10, 100, 1000)


@functools.cache
def _int_to_numeric() -> Callable[[int], Any]:
    import psycopg
    from psycopg.pq import Format

    # psycopg's own encoder (its C one, with the binary extra) of an int as numeric.
    numeric = psycopg.postgres.types["numeric"].oid
    return psycopg.adapters.get_dumper_by_oid(numeric, Format.BINARY)(int).dump


def numeric_binary(value: float | Decimal) -> bytes:
    """The binary ``numeric`` of ``value``; a float is the decimal of its ``repr``.

    ``repr`` is the shortest decimal that reads back as the same float, i.e. the
    digits the exchange sent: 0.1 is stored as 0.1, not 0.1000000000000000055….
    """
    if isinstance(value, float):
        text = repr(value)
        whole, _, fraction = text.partition(".")
        if not fraction or "e" in fraction:  # an exponent, inf or nan: rare
            value = Decimal(text)
        else:
            # psycopg's int encoder is several times faster than its Decimal one: encode
            # the digits as an int, widened to whole base-10000 digits after the point,
            # then move the point back in the header (weight, and dscale for the scale).
            scale = len(fraction)
            widen = -scale % 4
            out = _int_to_numeric()(int(whole + fraction) * _WIDEN[widen])
            if type(out) is not bytearray:
                out = bytearray(out)
            weight = int.from_bytes(out[2:4], "big", signed=True) - (scale + widen) // 4
            out[2:4] = weight.to_bytes(2, "big", signed=True)
            out[6:8] = scale.to_bytes(2, "big")
            return bytes(out)
    from psycopg.types.numeric import dump_decimal_to_numeric_binary

    return bytes(dump_decimal_to_numeric_binary(Decimal(value)))


class _NumericEncodings(dict[float | None, bytes | None]):
    """Binary ``numeric`` by float, filled on a miss and emptied when full.

    A price, a previous close or a 52-week high repeats across messages, and a
    lookup (in C, through ``map``) is much cheaper than encoding again. ``None`` is
    ``NULL``.
    """

    SIZE = 1 << 16

    def __missing__(self, key: float | None) -> bytes | None:
        if len(self) >= self.SIZE:
            self.clear()
        value = self[key] = None if key is None else numeric_binary(key)
        return value


@functools.cache
def _dumpers() -> tuple[type[Any], ...]:
    from psycopg.adapt import Dumper
    from psycopg.postgres import types
    from psycopg.pq import Format

    class TimestampDumper(Dumper):
        """Unix milliseconds (int, the exchange's times) or seconds (float,
        ``received_at``) as binary ``timestamptz``."""

        format = Format.BINARY
        oid = types["timestamptz"].oid

        def dump(self, obj: Any) -> bytes:
            if type(obj) is int:
                return _INT8((obj - _PG_EPOCH_MS) * 1000)
            return _INT8(round((obj - _PG_EPOCH_S) * 1_000_000))

    class JsonbDumper(Dumper):
        """A nested value (orderbook units, assets) as binary ``jsonb``."""

        format = Format.BINARY
        oid = types["jsonb"].oid

        def dump(self, obj: Any) -> bytes:
            return b"\x01" + msgspec.json.encode(obj)  # format version 1, then JSON text

    return TimestampDumper, JsonbDumper


def register_dumpers(connection: psycopg.Connection[Any]) -> None:
    """Make binary ``COPY`` with ``set_types`` on ``connection`` take what
    :meth:`_Table.row` gives: Unix ms or s for ``timestamptz``, nested values for
    ``jsonb``, encoded ``numeric`` as ``bytea``. Only typed ``COPY`` uses them (they
    are registered by oid only), so queries on the connection adapt values as usual."""
    from psycopg.types.string import BytesBinaryDumper

    # By oid, psycopg would pick the pure-Python dumper of psycopg.Binary for bytea.
    connection.adapters.register_dumper(None, BytesBinaryDumper)
    for dumper in _dumpers():
        connection.adapters.register_dumper(None, dumper)


# -- tables ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    sql_type: str
    kind: str  # "plain", "time" (ms → timestamptz) or "json"
    required: bool


def _column(field: mi.Field) -> _Column:
    kind = field.type
    if isinstance(kind, mi.UnionType):
        rest = [t for t in kind.types if not isinstance(t, mi.NoneType)]
        kind = rest[0] if len(rest) == 1 else kind
    if isinstance(kind, mi.IntType) and field.name in _TIME_FIELDS:
        return _Column(field.name, "timestamptz", "time", field.required)
    if isinstance(kind, mi.FloatType):
        return _Column(field.name, "numeric", "plain", field.required)
    if isinstance(kind, mi.BoolType):
        return _Column(field.name, "boolean", "plain", field.required)
    if isinstance(kind, mi.IntType):
        return _Column(field.name, "bigint", "plain", field.required)
    if isinstance(kind, mi.StrType | mi.LiteralType):
        return _Column(field.name, "text", "plain", field.required)
    return _Column(field.name, "jsonb", "json", field.required)


_COPY_TYPE = {
    "numeric": "numeric",
    "timestamptz": "timestamptz",
    "bigint": "int8",
    "boolean": "bool",
    "text": "text",
    "jsonb": "jsonb",
}


def _ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


_NUMERIC = _NumericEncodings()


def _picker(positions: list[int]) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """The values at ``positions`` as a tuple (``itemgetter`` of one is no tuple)."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda values: tuple(values[p] for p in positions)


class _Table:
    """One message class's table, with the columns derived from the class's fields."""

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
        self.indexes = indexes
        fields = cls.__struct_fields__
        self._plan = [(fields.index(c.name), c.kind) for c in self.columns]
        # Binary COPY names the numeric columns last, so a row is two C-level picks
        # from the message's values, the second mapped through the encodings.
        numeric = [c for c in self.columns if c.sql_type == "numeric"]
        other = [c for c in self.columns if c.sql_type != "numeric"]
        self._pick_other = _picker([fields.index(c.name) for c in other])
        self._pick_numeric = _picker([fields.index(c.name) for c in numeric])
        self._binary_columns = (*other, *numeric)
        #: The format "auto" writes this table with.
        self.auto_binary = name not in _TEXT_WHEN_AUTO
        #: The types that pick psycopg's dumpers for a binary row (``Copy.set_types``).
        #: Binary COPY data carries no types: the server reads each field as its
        #: column's type. "bytea" passes the numeric encodings through unchanged.
        self.copy_types = (
            "int8",
            "timestamptz",
            *(_COPY_TYPE[c.sql_type] for c in other),
            *("bytea" for _ in numeric),
        )

    def statements(self, schema: str) -> list[str]:
        table = f'"{schema}"."{self.name}"'
        columns = ", ".join(
            f'"{c.name}" {c.sql_type}' + (" NOT NULL" if c.required else "") for c in self.columns
        )
        out = [
            f"CREATE TABLE IF NOT EXISTS {table} "
            f"(id bigint PRIMARY KEY, received_at timestamptz NOT NULL, {columns})"
        ]
        # Columns that newer message classes have.
        out += [
            f'ALTER TABLE {table} ADD COLUMN IF NOT EXISTS "{c.name}" {c.sql_type}'
            for c in self.columns
        ]
        for index in self.indexes:
            name = f"{self.name}_{'_'.join(index)}"
            out.append(
                f'CREATE INDEX IF NOT EXISTS "{name}" ON {table} '
                f"({', '.join(f'{chr(34)}{c}{chr(34)}' for c in index)})"
            )
        return out

    def copy_sql(self, schema: str, binary: bool = True) -> str:
        columns = self._binary_columns if binary else self.columns
        names = ", ".join(f'"{c.name}"' for c in columns)
        options = " (FORMAT BINARY)" if binary else ""
        return f'COPY "{schema}"."{self.name}" (id, received_at, {names}) FROM STDIN{options}'

    def row(self, ident: int, received_at: float, message: Message) -> tuple[object, ...]:
        """The values for binary ``COPY``, converted by the dumpers of :func:`register_dumpers`."""
        values = msgspec.structs.astuple(message)
        encoded = map(_NUMERIC.__getitem__, self._pick_numeric(values))
        return (ident, received_at, *self._pick_other(values), *encoded)

    def text_row(self, ident: int, received_at: float, message: Message) -> list[object]:
        """The values for text ``COPY``, converted here."""
        values = msgspec.structs.astuple(message)
        out: list[object] = [ident, datetime.fromtimestamp(received_at, UTC)]
        for position, kind in self._plan:
            value = values[position]
            if value is not None and kind != "plain":
                if kind == "time":
                    value = _ms(value)
                else:
                    value = orjson.dumps(msgspec.to_builtins(value)).decode()
            out.append(value)
        return out


TABLES: tuple[_Table, ...] = tuple(
    _Table(t.name, t.cls, t.types, omit=t.omit, indexes=t.indexes) for t in TABLE_LAYOUT
)
_BY_TYPE = {kind: table for table in TABLES for kind in table.types}


def create_schema(connection: psycopg.Connection[Any], schema: str) -> None:
    """Create the schema, its tables and indexes; add columns newer message classes have."""
    with connection.transaction():
        # Concurrent CREATE ... IF NOT EXISTS can still collide; one creator at a time.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"upbus {schema}",))
        connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'.encode())
        for table in TABLES:
            for statement in table.statements(schema):
                connection.execute(statement.encode())


def _check_schema_name(schema: str) -> str:
    if '"' in schema or "\x00" in schema:
        raise ValueError(f"schema name {schema!r} may not contain a double quote")
    return schema


Pending = dict[_Table, list[tuple[int, float, Message]]]
"""A batch by table: ``(id, received_at, message)`` in order of arrival."""


class _PostgresSink:
    """The writer thread's connection; reopened when it is lost."""

    def __init__(self, dsn: str, schema: str, retries: int, copy_format: CopyFormat) -> None:
        self._dsn = dsn
        self._schema = schema
        self._retries = retries
        self._format = copy_format
        # The schema in the name tells a store's backend apart in pg_stat_activity.
        self._application = f"upbus {schema}"
        self._db: psycopg.Connection[Any] | None = self._connect()
        try:
            create_schema(self._db, schema)
            self._next_id = self._max_id(self._db) + 1
        except BaseException:
            self._db.close()
            raise
        self.reconnects = 0

    def _connect(self) -> psycopg.Connection[Any]:
        db = connect(self._dsn, self._application)
        register_dumpers(db)
        return db

    def _max_id(self, db: psycopg.Connection[Any]) -> int:
        parts = " UNION ALL ".join(
            f'SELECT max(id) FROM "{self._schema}"."{t.name}"' for t in TABLES
        )
        row = db.execute(f"SELECT max(m) FROM ({parts}) AS ids(m)".encode()).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def write(self, items: list[Item]) -> None:
        import psycopg

        # Ids are given once: a retry writes the same rows under the same ids.
        pending: Pending = {}
        ident = self._next_id
        for received_at, message in items:
            pending.setdefault(_BY_TYPE[message.type], []).append((ident, received_at, message))
            ident += 1
        self._next_id = ident
        delay = 0.1
        for attempt in range(self._retries + 1):
            try:
                if self._db is None or self._db.closed:
                    self._db = self._connect()
                    self.reconnects += 1
                    log.warning("postgres %s: reconnected", where(self._dsn))
                if attempt and self._committed(self._db, pending):
                    return  # the lost acknowledgement was of a commit
                self._copy(self._db, pending)
                return
            except (psycopg.OperationalError, PostgresUnreachable) as exc:
                if attempt == self._retries:
                    raise
                log.warning(
                    "postgres %s: writing %d rows failed (%s); retrying in %.1f s",
                    where(self._dsn),
                    len(items),
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    delay,
                )
                if self._db is not None:
                    self._db.close()
                self._db = None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _copy(self, db: psycopg.Connection[Any], pending: Pending) -> None:
        with db.transaction(), db.cursor() as cursor:
            for table, rows in pending.items():
                binary = table.auto_binary if self._format == "auto" else self._format == "binary"
                # Each row is made as it is written, so the server works on the
                # rows already sent while the next ones are made.
                make = table.row if binary else table.text_row
                with cursor.copy(table.copy_sql(self._schema, binary).encode()) as copy:
                    if binary:
                        copy.set_types(table.copy_types)
                    for ident, received_at, message in rows:
                        copy.write_row(make(ident, received_at, message))

    def _committed(self, db: psycopg.Connection[Any], pending: Pending) -> bool:
        table, rows = next(iter(pending.items()))
        found = db.execute(
            f'SELECT 1 FROM "{self._schema}"."{table.name}" WHERE id = %s'.encode(),
            (rows[0][0],),
        ).fetchone()
        return found is not None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


class PostgresStore(BatchRecorder):
    """Records messages into PostgreSQL (see the module docstring)."""

    def __init__(
        self,
        dsn: str = DEFAULT_DSN,
        *,
        schema: str = "upbus",
        write_retries: int = 8,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = 1.0,
        max_pending: int = 10_000,
        copy_format: CopyFormat = "auto",
    ) -> None:
        """``copy_format`` is ``"auto"`` (per table, the cheaper format), ``"binary"`` or
        ``"text"`` (the server converts each value, so it also fits a column an operator
        changed to another type)."""
        if copy_format not in ("auto", "binary", "text"):
            raise ValueError(f"copy_format must be auto, binary or text, not {copy_format!r}")
        self.schema = _check_schema_name(schema)
        self.copy_format = copy_format
        self.path = f"postgresql {where(dsn)} schema {schema}"
        super().__init__(
            self.path,
            lambda: _PostgresSink(dsn, self.schema, write_retries, copy_format),
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_pending=max_pending,
        )


# -- reading -----------------------------------------------------------------------------


def summarize(dsn: str, schema: str = "upbus") -> dict[str, Any]:
    """Rows per table and per code, with first/last exchange ``timestamp`` in Unix ms;
    the same shape as :func:`upbus.plugins.sqlite_store.summarize`."""
    _check_schema_name(schema)
    db = connect(dsn)
    try:
        present = {
            row[0]
            for row in db.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        }
        tables: dict[str, Any] = {}
        for table in TABLES:
            if table.name not in present:
                continue
            name = f'"{schema}"."{table.name}"'
            row = db.execute(
                f"SELECT count(*), extract(epoch FROM min(received_at)), "
                f"extract(epoch FROM max(received_at)) FROM {name}".encode()
            ).fetchone()
            assert row is not None
            codes: dict[str, Any] = {}
            if any(c.name == "code" for c in table.columns):
                for code, count, low, high in db.execute(
                    f"SELECT code, count(*), (extract(epoch FROM min(timestamp)) * 1000)::bigint, "
                    f"(extract(epoch FROM max(timestamp)) * 1000)::bigint FROM {name} "
                    "GROUP BY code ORDER BY code".encode()
                ):
                    codes[code] = {"rows": count, "first_timestamp": low, "last_timestamp": high}
            tables[table.name] = {
                "rows": row[0],
                "first_received_at": None if row[1] is None else float(row[1]),
                "last_received_at": None if row[2] is None else float(row[2]),
                "codes": codes,
            }
        return {"path": f"{where(dsn)} schema {schema}", "tables": tables}
    finally:
        db.close()


# -- the plugin --------------------------------------------------------------------------

_running: weakref.WeakKeyDictionary[Bus, PostgresStore] = weakref.WeakKeyDictionary()


def store_for(bus: Bus) -> PostgresStore | None:
    """The store this plugin runs for ``bus``, while it runs."""
    return _running.get(bus)


async def _start(bus: Bus, store: PostgresStore, specs: list[dict[str, Any]]) -> None:
    await store.start()
    try:
        await bus.register_component(store, specs)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await store.aclose()
        raise
    _running[bus] = store


@hookimpl
def upbus_startup(bus: Bus) -> Awaitable[None] | None:
    config = bus.settings.plugin_section(NAME, PostgresSettings)
    if not config.enabled:
        return None
    store = PostgresStore(
        config.dsn.get_secret_value(),
        schema=config.db_schema,
        write_retries=config.write_retries,
        copy_format=config.copy_format,
        batch_size=config.batch_size,
        flush_interval=config.flush_interval,
        max_pending=config.max_pending,
    )
    return _start(bus, store, config.specs)


@hookimpl
def upbus_shutdown(bus: Bus) -> Awaitable[None] | None:
    store = _running.pop(bus, None)
    return None if store is None else store.aclose()
