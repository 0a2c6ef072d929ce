"""Subscription specs: helpers, the exchange's own request objects, and clear errors."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from upbus.core._errors import SpecError
from upbus.core.subscriptions._merge import RefCountMerger
from upbus.core.subscriptions._specs import (
    Channel,
    Mode,
    Spec,
    Wish,
    candle,
    my_asset,
    my_order,
    orderbook,
    parse_specs,
    ticker,
    trade,
)
from upbus.core.wire._codec import encode_request
from upbus.sim.protocol import Subscribe, parse_request


def test_helpers_build_validated_specs() -> None:
    assert ticker("KRW-BTC", "KRW-ETH").codes == ("KRW-BTC", "KRW-ETH")
    assert trade("KRW-BTC", only_realtime=True).mode is Mode.REALTIME
    book = orderbook("KRW-BTC", depth=15, level=10000)
    assert (book.depth, book.level, book.channel) == (15, 10000, Channel.PUBLIC)
    assert candle("1m", "KRW-BTC").type == "candle.1m"
    assert my_order().codes == ()
    assert my_order("KRW-BTC").channel is Channel.PRIVATE
    assert my_asset().channel is Channel.PRIVATE


def test_wishes_flatten_per_code() -> None:
    assert orderbook("KRW-BTC", "KRW-ETH", depth=5).wishes() == [
        Wish("orderbook", "KRW-BTC", 0, 5, Mode.BOTH),
        Wish("orderbook", "KRW-ETH", 0, 5, Mode.BOTH),
    ]
    assert orderbook("KRW-BTC").wishes()[0].depth == 30
    assert my_asset().wishes() == [Wish("myAsset", None)]
    assert my_order().wishes() == [Wish("myOrder", None)]


def test_exchange_request_objects_paste_straight_in() -> None:
    frame = [
        {"ticket": "test"},
        {"type": "ticker", "codes": ["KRW-BTC"], "isOnlyRealtime": True},
        {"type": "orderbook", "codes": ["KRW-BTC.15", "KRW-ETH.15"], "level": "10000"},
        {"type": "trade", "codes": ["KRW-BTC"], "is_only_snapshot": True},
        {"type": "myOrder"},
        {"format": "SIMPLE"},
    ]
    specs = parse_specs(frame)
    assert specs == [
        Spec("ticker", ("KRW-BTC",), only_realtime=True),
        Spec("orderbook", ("KRW-BTC", "KRW-ETH"), depth=15, level=10000),
        Spec("trade", ("KRW-BTC",), only_snapshot=True),
        Spec("myOrder"),
    ]


def test_codes_with_different_depth_suffixes_become_one_spec_per_depth() -> None:
    specs = parse_specs({"type": "orderbook", "codes": ["KRW-BTC.5", "KRW-ETH.15", "KRW-XRP"]})
    assert specs == [
        orderbook("KRW-BTC", depth=5),
        orderbook("KRW-ETH", depth=15),
        orderbook("KRW-XRP"),
    ]


def test_a_list_of_codes_is_accepted_and_stored_as_a_tuple() -> None:
    spec = Spec("ticker", ["KRW-BTC"])  # type: ignore[arg-type]
    assert spec.codes == ("KRW-BTC",)
    assert hash(spec) == hash(ticker("KRW-BTC"))


@pytest.mark.parametrize(
    ("make", "field", "words"),
    [
        (lambda: Spec("tickers", ("KRW-BTC",)), "type", "not a supported type"),
        (lambda: ticker("krw-btc"), "codes[0]", "upper case"),
        (lambda: ticker("KRW-BTC", "BTC"), "codes[1]", "not a market code"),
        (lambda: ticker(), "codes", "at least one"),
        (lambda: ticker("KRW-BTC", "KRW-BTC"), "codes", "listed twice"),
        (lambda: Spec("myAsset", ("KRW-BTC",)), "codes", "takes no codes"),
        (lambda: orderbook("KRW-BTC", depth=20), "depth", "not supported"),
        (lambda: orderbook("BTC-ETH", level=10), "codes[0]", "KRW markets only"),
        (lambda: orderbook("KRW-BTC", level=-1), "level", ">= 0"),
        (lambda: Spec("ticker", ("KRW-BTC",), depth=5), "depth", "orderbook only"),
        (lambda: ticker("KRW-BTC", only_snapshot=True, only_realtime=True), "only_realtime", ""),
        (lambda: candle("2m", "KRW-BTC"), "unit", "not a candle unit"),
        (lambda: parse_specs({"type": "ticker"}), "specs[0].codes", "needs at least one"),
        (lambda: parse_specs({"type": "ticker", "codes": []}), "specs[0].codes", "is empty"),
        (lambda: parse_specs({"codes": ["KRW-BTC"]}), "specs[0].type", "missing"),
        (lambda: parse_specs({"type": "ticker", "codes": "KRW-BTC"}), "specs[0].codes", "list"),
        (lambda: parse_specs({"type": "ticker", "code": ["KRW-BTC"]}), "specs[0].code", "not a"),
        (
            lambda: parse_specs({"type": "ticker", "codes": ["KRW-BTC"], "isOnlySnapshot": "yes"}),
            "specs[0].isOnlySnapshot",
            "true or false",
        ),
        (
            lambda: parse_specs([ticker("KRW-BTC"), {"type": "myAsset", "codes": ["KRW-BTC"]}]),
            "specs[1].codes",
            "takes no codes",
        ),
        (lambda: parse_specs("ticker"), "specs", "not a string"),
        (lambda: parse_specs([42]), "specs[0]", "int"),
    ],
)
def test_bad_specs_name_the_field(make: object, field: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        make()  # type: ignore[operator]
    assert caught.value.field == field
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")


# -- what the wire cannot carry is refused before anything is registered ---------------


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (-1, "-1"),
        (-0.5, "-0.5"),
    ],
)
def test_levels_that_are_not_finite_non_negative_numbers_are_refused(
    level: float, shown: str
) -> None:
    with pytest.raises(SpecError) as helper:
        orderbook("KRW-BTC", level=level)
    assert str(helper.value) == f"level: {shown} is not a finite number >= 0"
    with pytest.raises(SpecError) as parsed:
        parse_specs([{"type": "orderbook", "codes": ["KRW-BTC"], "level": level}])
    assert str(parsed.value) == f"specs[0].level: {shown} is not a finite number >= 0"
    assert parsed.value.field == "specs[0].level"


@pytest.mark.parametrize("text", ["NaN", "nan", "Infinity", "-inf", "1e400", "-3"])
def test_numeric_string_levels_are_held_to_the_same_rule(text: str) -> None:
    with pytest.raises(SpecError, match=r"^specs\[0\]\.level: .* is not a finite number >= 0$"):
        parse_specs({"type": "orderbook", "codes": ["KRW-BTC"], "level": text})


@pytest.mark.parametrize(
    ("make", "field", "words"),
    [
        (lambda: orderbook("KRW-BTC", level=True), "level", "must be a number"),
        (lambda: orderbook("KRW-BTC", level="10"), "level", "must be a number"),  # type: ignore[arg-type]
        (lambda: orderbook("KRW-BTC", level=2**70), "level", "too large"),
        (lambda: orderbook("KRW-BTC", depth=True), "depth", "not supported"),
        (lambda: orderbook("KRW-BTC", depth=5.0), "depth", "not supported"),  # type: ignore[arg-type]
        (lambda: ticker("KRW-BTC", only_snapshot=1), "only_snapshot", "True or False"),  # type: ignore[arg-type]
        (lambda: trade("KRW-BTC", only_realtime="yes"), "only_realtime", "True or False"),  # type: ignore[arg-type]
        (lambda: ticker(b"KRW-BTC"), "codes[0]", "not a market code"),  # type: ignore[arg-type]
        (lambda: ticker(5), "codes[0]", "not a market code"),  # type: ignore[arg-type]
        (lambda: ticker(["KRW-BTC"]), "codes[0]", "not a market code"),  # type: ignore[arg-type]
        (lambda: Spec("ticker", frozenset({"KRW-BTC"})), "codes", "list of strings"),  # type: ignore[arg-type]
        (lambda: Spec(None, ("KRW-BTC",)), "type", "non-empty string"),  # type: ignore[arg-type]
        (lambda: Spec("ticker", ("KRW-BTC",), level=float("nan")), "level", "finite"),
        (
            lambda: parse_specs({"type": "orderbook", "codes": ["KRW-BTC"], "level": True}),
            "specs[0].level",
            "number",
        ),
        (
            lambda: parse_specs({"type": "orderbook", "codes": ["KRW-BTC"], "level": None}),
            "specs[0].level",
            "number",
        ),
        (
            lambda: parse_specs({"type": "orderbook", "codes": ["KRW-BTC.7"]}),
            "specs[0].depth",
            "not supported",
        ),
        (
            lambda: parse_specs({"type": "orderbook", "codes": ["KRW-BTC.x"]}),
            "specs[0].codes[0]",
            "not a depth",
        ),
        (
            lambda: parse_specs({"type": "ticker", "codes": [7]}),
            "specs[0].codes[0]",
            "not a market code",
        ),
        (
            lambda: parse_specs({"type": 7, "codes": ["KRW-BTC"]}),
            "specs[0].type",
            "non-empty string",
        ),
        (
            lambda: parse_specs({"type": "ticker", "codes": ["KRW-BTC"], "level": "abc"}),
            "specs[0].level",
            "not a number",
        ),
        (lambda: parse_specs({1: "x", "other": 2}), "specs[0].1", "not a subscription field"),
    ],
)
def test_every_field_the_wire_cannot_carry_is_named(make: object, field: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        make()  # type: ignore[operator]
    assert caught.value.field == field
    assert words in str(caught.value)


def test_a_negative_zero_level_is_the_default_level() -> None:
    assert orderbook("KRW-BTC", level=-0.0) == orderbook("KRW-BTC")
    assert orderbook("KRW-BTC", level=-0.0).level == 0


# Anything validation lets through must be a request the (strict) simulator accepts.
# Each field is usually valid, so that most drawn objects get as far as the wire,
# and sometimes odd: every odd value is either refused by validation or encoded in a
# form the simulator accepts.
_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.text(max_size=8), max_size=2),
)
_good_codes = st.lists(
    st.sampled_from(["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-BTC.15", "KRW-ETH.5"]),
    min_size=1,
    max_size=3,
    unique=True,
)
_odd_code = st.one_of(
    st.sampled_from(["BTC-ETH", "krw-btc", "KRW-BTC.True", "KRW-BTC.5.0", "KRW-BTC.05"]), _junk
)
_odd_level = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, -1, True, 2**70, "NaN"]),
    _junk,
)


def _mostly(valid: st.SearchStrategy[object], odd: st.SearchStrategy[object]) -> Any:
    """``valid`` nine times in ten, ``odd`` otherwise."""
    return st.integers(0, 9).flatmap(lambda n: valid if n else odd)


_types = _mostly(st.sampled_from(["orderbook", "ticker", "candle.1m", "myOrder", "myAsset"]), _junk)
_codes = _mostly(_good_codes, st.one_of(st.lists(_odd_code, min_size=1, max_size=2), _junk))
_levels = st.one_of(st.sampled_from([0, 10, 1000, "10", "1e3", 0.5]), _odd_level)
_flags = _mostly(st.booleans(), _junk)


@st.composite
def _request_objects(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(_types)
    obj: dict[str, object] = {"type": kind}
    if kind not in ("myOrder", "myAsset") or draw(st.booleans()):
        obj["codes"] = draw(_codes)
    if kind == "orderbook" or not draw(st.integers(0, 9)):
        obj["level"] = draw(_levels)
    for flag in ("is_only_snapshot", "isOnlyRealtime"):
        if draw(st.booleans()):
            obj[flag] = draw(_flags)
    return obj


@example([{"type": "orderbook", "codes": ["KRW-BTC"], "level": float("nan")}])
@example([{"type": "orderbook", "codes": ["KRW-BTC"], "level": float("inf")}])
@given(st.lists(_request_objects(), min_size=1, max_size=3))
@settings(max_examples=400, deadline=None)
def test_whatever_validation_accepts_the_simulator_accepts(
    objects: list[dict[str, object]],
) -> None:
    try:
        specs = parse_specs(objects)
    except SpecError:
        return
    for channel in Channel:
        merger = RefCountMerger()
        merger.add(w for spec in specs if spec.channel is channel for w in spec.wishes())
        entries = [entry.to_request() for entry in merger.entries()]
        if not entries:
            continue
        text = encode_request("ticket", entries)
        request = parse_request(text, private=channel is Channel.PRIVATE)  # raises if refused
        assert isinstance(request, Subscribe)


@example(codes=["KRW-BTC"], depth=None, level=float("nan"), snapshot=False)
@example(codes=["KRW-BTC"], depth=True, level=0, snapshot=False)
@given(
    codes=_mostly(_good_codes, st.lists(_odd_code, max_size=2)),
    depth=_mostly(st.sampled_from([None, 1, 5, 15, 30]), _junk),
    level=_levels,
    snapshot=_flags,
)
@settings(max_examples=300, deadline=None)
def test_whatever_the_orderbook_helper_accepts_the_simulator_accepts(
    codes: list[object], depth: object, level: object, snapshot: object
) -> None:
    try:
        spec = orderbook(*codes, depth=depth, level=level, only_snapshot=snapshot)  # type: ignore[arg-type]
    except SpecError:
        return
    merger = RefCountMerger()
    merger.add(spec.wishes())
    text = encode_request("ticket", [entry.to_request() for entry in merger.entries()])
    assert isinstance(parse_request(text, private=False), Subscribe)
