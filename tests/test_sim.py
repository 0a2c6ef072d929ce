"""The simulator's public endpoint, limits, keepalive and faults, over real loopback sockets.

The client is the ``websockets`` package, never upbus code. Tests wait on frames or on
the simulator's records with ``anyio.fail_after`` bounds; the few short sleeps are the
time a rule under test is about (a window to pass, a timeout to expire).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio
import jwt
import pytest
from upbit_samples import SAMPLES, needs_samples, sample_text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    InvalidMessage,
    InvalidStatus,
)
from websockets.typing import Origin

from upbus.sim import AccountConfig, SimConfig, Simulator
from upbus.sim.limits import ConnectLimiter, MessageLimiter, RollingWindow
from upbus.sim.protocol import Subscribe

pytestmark = pytest.mark.anyio


def config(**overrides: Any) -> SimConfig:
    """Fast settings for tests."""
    settings: dict[str, Any] = {
        "rate": 500.0,
        "error_close_delay": 0.02,
        "close_timeout": 0.5,
        "up_interval": 0.2,
    }
    settings.update(overrides)
    return SimConfig(**settings)


def entry(kind: str, *codes: str, **options: Any) -> dict[str, Any]:
    return {"type": kind, "codes": list(codes), **options}


def request(*entries: dict[str, Any], ticket: str = "t", fmt: str | None = None) -> str:
    frame: list[dict[str, Any]] = [{"ticket": ticket}, *entries]
    if fmt is not None:
        frame.append({"format": fmt})
    return json.dumps(frame)


async def recv(ws: ClientConnection) -> Any:
    with anyio.fail_after(5):
        frame = await ws.recv()
    assert isinstance(frame, bytes), "server frames are binary"
    return json.loads(frame, parse_float=Decimal)


async def recv_until(ws: ClientConnection, predicate: Callable[[Any], bool]) -> Any:
    for _ in range(5000):
        message = await recv(ws)
        if predicate(message):
            return message
    raise AssertionError("no matching frame")


async def recv_many(ws: ClientConnection, count: int) -> list[Any]:
    return [await recv(ws) for _ in range(count)]


async def closed(ws: ClientConnection) -> ConnectionClosed:
    """Read until the connection ends; the close exception."""
    with anyio.fail_after(5):
        for _ in range(100_000):
            try:
                await ws.recv()
            except ConnectionClosed as exc:
                return exc
    raise AssertionError("the connection stayed open")


def kind(message: dict[str, Any]) -> tuple[str, str]:
    return message.get("type") or message["ty"], message.get("code") or message["cd"]


# -- subscriptions --------------------------------------------------------------------


async def test_a_new_frame_replaces_the_whole_set() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("ticker", "KRW-BTC"), entry("trade", "KRW-BTC")))
        await recv_until(ws, lambda m: m["stream_type"] == "REALTIME")
        await ws.send(request(entry("ticker", "KRW-ETH")))
        await recv_until(ws, lambda m: m["code"] == "KRW-ETH")
        # The server cuts over at once: after the first new frame, only the new set.
        later = await recv_many(ws, 30)
        assert {kind(m) for m in later} == {("ticker", "KRW-ETH")}
        assert not sim.violations


async def test_several_entries_of_one_type_keep_their_own_options() -> None:
    frame = request(
        entry("orderbook", "KRW-BTC.15", "KRW-ETH.5", "USDT-ETH.2"),
        entry("orderbook", "KRW-XRP", level=10),
        entry("orderbook", "USDT-BTC", is_only_snapshot=True),
        entry("orderbook", "BTC-ETH", level=10),  # level on a non-KRW market: no data
        entry("orderbook", "KRW-BTC.1", level=1000),  # the same code again, other options
        fmt="SIMPLE",
    )
    async with Simulator(config(rate=None)) as sim, connect(sim.public_url) as ws:
        await ws.send(frame)
        books = await recv_many(ws, 200)
    by_code: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for book in books:
        by_code.setdefault((book["cd"], len(book["obu"]), str(book["lv"])), []).append(book)
    assert set(by_code) == {
        ("KRW-BTC", 15, "0"),
        ("KRW-ETH", 5, "0"),
        ("USDT-ETH", 30, "0"),  # .2 is not a supported depth: 30 units
        ("KRW-XRP", 30, "10"),
        ("USDT-BTC", 30, "0"),
        ("KRW-BTC", 1, "1000"),
    }
    assert [b["st"] for b in by_code[("USDT-BTC", 30, "0")]] == ["SNAPSHOT"]
    xrp = by_code[("KRW-XRP", 30, "10")][0]
    prices = [u["ap"] for u in xrp["obu"]] + [u["bp"] for u in xrp["obu"]]
    assert all(Decimal(str(p)) % 10 == 0 for p in prices)


async def test_snapshot_only_realtime_only_and_the_default() -> None:
    frame = request(
        entry("ticker", "KRW-BTC", is_only_snapshot=True),
        entry("trade", "KRW-ETH", isOnlyRealtime=True),  # camelCase is accepted too
        entry("ticker", "KRW-XRP"),
    )
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(frame)
        frames = await recv_many(ws, 60)
        assert not sim.violations
    btc = [m for m in frames if m["code"] == "KRW-BTC"]
    assert [m["stream_type"] for m in btc] == ["SNAPSHOT"]
    assert {m["stream_type"] for m in frames if m["code"] == "KRW-ETH"} == {"REALTIME"}
    xrp = [m["stream_type"] for m in frames if m["code"] == "KRW-XRP"]
    assert xrp[0] == "SNAPSHOT"
    assert set(xrp[1:]) == {"REALTIME"}
    # Snapshots come before any realtime frame.
    first_realtime = next(i for i, m in enumerate(frames) if m["stream_type"] == "REALTIME")
    assert all(m["stream_type"] == "SNAPSHOT" for m in frames[:first_realtime])
    assert first_realtime == 2


@pytest.mark.parametrize(
    ("fmt", "is_list", "type_key"),
    [
        ("DEFAULT", False, "type"),
        ("SIMPLE", False, "ty"),
        ("JSON_LIST", True, "type"),
        ("SIMPLE_LIST", True, "ty"),
    ],
)
async def test_formats(fmt: str, is_list: bool, type_key: str) -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("trade", "KRW-BTC"), fmt=fmt))
        for message in await recv_many(ws, 5):
            assert isinstance(message, list) is is_list
            objects = message if is_list else [message]
            assert [obj[type_key] for obj in objects] == ["trade"]


async def test_format_switches_for_the_whole_connection_also_by_list_subscriptions() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("ticker", "KRW-BTC"), entry("trade", "KRW-ETH")))
        await recv_until(ws, lambda m: isinstance(m, dict) and "type" in m)
        await ws.send(request(entry("ticker", "KRW-BTC"), entry("trade", "KRW-ETH"), fmt="SIMPLE"))
        await recv_until(ws, lambda m: "ty" in m)
        assert all("ty" in m for m in await recv_many(ws, 10))
        await ws.send(
            json.dumps([{"method": "LIST_SUBSCRIPTIONS"}, {"ticket": "l"}, {"format": "JSON_LIST"}])
        )
        reply = await recv_until(ws, lambda m: isinstance(m, list) and "method" in m[0])
        assert reply[0]["ticket"] == "l"
        later = await recv_many(ws, 10)
        assert all(isinstance(m, list) and "type" in m[0] for m in later)
        assert {m[0]["type"] for m in later} == {"ticker", "trade"}


async def test_depth_totals_and_zero_padding() -> None:
    frame = request(
        entry("orderbook", "KRW-BTC.1"),
        entry("orderbook", "KRW-BTC.5"),
        entry("orderbook", "KRW-BTC.15"),
        entry("orderbook", "KRW-BTC.30"),
        entry("orderbook", "BTC-XRP"),  # a thin BTC-market book
        entry("orderbook", "BTC-XRP.5"),
    )
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(frame)
        books = await recv_many(ws, 60)
    assert sorted(len(b["orderbook_units"]) for b in books[:6]) == [1, 5, 5, 15, 30, 30]
    for book in books:
        units = book["orderbook_units"]
        asks = [Decimal(str(u["ask_size"])) for u in units]
        bids = [Decimal(str(u["bid_size"])) for u in units]
        assert Decimal(str(book["total_ask_size"])) == sum(asks)
        assert Decimal(str(book["total_bid_size"])) == sum(bids)
        prices = [u["ask_price"] for u in units if u["ask_price"]]
        assert prices == sorted(prices)
        assert book["code"] in ("KRW-BTC", "BTC-XRP")
    thin = next(b for b in books if b["code"] == "BTC-XRP" and len(b["orderbook_units"]) == 30)
    padded = [u for u in thin["orderbook_units"] if u["ask_price"] == 0]
    assert padded, "a thin book is padded"
    assert all(u == {"ask_price": 0, "bid_price": 0, "ask_size": 0, "bid_size": 0} for u in padded)
    assert thin["orderbook_units"][-1] == padded[-1]


async def test_list_subscriptions() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(json.dumps([{"ticket": "first"}, {"method": "LIST_SUBSCRIPTIONS"}]))
        assert await recv(ws) == {"method": "LIST_SUBSCRIPTIONS", "result": [], "ticket": "first"}
        await ws.send(
            request(
                entry("ticker", "KRW-BTC", "KRW-ETH"),
                entry("orderbook", "KRW-BTC.5"),
                entry("orderbook", "KRW-XRP", level=10),
            )
        )
        await recv(ws)
        await ws.send(json.dumps([{"ticket": "list"}, {"method": "LIST_SUBSCRIPTIONS"}]))
        reply = await recv_until(ws, lambda m: "method" in m)
        assert reply == {
            "method": "LIST_SUBSCRIPTIONS",
            "result": [
                {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
                {"type": "orderbook", "codes": ["KRW-BTC.5"], "level": 0},
                {"type": "orderbook", "codes": ["KRW-XRP"], "level": 10},
            ],
            "ticket": "list",
        }
        # Listing does not change the subscription.
        later = await recv_many(ws, 20)
        assert {kind(m)[1] for m in later} <= {"KRW-BTC", "KRW-ETH", "KRW-XRP"}
        assert not sim.violations


async def test_unknown_and_lower_case_codes_are_ignored() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("ticker", "krw-btc", "KRW-NOPE", "KRW-ETH", "KRW-ETH.5")))
        frames = await recv_many(ws, 30)
        assert {m["code"] for m in frames} == {"KRW-ETH"}
        assert not sim.violations
        assert sim.connections[-1].is_open


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One ``example`` per sample request, read at collection: without the samples, a skip."""
    if "example" not in metafunc.fixturenames:
        return
    if not SAMPLES.is_dir():  # where they are required, upbit_samples failed the import
        metafunc.parametrize("example", [pytest.param({}, marks=needs_samples, id="no-samples")])
        return
    examples = json.loads(sample_text("requests.json"))["examples"]
    # announcement is out of the simulator's scope; the text PING is tested below.
    wanted = [e for e in examples if e["id"] not in ("req-announcement", "req-text-ping")]
    metafunc.parametrize("example", wanted, ids=[e["id"] for e in wanted])


