"""Tests of upbus.core.wire._codec and upbus.core.wire._messages against the recorded Upbit samples.

Every server message in the samples directory is decoded from its exact source text:
the sample files are parsed with a loader that keeps each number token as written, and
messages are re-serialised from those tokens, so spellings like ``1.16539E8``,
``6E-8`` and ``31883000.00000000`` reach the decoder unchanged. Each message is also
converted to the other format (DEFAULT <-> SIMPLE) with this file's own copy of the
SIMPLE abbreviation tables (docs/protocol.md, "Messages"), deliberately not the codec's,
so a misreading of the protocol cannot hide by being shared.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import msgspec
import orjson
import pytest
from factories import make_ticker
from hypothesis import given, settings
from hypothesis import strategies as st
from upbit_samples import SAMPLES, needs_samples

from upbus.core._errors import FrameDecodeError, SpecError, UpbusError
from upbus.core.wire._codec import (
    FrameDecoder,
    encode_list_subscriptions,
    encode_request,
    new_ticket,
    to_default_dict,
)
from upbus.core.wire._messages import (
    CANDLE_TYPES,
    DATA_TYPES,
    MESSAGE_CLASSES,
    Asset,
    Candle,
    DelistingDate,
    ErrorMessage,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    Status,
    SubscriptionEntry,
    SubscriptionList,
    Ticker,
    Trade,
)

decoder = FrameDecoder()

# --- Raw-number JSON ---------------------------------------------------------------


class RawNumber(str):
    """A JSON number token exactly as written in the source text."""


def load_raw(text: str) -> Any:
    """Parse JSON, keeping every number as its source token (a RawNumber)."""
    return json.loads(text, parse_float=RawNumber, parse_int=RawNumber)


def dump_raw(value: Any) -> str:
    """Compact JSON text in which each RawNumber is written back verbatim."""
    if isinstance(value, RawNumber):
        return str(value)
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=False)}:{dump_raw(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump_raw(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


# --- The SIMPLE abbreviations, transcribed from docs/protocol.md, "Messages" ---------

TICKER_SIMPLE = {
    "type": "ty", "code": "cd", "opening_price": "op", "high_price": "hp",
    "low_price": "lp", "trade_price": "tp", "prev_closing_price": "pcp", "change": "c",
    "change_price": "cp", "signed_change_price": "scp", "change_rate": "cr",
    "signed_change_rate": "scr", "trade_volume": "tv", "acc_trade_volume": "atv",
    "acc_trade_volume_24h": "atv24h", "acc_trade_price": "atp",
    "acc_trade_price_24h": "atp24h", "trade_date": "tdt", "trade_time": "ttm",
    "trade_timestamp": "ttms", "ask_bid": "ab", "acc_ask_volume": "aav",
    "acc_bid_volume": "abv", "highest_52_week_price": "h52wp",
    "highest_52_week_date": "h52wdt", "lowest_52_week_price": "l52wp",
    "lowest_52_week_date": "l52wdt", "market_state": "ms", "is_trading_suspended": "its",
    "delisting_date": "dd", "market_warning": "mw", "timestamp": "tms",
    "stream_type": "st",
    # Legacy (before about 2021), ignored by the decoder.
    "trade_status": "ts", "market_state_for_ios": "msfi",
}  # fmt: skip
TRADE_SIMPLE = {
    "type": "ty", "code": "cd", "trade_price": "tp", "trade_volume": "tv", "ask_bid": "ab",
    "prev_closing_price": "pcp", "change": "c", "change_price": "cp", "trade_date": "td",
    "trade_time": "ttm", "trade_timestamp": "ttms", "timestamp": "tms",
    "sequential_id": "sid", "best_ask_price": "bap", "best_ask_size": "bas",
    "best_bid_price": "bbp", "best_bid_size": "bbs", "stream_type": "st",
}  # fmt: skip
ORDERBOOK_SIMPLE = {
    "type": "ty", "code": "cd", "total_ask_size": "tas", "total_bid_size": "tbs",
    "orderbook_units": "obu", "timestamp": "tms", "level": "lv", "stream_type": "st",
}  # fmt: skip
UNIT_SIMPLE = {"ask_price": "ap", "bid_price": "bp", "ask_size": "as", "bid_size": "bs"}
CANDLE_SIMPLE = {
    "type": "ty", "code": "cd", "candle_date_time_utc": "cdttmu",
    "candle_date_time_kst": "cdttmk", "opening_price": "op", "high_price": "hp",
    "low_price": "lp", "trade_price": "tp", "candle_acc_trade_volume": "catv",
    "candle_acc_trade_price": "catp", "timestamp": "tms", "stream_type": "st",
}  # fmt: skip
MY_ORDER_SIMPLE = {
    "type": "ty", "code": "cd", "uuid": "uid", "ask_bid": "ab", "order_type": "ot",
    "state": "s", "trade_uuid": "tuid", "price": "p", "avg_price": "ap", "volume": "v",
    "remaining_volume": "rv", "executed_volume": "ev", "trades_count": "tc",
    "reserved_fee": "rsf", "remaining_fee": "rmf", "paid_fee": "pf", "locked": "l",
    "executed_funds": "ef", "time_in_force": "tif", "trade_fee": "tf", "is_maker": "im",
    "identifier": "id", "smp_type": "smpt", "prevented_volume": "pv",
    "prevented_locked": "pl", "trade_timestamp": "ttms", "order_timestamp": "otms",
    "timestamp": "tms", "stream_type": "st",
}  # fmt: skip
MY_ASSET_SIMPLE = {
    "type": "ty", "asset_uuid": "astuid", "assets": "ast", "asset_timestamp": "asttms",
    "timestamp": "tms", "stream_type": "st",
}  # fmt: skip
ASSET_SIMPLE = {"currency": "cu", "balance": "b", "locked": "l"}
LIST_SIMPLE = {"method": "mthd", "result": "rslt", "ticket": "tckt"}
LIST_ENTRY_SIMPLE = {"type": "ty", "codes": "cds", "level": "lv"}

# Per kind: the top-level table, and the table of the items of a nested list field.
SIMPLE_TABLES: dict[str, tuple[dict[str, str], dict[str, dict[str, str]]]] = {
    "ticker": (TICKER_SIMPLE, {}),
    "trade": (TRADE_SIMPLE, {}),
    "orderbook": (ORDERBOOK_SIMPLE, {"orderbook_units": UNIT_SIMPLE}),
    "candle": (CANDLE_SIMPLE, {}),
    "myOrder": (MY_ORDER_SIMPLE, {}),
    "myAsset": (MY_ASSET_SIMPLE, {"assets": ASSET_SIMPLE}),
    "list": (LIST_SIMPLE, {"result": LIST_ENTRY_SIMPLE}),
}
LEGACY_FIELDS = {"trade_status", "market_state_for_ios"}


def kind_of(message: dict[str, Any]) -> str:
    name = message.get("type", message.get("ty"))
    if name is None:
        return "list"
    return "candle" if str(name).startswith("candle.") else str(name)


def rename(obj: dict[str, Any], table: dict[str, str], nested: dict[str, dict[str, str]]) -> Any:
    return {
        table.get(key, key): (
            [rename(item, nested[key], {}) for item in value] if key in nested else value
        )
        for key, value in obj.items()
    }


def to_simple(default: dict[str, Any], kind: str) -> dict[str, Any]:
    table, nested = SIMPLE_TABLES[kind]
    return rename(default, table, nested)  # type: ignore[no-any-return]


def to_default(simple: dict[str, Any], kind: str) -> dict[str, Any]:
    table, nested = SIMPLE_TABLES[kind]
    inverse = {short: full for full, short in table.items()}
    nested_by_short = {table[key]: {s: f for f, s in t.items()} for key, t in nested.items()}
    return rename(simple, inverse, nested_by_short)  # type: ignore[no-any-return]


# --- Samples ----------------------------------------------------------------------------


class Sample:
    def __init__(self, file: str, example: dict[str, Any]) -> None:
        self.id: str = example["id"]
        self.file = file
        self.format: str = example.get("format", "DEFAULT")
        self.message: Any = example["message"]
        self.text = dump_raw(self.message)
        kind = kind_of(self.message) if isinstance(self.message, dict) else "?"
        if self.format == "SIMPLE":
            self.default = to_default(self.message, kind)
            self.simple = self.message
        else:
            self.default = self.message
            self.simple = to_simple(self.message, kind) if kind in SIMPLE_TABLES else None


def load_samples() -> list[Sample]:
    if not SAMPLES.is_dir():
        return []
    samples = []
    for path in sorted(SAMPLES.glob("*.json")):
        if path.name == "requests.json":  # client frames, not server messages
            continue
        document = load_raw(path.read_text(encoding="utf-8"))
        samples += [Sample(path.name, example) for example in document["examples"]]
    return samples


ALL = load_samples()
DATA = [
    s for s in ALL if s.file not in {"error.json", "ping_reply.json", "list_subscriptions.json"}
]
# The 2018 transcripts name the market "market"/"mk" and carry no type: a current server
# never sends that shape and no message class can represent it; they must be rejected.
UNREPRESENTABLE = {"ticker-legacy-2018", "trade-simple-legacy-2018"}
DECODABLE = [s for s in DATA if s.id not in UNREPRESENTABLE]


def ids(samples: list[Sample]) -> list[str]:
    return [s.id for s in samples]


# --- Field checks ---------------------------------------------------------------------


def check_value(actual: Any, expected: Any, where: str) -> None:
    if isinstance(expected, RawNumber):
        if type(actual) is float:
            assert actual == float(expected), where
        elif type(actual) is int:
            assert actual == int(expected), where  # int() also rejects a "1.0" token
        elif type(actual) is Decimal:
            assert actual == Decimal(expected), where
        else:
            pytest.fail(f"{where}: {actual!r} is not a number")
    elif expected is None or isinstance(expected, bool):
        assert actual is expected, where
    elif isinstance(expected, str):
        assert type(actual) is str, where
        assert actual == expected, where
    elif isinstance(expected, list):
        assert type(actual) is tuple, where
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            check_value(a, e, f"{where}[{index}]")
    elif isinstance(expected, dict):
        check_fields(actual, expected, where)
    else:
        pytest.fail(f"{where}: unexpected sample value {expected!r}")


def check_fields(message: Any, default: dict[str, Any], where: str = "$") -> None:
    """Every DEFAULT key of the sample is an attribute of the message with its value."""
    assert isinstance(message, msgspec.Struct)
    for key, expected in default.items():
        if key in LEGACY_FIELDS:
            assert not hasattr(message, key)
            continue
        check_value(getattr(message, key), expected, f"{where}.{key}")


def decode_one(frame: bytes | str) -> Any:
    messages = decoder.decode(frame)
    assert len(messages) == 1
    return messages[0]


# --- Data messages from the samples ------------------------------------------------------


@needs_samples
def test_samples_found() -> None:
    assert {s.file for s in DATA} >= {
        "ticker.json",
        "trade.json",
        "orderbook.json",
        "candle.json",
        "myOrder.json",
        "myAsset.json",
    }
    # The loader really keeps the wire spellings.
    texts = "".join(s.text for s in ALL)
    for spelling in ("1.16539E8", "6E-8", "7.9276E-4", "5.0E-4", "31883000.00000000"):
        assert spelling in texts
    assert "1386929.37231066771348207123" in texts


@needs_samples
@pytest.mark.parametrize("sample", DECODABLE, ids=ids(DECODABLE))
def test_sample_decodes_with_its_values(sample: Sample) -> None:
    message = decode_one(sample.text.encode())
    assert type(message) is MESSAGE_CLASSES[sample.default["type"]]
    check_fields(message, sample.default)
    # A text frame gives the same message as a binary one.
    assert decode_one(sample.text) == message


@needs_samples
@pytest.mark.parametrize("sample", DECODABLE, ids=ids(DECODABLE))
def test_sample_in_both_formats_gives_one_message(sample: Sample) -> None:
    message = decode_one(sample.text.encode())
    simple = decode_one(dump_raw(sample.simple))
    default = decode_one(dump_raw(sample.default))
    assert simple == message
    assert default == message
    # Exactly the public classes, also for nested items of a SIMPLE frame.
    assert type(simple) is type(message)
    for name in ("orderbook_units", "assets"):
        for item in getattr(simple, name, ()):
            assert type(item) in (OrderbookUnit, Asset)
    assert hash(simple) == hash(message)


@needs_samples
@pytest.mark.parametrize("sample", DECODABLE, ids=ids(DECODABLE))
def test_sample_round_trips_through_default_dict(sample: Sample) -> None:
    message = decode_one(sample.text)
    as_dict = to_default_dict(message)
    assert set(sample.default) - LEGACY_FIELDS <= set(as_dict)
    assert decode_one(orjson.dumps(as_dict)) == message
    # Any JSON library can write it (Decimals are strings, no tuples).
    assert decode_one(json.dumps(as_dict)) == message
    assert json.loads(json.dumps(as_dict)) == as_dict
    # And its SIMPLE spelling decodes to the same message too.
    assert decode_one(orjson.dumps(to_simple(as_dict, kind_of(as_dict)))) == message


@needs_samples
@pytest.mark.parametrize("sample_id", sorted(UNREPRESENTABLE))
def test_legacy_2018_shapes_are_rejected(sample_id: str) -> None:
    (sample,) = [s for s in DATA if s.id == sample_id]
    with pytest.raises(FrameDecodeError, match="none of the keys"):
        decoder.decode(sample.text)


@needs_samples
def test_legacy_orderbook_without_level_decodes_with_level_zero() -> None:
    (sample,) = [s for s in DATA if s.id == "orderbook-simple-recorded-2021-krw"]
    book = decode_one(sample.text)
    assert book.level == 0.0
    assert len(book.orderbook_units) == 15


@needs_samples
def test_nullable_and_missing_my_order_fields() -> None:
    (wait,) = [s for s in DATA if s.id == "myorder-wait-live-ccxt-2025"]
    order = decode_one(wait.text)
    assert order.volume is None
    assert order.trade_uuid is None
    assert order.is_maker is None
    assert order.prevented_locked == 0.0
    assert order.trade_timestamp is None
    # The SG message predates several fields and has its keys sorted (type not first).
    (sg,) = [s for s in DATA if s.id == "myorder-cancel-live-sg-2024"]
    assert not sg.text.startswith('{"type"')
    order = decode_one(sg.text)
    assert order.code == "SGD-XRP"
    assert order.identifier is None
    assert order.smp_type is None


@needs_samples
def test_exponent_and_trailing_zero_spellings() -> None:
    (probe,) = [s for s in DATA if s.id == "orderbook-default-probe-2026-snapshot"]
    assert '"ask_price":1.16539E8' in probe.text
    book = decode_one(probe.text)
    assert book.orderbook_units[0].ask_price == 116539000.0
    (simple,) = [s for s in DATA if s.id == "orderbook-simple-probe-2026-snapshot"]
    book = decode_one(simple.text)
    assert book.orderbook_units[0].bid_size == 0.00079276
    assert book.orderbook_units[1].ask_size == 0.0005
    (trade,) = [s for s in DATA if s.id == "trade-simple-recorded-2021-btc-market"]
    assert decode_one(trade.text).change_price == 6e-8


@needs_samples
def test_my_asset_sample_keeps_every_digit() -> None:
    (sample,) = [s for s in DATA if s.file == "myAsset.json"]
    asset = decode_one(sample.text.encode())
    assert asset.code == ""
    (krw,) = asset.assets
    assert str(krw.balance) == "1386929.37231066771348207123"
    assert str(krw.locked) == "10329.670127489597585685"
    as_dict = to_default_dict(asset)
    assert "code" not in as_dict
    assert as_dict["assets"] == [
        {
            "currency": "KRW",
            "balance": "1386929.37231066771348207123",
            "locked": "10329.670127489597585685",
        }
    ]


# --- List frames -------------------------------------------------------------------------


def list_frame(texts: list[str]) -> str:
    return "[" + ",".join(texts) + "]"


@needs_samples
def test_json_list_and_simple_list_frames() -> None:
    singles = [decode_one(s.text) for s in DECODABLE]
    default_texts = [dump_raw(s.default) for s in DECODABLE]
    simple_texts = [dump_raw(s.simple) for s in DECODABLE]
    # Mixed kinds in one frame.
    assert decoder.decode(list_frame(default_texts)) == singles
    assert decoder.decode(list_frame(simple_texts).encode()) == singles
    # One kind only (the typed list fast path), as in the official JSON_LIST trade example.
    trades = [s for s in DECODABLE if s.default["type"] == "trade"]
    expected = [decode_one(s.text) for s in trades]
    assert decoder.decode(list_frame([dump_raw(s.default) for s in trades])) == expected
    simple = decoder.decode(list_frame([dump_raw(s.simple) for s in trades]))
    assert simple == expected
    assert all(type(m) is Trade for m in simple)
    books = [s for s in DECODABLE if s.default["type"] == "orderbook"]
    simple = decoder.decode(list_frame([dump_raw(s.simple) for s in books]))
    assert simple == [decode_one(s.text) for s in books]
    for book in simple:
        assert isinstance(book, Orderbook)
        assert all(type(u) is OrderbookUnit for u in book.orderbook_units)


@needs_samples
def test_single_item_list_frames() -> None:
    for sample in DECODABLE:
        assert decoder.decode(list_frame([sample.text])) == [decode_one(sample.text)]


def test_list_frame_with_a_bad_item_is_rejected() -> None:
    good = '{"status":"UP"}'
    for bad in ("1", "[]", '{"type":"nope"}', '{"ty":"trade"}', "{}"):
        with pytest.raises(FrameDecodeError):
            decoder.decode(list_frame([good, bad]))


# --- Exact decimals ------------------------------------------------------------------------

MY_ASSET_30 = (
    '{"type":"myAsset","asset_uuid":"u","assets":[{"currency":"KRW",'
    '"balance":123456789012345.678901234567890123,"locked":0.000000000000000000000000000001},'
    '{"currency":"BTC","balance":1.23456789012345678901234567890E-5,"locked":6E-8}],'
    '"asset_timestamp":1,"timestamp":2,"stream_type":"REALTIME"}'
)


def test_my_asset_balance_with_30_digits_is_exact() -> None:
    asset = decode_one(MY_ASSET_30.encode())
    krw, btc = asset.assets
    assert krw.balance == Decimal("123456789012345.678901234567890123")
    assert krw.locked == Decimal("1E-30")
    assert btc.balance == Decimal("0.0000123456789012345678901234567890")
    assert btc.locked == Decimal("6E-8")
    # The same through SIMPLE, and back through the DEFAULT dict.
    simple = MY_ASSET_30
    for full, short in {**MY_ASSET_SIMPLE, **ASSET_SIMPLE}.items():
        simple = simple.replace(f'"{full}":', f'"{short}":')
    assert decode_one(simple) == asset
    assert decode_one(orjson.dumps(to_default_dict(asset))) == asset


@pytest.mark.parametrize("balance", ['"NaN"', '"sNaN"', '"Infinity"', '"-Infinity"'])
def test_my_asset_rejects_non_finite_balances(balance: str) -> None:
    frame = MY_ASSET_30.replace("123456789012345.678901234567890123", balance)
    with pytest.raises(FrameDecodeError, match="finite"):
        decoder.decode(frame)


# --- Status, errors, LIST_SUBSCRIPTIONS --------------------------------------------------


@needs_samples
def test_status_sample() -> None:
    (sample,) = [s for s in ALL if s.file == "ping_reply.json"]
    status = decode_one(sample.text.encode())
    assert status == Status(status="UP")
    assert to_default_dict(status) == {"status": "UP"}


ERRORS = [s for s in ALL if s.file == "error.json"]


@needs_samples
@pytest.mark.parametrize("sample", ERRORS, ids=ids(ERRORS))
def test_error_samples(sample: Sample) -> None:
    error = decode_one(sample.text.encode())
    assert type(error) is ErrorMessage
    assert error.name == sample.message["error"]["name"]
    assert error.message == sample.message["error"]["message"]
    assert to_default_dict(error) == sample.message
    assert decode_one(orjson.dumps(to_default_dict(error))) == error


LISTS = [s for s in ALL if s.file == "list_subscriptions.json"]


@needs_samples
@pytest.mark.parametrize("sample", LISTS, ids=ids(LISTS))
def test_list_subscriptions_samples(sample: Sample) -> None:
    reply = decode_one(sample.text)
    assert type(reply) is SubscriptionList
    assert reply.method == "LIST_SUBSCRIPTIONS"
    assert reply.ticket == sample.message["ticket"]
    assert [e.type for e in reply.result] == [e["type"] for e in sample.message["result"]]
    check_fields(reply, sample.default)
    assert to_default_dict(reply) == json.loads(sample.text)
    # SIMPLE keys, alone and inside a SIMPLE_LIST array.
    simple_text = dump_raw(sample.simple)
    assert '"mthd"' in simple_text
    assert '"rslt"' in simple_text
    assert '"tckt"' in simple_text
    simple = decode_one(simple_text)
    assert simple == reply
    assert all(type(entry) is SubscriptionEntry for entry in simple.result)
    assert decoder.decode(list_frame([simple_text])) == [reply]
    assert decoder.decode(list_frame([sample.text]).encode()) == [reply]


def test_list_subscriptions_entries_without_codes_or_level() -> None:
    reply = decode_one('{"mthd":"LIST_SUBSCRIPTIONS","rslt":[{"ty":"myAsset"}],"tckt":"t"}')
    assert reply.result == (SubscriptionEntry(type="myAsset"),)
    assert to_default_dict(reply) == {
        "method": "LIST_SUBSCRIPTIONS",
        "result": [{"type": "myAsset"}],
        "ticket": "t",
    }


# --- Detection details ----------------------------------------------------------------------


def test_reordered_keys_and_whitespace_are_accepted() -> None:
    trade = {
        "type": "trade", "code": "KRW-BTC", "trade_price": 1.5, "trade_volume": 2.0,
        "ask_bid": "BID", "prev_closing_price": 1.0, "change": "RISE", "change_price": 0.5,
        "trade_date": "2024-10-31", "trade_time": "01:07:42", "trade_timestamp": 1,
        "timestamp": 2, "sequential_id": 3, "stream_type": "REALTIME",
    }  # fmt: skip
    expected = decode_one(json.dumps(trade, separators=(",", ":")))
    reordered = dict(reversed(trade.items()))
    assert decode_one(json.dumps(reordered)) == expected
    assert decode_one(" \n" + json.dumps(trade, indent=2) + "\n") == expected
    simple = dict(reversed(to_simple(trade, "trade").items()))
    assert decode_one(json.dumps(simple)) == expected
    assert decoder.decode(" [ " + json.dumps(simple) + " ] ") == [expected]


def test_every_candle_type() -> None:
    assert len(CANDLE_TYPES) == 9
    for name in CANDLE_TYPES:
        default = {
            "type": name, "code": "KRW-BTC", "candle_date_time_utc": "2026-08-26T08:08:00",
            "candle_date_time_kst": "2026-08-26T17:08:00", "opening_price": 1,
            "high_price": 2, "low_price": 0.5, "trade_price": 1.5,
            "candle_acc_trade_volume": 3, "candle_acc_trade_price": 4,
            "timestamp": 5, "stream_type": "SNAPSHOT",
        }  # fmt: skip
        for frame in (default, to_simple(default, "candle")):
            candle = decode_one(orjson.dumps(frame))
            assert type(candle) is Candle
            assert candle.type == name
            assert candle.high_price == 2.0
            assert candle.timestamp == 5


def test_data_types_and_classes() -> None:
    assert set(DATA_TYPES) == set(MESSAGE_CLASSES)
    assert {MESSAGE_CLASSES[t] for t in DATA_TYPES} == {
        Ticker,
        Trade,
        Orderbook,
        Candle,
        MyOrder,
        MyAsset,
    }


def test_messages_are_immutable() -> None:
    unit = OrderbookUnit(ask_price=1, bid_price=0.5, ask_size=2, bid_size=3)
    with pytest.raises(AttributeError):
        unit.ask_price = 2  # type: ignore[misc]
    book = decode_one(
        '{"ty":"orderbook","cd":"KRW-BTC","tms":1,"tas":2,"tbs":3,'
        '"obu":[{"ap":1,"bp":0.5,"as":2,"bs":3}],"st":"SNAPSHOT"}'
    )
    assert book.orderbook_units == (unit,)
    with pytest.raises(AttributeError):
        book.code = "KRW-ETH"
    with pytest.raises(AttributeError):
        book.orderbook_units[0].ask_size = 0


def test_payload_types() -> None:
    frame = b'{"status":"UP"}'
    assert decoder.decode(bytearray(frame)) == [Status(status="UP")]
    assert decoder.decode(memoryview(frame)) == [Status(status="UP")]
    with pytest.raises(FrameDecodeError) as info:
        decoder.decode(bytearray(b"{}"))
    assert info.value.sample == b"{}"
    with pytest.raises(TypeError):
        decoder.decode(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("wire", "value"),
    [
        ("null", None),
        ('"2026-10-01"', "2026-10-01"),
        ('{"year":2026,"month":10,"day":1}', DelistingDate(year=2026, month=10, day=1)),
    ],
)
def test_delisting_date_shapes(wire: str, value: object) -> None:
    # No sample shows a non-null delisting date (docs/protocol.md, "Messages"): a string
    # and the SDK's object are both accepted, so that a notice is not lost to a decode error.
    ticker = {
        "type": "ticker", "code": "KRW-X", "opening_price": 1, "high_price": 1,
        "low_price": 1, "trade_price": 1, "prev_closing_price": 1, "change": "EVEN",
        "change_price": 0, "signed_change_price": 0, "change_rate": 0,
        "signed_change_rate": 0, "trade_volume": 1, "acc_trade_volume": 1,
        "acc_trade_volume_24h": 1, "acc_trade_price": 1, "acc_trade_price_24h": 1,
        "trade_date": "20260923", "trade_time": "031700", "trade_timestamp": 1,
        "ask_bid": "ASK", "acc_ask_volume": 1, "acc_bid_volume": 1,
        "highest_52_week_price": 1, "highest_52_week_date": "2026-01-01",
        "lowest_52_week_price": 1, "lowest_52_week_date": "2026-01-01",
        "market_state": "ACTIVE", "delisting_date": None, "timestamp": 2,
        "stream_type": "REALTIME",
    }  # fmt: skip
    text = json.dumps(ticker).replace('"delisting_date": null', f'"delisting_date": {wire}')
    message = decode_one(text)
    assert message.delisting_date == value
    assert message.is_trading_suspended is None  # deprecated, absent here
    assert decode_one(orjson.dumps(to_default_dict(message))) == message
    assert decode_one(json.dumps(to_simple(ticker, "ticker")).replace("null", wire)) == message


# --- Malformed frames -----------------------------------------------------------------------

MALFORMED: list[bytes | str] = [
    b"",
    b"   ",
    b"\x00\x01\x02garbage",
    b"hello",
    "PING",
    b"{}",
    b"[]",
    b"[[]]",
    b"[1, 2]",
    b"null",
    b"true",
    b"42",
    b'"text"',
    b'{"type":"nope"}',
    b'{"ty":"nope"}',
    b'{"type":"ticker"}',
    b'{"type":5}',
    b'{"type":null}',
    b'{"status":1}',
    b'{"error":"x"}',
    b'{"error":{"message":"no name"}}',
    b'{"method":"LIST_SUBSCRIPTIONS"}',
    b'{"mthd":"LIST_SUBSCRIPTIONS","rslt":[{"cds":["KRW-BTC"]}]}',
    b'{"status":"UP"} trailing',
    b'{"status":"UP"',
    b'{"type":"candle.2m","code":"KRW-BTC"}',
    # Valid JSON, wrong field types.
    b'{"type":"trade","code":"KRW-BTC","trade_price":"1.5","trade_volume":1,"ask_bid":"BID",'
    b'"prev_closing_price":1,"change":"RISE","change_price":1,"trade_date":"d",'
    b'"trade_time":"t","trade_timestamp":1,"timestamp":1,"sequential_id":1,"stream_type":"S"}',
    b'{"ty":"orderbook","cd":"KRW-BTC","tms":1,"tas":1,"tbs":1,"obu":{},"st":"S"}',
    b'{"ty":"orderbook","cd":"KRW-BTC","tms":1.5,"tas":1,"tbs":1,"obu":[],"st":"S"}',
    b'{"type":"myAsset","asset_uuid":"u","assets":[{"currency":"KRW","balance":true,'
    b'"locked":0}],"asset_timestamp":1,"timestamp":1,"stream_type":"R"}',
    # Invalid UTF-8, and a lone surrogate in a text frame.
    b'{"status":"\xff\xfe"}',
    b'{"error":{"name":"\xed\xa0\x80","message":""}}',
    '{"status":"\ud800"}',
    # Nesting deeper than the parser recurses.
    b'{"status":"UP","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 100_000,
]


@pytest.mark.parametrize("frame", MALFORMED, ids=[repr(f[:30]) for f in MALFORMED])
def test_malformed_frames_raise_frame_decode_error(frame: bytes | str) -> None:
    with pytest.raises(FrameDecodeError) as info:
        decoder.decode(frame)
    error = info.value
    assert isinstance(error, UpbusError)
    assert isinstance(error, ValueError)
    assert error.sample == frame[:200]
    assert type(error.sample) is type(frame)
    assert error.reason


def iter_prefixes(text: str) -> Iterator[bytes]:
    data = text.encode()
    for end in range(len(data)):
        yield data[:end]


@needs_samples
def test_every_truncation_of_every_sample_is_rejected() -> None:
    for sample in ALL:
        for prefix in iter_prefixes(sample.text):
            with pytest.raises(FrameDecodeError):
                decoder.decode(prefix)


PUBLIC_CLASSES = {*MESSAGE_CLASSES.values(), Status, ErrorMessage, SubscriptionList}
CONTROL = (Status, ErrorMessage, SubscriptionList)


def assert_decodes_or_rejects(frame: bytes | str) -> None:
    data, control, errors = decoder.decode_batch([frame])
    try:
        messages = decoder.decode(frame)
    except FrameDecodeError:
        assert (data, control, len(errors)) == ([], [], 1)  # the batch path agrees
        return
    assert messages
    # Only public classes come out (a SIMPLE object was given its public class back).
    assert all(type(m) in PUBLIC_CLASSES for m in messages)
    assert not errors
    assert data == [m for m in messages if not isinstance(m, CONTROL)]
    assert control == [m for m in messages if isinstance(m, CONTROL)]


def test_a_batch_splits_data_control_and_errors_in_frame_order() -> None:
    one, two, three = (make_ticker(price) for price in (1.0, 2.0, 3.0))
    error = {"error": {"name": "INVALID_AUTH", "message": "x"}}
    frames: list[bytes | str] = [
        b'{"type":"ticker","code":"KRW-BTC","trade_price":1}',  # fields missing
        msgspec.json.encode(one),
        '{"status":"UP"}',
        b"garbage",
        b"[" + msgspec.json.encode(two) + b"," + orjson.dumps(error) + b"]",
        msgspec.json.encode(three).decode(),  # a text frame
    ]
    data, control, errors = decoder.decode_batch(frames)
    assert data == [one, two, three]
    assert [type(m) for m in control] == [Status, ErrorMessage]
    assert [e.sample[:9] for e in errors] == [b'{"type":"', b"garbage"]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_frame_decode_error(frame: bytes) -> None:
    assert_decodes_or_rejects(frame)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_only_raises_frame_decode_error(frame: str) -> None:
    assert_decodes_or_rejects(frame)


KEYS = st.sampled_from(
    ["type", "ty", "code", "cd", "status", "error", "name", "message", "method", "mthd",
     "rslt", "result", "obu", "assets", "balance", "timestamp", "tms", "x"]
)  # fmt: skip
TYPES = st.sampled_from([*DATA_TYPES, "nope", ""])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TYPES | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json_only_raises_frame_decode_error(value: Any) -> None:
    assert_decodes_or_rejects(json.dumps(value))
    assert_decodes_or_rejects(json.dumps([value]))


@needs_samples
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_samples_only_raise_frame_decode_error(data: st.DataObject) -> None:
    sample = data.draw(st.sampled_from(ALL))
    frame = bytearray(sample.text.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    assert_decodes_or_rejects(bytes(frame))


# --- Requests --------------------------------------------------------------------------------


def test_encode_request_parses_back() -> None:
    entries: list[dict[str, object]] = [
        {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
        {"type": "orderbook", "codes": ["KRW-BTC.15"], "level": 10000},
        {"type": "trade", "codes": ("KRW-XRP",), "is_only_realtime": True},
    ]
    text = encode_request("tk", entries, "SIMPLE_LIST")
    assert isinstance(text, str)
    assert json.loads(text) == [
        {"ticket": "tk"},
        {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
        {"type": "orderbook", "codes": ["KRW-BTC.15"], "level": 10000},
        {"type": "trade", "codes": ["KRW-XRP"], "is_only_realtime": True},
        {"format": "SIMPLE_LIST"},
    ]
    assert json.loads(encode_request("tk", [{"type": "myAsset"}])) == [
        {"ticket": "tk"},
        {"type": "myAsset"},
        {"format": "DEFAULT"},
    ]


def test_encode_list_subscriptions() -> None:
    text = encode_list_subscriptions("0e66c0ac", "SIMPLE")
    assert isinstance(text, str)
    assert json.loads(text) == [
        {"ticket": "0e66c0ac"},
        {"method": "LIST_SUBSCRIPTIONS"},
        {"format": "SIMPLE"},
    ]


@pytest.mark.parametrize(
    ("ticket", "fmt", "field"), [("", "DEFAULT", "ticket"), ("t", "XML", "format")]
)
def test_encode_rejects_bad_ticket_or_format(ticket: str, fmt: str, field: str) -> None:
    with pytest.raises(SpecError) as info:
        encode_request(ticket, [{"type": "ticker", "codes": ["KRW-BTC"]}], fmt)
    assert info.value.field == field
    with pytest.raises(SpecError):
        encode_list_subscriptions(ticket, fmt)


def test_new_ticket_is_a_fresh_uuid4() -> None:
    tickets = {new_ticket() for _ in range(100)}
    assert len(tickets) == 100
    assert all(uuid.UUID(t).version == 4 for t in tickets)
