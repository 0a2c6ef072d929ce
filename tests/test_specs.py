"""Subscription specs: helpers, the exchange's own request objects, and clear errors."""

from __future__ import annotations

import pytest

from upbus.core.errors import SpecError
from upbus.core.specs import (
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
