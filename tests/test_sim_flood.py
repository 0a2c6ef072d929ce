"""The simulator's ``rate="max"`` flood: a pre-encoded ring written in large batches.

The client is the ``websockets`` package, never upbus code. Every wait is bounded by
``anyio.fail_after`` and every receive loop by a message count.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from upbus.core._errors import ConfigError
from upbus.sim import SimConfig, Simulator
from upbus.sim.cli import build_parser
from upbus.sim.flood import binary_frame, build_ring
from upbus.sim.markets import POPULAR
from upbus.sim.protocol import Subscribe, parse_request

pytestmark = pytest.mark.anyio

CODES = list(POPULAR)
MAX_FRAMES = 200_000  # bound on every receive loop


def config(**overrides: Any) -> SimConfig:
    settings: dict[str, Any] = {"rate": "max", "flood_ring": 1024, "up_interval": 60.0}
    settings.update(overrides)
    return SimConfig(**settings)


def request(kind: str, codes: list[str], fmt: str = "DEFAULT", ticket: str = "t") -> str:
    return json.dumps([{"ticket": ticket}, {"type": kind, "codes": codes}, {"format": fmt}])


@asynccontextmanager
async def open_client(url: str) -> AsyncIterator[ClientConnection]:
    """A websockets client without compression, so frames are the bytes the server wrote.

    Its close reads on: with a bounded queue, a client that stops reading mid-flood
    never sees the server's close frame behind the data and sits out close_timeout.
    """
    ws = await connect(url, compression=None, max_size=None, max_queue=64)
    try:
        yield ws
    finally:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ws.close)
                with suppress(ConnectionClosed):
                    for _ in range(MAX_FRAMES):
                        await ws.recv()


async def frames(ws: ClientConnection, count: int) -> list[bytes]:
    received: list[bytes] = []
    for _ in range(count):
        frame = await ws.recv()
        assert isinstance(frame, bytes), "server frames are binary"
        received.append(frame)
    return received


async def skip_until(ws: ClientConnection, prefix: bytes) -> bytes:
    """Read past frames already in flight until one starts with ``prefix``."""
    for _ in range(MAX_FRAMES):
        frame = await ws.recv()
        assert isinstance(frame, bytes)
        if frame.startswith(prefix):
            return frame
    raise AssertionError(f"no frame starting with {prefix!r}")


async def test_max_rate_streams_the_subscription_then_switches_and_answers_pings() -> None:
    async with Simulator(config()) as sim, open_client(sim.public_url) as ws:
        await ws.send(request("ticker", CODES))
        with anyio.fail_after(30):
            tickers = [orjson.loads(frame) for frame in await frames(ws, 20_000)]
        assert {m["type"] for m in tickers} == {"ticker"}  # DEFAULT keys
        assert Counter(m["code"] for m in tickers).keys() == set(CODES)
        assert [m["stream_type"] for m in tickers[:10]] == ["SNAPSHOT"] * 10
        assert {m["stream_type"] for m in tickers[10:]} == {"REALTIME"}
        # The ring varies: prices and timestamps are not one frame repeated.
        assert len({(m["code"], m["trade_price"], m["timestamp"]) for m in tickers}) > 500

        # A protocol ping is answered while the flood goes on.
        answered = anyio.Event()

        async def ping() -> None:
            await (await ws.ping())
            answered.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ping)
                for _ in range(MAX_FRAMES):  # the pong is read behind the data in flight
                    if answered.is_set():
                        break
                    await ws.recv()

        # A replacement subscription switches what flows: SIMPLE trades only.
        await ws.send(request("trade", CODES, fmt="SIMPLE", ticket="u"))
        with anyio.fail_after(30):
            first = await skip_until(ws, b'{"ty":"trade"')
            trades = [orjson.loads(frame) for frame in [first, *await frames(ws, 20_000)]]
        assert {m["ty"] for m in trades} == {"trade"}
        assert Counter(m["cd"] for m in trades).keys() == set(CODES)
        assert all("type" not in m for m in trades)
        # The text PING is answered with UP between two batches.
        await ws.send("PING")
        with anyio.fail_after(10):
            await skip_until(ws, b'{"status":"UP"}')
        assert not sim.violations
        assert not sim.internal_errors


async def test_the_ring_is_what_the_generated_flood_sends_first() -> None:
    """With a virtual clock, "max" repeats the first frames of rate=None byte for byte."""
    start = {"start_ms": 1_790_000_000_000, "seed": 3, "deflate": False}
    subscription = json.dumps(
        [
            {"ticket": "t"},
            {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
            {"type": "trade", "codes": ["KRW-BTC", "KRW-XRP"]},
            {"type": "orderbook", "codes": ["KRW-ETH.15"]},
            {"format": "SIMPLE_LIST"},
        ]
    )
    ring_size, count = 100, 250
    received: dict[str, list[bytes]] = {}
    for rate in ("max", None):
        settings = config(rate=rate, flood_ring=ring_size, list_batch=2, **start)
        async with Simulator(settings) as sim, open_client(sim.public_url) as ws:
            await ws.send(subscription)
            with anyio.fail_after(30):
                received[str(rate)] = await frames(ws, count)
    generated = received["None"]
    snapshots = sum(frame.startswith(b'[{"ty":"') and b'"SNAPSHOT"' in frame for frame in generated)
    assert snapshots == 3  # five snapshots, two per SIMPLE_LIST frame
    flood = received["max"]
    assert flood[: snapshots + ring_size] == generated[: snapshots + ring_size]
    # Then the ring starts over.
    assert flood[snapshots + ring_size : count] == flood[snapshots : count - ring_size]
    # Within one lap, trade ids increase per code.
    ids: dict[str, list[int]] = {}
    for frame in flood[snapshots : snapshots + ring_size]:
        for message in orjson.loads(frame):
            if message["ty"] == "trade":
                ids.setdefault(message["cd"], []).append(message["sid"])
    assert ids.keys() == {"KRW-BTC", "KRW-XRP"}
    assert all(sequence == sorted(set(sequence)) for sequence in ids.values())


async def test_close_stops_the_flood_and_rings_are_cached() -> None:
    async with Simulator(config()) as sim:
        for ticket in ("a", "b"):
            async with open_client(sim.public_url) as ws:
                await ws.send(request("trade", CODES[:3], ticket=ticket))
                with anyio.fail_after(30):
                    assert len(await frames(ws, 5_000)) == 5_000
        await sim.wait_until(lambda: not sim.live_connections, timeout=5)
        assert [record.close_reason for record in sim.connections] == ["client_close:1000"] * 2
        assert sim.ring_builds == 1  # the second connection reused the first one's ring
        assert not sim.internal_errors


async def test_set_rate_switches_a_paced_connection_to_max_and_back() -> None:
    async with Simulator(config(rate=5.0)) as sim, open_client(sim.public_url) as ws:
        await ws.send(request("ticker", CODES[:2]))
        await frames(ws, 2)  # the snapshots; realtime now comes 5 per second
        sim.set_rate("max")
        with anyio.fail_after(10):
            assert len(await frames(ws, 10_000)) == 10_000
        sim.set_rate(5.0)
        with anyio.fail_after(10):
            # What was written before the switch drains first; then the pace is slow.
            for _ in range(MAX_FRAMES):
                with anyio.move_on_after(0.1) as idle:
                    await ws.recv()
                if idle.cancelled_caught:
                    break
        started = anyio.current_time()
        with anyio.fail_after(5):
            await frames(ws, 5)
        assert anyio.current_time() - started >= 3 / 5


async def test_list_subscriptions_switches_the_ring_to_its_format() -> None:
    async with Simulator(config()) as sim, open_client(sim.public_url) as ws:
        await ws.send(request("trade", CODES[:2]))
        with anyio.fail_after(10):
            assert all(frame.startswith(b'{"type":"trade"') for frame in await frames(ws, 2_000))
        listing = [{"ticket": "l"}, {"method": "LIST_SUBSCRIPTIONS"}, {"format": "SIMPLE_LIST"}]
        await ws.send(json.dumps(listing))
        with anyio.fail_after(10):
            reply = orjson.loads(await skip_until(ws, b'[{"mthd"'))
            assert reply[0]["rslt"] == [{"ty": "trade", "cds": CODES[:2]}]
            after = await frames(ws, 2_000)
        assert all(frame.startswith(b'[{"ty":"trade"') for frame in after)
        assert sim.ring_builds == 2


async def test_candles_alone_give_a_short_ring_and_still_flow() -> None:
    entries = parse_request(request("candle.1s", ["KRW-BTC"]), private=False)
    assert isinstance(entries, Subscribe)
    wall_clock = config(flood_ring=64)  # trades take no wall time: candles are rarely due
    ring = await build_ring(entries.entries, "DEFAULT", wall_clock)
    assert ring.frames < 64
    # On a virtual clock a trade moves time 5-120 ms: one candle.1s per ~16 trades,
    # and generation stops after four trades per wanted frame.
    virtual = config(flood_ring=64, start_ms=1_790_000_000_000)
    assert 8 <= (await build_ring(entries.entries, "DEFAULT", virtual)).frames < 64
    async with Simulator(wall_clock) as sim, open_client(sim.public_url) as ws:
        await ws.send(request("candle.1s", ["KRW-BTC"]))
        with anyio.fail_after(10):
            assert len(await frames(ws, 3)) == 3


def test_frames_chunks_and_settings() -> None:
    assert binary_frame(b"x") == b"\x82\x01x"
    assert binary_frame(b"x" * 200)[:4] == b"\x82\x7e\x00\xc8"
    assert binary_frame(b"x" * 70_000)[:10] == b"\x82\x7f" + (70_000).to_bytes(8, "big")
    assert SimConfig(rate="max").rate == "max"
    bad: Any
    for bad in (0, -1.0, "fast", float("nan")):
        with pytest.raises(ConfigError):
            SimConfig(rate=bad)
    with pytest.raises(ConfigError):
        SimConfig(flood_ring=0)
    parser = build_parser()
    assert parser.parse_args(["--rate", "max"]).rate == "max"
    assert parser.parse_args(["--rate", "flood"]).rate is None
    assert parser.parse_args(["--rate", "20"]).rate == 20.0
    for bad in ("fast", "0", "-3"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--rate", bad])


async def test_chunks_hold_whole_frames_of_about_the_write_size() -> None:
    entries = parse_request(request("ticker", CODES), private=False)
    assert isinstance(entries, Subscribe)
    settings = config(flood_ring=200, flood_write_bytes=16_384)
    ring = await build_ring(entries.entries, "DEFAULT", settings)
    assert ring.frames == 200
    assert all(len(chunk) <= 16_384 for chunk in ring.chunks)
    assert len(ring.chunks) >= ring.size // 16_384
    data = b"".join(ring.chunks)
    offset = frames_seen = 0
    while offset < len(data) and frames_seen <= 200:
        assert data[offset] == 0x82
        length = data[offset + 1]
        header = 2
        if length == 126:
            length, header = int.from_bytes(data[offset + 2 : offset + 4], "big"), 4
        assert orjson.loads(data[offset + header : offset + header + length])["type"] == "ticker"
        offset += header + length
        frames_seen += 1
    assert (offset, frames_seen) == (len(data), 200)
