"""Heartbeats under ``block`` backpressure, on both transports.

A lossless (``block``) subscriber whose buffer is full parks the channel's receive
loop until the consumer makes room. The heartbeat must keep working meanwhile: a
consumer that does not read never makes the connection look dead, and a server that
stops answering is still found. The first tests run the real :class:`~upbus.Bus`
against the strict simulator over loopback; the last ones pin the rule at the
transport level: while a connection holds ``max_pending`` unread messages it reads no
more, and the timeout of ``ping`` stops counting until the reader catches up.

Every wait is bounded. The two "nothing goes wrong" checks watch a fixed window of
several heartbeat timeouts, since the absence of a timeout has no event to wait for.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from simbus import make_bus
from wsproto.events import BytesMessage, CloseConnection, Ping
from wsservers import WAIT, Handler, Kind, Peer, connected, each_transport, make_transport

import upbus
from upbus.core.delivery._router import ConnectionEvent, Subscriber
from upbus.core.wire._messages import Trade
from upbus.core.wire._transport import Connection, ConnectionClosed
from upbus.sim import SimConfig, Simulator

TRANSPORTS = pytest.mark.parametrize("transport", ["httpx", "picows"])
INTERVAL = 0.1  # heartbeat interval
TIMEOUT = 0.3  # heartbeat timeout, as in the report of the bug
WINDOW = 5 * TIMEOUT  # how long "nothing goes wrong" is watched
RATE = 200.0  # simulator trades per second: far below either transport's max_pending per window


class Silent:
    """A component that iterates its buffer only when told to."""


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=RATE)


def heartbeat_bus(sim: Simulator, transport: str) -> upbus.Bus:
    """A bus on ``sim`` over ``transport`` whose heartbeat runs every ``INTERVAL``."""
    return make_bus(
        sim,
        transport=transport,
        debounce=0.02,
        heartbeat_interval=INTERVAL,
        heartbeat_timeout=TIMEOUT,
        reconnect={"initial": 0.05, "maximum": 0.2},
    )


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` holds (polled: bus metrics have no change event)."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def public(bus: upbus.Bus) -> dict[str, Any]:
    metrics: dict[str, Any] = bus.get_connection_metrics()["public"]
    return metrics


async def take_trades(subscriber: Subscriber, count: int) -> tuple[list[Trade], list[str]]:
    """The next ``count`` trades from ``subscriber``, and the connection states seen."""
    trades: list[Trade] = []
    states: list[str] = []
    with anyio.fail_after(WAIT + count / RATE):
        async for item in subscriber:
            if isinstance(item, ConnectionEvent):
                states.append(item.state)
                continue
            assert isinstance(item, Trade), item  # no Dropped: block loses nothing
            trades.append(item)
            if len(trades) == count:
                break
    return trades, states


@TRANSPORTS
@pytest.mark.anyio
async def test_a_consumer_that_does_not_read_never_makes_the_connection_look_dead(
    sim: Simulator, transport: str
) -> None:
    async with heartbeat_bus(sim, transport) as bus:
        component = Silent()
        subscriber = await bus.register_component(
            component, [upbus.trade("KRW-BTC")], overflow="block", capacity=5
        )
        # The buffer fills; delivering the read that filled it, the receive loop parks.
        await until(lambda: subscriber.full)
        parked = public(bus)["messages_in"]
        rtts: set[float] = set()
        with anyio.move_on_after(WINDOW):
            while True:
                await anyio.sleep(INTERVAL / 2)
                rtt = public(bus)["ping_rtt"]
                if rtt is not None:
                    rtts.add(rtt)

        metrics = public(bus)
        assert metrics["messages_in"] == parked  # the receive loop stayed parked throughout
        assert metrics["heartbeat_timeouts"] == 0
        assert (metrics["connects"], metrics["reconnects"]) == (1, 0)
        assert len(rtts) >= 3  # the heartbeat ran and was answered meanwhile
        assert [record.status for record in sim.connections] == [101]

        # The consumer starts reading: everything comes, in order, nothing lost.
        trades, states = await take_trades(subscriber, 2 * int(RATE))
        assert states == ["connected"]  # no gap, no reconnect
        ids = [trade.sequential_id for trade in trades]
        assert ids == sorted(set(ids))
        assert subscriber.dropped == 0
        metrics = public(bus)
        assert metrics["messages_in"] >= parked + len(trades) - subscriber.capacity
        assert metrics["heartbeat_timeouts"] == 0
        assert metrics["connects"] == 1
    assert list(sim.violations) == []


@TRANSPORTS
@pytest.mark.parametrize("backpressured", [True, False], ids=["backpressured", "reading"])
@pytest.mark.anyio
async def test_a_stalled_server_is_still_found_by_the_heartbeat(
    sim: Simulator, transport: str, backpressured: bool
) -> None:
    async with heartbeat_bus(sim, transport) as bus, anyio.create_task_group() as tg:
        component = Silent()
        subscriber = await bus.register_component(
            component, [upbus.trade("KRW-BTC")], overflow="block", capacity=5
        )
        taken: list[object] = []
        if backpressured:
            await until(lambda: subscriber.full)
        else:

            async def consume() -> None:
                async for item in subscriber:
                    taken.append(item)

            tg.start_soon(consume)
            await until(lambda: len(taken) >= 10)
        (first,) = sim.live_connections
        sim.stall(first)  # the socket stays open; nothing is read or written
        await sim.wait_for_connections(2, timeout=WAIT)  # the client replaced it
        metrics = public(bus)
        assert metrics["heartbeat_timeouts"] == 1
        assert "no pong" in metrics["last_error"]
        if backpressured:
            assert subscriber.full  # found while the consumer never read
        tg.cancel_scope.cancel()


# -- the rule at the transport level ------------------------------------------------------

MAX_PENDING = 50
FLOOD = 5000  # 1 kB frames: far more than fits in the socket buffers and max_pending


def opened(handler: Handler, kind: Kind) -> AbstractAsyncContextManager[Connection]:
    """A connection through a ``kind`` transport holding at most ``MAX_PENDING`` unread."""
    return connected(handler, make_transport(kind, max_pending=MAX_PENDING))


def numbered(index: int) -> bytes:
    return b"%06d" % index + b"x" * 1000


@each_transport(trio=True)
@pytest.mark.anyio
async def test_the_ping_clock_stops_while_the_reader_is_behind_and_the_pong_comes_after(
    kind: Kind,
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        ping = await peer.expect(Ping)
        # More than the client may hold: this write waits for the client to read.
        for start in range(0, FLOOD, 500):
            await peer.send(*(BytesMessage(numbered(i)) for i in range(start, start + 500)))
        await peer.send(ping.response())  # type: ignore[attr-defined]
        await peer.expect(CloseConnection)

    answered = anyio.Event()
    rtts: list[float] = []

    async def ping(conn: Connection) -> None:
        rtts.append(await conn.ping(0.2))
        answered.set()

    async with opened(handler, kind) as conn, anyio.create_task_group() as tg:
        tg.start_soon(ping, conn)
        await until(lambda: conn.reading_paused)
        # Five timeouts long, with nobody reading: the ping neither fails nor ends.
        with anyio.move_on_after(1.0):
            await answered.wait()
        assert not answered.is_set()
        assert not conn.closed
        # The reader catches up: every message, in order, then the pong.
        received: list[bytes | str] = []
        with anyio.fail_after(WAIT):
            while len(received) < FLOOD:
                received += await conn.receive_batch()
            await answered.wait()
        assert received == [numbered(i) for i in range(FLOOD)]
        assert rtts[0] >= 1.0  # the round trip includes the time the clock stood still
        await conn.aclose()


@each_transport(trio=True)
@pytest.mark.anyio
async def test_ping_without_a_reader_reads_and_keeps_the_messages_in_order(
    kind: Kind,
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(*(BytesMessage(numbered(i)) for i in range(20)))
        await peer.expect(CloseConnection)  # answers every ping on the way

    async with opened(handler, kind) as conn:
        with anyio.fail_after(WAIT):
            rtts = [await conn.ping(WAIT) for _ in range(3)]
            received: list[bytes | str] = []
            while len(received) < 20:
                received += await conn.receive_batch()
        assert received == [numbered(i) for i in range(20)]
        assert all(0 < rtt < WAIT for rtt in rtts)


@each_transport(trio=True)
@pytest.mark.anyio
async def test_a_silent_server_times_the_ping_out_with_or_without_a_reader(
    kind: Kind,
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(BytesMessage(b"hello"))
        while await peer.next_event() is not None:  # reads pings, answers none
            pass

    async with opened(handler, kind) as conn:
        with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
            await conn.ping(0.2)  # nobody reads: the ping reads, and finds nothing
        assert not conn.closed
        async with anyio.create_task_group() as tg:
            received: list[bytes | str] = []

            async def read() -> None:
                try:
                    while True:
                        received.extend(await conn.receive_batch())
                except ConnectionClosed:
                    pass

            tg.start_soon(read)
            with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
                await conn.ping(0.2)
            await conn.aclose()
        assert received == [b"hello"]


@each_transport(trio=True)
@pytest.mark.anyio
async def test_pings_and_an_intermittent_reader_share_the_socket_without_loss(
    kind: Kind,
) -> None:
    """The reading role passes between ``receive_batch`` and ``ping`` many times."""
    count = 3000

    async def handler(peer: Peer) -> None:
        await peer.accept()
        for start in range(0, count, 30):
            await peer.send(*(BytesMessage(b"%05d" % i) for i in range(start, start + 30)))
            await anyio.lowlevel.checkpoint()
        await peer.expect(CloseConnection)  # answers pings on the way

    received: list[bytes | str] = []
    rtts: list[float] = []
    done = anyio.Event()
    async with opened(handler, kind) as conn:
        with anyio.fail_after(WAIT * 2):
            async with anyio.create_task_group() as tg:

                async def heartbeat() -> None:
                    # Ends after a whole ping: cancelling one mid-write would end the
                    # connection (half a frame may be on the wire).
                    while not done.is_set():
                        rtts.append(await conn.ping(WAIT))

                tg.start_soon(heartbeat)
                while len(received) < count:
                    received += await conn.receive_batch()
                    for _ in range(3):  # not reading for a moment: the ping reads
                        await anyio.lowlevel.checkpoint()
                done.set()
        assert not conn.closed
    assert received == [b"%05d" % i for i in range(count)]
    assert rtts
