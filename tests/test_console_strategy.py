"""The console view and the example moving-average strategy."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson
import pytest
from factories import START_MS, make_ticker, make_trade
from simbus import settings_for

import upbus
from upbus import ConnectionEvent, Message, Ticker
from upbus.core.wire._codec import to_default_dict
from upbus.plugins.console import ConsoleSettings, ConsoleView, format_line
from upbus.plugins.ma_cross import MaCross, MaCrossSettings
from upbus.plugins.replay import END_OF_RECORDING
from upbus.sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio


def ticker(price: float, at_ms: int = START_MS, code: str = "KRW-BTC") -> Ticker:
    return make_ticker(price, at_ms, code)


class Lines(io.StringIO):
    """An output stream that wakes waiters at every line."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = anyio.Event()

    def write(self, text: str) -> int:
        self._changed.set()
        return super().write(text)

    @property
    def lines(self) -> list[str]:
        return self.getvalue().splitlines()

    async def wait_for_lines(self, count: int, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.lines) < count:
                self._changed = anyio.Event()
                await self._changed.wait()


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=500.0)


def live_settings(sim: Simulator, **plugins: Any) -> upbus.Settings:
    """:func:`settings_for` ``sim`` with ``plugins``, a shorter debounce and default reconnects."""
    return settings_for(sim, debounce=0.01, reconnect={}, plugins=plugins)


# -- console -----------------------------------------------------------------------------


async def test_the_console_prints_a_line_per_message_from_the_simulator(sim: Simulator) -> None:
    out = Lines()
    view = ConsoleView(every=0, out=out)
    async with upbus.Bus(live_settings(sim)) as bus:
        await bus.register_component(view, [upbus.ticker("KRW-BTC"), upbus.trade("KRW-BTC")])
        await out.wait_for_lines(20)
    lines = out.lines
    assert lines[0] == "-- public connected: " + sim.public_url
    assert any(" ticker    KRW-BTC    " in line for line in lines)
    assert any(" trade     KRW-BTC    " in line for line in lines)


async def test_the_console_prints_one_line_per_key_per_interval() -> None:
    now = [0.0]
    out = io.StringIO()
    view = ConsoleView(every=1.0, out=out, clock=lambda: now[0])
    for at, message in [
        (0.0, ticker(100.0)),
        (0.5, ticker(101.0)),  # KRW-BTC was printed 0.5 s ago: skipped
        (0.5, ticker(5.0, code="KRW-XRP")),  # another key
        (1.0, ticker(102.0)),
    ]:
        now[0] = at
        await view.on_message(message)
    printed = [line.split()[3] for line in out.getvalue().splitlines()]
    assert printed == ["100", "5", "102"]
    assert view.skipped == 1


def test_console_lines_are_compact_and_readable() -> None:
    line = format_line(ticker(143_500_000.0))
    assert line.endswith(" ticker    KRW-BTC    143,500,000 +1.25%  vol24h 2,345.6789")
    trade = msgspec.structs.replace(make_trade(), trade_price=143_500_000.0, trade_volume=0.0123)
    assert format_line(trade).endswith(" trade     KRW-BTC    BID 143,500,000 x 0.0123")


async def test_console_and_strategy_plugins_are_enabled_by_settings(sim: Simulator) -> None:
    async with upbus.Bus(live_settings(sim)) as bus:
        assert bus.get_subscription_stats()["components"] == 0
    plugins = {"console": {"enabled": True, "every": 60}, "ma_cross": {"enabled": True}}
    async with upbus.Bus(live_settings(sim, **plugins)) as bus:
        assert bus.get_subscription_stats()["components"] == 2
        assert bus.plugins.failures == {}


