"""The simulator's encoder against the real messages in the shared Upbit samples.

Samples are read keeping each number's raw spelling; re-encoding a sample's values
must give back the same spellings, and live frames must carry the samples' keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anyio
import pytest
from upbit_samples import SAMPLES
from websockets.asyncio.client import ClientConnection, connect

from upbus.sim import SimConfig, Simulator
from upbus.sim.encode import SCHEMAS, Field, encode_error, encode_message, encode_status
from upbus.sim.protocol import error_message
from upbus.sim.spelling import F8, F10, fixed, java_bigdecimal, java_double, plain, plain_dot0

# A 2025 wire capture printed (from raw bytes) in the docs' Java WebSocket example,
# https://docs.upbit.com/kr/ (Java "Websocket 연결", page updated 2026-01-07). It is
# newer than samples/ticker.json and the simulator follows it; not yet in samples/.
TICKER_2025 = (
    '{"type":"ticker","code":"KRW-BTC","opening_price":158219000.00000000,'
    '"high_price":159278000.00000000,"low_price":157588000.00000000,'
    '"trade_price":158200000.00000000,"prev_closing_price":158200000.00000000,'
    '"acc_trade_price":95088751392.9099200000000000,"change":"EVEN","change_price":0E-8,'
    '"signed_change_price":0E-8,"change_rate":0,"signed_change_rate":0,"ask_bid":"ASK",'
    '"trade_volume":0.00011188,"acc_trade_volume":600.09226312,"trade_date":"20250926",'
    '"trade_time":"082646","trade_timestamp":1758875206936,"acc_ask_volume":341.67996226,'
    '"acc_bid_volume":258.41230086,"highest_52_week_price":169900000.00000000,'
    '"highest_52_week_date":"2025-08-14","lowest_52_week_price":80635000.00000000,'
    '"lowest_52_week_date":"2024-10-10","market_state":"ACTIVE","is_trading_suspended":false,'
    '"delisting_date":null,"market_warning":"NONE","timestamp":1758875206974,'
    '"acc_trade_price_24h":331188513477.17233,"acc_trade_volume_24h":2083.83396972,'
    '"stream_type":"REALTIME"}'
)


class Raw(str):
    """A JSON number kept exactly as spelled."""

    __slots__ = ()


def load_raw(text: str) -> Any:
    return json.loads(text, parse_float=Raw, parse_int=Raw)


def sample_examples(name: str) -> dict[str, dict[str, Any]]:
    data = load_raw((SAMPLES / name).read_text(encoding="utf-8"))
    return {example["id"]: example for example in data["examples"]}


def to_fields(schema: tuple[Field, ...], message: dict[str, Any]) -> dict[str, Any]:
    """Sample values as the encoder takes them: Decimal, int, str, bool, None."""
    fields: dict[str, Any] = {}
    by_key = {spec.key: spec for spec in schema}
    for key, value in message.items():
        spec = by_key[key]
        if spec.items is not None:
            fields[key] = [to_fields(spec.items, item) for item in value]
        elif isinstance(value, Raw):
            fields[key] = Decimal(value) if spec.default_spelling else int(value)
        else:
            fields[key] = value
    return fields


def spellings(message: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, raw text) of every number in a raw-parsed message."""
    if isinstance(message, dict):
        for key, value in message.items():
            yield from spellings(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(message, list):
        for index, value in enumerate(message):
            yield from spellings(value, f"{prefix}[{index}]")
    elif isinstance(message, Raw):
        yield prefix, str(message)


def reencode(kind: str, message: dict[str, Any], *, simple: bool) -> dict[str, str]:
    fields = to_fields(SCHEMAS[kind], _default_keys(kind, message) if simple else message)
    return dict(spellings(load_raw(encode_message(kind, fields, simple=simple))))


def _default_keys(kind: str, message: dict[str, Any]) -> dict[str, Any]:
    """A SIMPLE sample with its keys renamed to DEFAULT names."""

    def rename(schema: tuple[Field, ...], obj: dict[str, Any]) -> dict[str, Any]:
        by_simple = {spec.simple: spec for spec in schema}
        out: dict[str, Any] = {}
        for key, value in obj.items():
            spec = by_simple[key]
            if spec.items is not None:
                value = [rename(spec.items, item) for item in value]
            out[spec.key] = value
        return out

    return rename(SCHEMAS[kind], message)


# -- number spellings -------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "value", "expected"),
    [
        (F8, "31883000", "31883000.00000000"),
        (F8, "0.00077720", "0.00077720"),
        (F8, "0.00000113", "0.00000113"),
        (F8, "0.00000006", "6E-8"),
        (F8, "0.00000012", "1.2E-7"),
        (F8, "0", "0E-8"),
        (F8, "-4776000", "-4776000.00000000"),
        (F10, "0.0126713295", "0.0126713295"),
        (java_double, "116539000", "1.16539E8"),
        (java_double, "0.00079276", "7.9276E-4"),
        (java_double, "0.0005", "5.0E-4"),
        (java_double, "127", "127.0"),
        (java_double, "10000000", "1.0E7"),
        (java_double, "9999999", "9999999.0"),
        (java_double, "0.001", "0.001"),
        (java_double, "0", "0.0"),
        (plain, "31883000.00", "31883000"),
        (plain, "1386929.37231066771348207123", "1386929.37231066771348207123"),
        (plain, "0E-8", "0"),
        (plain_dot0, "109715000", "109715000.0"),
        (plain_dot0, "0.71326612", "0.71326612"),
    ],
)
def test_spellings(spelling: Any, value: str, expected: str) -> None:
    assert spelling(Decimal(value)) == expected


