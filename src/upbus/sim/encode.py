"""Server frames: DEFAULT / SIMPLE keys, LIST wrapping and exchange number spellings.

Messages are built as dicts keyed by DEFAULT names with exact values (``Decimal`` for
prices and sizes, ``int`` for timestamps and ids). A schema per message kind gives the
key order (as in the samples), the SIMPLE key and the spelling of each number in each
format. JSON is written by hand so those spellings survive (a JSON library would
reprint them).

Spelling choices, each matched to a raw wire sample (tests/test_sim_encode.py):

* ticker (a 2025 wire capture printed in the docs' Java example): scale-8
  BigDecimals (``158219000.00000000``, ``0E-8``), turnover with scale 16, rates with
  scale 10 but ``0`` when zero, 24 h turnover with scale 5 (``331187169240.21526``).
  The 2023 docs example printed prices plainly; the newer capture wins.
* trade (DEFAULT, docs 2024): scale-8 BigDecimals, best prices plain (``100473000``).
* trade (SIMPLE, 2021 recording): price ``127.0`` / ``0.00000113``, size as a Java double.
* orderbook (2026 probe): DEFAULT prices as Java doubles (``1.16539E8``), sizes with
  scale 8; SIMPLE prices plain, sizes as Java doubles (``7.9276E-4``).
* candle (docs): plain with one decimal (``109715000.0``); SIMPLE sizes as Java doubles.
* myOrder, myAsset: plain, exact (``1386929.37231066771348207123``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from upbus.sim.spelling import F5, F8, F16, Spelling, java_double, plain, plain_dot0, rate

__all__ = (
    "SCHEMAS",
    "Field",
    "encode_error",
    "encode_frame",
    "encode_message",
    "encode_status",
    "is_list_format",
    "is_simple_format",
)


@dataclass(frozen=True, slots=True)
class Field:
    """One key: DEFAULT name, SIMPLE name, number spellings (None: not a decimal)."""

    key: str
    simple: str
    default_spelling: Spelling | None = None
    simple_spelling: Spelling | None = None
    items: tuple[Field, ...] | None = None  # a list of objects with these fields


def _num(
    key: str, simple: str, default: Spelling, simple_spelling: Spelling | None = None
) -> Field:
    return Field(key, simple, default, simple_spelling or default)


def _val(key: str, simple: str) -> Field:
    return Field(key, simple)


_TICKER = (
    _val("type", "ty"),
    _val("code", "cd"),
    _num("opening_price", "op", F8),
    _num("high_price", "hp", F8),
    _num("low_price", "lp", F8),
    _num("trade_price", "tp", F8),
    _num("prev_closing_price", "pcp", F8),
    _num("acc_trade_price", "atp", F16),
    _val("change", "c"),
    _num("change_price", "cp", F8),
    _num("signed_change_price", "scp", F8),
    _num("change_rate", "cr", rate),
    _num("signed_change_rate", "scr", rate),
    _val("ask_bid", "ab"),
    _num("trade_volume", "tv", F8, java_double),
    _num("acc_trade_volume", "atv", F8),
    _val("trade_date", "tdt"),
    _val("trade_time", "ttm"),
    _val("trade_timestamp", "ttms"),
    _num("acc_ask_volume", "aav", F8),
    _num("acc_bid_volume", "abv", F8),
    _num("highest_52_week_price", "h52wp", F8),
    _val("highest_52_week_date", "h52wdt"),
    _num("lowest_52_week_price", "l52wp", F8),
    _val("lowest_52_week_date", "l52wdt"),
    _val("market_state", "ms"),
    _val("is_trading_suspended", "its"),
    _val("delisting_date", "dd"),
    _val("market_warning", "mw"),
    _val("timestamp", "tms"),
    _num("acc_trade_price_24h", "atp24h", F5),
    _num("acc_trade_volume_24h", "atv24h", F8),
    _val("stream_type", "st"),
)

_TRADE = (
    _val("type", "ty"),
    _val("code", "cd"),
    _val("timestamp", "tms"),
    _val("trade_date", "td"),
    _val("trade_time", "ttm"),
    _val("trade_timestamp", "ttms"),
    _num("trade_price", "tp", F8, plain_dot0),
    _num("trade_volume", "tv", F8, java_double),
    _val("ask_bid", "ab"),
    _num("prev_closing_price", "pcp", F8),
    _val("change", "c"),
    _num("change_price", "cp", F8),
    _val("sequential_id", "sid"),
    _num("best_ask_price", "bap", plain),
    _num("best_ask_size", "bas", F8, java_double),
    _num("best_bid_price", "bbp", plain),
    _num("best_bid_size", "bbs", F8, java_double),
    _val("stream_type", "st"),
)

_ORDERBOOK_UNIT = (
    _num("ask_price", "ap", java_double, plain),
    _num("bid_price", "bp", java_double, plain),
    _num("ask_size", "as", F8, java_double),
    _num("bid_size", "bs", F8, java_double),
)

_ORDERBOOK = (
    _val("type", "ty"),
    _val("code", "cd"),
    _val("timestamp", "tms"),
    _num("total_ask_size", "tas", F8, java_double),
    _num("total_bid_size", "tbs", F8, java_double),
    Field("orderbook_units", "obu", items=_ORDERBOOK_UNIT),
    _val("stream_type", "st"),
    _num("level", "lv", plain),
)

_CANDLE = (
    _val("type", "ty"),
    _val("code", "cd"),
    _val("candle_date_time_utc", "cdttmu"),
    _val("candle_date_time_kst", "cdttmk"),
    _num("opening_price", "op", plain_dot0),
    _num("high_price", "hp", plain_dot0),
    _num("low_price", "lp", plain_dot0),
    _num("trade_price", "tp", plain_dot0),
    _num("candle_acc_trade_volume", "catv", plain_dot0, java_double),
    _num("candle_acc_trade_price", "catp", plain_dot0, java_double),
    _val("timestamp", "tms"),
    _val("stream_type", "st"),
)

_MY_ORDER = (
    _val("type", "ty"),
    _val("code", "cd"),
    _val("uuid", "uid"),
    _val("ask_bid", "ab"),
    _val("order_type", "ot"),
    _val("state", "s"),
    _val("trade_uuid", "tuid"),
    _num("price", "p", plain),
    _num("avg_price", "ap", plain),
    _num("volume", "v", plain),
    _num("remaining_volume", "rv", plain),
    _num("executed_volume", "ev", plain),
    _val("trades_count", "tc"),
    _num("reserved_fee", "rsf", plain),
    _num("remaining_fee", "rmf", plain),
    _num("paid_fee", "pf", plain),
    _num("locked", "l", plain),
    _num("executed_funds", "ef", plain),
    _val("time_in_force", "tif"),
    _num("trade_fee", "tf", plain),
    _val("is_maker", "im"),
    _val("identifier", "id"),
    _val("smp_type", "smpt"),
    _num("prevented_volume", "pv", plain),
    _num("prevented_locked", "pl", plain),
    _val("trade_timestamp", "ttms"),
    _val("order_timestamp", "otms"),
    _val("timestamp", "tms"),
    _val("stream_type", "st"),
)

_MY_ASSET = (
    _val("type", "ty"),
    _val("asset_uuid", "astuid"),
    Field(
        "assets",
        "ast",
        items=(_val("currency", "cu"), _num("balance", "b", plain), _num("locked", "l", plain)),
    ),
    _val("asset_timestamp", "asttms"),
    _val("timestamp", "tms"),
    _val("stream_type", "st"),
)

_LIST_RESULT = (_val("type", "ty"), _val("codes", "cds"), _num("level", "lv", plain))

_LIST_REPLY = (
    _val("method", "mthd"),
    Field("result", "rslt", items=_LIST_RESULT),
    _val("ticket", "tckt"),
)

SCHEMAS: dict[str, tuple[Field, ...]] = {
    "ticker": _TICKER,
    "trade": _TRADE,
    "orderbook": _ORDERBOOK,
    "candle": _CANDLE,
    "myOrder": _MY_ORDER,
    "myAsset": _MY_ASSET,
    "list": _LIST_REPLY,
}


def is_simple_format(fmt: str) -> bool:
    """Whether ``fmt`` uses abbreviated keys."""
    return fmt in ("SIMPLE", "SIMPLE_LIST")


def is_list_format(fmt: str) -> bool:
    """Whether ``fmt`` wraps every frame in a JSON array."""
    return fmt in ("JSON_LIST", "SIMPLE_LIST")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_scalar(item) for item in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}: {value!r}")


def _object(schema: Sequence[Field], fields: Mapping[str, Any], simple: bool) -> str:
    # Keys absent from ``fields`` are left out; that is how optional keys (a list
    # entry's ``level``, ``codes``) are expressed.
    parts: list[str] = []
    for spec in schema:
        if spec.key not in fields:
            continue
        value = fields[spec.key]
        key = spec.simple if simple else spec.key
        if spec.items is not None:
            text = "[" + ",".join(_object(spec.items, item, simple) for item in value) + "]"
        elif spec.default_spelling is not None and isinstance(value, Decimal):
            spelling = spec.simple_spelling if simple else spec.default_spelling
            assert spelling is not None
            text = spelling(value)
        else:
            text = _scalar(value)
        parts.append(f'"{key}":{text}')
    return "{" + ",".join(parts) + "}"


def encode_message(kind: str, fields: Mapping[str, Any], *, simple: bool) -> str:
    """One message object of ``kind`` (a key of :data:`SCHEMAS`) as JSON text."""
    return _object(SCHEMAS[kind], fields, simple)


def encode_frame(messages: Sequence[tuple[str, Mapping[str, Any]]], fmt: str) -> bytes:
    """One frame payload: a single object, or an array for the ``*_LIST`` formats."""
    simple = is_simple_format(fmt)
    texts = [encode_message(kind, fields, simple=simple) for kind, fields in messages]
    if is_list_format(fmt):
        return ("[" + ",".join(texts) + "]").encode()
    if len(texts) != 1:
        raise ValueError("non-list formats carry exactly one message per frame")
    return texts[0].encode()


def encode_error(name: str, message: str) -> bytes:
    """An ``{"error":{...}}`` frame.

    The live probe saw ``message`` first for INVALID_PARAM and WRONG_FORMAT and
    ``name`` first otherwise (samples/error.json); the simulator does the same.
    """
    name_text = f'"name":{_scalar(name)}'
    message_text = f'"message":{_scalar(message)}'
    if name in ("INVALID_PARAM", "WRONG_FORMAT"):
        inner = f"{message_text},{name_text}"
    else:
        inner = f"{name_text},{message_text}"
    return ('{"error":{' + inner + "}}").encode()


def encode_status() -> bytes:
    """The keepalive reply to a text ``PING``."""
    return b'{"status":"UP"}'