async def test_every_sample_request_is_accepted(example: dict[str, Any]) -> None:
    settings = config(accounts=(AccountConfig("k", "s" * 64, {}),))
    private = example.get("endpoint") == "private"
    headers = {}
    if private:
        claims = {"access_key": "k", "nonce": str(uuid.uuid4())}
        headers["Authorization"] = f"Bearer {jwt.encode(claims, 's' * 64, algorithm='HS512')}"
    async with Simulator(settings) as sim:
        url = sim.private_url if private else sim.public_url
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(json.dumps(example["message"]))
            await ws.send(json.dumps([{"ticket": "check"}, {"method": "LIST_SUBSCRIPTIONS"}]))
            reply = await recv_until(
                ws, lambda m: "error" in m or "method" in m or "mthd" in (m[0] if m else {})
            )
        assert "error" not in reply
        assert not sim.violations
        assert sim.requests[0].error is None


async def test_binary_client_frames_are_read_as_text() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("trade", "KRW-BTC")).encode())
        assert (await recv(ws))["type"] == "trade"


async def test_oversized_client_messages_close_with_1009() -> None:
    async with Simulator(config(max_message_bytes=100)) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("trade", *(["KRW-BTC"] * 20))))
        exc = await closed(ws)
        assert exc.rcvd is not None
        assert exc.rcvd.code == 1009