def test_plugin_settings_are_checked() -> None:
    def section(name: str, model: type[Any], **values: Any) -> Any:
        return upbus.Settings(plugins={name: values}).plugin_section(name, model)

    assert section("ma_cross", MaCrossSettings).slow == 20
    with pytest.raises(upbus.ConfigError, match="fast"):
        section("ma_cross", MaCrossSettings, fast=20, slow=20)
    with pytest.raises(upbus.ConfigError, match=r"plugins\.ma_cross\.code"):
        section("ma_cross", MaCrossSettings, code="krw-btc")
    with pytest.raises(upbus.ConfigError, match=r"plugins\.console\.specs"):
        section("console", ConsoleSettings, specs=[{"type": "tickers", "codes": ["KRW-BTC"]}])
    specs = '[{"type": "trade", "codes": ["KRW-ETH"]}]'  # as the environment gives it
    assert section("console", ConsoleSettings, specs=specs).specs[0]["codes"] == ["KRW-ETH"]


# -- the example strategy ----------------------------------------------------------------


class Probe(MaCross):
    """The strategy, telling the test when the replay is over."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ended = anyio.Event()

    async def on_connection_state(self, event: ConnectionEvent) -> None:
        await super().on_connection_state(event)
        if END_OF_RECORDING in event.detail:
            self.ended.set()


async def feed(strategy: MaCross, prices: list[float]) -> None:
    for i, price in enumerate(prices):
        message: Message = ticker(price, at_ms=1_735_689_600_000 + 1000 * i)
        await strategy.on_message(message)


async def test_ma_cross_signals_on_a_crafted_replay(tmp_path: Path) -> None:
    # Falling, then rising through the slow average (BUY at 10), then falling (SELL at 8).
    prices = [10.0, 9.0, 8.0, 7.0, 8.0, 10.0, 12.0, 11.0, 8.0, 6.0, 5.0]
    path = tmp_path / "crafted.jsonl"
    path.write_bytes(
        b"".join(
            orjson.dumps(
                {
                    "received_at": 1000.0 + i,
                    "channel": "public",
                    "message": to_default_dict(ticker(p, 1_735_689_600_000 + 1000 * i)),
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
            for i, p in enumerate(prices)
        )
    )
    settings = upbus.Settings(debounce=0.01, plugins={"replay": {"path": str(path), "speed": None}})
    out = io.StringIO()
    strategy = Probe("KRW-BTC", fast=2, slow=4, out=out)
    async with upbus.Bus(settings) as bus:
        await bus.register_component(strategy, strategy.specs)
        with anyio.fail_after(10):
            await strategy.ended.wait()
    assert [(s.side, s.price) for s in strategy.signals] == [("BUY", 10.0), ("SELL", 8.0)]
    assert strategy.signals[0].fast > strategy.signals[0].slow
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "ma_cross KRW-BTC BUY at 10 (fast 9.00, slow 8.25)" in lines[0]
    assert "ma_cross KRW-BTC SELL at 8 " in lines[1]
    assert strategy.resets == 1  # the end of the recording is a gap


async def test_ma_cross_starts_over_after_a_gap() -> None:
    fresh = MaCross("KRW-BTC", fast=2, slow=4, out=io.StringIO())
    await feed(fresh, [10.0, 9.0, 8.0, 7.0, 8.0, 10.0, 12.0, 14.0])
    assert [s.side for s in fresh.signals] == ["BUY"]

    gapped = MaCross("KRW-BTC", fast=2, slow=4, out=io.StringIO())
    await feed(gapped, [10.0, 9.0, 8.0, 7.0])
    await gapped.on_connection_state(ConnectionEvent("public", "gap", "connection lost"))
    # The same rise after the outage: the averages start empty, so no cross spans the gap.
    await feed(gapped, [8.0, 10.0, 12.0, 14.0])
    assert gapped.signals == []
    assert gapped.resets == 1


async def test_ma_cross_ignores_other_markets() -> None:
    strategy = MaCross("KRW-BTC", fast=2, slow=3, out=io.StringIO())
    for price in [10.0, 9.0, 8.0, 12.0, 14.0]:
        await strategy.on_message(ticker(price, code="KRW-ETH"))
    assert strategy.signals == []