def test_java_bigdecimal_positive_exponent() -> None:
    assert java_bigdecimal(Decimal("1.0E+8")) == "1.0E+8"
    assert fixed(Decimal("95078733694.3792"), 16) == "95078733694.3792000000000000"


# -- re-encoding samples gives their spellings ---------------------------------------

# (file, example id, schema kind, SIMPLE?, fields whose spelling is known to differ)
EXACT = [
    ("trade.json", "trade-default-official-krw-btc", "trade", False, ()),
    ("trade.json", "trade-default-official-krw-eth", "trade", False, ()),
    ("trade.json", "trade-simple-recorded-2021-krw", "trade", True, ()),
    ("trade.json", "trade-simple-recorded-2021-btc-market", "trade", True, ()),
    ("orderbook.json", "orderbook-default-probe-2026-snapshot", "orderbook", False, ()),
    ("orderbook.json", "orderbook-default-probe-2026-realtime", "orderbook", False, ()),
    ("orderbook.json", "orderbook-simple-probe-2026-snapshot", "orderbook", True, ()),
    ("candle.json", "candle-1m-default-official", "candle", False, ()),
    ("candle.json", "candle-15m-default-official", "candle", False, ()),
    ("myOrder.json", "myorder-trade-official", "myOrder", False, ()),
    ("myOrder.json", "myorder-wait-live-ccxt-2025", "myOrder", False, ()),
    ("myAsset.json", "myasset-official", "myAsset", False, ()),
    ("list_subscriptions.json", "ls-public-official", "list", False, ()),
    # The 2023 docs example predates the 2025 capture the simulator follows: it
    # printed open/high/low/last plainly and turnover with scale 8.
    (
        "ticker.json",
        "ticker-default-official-2023",
        "ticker",
        False,
        (
            "opening_price",
            "high_price",
            "low_price",
            "trade_price",
            "acc_trade_price",
            "acc_trade_price_24h",
        ),
    ),
]


@pytest.mark.parametrize(("file", "example", "kind", "simple", "differs"), EXACT)
def test_reencoded_sample_keeps_its_spelling(
    file: str, example: str, kind: str, simple: bool, differs: tuple[str, ...]
) -> None:
    message = sample_examples(file)[example]["message"]
    ours = reencode(kind, message, simple=simple)
    theirs = dict(spellings(message))
    assert ours.keys() == theirs.keys()
    mismatched = {path for path in theirs if ours[path] != theirs[path]}
    assert mismatched == set(differs), {path: (theirs[path], ours[path]) for path in mismatched}