async def test_internal_errors_are_reported_when_the_simulator_exits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: object, **_: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr("upbus.sim.server.Connection.run", broken)
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="bug")):
        async with Simulator(config()) as sim:
            with pytest.raises(ConnectionClosed):
                async with connect(sim.public_url) as ws:
                    await ws.recv()
            await sim.wait_until(lambda: bool(sim.internal_errors))


# -- errors ------------------------------------------------------------------------------

ERROR_CASES = [
    ("hello", "WRONG_FORMAT", "Format 이 맞지 않습니다."),
    ('{"ticket":"x"}', "WRONG_FORMAT", "Format 이 맞지 않습니다."),
    ('[{"ticket":"x"},{"type":"ticker","codes":"KRW-BTC"}]', "WRONG_FORMAT", None),
    ('[{"type":"ticker","codes":["KRW-BTC"]}]', "NO_TICKET", None),
    ('[{"ticket":"x"},{"codes":["KRW-BTC"]}]', "NO_TYPE", None),
    ('[{"ticket":"x"}]', "NO_TYPE", None),
    ('[{"ticket":"x"},{"type":"ticker"}]', "NO_CODES", "codes 필드가 존재하지 않습니다."),
    (
        '[{"ticket":"x"},{"type":"ticker","codes":[]}]',
        "INVALID_PARAM",
        "codes 필드가 비어 있습니다.",
    ),
    (
        '[{"ticket":"x"},{"type":"nope","codes":["A"]}]',
        "INVALID_PARAM",
        "nope 은 지원하지 않는 타입입니다.",
    ),
    (
        '[{"ticket":"x"},{"type":"ticker","codes":["KRW-BTC"]},{"format":"XML"}]',
        "INVALID_PARAM",
        None,
    ),
    ('[{"ticket":"x"},{"type":"myOrder"}]', "INVALID_PARAM", None),  # private type, public URL
]


