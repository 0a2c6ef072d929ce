"""Record a session from the simulator, then replay it through a Bus as if it were the exchange."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from factories import make_ticker
from simbus import Recorder, make_bus

import upbus
from upbus.core.wire._codec import FrameDecoder, to_default_dict
from upbus.core.wire._messages import Status
from upbus.plugin import (
    PRIVATE_TYPES,
    PUBLIC_TYPES,
    Channel,
    ConnectionClosed,
    ConnectionEvent,
    Message,
    Ticker,
)
from upbus.plugins import jsonl_recorder, replay, sqlite_store
from upbus.plugins.replay import END_OF_RECORDING, ReplayTransport
from upbus.sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio

SPECS = [
    {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
    {"type": "trade", "codes": ["KRW-BTC"]},
    {"type": "orderbook", "codes": ["KRW-BTC.5"]},
]
REQUEST = '[{"ticket":"t"},{"type":"ticker","codes":["KRW-BTC"]}]'


class Collector(Recorder):
    """A lossless :class:`Recorder` that also keeps the loop time each message arrived."""

    upbus_overflow = "block"

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.ended = anyio.Event()

    async def on_message(self, message: Message) -> None:
        self.times.append(anyio.current_time())
        await super().on_message(message)

    async def on_connection_state(self, event: ConnectionEvent) -> None:
        if END_OF_RECORDING in event.detail:
            self.ended.set()
        await super().on_connection_state(event)

    async def wait_for_end(self, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            await self.ended.wait()


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=1000.0)


def live_bus(sim: Simulator, **plugins: Any) -> upbus.Bus:
    """:func:`make_bus` on ``sim`` with ``plugins``, a shorter debounce and default reconnects."""
    return make_bus(sim, debounce=0.01, reconnect={}, plugins=plugins)


def replay_bus(path: Path, speed: float | None) -> upbus.Bus:
    settings = upbus.Settings(
        debounce=0.01, plugins={"replay": {"path": str(path), "speed": speed}}
    )
    return upbus.Bus(settings)


async def replayed(path: Path, speed: float | None = None) -> Collector:
    async with replay_bus(path, speed) as bus:
        collector = Collector()
        await bus.register_component(collector, SPECS)
        await collector.wait_for_end()
    return collector


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def tick(price: float, received_at: float) -> dict[str, Any]:
    """A recorder line holding a KRW-BTC ticker at ``price``."""
    at = int(received_at * 1000)
    message = make_ticker(price, at, signed_change_rate=0.0)
    return {"received_at": received_at, "channel": "public", "message": to_default_dict(message)}


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))


async def test_a_jsonl_recording_replays_the_same_messages_in_order(
    sim: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "session.jsonl"
    jsonl = {"enabled": True, "path": str(path), "specs": SPECS, "flush_interval": 0.05}
    async with live_bus(sim, jsonl=jsonl) as bus:
        recorder = jsonl_recorder.recorder_for(bus)
        assert recorder is not None
        live = Collector()
        await bus.register_component(live, SPECS)
        await live.wait_for(lambda: recorder.accepted >= 200)

    lines = read_jsonl(path)
    assert len(lines) == recorder.accepted == recorder.written
    assert {line["channel"] for line in lines} == {"public"}
    assert all(isinstance(line["received_at"], float) for line in lines)
    decode = FrameDecoder().decode
    recorded = [decode(orjson.dumps(line["message"]))[0] for line in lines]
    assert recorded == live.messages[: len(recorded)]
    assert {m.type for m in recorded} == {"ticker", "trade", "orderbook"}

    collector = await replayed(path, speed=None)
    assert collector.messages == recorded


async def test_an_sqlite_store_replays_the_same_messages_in_order(
    sim: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "session.db"
    sqlite = {"enabled": True, "path": str(path), "specs": SPECS, "flush_interval": 0.05}
    async with live_bus(sim, sqlite=sqlite) as bus:
        store = sqlite_store.store_for(bus)
        assert store is not None
        live = Collector()
        await bus.register_component(live, SPECS)
        await live.wait_for(lambda: store.accepted >= 200)

    collector = await replayed(path, speed=None)
    assert len(collector.messages) == store.accepted
    assert collector.messages == live.messages[: store.accepted]


async def test_paced_replay_keeps_the_recorded_gaps_scaled_by_speed(tmp_path: Path) -> None:
    path = tmp_path / "crafted.jsonl"
    write_jsonl(path, [tick(100.0, 1000.0), tick(101.0, 1000.3), tick(102.0, 1000.6)])

    paced = await replayed(path, speed=2.0)
    assert [m.trade_price for m in paced.messages if isinstance(m, Ticker)] == [100, 101, 102]
    # 0.6 s recorded at twice the speed: the last arrives at least 0.3 s after the first.
    assert paced.times[-1] - paced.times[0] >= 0.3 - 0.01
    assert paced.times[1] - paced.times[0] >= 0.15 - 0.01

    fast = await replayed(path, speed=None)
    assert fast.messages == paced.messages
    assert fast.times[-1] - fast.times[0] < 0.15


async def test_a_damaged_last_line_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crafted.jsonl"
    write_jsonl(path, [tick(100.0, 1.0), tick(101.0, 2.0)])
    with path.open("ab") as file:
        file.write(b'{"received_at": 3.0, "channel": "public", "mess')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="upbus.plugins.replay"):
        collector = await replayed(path)
    assert [m.trade_price for m in collector.messages if isinstance(m, Ticker)] == [100, 101]
    assert "crafted.jsonl:3: not a recorded message; skipped" in caplog.text


async def test_a_replay_connection_behaves_like_the_exchange(tmp_path: Path) -> None:
    path = tmp_path / "crafted.jsonl"
    write_jsonl(path, [tick(100.0, 1.0), tick(101.0, 2.0), tick(102.0, 3.0)])
    transport = ReplayTransport(path, speed=None, types=PUBLIC_TYPES)
    decode = FrameDecoder().decode

    first = await transport.connect("ws://replay", {})
    await first.send_text(REQUEST)
    await first.send_text("PING")
    assert [decode(frame)[0] for frame in await first.receive_batch()] == [Status(status="UP")]
    frames = await first.receive_batch()
    prices = [m.trade_price for frame in frames for m in decode(frame) if isinstance(m, Ticker)]
    assert prices == [100, 101, 102]
    with pytest.raises(ConnectionClosed) as closed:
        await first.receive_batch()
    assert (closed.value.code, closed.value.reason) == (1000, END_OF_RECORDING)
    assert transport.requests == [REQUEST, "PING"]
    assert transport.ended

    # After the end a connection stays silent until the client closes it.
    second = await transport.connect("ws://replay", {})
    await second.send_text(REQUEST)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(second.aclose)
            with pytest.raises(ConnectionClosed, match="closed by the client"):
                await second.receive_batch()
    await transport.aclose()


async def test_nothing_streams_before_the_first_subscription_request(tmp_path: Path) -> None:
    path = tmp_path / "crafted.jsonl"
    write_jsonl(path, [tick(100.0, 1.0)])
    transport = ReplayTransport(path, speed=None)
    conn = await transport.connect("ws://replay", {})
    frames: list[Any] = []

    async def read() -> None:
        frames.extend(await conn.receive_batch())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            assert frames == []  # the reader waits for a request, like the exchange
            await conn.send_text(REQUEST)
    assert len(frames) == 1
    await transport.aclose()


def test_the_replay_transport_answers_only_when_a_recording_is_set(tmp_path: Path) -> None:
    assert replay.upbus_make_transport(channel=Channel.PUBLIC, settings=upbus.Settings()) is None

    path = tmp_path / "crafted.jsonl"
    write_jsonl(path, [tick(100.0, 1.0)])
    settings = upbus.Settings(plugins={"replay": {"path": str(path), "speed": None}})
    public = replay.upbus_make_transport(channel=Channel.PUBLIC, settings=settings)
    private = replay.upbus_make_transport(channel=Channel.PRIVATE, settings=settings)
    assert isinstance(public, ReplayTransport)
    assert isinstance(private, ReplayTransport)
    assert (public.types, private.types, public.speed) == (PUBLIC_TYPES, PRIVATE_TYPES, None)

    missing = upbus.Settings(plugins={"replay": {"path": str(tmp_path / "nope.jsonl")}})
    with pytest.raises(upbus.ConfigError, match=r"plugins\.replay\.path"):
        replay.upbus_make_transport(channel=Channel.PUBLIC, settings=missing)

    def speed(value: object) -> float | None:
        section = upbus.Settings(plugins={"replay": {"speed": value}})
        return section.plugin_section("replay", replay.ReplaySettings).speed

    assert (speed(2), speed(0), speed(None)) == (2.0, None, None)  # TOML has no null: 0
    with pytest.raises(upbus.ConfigError, match=r"plugins\.replay\.speed"):
        speed(-1)