def test_ticker_matches_the_2025_capture_exactly() -> None:
    message = load_raw(TICKER_2025)
    fields = to_fields(SCHEMAS["ticker"], message)
    assert encode_message("ticker", fields, simple=False) == TICKER_2025


def test_error_frames_match_the_live_probe_byte_for_byte() -> None:
    for example in sample_examples("error.json").values():
        if example["source"] != "P1":
            continue
        error = example["message"]["error"]
        expected = json.dumps(example["message"], ensure_ascii=False, separators=(",", ":"))
        assert encode_error(error["name"], error["message"]).decode() == expected


@pytest.mark.parametrize(
    ("key", "language", "value", "example"),
    [
        ("INVALID_AUTH", "ko", "", "err-invalid-auth-kr-doc"),
        ("WRONG_FORMAT", "ko", "", "err-wrong-format-kr-live"),
        ("NO_TICKET", "ko", "", "err-no-ticket-kr-live"),
        ("NO_TYPE", "ko", "", "err-no-type-kr-doc"),
        ("NO_CODES", "ko", "", "err-no-codes-kr-doc"),
        ("EMPTY_CODES", "ko", "", "err-invalid-param-empty-codes-kr-doc"),
        ("BAD_TYPE", "ko", "nope", "err-invalid-param-unknown-type-kr-live"),
        ("INVALID_AUTH", "en", "", "err-invalid-auth-en-doc"),
        ("WRONG_FORMAT", "en", "", "err-wrong-format-en-doc"),
        ("NO_TICKET", "en", "", "err-no-ticket-en-doc"),
        ("EMPTY_CODES", "en", "", "err-invalid-param-empty-codes-en-doc"),
        ("BAD_FORMAT", "en", "$format", "err-invalid-param-format-en-doc"),
        ("BAD_TYPE", "en", "$type", "err-invalid-param-type-en-doc"),
    ],
)
def test_error_texts_match_the_samples(key: str, language: Any, value: str, example: str) -> None:
    expected = sample_examples("error.json")[example]["message"]["error"]["message"]
    assert error_message(key, language, value) == expected


def test_status_frame_matches_the_sample() -> None:
    sample = sample_examples("ping_reply.json")["status-up"]["message"]
    assert json.loads(encode_status()) == sample


# -- live frames carry the samples' keys ---------------------------------------------

# SIMPLE keys of tickers and candles from docs/protocol.md, "Messages" (no SIMPLE sample
# exists for these).
TICKER_SIMPLE_KEYS = {
    *("ty", "cd", "op", "hp", "lp", "tp", "pcp", "c", "cp", "scp", "cr", "scr", "tv", "atv"),
    *("atv24h", "atp", "atp24h", "tdt", "ttm", "ttms", "ab", "aav", "abv", "h52wp", "h52wdt"),
    *("l52wp", "l52wdt", "ms", "its", "dd", "mw", "tms", "st"),
}
CANDLE_SIMPLE_KEYS = {
    "ty",
    "cd",
    "cdttmu",
    "cdttmk",
    "op",
    "hp",
    "lp",
    "tp",
    "catv",
    "catp",
    "tms",
    "st",
}


async def _collect(ws: ClientConnection, *, simple: bool) -> dict[str, dict[str, Any]]:
    """The first frame of each of the four types, in the given format.

    Frames of the previous format may still be in flight after a switch; skip them.
    """
    type_key = "ty" if simple else "type"
    seen: dict[str, dict[str, Any]] = {}
    with anyio.fail_after(5):
        for _ in range(1000):
            frame = await ws.recv()
            assert isinstance(frame, bytes)
            message = load_raw(frame.decode())
            if type_key in message:
                seen.setdefault(message[type_key], message)
            if len(seen) == 4:
                return seen
    raise AssertionError(f"only {sorted(seen)} arrived")