@pytest.mark.parametrize(("frame", "name", "text"), ERROR_CASES)
async def test_errors_then_close_1000(frame: str, name: str, text: str | None) -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        [connection] = sim.live_connections
        await ws.send(frame)
        with anyio.fail_after(5):
            raw = await ws.recv()
        assert isinstance(raw, bytes)
        error = json.loads(raw)["error"]
        assert error["name"] == name
        if text is not None:
            assert error["message"] == text
        if name in ("INVALID_PARAM", "WRONG_FORMAT"):
            assert raw.startswith(b'{"error":{"message"')  # key order as the probe saw
        exc = await closed(ws)
        assert exc.rcvd is not None
        assert exc.rcvd.code == 1000
        record = await sim.wait_for_close(connection)
        assert record.close_reason == f"error:{name}"
        assert [(v.kind, v.detail) for v in sim.violations] == [("request_error", name)]
        [logged] = sim.requests
        assert (logged.raw, logged.error, logged.parsed) == (frame, name, None)


async def test_a_malformed_replacement_ends_the_old_subscription() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("ticker", "KRW-BTC")))
        await recv(ws)
        await ws.send('[{"ticket":"x"},{"type":"ticker","codes":[]}]')
        error = await recv_until(ws, lambda m: "error" in m)
        assert error["error"]["name"] == "INVALID_PARAM"
        exc = await closed(ws)
        assert exc.rcvd is not None
        assert exc.rcvd.code == 1000


