"""Decode cost per message: upbus FrameDecoder vs plain orjson.loads, side by side.

Run: ``.venv/bin/python bench/bench_decode.py [--rounds N]``

For each message kind and wire format the same frame is timed with three decoders,
interleaved round by round so that load on a shared machine hits them alike:

* ``upbus``: ``FrameDecoder().decode(frame)``, typed messages (the thing measured);
* ``orjson``: ``orjson.loads(frame)``, untyped dicts (the usual alternative);
* ``typed``: ``msgspec.json.Decoder(Cls).decode(frame)`` for DEFAULT objects only,
  the floor: the cost of one typed decode without format detection or dispatch.

Frames are written with the wire's own number spellings (``31883000.00000000``,
``1.16539E8``). SIMPLE frames are the DEFAULT text with the keys replaced. List frames
hold ``--list-size`` copies; their figures are per message. The best round is printed.
"""

from __future__ import annotations

import argparse
import platform
import timeit

import msgspec
import orjson

from upbus.core.wire._codec import SIMPLE_NAMES, FrameDecoder
from upbus.core.wire._messages import (
    Asset,
    Candle,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    Ticker,
    Trade,
)

TICKER = (
    '{"type":"ticker","code":"KRW-BTC","opening_price":31883000,"high_price":32310000,'
    '"low_price":31855000,"trade_price":32287000,"prev_closing_price":31883000.00000000,'
    '"acc_trade_price":78039261076.51241000,"change":"RISE","change_price":404000.00000000,'
    '"signed_change_price":404000.00000000,"change_rate":0.0126713295,'
    '"signed_change_rate":0.0126713295,"ask_bid":"ASK","trade_volume":0.03103806,'
    '"acc_trade_volume":2429.58834336,"trade_date":"20230221","trade_time":"074102",'
    '"trade_timestamp":1676965262139,"acc_ask_volume":1146.25573608,'
    '"acc_bid_volume":1283.33260728,"highest_52_week_price":57678000.00000000,'
    '"highest_52_week_date":"2022-03-28","lowest_52_week_price":20700000.00000000,'
    '"lowest_52_week_date":"2022-12-30","market_state":"ACTIVE",'
    '"is_trading_suspended":false,"delisting_date":null,"market_warning":"NONE",'
    '"timestamp":1676965262177,"acc_trade_price_24h":228827082483.70729000,'
    '"acc_trade_volume_24h":7158.80283560,"stream_type":"REALTIME"}'
)
TRADE = (
    '{"type":"trade","code":"KRW-BTC","timestamp":1730336862082,"trade_date":"2024-10-31",'
    '"trade_time":"01:07:42","trade_timestamp":1730336862047,'
    '"trade_price":100473000.00000000,"trade_volume":0.00014208,"ask_bid":"BID",'
    '"prev_closing_price":100571000.00000000,"change":"FALL","change_price":98000.00000000,'
    '"sequential_id":17303368620470000,"best_ask_price":100473000,'
    '"best_ask_size":0.43139478,"best_bid_price":100465000,"best_bid_size":0.01990656,'
    '"stream_type":"REALTIME"}'
)
CANDLE = (
    '{"type":"candle.1m","code":"KRW-BTC","candle_date_time_utc":"2026-08-26T08:08:00",'
    '"candle_date_time_kst":"2026-08-26T17:08:00","opening_price":109715000.0,'
    '"high_price":109756000.0,"low_price":109714000.0,"trade_price":109756000.0,'
    '"candle_acc_trade_volume":0.71326612,"candle_acc_trade_price":78269528.64757,'
    '"timestamp":1787731717049,"stream_type":"REALTIME"}'
)
MY_ORDER = (
    '{"type":"myOrder","code":"KRW-BTC","uuid":"ac2dc2a3-fce9-40a2-a4f6-5987c25c438f",'
    '"ask_bid":"BID","order_type":"limit","state":"trade",'
    '"trade_uuid":"68315169-fba4-4175-ade3-aff14a616657","price":0.001453,'
    '"avg_price":0.00145372,"volume":30925891.29839369,"remaining_volume":29968038.09235948,'
    '"executed_volume":30925891.29839369,"trades_count":1,"reserved_fee":44.23943970238218,'
    '"remaining_fee":21.77177967409916,"paid_fee":22.467660028283017,'
    '"locked":43565.33112787242,"executed_funds":44935.32005656603,"time_in_force":null,'
    '"trade_fee":22.467660028283017,"is_maker":true,"identifier":"test-1",'
    '"smp_type":"cancel_maker","prevented_volume":1.174291929,'
    '"prevented_locked":0.001706246173,"trade_timestamp":1710751590421,'
    '"order_timestamp":1710751590000,"timestamp":1710751597500,"stream_type":"REALTIME"}'
)
MY_ASSET = (
    '{"type":"myAsset","asset_uuid":"e635f223-1609-4969-8fb6-4376937baad6","assets":['
    '{"currency":"KRW","balance":1386929.37231066771348207123,'
    '"locked":10329.670127489597585685},'
    '{"currency":"BTC","balance":0.00123456789012345678,"locked":0.0}],'
    '"asset_timestamp":1710146517259,"timestamp":1710146517267,"stream_type":"REALTIME"}'
)