def _request(fmt: str) -> str:
    return json.dumps(
        [
            {"ticket": "keys"},
            {"type": "ticker", "codes": ["KRW-BTC"]},
            {"type": "trade", "codes": ["KRW-BTC"]},
            {"type": "orderbook", "codes": ["KRW-BTC"]},
            {"type": "candle.1m", "codes": ["KRW-BTC"]},
            {"format": fmt},
        ]
    )


@pytest.mark.anyio
async def test_live_default_and_simple_frames_have_the_sample_keys() -> None:
    ticker = sample_examples("ticker.json")
    trade = sample_examples("trade.json")
    book = sample_examples("orderbook.json")
    candle = sample_examples("candle.json")
    async with Simulator(SimConfig(rate=None)) as sim:
        async with connect(sim.public_url) as ws:
            await ws.send(_request("DEFAULT"))
            default = await _collect(ws, simple=False)
            await ws.send(_request("SIMPLE"))
            simple = await _collect(ws, simple=True)
        assert not sim.violations
    assert default["ticker"].keys() == ticker["ticker-default-official-2023"]["message"].keys()
    assert default["ticker"].keys() == load_raw(TICKER_2025).keys()
    assert default["trade"].keys() == trade["trade-default-official-krw-btc"]["message"].keys()
    official_book = book["orderbook-default-official-krw-btc-level10000"]["message"]
    assert default["orderbook"].keys() == official_book.keys()
    unit_keys = official_book["orderbook_units"][0].keys()
    assert all(unit.keys() == unit_keys for unit in default["orderbook"]["orderbook_units"])
    assert default["candle.1m"].keys() == candle["candle-1m-default-official"]["message"].keys()

    assert simple["ticker"].keys() == TICKER_SIMPLE_KEYS
    recorded = trade["trade-simple-recorded-2021-krw"]["message"].keys()
    assert simple["trade"].keys() - recorded == {"bap", "bas", "bbp", "bbs"}  # added since 2021
    assert recorded <= simple["trade"].keys()
    probe = book["orderbook-simple-probe-2026-snapshot"]["message"]
    assert simple["orderbook"].keys() == probe.keys()
    assert all(unit.keys() == probe["obu"][0].keys() for unit in simple["orderbook"]["obu"])
    assert simple["candle.1m"].keys() == CANDLE_SIMPLE_KEYS


@pytest.mark.anyio
async def test_live_frames_use_the_exchange_spellings() -> None:
    simple_books: list[str] = []
    async with Simulator(SimConfig(rate=None)) as sim, connect(sim.public_url) as ws:
        await ws.send(_request("DEFAULT"))
        default = await _collect(ws, simple=False)
        request = [
            {"ticket": "s"},
            {"type": "orderbook", "codes": ["KRW-BTC", "KRW-ETH"]},
            {"format": "SIMPLE"},
        ]
        await ws.send(json.dumps(request))
        with anyio.fail_after(5):
            while len(simple_books) < 50:
                frame = await ws.recv()
                assert isinstance(frame, bytes)
                if frame.startswith(b'{"ty"'):
                    simple_books.append(frame.decode())
    book = dict(spellings(default["orderbook"]))
    prices = [value for path, value in book.items() if path.endswith("_price")]
    sizes = [value for path, value in book.items() if path.endswith("_size")]
    # KRW-BTC prices are above 1e7, so DEFAULT books print them as Java doubles;
    # sizes have scale 8 (a zero-padded unit prints 0.0 and 0E-8).
    assert all(price == "0.0" or "E" in price for price in prices)
    assert all(size == "0E-8" or len(size.partition(".")[2]) == 8 for size in sizes)
    ticker = dict(spellings(default["ticker"]))
    assert ticker["trade_price"].endswith(".00000000")
    assert len(ticker["acc_trade_price"].partition(".")[2]) == 16
    # Round small sizes show up in SIMPLE books in exponent form now and then.
    assert any("E-" in text for text in simple_books)