# -- keepalive ---------------------------------------------------------------------------


async def test_text_ping_gets_up_now_and_then_periodically() -> None:
    async with Simulator(config(up_interval=0.1)) as sim, connect(sim.public_url) as ws:
        for _ in range(8):  # text PINGs do not count toward the message limit
            await ws.send("PING")
        for _ in range(10):  # eight immediate replies, then the timer's
            assert await recv(ws) == {"status": "UP"}
        assert not sim.violations
        assert [r.parsed for r in sim.requests] == ["PING"] * 8


async def test_up_frames_can_be_text() -> None:
    async with Simulator(config(binary_control_frames=False)) as sim, connect(sim.public_url) as ws:
        await ws.send("PING")
        with anyio.fail_after(5):
            assert await ws.recv() == '{"status":"UP"}'


async def test_protocol_ping_gets_a_pong() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url, ping_interval=None) as ws:
        with anyio.fail_after(5):
            waiter = await ws.ping(b"hi")
            await waiter
        assert not sim.requests  # pings are not requests


async def test_idle_connections_are_dropped_without_a_close_frame() -> None:
    async with Simulator(config(idle_timeout=0.2)) as sim:
        async with connect(sim.public_url, ping_interval=None) as ws:
            [connection] = sim.live_connections
            exc = await closed(ws)
            assert isinstance(exc, ConnectionClosedError)
            assert exc.rcvd is None  # abrupt: no close frame (1006)
        record = await sim.wait_for_close(connection)
        assert record.close_reason == "idle_timeout"


async def test_traffic_keeps_a_connection_alive() -> None:
    settings = config(idle_timeout=0.25)
    async with Simulator(settings) as sim, connect(sim.public_url, ping_interval=None) as ws:
        for _ in range(10):  # 0.5 s in all, twice the idle timeout
            await anyio.sleep(0.05)
            with anyio.fail_after(5):
                await (await ws.ping())
        assert sim.connections[-1].is_open


# -- message limits ----------------------------------------------------------------------


async def test_message_flood_gets_an_error_frame_then_close() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        for _ in range(6):  # LIST_SUBSCRIPTIONS counts toward the limit
            await ws.send(json.dumps([{"ticket": "l"}, {"method": "LIST_SUBSCRIPTIONS"}]))
        error = await recv_until(ws, lambda m: "error" in m)
        assert error["error"]["name"] == "TOO_MANY_REQUEST"
        exc = await closed(ws)
        assert exc.rcvd is not None
        assert exc.rcvd.code == 1000
        [violation] = await sim.wait_for_violations(1)
        assert violation.kind == "message_rate"
        assert violation.detail == "more than 5 requests in 1 s"


async def test_the_minute_window_is_rolling_too() -> None:
    settings = config(message_limits=((5, 0.2), (8, 60.0)), too_many_name="Too Many Requests")
    async with Simulator(settings) as sim, connect(sim.public_url) as ws:
        listing = json.dumps([{"ticket": "l"}, {"method": "LIST_SUBSCRIPTIONS"}])
        for _ in range(4):
            await ws.send(listing)
        await sim.wait_for_requests(4)
        await anyio.sleep(0.3)  # the short window passes, measured from the server's clock
        for _ in range(5):
            await ws.send(listing)
        error = await recv_until(ws, lambda m: "error" in m)
        assert error["error"]["name"] == "Too Many Requests"
        [violation] = await sim.wait_for_violations(1)
        assert violation.detail == "more than 8 requests in 60 s"