def orderbook(units: int) -> str:
    """A DEFAULT book with ``units`` levels, prices in the live exponent spelling."""
    rows = ",".join(
        f'{{"ask_price":1.{16539 + i}E8,"bid_price":1.{16538 - i}E8,'
        f'"ask_size":0.0{2054761 + 7919 * i},"bid_size":0.0{8120946 - 5153 * i}}}'
        for i in range(units)
    )
    return (
        '{"type":"orderbook","code":"KRW-BTC","timestamp":1790134742106,'
        f'"total_ask_size":2.51469375,"total_bid_size":1.63815297,"orderbook_units":[{rows}],'
        '"stream_type":"REALTIME","level":0}'
    )


KINDS: list[tuple[str, str, type[msgspec.Struct], tuple[type[msgspec.Struct], ...]]] = [
    ("ticker", TICKER, Ticker, ()),
    ("trade", TRADE, Trade, ()),
    ("orderbook/15", orderbook(15), Orderbook, (OrderbookUnit,)),
    ("orderbook/30", orderbook(30), Orderbook, (OrderbookUnit,)),
    ("candle", CANDLE, Candle, ()),
    ("myOrder", MY_ORDER, MyOrder, ()),
    ("myAsset", MY_ASSET, MyAsset, (Asset,)),
]


def simple(text: str, classes: tuple[type[msgspec.Struct], ...]) -> str:
    """The SIMPLE spelling of a DEFAULT frame: every ``"key":`` replaced."""
    for cls in classes:
        for default, short in SIMPLE_NAMES[cls].items():
            text = text.replace(f'"{default}":', f'"{short}":')
    return text


Case = tuple[str, str, str]  # kind, format, decoder


def measure(timers: dict[Case, timeit.Timer], rounds: int, per_round: float) -> dict[Case, float]:
    """The best per-call time of each timer in µs.

    Every round times every case once, so a burst of load from elsewhere on a shared
    machine hits all cases alike instead of a few rows of the table.
    """
    numbers = {}
    for case, timer in timers.items():
        estimate = timer.timeit(100) / 100
        numbers[case] = max(10, int(per_round / estimate))
    best = dict.fromkeys(timers, float("inf"))
    for _ in range(rounds):
        for case, timer in timers.items():
            best[case] = min(best[case], timer.timeit(numbers[case]) / numbers[case] * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=float, default=0.01, help="seconds per timing")
    parser.add_argument("--list-size", type=int, default=5)
    args = parser.parse_args()

    decode = FrameDecoder().decode
    timers: dict[Case, timeit.Timer] = {}
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    for kind, text, cls, nested in KINDS:
        short = simple(text, (cls, *nested))
        n = args.list_size
        frames = {
            "DEFAULT": (text.encode(), 1),
            "SIMPLE": (short.encode(), 1),
            "JSON_LIST": (f"[{','.join([text] * n)}]".encode(), n),
            "SIMPLE_LIST": (f"[{','.join([short] * n)}]".encode(), n),
        }
        for fmt, (frame, count) in frames.items():
            assert len(decode(frame)) == count
            sizes[kind, fmt] = (len(frame) // count, count)
            # The statement is compiled into timeit's loop: no wrapper call is timed.
            timers[kind, fmt, "upbus"] = timeit.Timer(
                "decode(frame)", globals={"decode": decode, "frame": frame}
            )
            timers[kind, fmt, "orjson"] = timeit.Timer(
                "loads(frame)", globals={"loads": orjson.loads, "frame": frame}
            )
            if fmt == "DEFAULT":
                typed = msgspec.json.Decoder(cls).decode
                timers[kind, fmt, "typed"] = timeit.Timer(
                    "typed(frame)", globals={"typed": typed, "frame": frame}
                )
    best = measure(timers, args.rounds, args.per_round)

    print(
        f"Python {platform.python_version()}, msgspec {msgspec.__version__}, "
        f"orjson {orjson.__version__}; best of {args.rounds} rounds; µs per message "
        f"(list frames hold {args.list_size})"
    )
    print(
        f"{'kind':13} {'format':11} {'bytes':>6} {'upbus':>7} {'orjson':>7} "
        f"{'typed':>7} {'upbus/orjson':>12}"
    )
    for (kind, fmt), (size, count) in sizes.items():
        upbus = best[kind, fmt, "upbus"] / count
        loads = best[kind, fmt, "orjson"] / count
        typed_cost = best.get((kind, fmt, "typed"))
        floor = f"{typed_cost:7.2f}" if typed_cost is not None else f"{'':7}"
        print(
            f"{kind:13} {fmt:11} {size:6d} {upbus:7.2f} {loads:7.2f} {floor} {upbus / loads:12.2f}"
        )


if __name__ == "__main__":
    main()