async def test_a_client_within_limits_records_no_violation() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        for index in range(5):
            await ws.send(request(entry("ticker", "KRW-BTC"), ticket=f"t{index}"))
        for _ in range(5):
            await ws.send("PING")
        await sim.wait_for_requests(10)
        await recv_many(ws, 20)
        assert not sim.violations
        assert sim.connections[-1].is_open


def test_rolling_windows_count_any_interval() -> None:
    window = RollingWindow(5, 1.0)
    assert all(window.hit(t) for t in (0.0, 0.2, 0.4, 0.6, 0.8))
    assert not window.hit(0.99)  # six within one second
    assert window.hit(1.21)  # 0.4 .. 1.21: 0.2 has left the window
    limiter = MessageLimiter(((5, 1.0), (100, 60.0)))
    assert all(limiter.hit(t * 0.25) is None for t in range(100))  # 4/s for 25 s
    assert limiter.hit(25.0) == (100, 60.0)


def test_connect_bans_grow() -> None:
    limiter = ConnectLimiter(
        2, 1.0, strikes_before_ban=1, strike_window=60.0, ban_base=1.0, ban_factor=2.0, ban_max=3.0
    )
    statuses = [limiter.check("ip", t).status for t in (0.0, 0.1, 0.2, 0.3)]
    assert statuses == [101, 101, 429, 418]
    assert limiter.check("ip", 1.2).status == 418  # banned until 1.3
    assert limiter.check("other", 1.2).status == 101  # scopes are separate
    assert [limiter.check("ip", t).status for t in (1.4, 1.5, 1.6, 1.7)] == [101, 101, 429, 418]
    assert limiter.check("ip", 1.8).retry_after == pytest.approx(1.9)  # two seconds this time
    for t in (3.8, 3.9, 4.0, 4.1):
        decision = limiter.check("ip", t)
    assert decision.retry_after == 3.0  # capped at ban_max


async def test_connect_limit_gives_429_then_418() -> None:
    # Five per 10 s rather than per second, so a slow machine cannot spread the attempts.
    settings = config(connect_limit=(5, 10.0), connect_strikes_before_ban=1, ban_base=30.0)
    async with Simulator(settings) as sim:
        statuses = []
        retry_after = []
        for _ in range(8):
            try:
                async with connect(sim.public_url):
                    statuses.append(101)
            except InvalidStatus as exc:
                statuses.append(exc.response.status_code)
                retry_after.append(exc.response.headers.get("Retry-After"))
        # The 6th attempt gets 429, the 7th starts a ban.
        assert statuses == [101] * 5 + [429, 418, 418]
        assert retry_after == [None, "30", "30"]
        assert [v.kind for v in sim.violations] == ["connect_rate", "connect_ban", "connect_ban"]
        assert [r.status for r in sim.connections] == statuses


async def test_origin_header_limit() -> None:
    async with Simulator(config()) as sim:
        async with connect(sim.public_url, origin=Origin("http://localhost")):
            pass
        with pytest.raises(InvalidStatus) as info:
            async with connect(sim.public_url, origin=Origin("http://localhost")):
                pass
        assert info.value.response.status_code == 429
        assert [v.kind for v in sim.violations] == ["origin_rate"]


# -- faults ------------------------------------------------------------------------------


async def test_drop_closes_without_a_close_frame() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        [connection] = sim.live_connections
        sim.drop(connection)
        exc = await closed(ws)
        assert isinstance(exc, ConnectionClosedError)
        assert exc.rcvd is None
        assert (await sim.wait_for_close(connection)).close_reason == "dropped"


async def test_drop_with_reset() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        sim.drop(sim.live_connections[0], reset=True)
        exc = await closed(ws)
        assert isinstance(exc, ConnectionClosedError)
        assert exc.rcvd is None


async def test_stall_stops_reading_and_writing_but_keeps_the_socket() -> None:
    async with Simulator(config()) as sim:
        async with connect(sim.public_url, ping_interval=None, close_timeout=0.1) as ws:
            await ws.send(request(entry("trade", "KRW-BTC")))
            await recv_many(ws, 3)
            [connection] = sim.live_connections
            sim.stall(connection)
            waiter = await ws.ping()
            with anyio.move_on_after(0.3) as scope:
                await waiter
            assert scope.cancelled_caught, "a stalled server answers no ping"
            assert connection in sim.live_connections
            assert sim.connections[-1].closed is None
            sim.drop(connection)
        assert (await sim.wait_for_close(connection)).close_reason == "stalled"


async def test_garbage_bytes_break_the_client() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        sim.send_garbage(sim.live_connections[0])
        exc = await closed(ws)
        assert isinstance(exc, ConnectionClosedError)


async def test_injected_error_frame_then_close() -> None:
    async with Simulator(config()) as sim, connect(sim.public_url) as ws:
        sim.send_error(sim.live_connections[0], "SOMETHING", "injected")
        assert await recv(ws) == {"error": {"name": "SOMETHING", "message": "injected"}}
        exc = await closed(ws)
        assert exc.rcvd is not None
        assert exc.rcvd.code == 1000


async def test_refused_connections() -> None:
    async with Simulator(config()) as sim:
        sim.refuse_connections(10, status=503)
        with pytest.raises(InvalidStatus) as info:
            async with connect(sim.public_url):
                pass
        assert info.value.response.status_code == 503
        sim.refuse_connections(10)
        with pytest.raises(InvalidMessage):  # the socket closes before any HTTP reply
            async with connect(sim.public_url, open_timeout=2):
                pass
        sim.refuse_connections(0.1)
        await anyio.sleep(0.15)  # the refusal window ends
        async with connect(sim.public_url):
            pass
        assert [r.close_reason for r in sim.connections][:2] == ["rejected:503", "refused"]


# -- market data -------------------------------------------------------------------------


async def _first_frames(seed: int, count: int) -> list[bytes]:
    settings = config(seed=seed, start_ms=1_790_000_000_000, rate=None)
    async with Simulator(settings) as sim, connect(sim.public_url) as ws:
        await ws.send(
            request(
                entry("ticker", "KRW-BTC", "KRW-SOL"),
                entry("trade", "KRW-BTC"),
                entry("orderbook", "KRW-ETH.15"),
                entry("candle.1s", "KRW-XRP"),
            )
        )
        frames = []
        with anyio.fail_after(5):
            for _ in range(count):
                frame = await ws.recv()
                assert isinstance(frame, bytes)
                frames.append(frame)
        return frames


async def test_same_seed_same_bytes() -> None:
    first = await _first_frames(7, 80)
    assert first == await _first_frames(7, 80)
    assert first != await _first_frames(8, 80)


async def test_market_fields_are_consistent() -> None:
    async with Simulator(config(rate=None)) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("ticker", "KRW-DOGE"), entry("trade", "KRW-DOGE")))
        frames = await recv_many(ws, 200)
    tickers = [m for m in frames if m["type"] == "ticker"]
    trades = [m for m in frames if m["type"] == "trade"]
    for t in tickers:
        price, prev = Decimal(str(t["trade_price"])), Decimal(str(t["prev_closing_price"]))
        assert Decimal(str(t["signed_change_price"])) == price - prev
        assert Decimal(str(t["change_price"])) == abs(price - prev)
        assert t["change"] == ("RISE" if price > prev else "FALL" if price < prev else "EVEN")
        rate = Decimal(str(t["signed_change_rate"]))
        assert abs(rate - (price - prev) / prev) < Decimal("1e-10")
        volumes = Decimal(str(t["acc_ask_volume"])) + Decimal(str(t["acc_bid_volume"]))
        assert volumes == Decimal(str(t["acc_trade_volume"]))
        assert Decimal(str(t["low_price"])) <= price <= Decimal(str(t["high_price"]))
    accumulated = [Decimal(str(t["acc_trade_volume"])) for t in tickers]
    assert accumulated == sorted(accumulated)
    assert accumulated[0] < accumulated[-1]
    ids = [t["sequential_id"] for t in trades]
    assert ids == sorted(set(ids))
    assert all(t["trade_timestamp"] <= t["timestamp"] for t in trades)


async def test_candles_at_most_once_per_second_and_only_when_changed() -> None:
    settings = config(rate=None, start_ms=1_790_000_000_000)
    async with Simulator(settings) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("candle.1m", "KRW-BTC"), entry("trade", "KRW-BTC")))
        frames = await recv_many(ws, 300)
    candles = [m for m in frames if m["type"] == "candle.1m"]
    assert candles[0]["stream_type"] == "SNAPSHOT"
    times = [c["timestamp"] for c in candles]
    assert len(times) > 3
    assert all(later - earlier >= 1000 for earlier, later in itertools.pairwise(times))


async def test_rate_paces_realtime_messages() -> None:
    async with Simulator(config(rate=40.0)) as sim, connect(sim.public_url) as ws:
        await ws.send(request(entry("trade", "KRW-BTC")))
        await recv(ws)  # the snapshot is not paced
        started = anyio.current_time()
        await recv_many(ws, 9)
        assert anyio.current_time() - started >= 8 / 40


async def test_flood_mode_still_reads_client_frames() -> None:
    codes = [f"KRW-{s}" for s in ("BTC", "ETH", "XRP", "SOL", "DOGE", "ADA", "TRX", "LINK")]
    async with Simulator(config(rate=None)) as sim, connect(sim.public_url, max_queue=4) as ws:
        await ws.send(request(entry("orderbook", *codes), entry("trade", *codes)))
        await recv_many(ws, 300)
        with anyio.fail_after(2):
            await (await ws.ping())
        await ws.send(request(entry("ticker", "KRW-SUI")))
        await recv_until(ws, lambda m: m["type"] == "ticker")
        assert {kind(m) for m in await recv_many(ws, 50)} == {("ticker", "KRW-SUI")}
        assert not sim.violations


# -- records and the command line --------------------------------------------------------


async def test_requests_and_connections_are_recorded() -> None:
    async with Simulator(config()) as sim:
        async with connect(sim.public_url) as ws:
            frame = request(entry("ticker", "KRW-BTC"), fmt="SIMPLE")
            await ws.send(frame)
            [record] = await sim.wait_for_requests(1)
            await recv(ws)
        assert (record.connection, record.endpoint, record.raw) == (1, "public", frame)
        assert record.parsed is not None
        assert record.parsed != "PING"
        assert isinstance(record.parsed, Subscribe)
        assert record.parsed.format == "SIMPLE"
        closed_record = await sim.wait_for_close(1)
        assert closed_record.close_reason == "client_close:1000"
        assert closed_record.opened <= record.time <= (closed_record.closed or 0)
        assert "origin" not in dict(closed_record.headers)


async def test_run_cli_prints_the_url_first() -> None:
    code = (
        "from upbus.sim import run_cli; raise SystemExit(run_cli(['--port', '0', '--rate', 'max']))"
    )
    process = await anyio.open_process([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        buffer = b""
        with anyio.fail_after(20):
            while b"\n" not in buffer:
                buffer += await process.stdout.receive()
        url = buffer.split(b"\n", 1)[0].decode()
        assert url.startswith("ws://127.0.0.1:")
        assert url.endswith("/websocket/v1")
        async with connect(url) as ws:
            await ws.send(request(entry("ticker", "KRW-BTC")))
            assert (await recv(ws))["code"] == "KRW-BTC"
    finally:
        process.terminate()
        with anyio.fail_after(10):
            await process.wait()
        await process.aclose()
