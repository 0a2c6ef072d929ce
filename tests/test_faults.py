"""Recovery from connection faults: 100 of them, of every kind the simulator can inject.

Twenty components with overlapping and distinct ticker, trade and orderbook wishes on
one :class:`~upbus.Bus` (half called back through ``on_message``, ``async def`` or
plain ``def``, half iterating their buffer) watch the strict simulator's connection
fail 100 times on each transport, over real loopback sockets. The faults, in turn:

* ``drop_fin`` / ``drop_rst``: the socket closes without a close frame (FIN, or RST);
* ``stall``: the server stops reading and writing but keeps the socket open (a
  half-open peer; only the heartbeat can find it);
* ``garbage``: bytes that are not a WebSocket frame;
* ``error_close``: an error frame, then the server's close, as after a bad request;
* ``too_many``: the same with ``TOO_MANY_REQUEST`` (the client must back off);
* ``refused_503`` / ``refused_429`` / ``refused_silent``: the connection drops and
  the reconnect's upgrade is refused (HTTP 503, HTTP 429, or the socket closed
  without an answer) until one refusal has been seen. Meanwhile one component
  changes its wish, so the next connection must carry the *latest* state.

After each fault the test waits (on events, never by sleeping) until every
component has seen the gap, the reconnect and data after it, then injects the next.
Then it checks: every accepted connection got exactly one request, equal to the union
of the wishes at that time (no lost subscription, no useless send); each component's
stream holds exactly ``connected`` then one ``gap`` + ``reconnected`` per outage, with
no data between the two and data after each; the heartbeat and error counters match
the faults; the simulator saw no broken limit.

The simulator allows 50 connects a second (the exchange: 5) and the bus keeps under
that: 100 reconnects at the exchange's rate would take 20 s alone.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest

import upbus
from upbus.core._bus import Bus
from upbus.core.delivery._router import Overflow
from upbus.core.subscriptions._specs import Spec
from upbus.sim import SimConfig, Simulator
from upbus.sim.protocol import Subscribe
from upbus.sim.records import ConnectionRecord

FAULTS = 100
STEP_TIMEOUT = 10.0  # one fault's whole recovery; normally tens of milliseconds
CONNECTS_PER_SECOND = 50
HEARTBEAT_INTERVAL = 0.1
HEARTBEAT_TIMEOUT = 0.3

KINDS = (
    "drop_fin",
    "drop_rst",
    "stall",
    "garbage",
    "error_close",
    "too_many",
    "refused_503",
    "refused_429",
    "refused_silent",
)
# The refused kinds: the upgrade status the simulator answers with (0: no answer).
REFUSALS = {"refused_503": 503, "refused_429": 429, "refused_silent": 0}
ERRORS = {"error_close": "WRONG_FORMAT", "too_many": "TOO_MANY_REQUEST"}

SHARED = ("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-DOGE", "KRW-ADA")
DISTINCT = ("KRW-AVAX", "KRW-XLM", "KRW-SUI")  # each wanted by one component only
TOGGLED = ("KRW-HBAR", "KRW-DOT")  # the last component switches between these
OWN = "KRW-BCH"  # ... and keeps this one (a wish it shares would replay a cached value)
COMPONENTS = 20
DATA_TYPES = frozenset({"ticker", "trade", "orderbook"})
POLICIES: tuple[Overflow, ...] = ("conflate", "drop_oldest", "block")


def component_specs(index: int, toggle: int = 0) -> list[Spec]:
    """Component ``index``'s wishes; the last one's depend on ``toggle``."""
    if index == COMPONENTS - 1:
        return [upbus.trade(TOGGLED[toggle % 2]), upbus.ticker(OWN)]
    if index >= COMPONENTS - 1 - len(DISTINCT):
        code = DISTINCT[index - (COMPONENTS - 1 - len(DISTINCT))]
        return [upbus.ticker(code), upbus.trade(code), upbus.orderbook(code, depth=5)]
    a, b = SHARED[index % len(SHARED)], SHARED[(index + 1) % len(SHARED)]
    return [
        [upbus.ticker(a, b)],
        [upbus.trade(a), upbus.ticker(b)],
        [upbus.orderbook(a, depth=5), upbus.trade(b)],
        [upbus.orderbook(a, depth=15), upbus.ticker(a)],
    ][index % 4]


def wanted_streams(specs: Iterable[Spec]) -> frozenset[tuple[str, str]]:
    """The union of ``specs`` as (type, code) pairs, each orderbook at its deepest depth."""
    streams: set[tuple[str, str]] = set()
    depths: dict[str, int] = {}
    for spec in specs:
        for code in spec.codes:
            if spec.type == "orderbook":
                depths[code] = max(depths.get(code, 0), spec.depth or 30)
            else:
                streams.add((spec.type, code))
    for code, depth in depths.items():
        streams.add(("orderbook", code if depth == 30 else f"{code}.{depth}"))
    return frozenset(streams)


def requested_streams(request: Subscribe) -> list[tuple[str, str]]:
    """What one subscription frame asked for, as (type, code) pairs, repeats kept."""
    for entry in request.entries:
        assert not entry.is_only_snapshot
        assert not entry.is_only_realtime
        assert not entry.level
    return [(entry.type, code) for entry in request.entries for code in entry.codes or ()]


class Tracker:
    """Wakes the test whenever any component received anything."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def changed(self) -> None:
        self._event.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        with anyio.fail_after(timeout):
            while not predicate():
                self._event = anyio.Event()
                await self._event.wait()


@dataclass(eq=False)
class Component:
    """Counts data messages and keeps connection events with the count at their arrival."""

    name: str
    tracker: Tracker
    messages: int = 0
    # (state, messages received before it, detail)
    events: list[tuple[str, int, str]] = field(default_factory=list)

    # Anything else in the stream (a report of dropped messages, say)
    others: list[object] = field(default_factory=list)

    def take(self, item: Any) -> None:
        if isinstance(item, upbus.ConnectionEvent):
            assert item.channel == "public"
            self.events.append((item.state, self.messages, item.detail))
        elif item.type in DATA_TYPES:
            self.messages += 1
        else:
            self.others.append(item)
        self.tracker.changed()

    def recovered(self, outages: int) -> bool:
        """Whether it saw ``outages`` gaps and reconnects, and data after the last one."""
        if len(self.events) != 1 + 2 * outages:
            return False
        state, count, _detail = self.events[-1]
        return state == ("reconnected" if outages else "connected") and self.messages > count

    def describe(self) -> str:
        tail = [state for state, _count, _detail in self.events[-3:]]
        return f"{self.name}: {len(self.events)} events (last {tail}), {self.messages} messages"


@dataclass(eq=False)
class AsyncCallback(Component):
    async def on_message(self, message: Any) -> None:
        self.take(message)

    async def on_connection_state(self, event: upbus.ConnectionEvent) -> None:
        self.take(event)


@dataclass(eq=False)
class PlainCallback(Component):
    """Plain ``def`` handlers, which the bus may call from a thread of their own."""

    loop_thread: int = field(default_factory=threading.get_ident)
    token: anyio.lowlevel.EventLoopToken = field(default_factory=anyio.lowlevel.current_token)

    def on_message(self, message: Any) -> None:
        self.take_here(message)

    def on_connection_state(self, event: upbus.ConnectionEvent) -> None:
        self.take_here(event)

    def take_here(self, item: Any) -> None:
        if threading.get_ident() == self.loop_thread:
            self.take(item)
        else:  # the tracker's event belongs to the event loop: set it there
            anyio.from_thread.run_sync(self.take, item, token=self.token)


@dataclass(eq=False)
class Iterating(Component):
    async def consume(self, subscriber: upbus.Subscriber) -> None:
        async for item in subscriber:
            self.take(item)


def make_component(index: int, tracker: Tracker) -> Component:
    kind = (AsyncCallback, PlainCallback, Iterating, Iterating)[index % 4]
    return kind(f"{kind.__name__}#{index}", tracker)


@dataclass
class Fault:
    """One injected fault: its kind, the connection it hit, what the next one must carry."""

    kind: str
    connection: int
    wanted: frozenset[tuple[str, str]]


def accepted(sim: Simulator) -> list[ConnectionRecord]:
    return [record for record in sim.connections if record.status == 101]


def requests_by_connection(sim: Simulator) -> dict[int, list[Subscribe]]:
    found: dict[int, list[Subscribe]] = {}
    for record in sim.requests:
        assert record.error is None, record
        assert isinstance(record.parsed, Subscribe), record
        found.setdefault(record.connection, []).append(record.parsed)
    return found


async def inject(
    sim: Simulator, kind: str, connection: int, during: Callable[[], Awaitable[None]]
) -> None:
    """Make connection ``connection`` fail with a fault of ``kind``.

    For a refused kind, ``during`` runs while the reconnect is being refused.
    """
    if kind == "drop_fin":
        sim.drop(connection)
    elif kind == "drop_rst":
        sim.drop(connection, reset=True)
    elif kind == "stall":
        sim.stall(connection)
    elif kind == "garbage":
        sim.send_garbage(connection)
    elif kind in ERRORS:
        sim.send_error(connection, ERRORS[kind], "injected by the test")
    else:
        status = REFUSALS[kind]
        sim.refuse_connections(STEP_TIMEOUT, status=status or None)
        sim.drop(connection)

        def refused() -> bool:
            return any(
                record.id > connection
                and record.status == status
                and (status or record.close_reason == "refused")
                for record in sim.connections
            )

        await sim.wait_until(refused, STEP_TIMEOUT)
        await during()
        sim.refuse_connections(0)  # the window ends: the next attempt gets in


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["httpx", "picows"])
@pytest.mark.anyio
async def test_every_component_recovers_from_a_hundred_faults_of_every_kind(
    transport: str,
) -> None:
    config = SimConfig(
        rate=100.0,
        connect_limit=(CONNECTS_PER_SECOND, 1.0),
        error_close_delay=0.05,
    )
    tracker = Tracker()
    components = [make_component(index, tracker) for index in range(COMPONENTS)]
    specs = {index: component_specs(index) for index in range(COMPONENTS)}
    toggles = itertools.count(1)
    faults: list[Fault] = []

    def wanted() -> frozenset[tuple[str, str]]:
        return wanted_streams(spec for wishes in specs.values() for spec in wishes)

    async with Simulator(config) as sim:
        settings = upbus.Settings(
            public_url=sim.public_url,
            private_url=sim.private_url,
            transport=transport,
            debounce=0.02,
            heartbeat_interval=HEARTBEAT_INTERVAL,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            reconnect={"initial": 0.05, "maximum": 0.2},
            rate_limit={
                "connect_per_second": CONNECTS_PER_SECOND,
                "backoff_initial": 0.05,
                "backoff_max": 0.2,
            },
        )
        async with Bus(settings) as bus, anyio.create_task_group() as consumers:
            for index, component in enumerate(components):
                subscriber = await bus.register_component(
                    component, specs[index], overflow=POLICIES[index % len(POLICIES)]
                )
                if isinstance(component, Iterating):
                    consumers.start_soon(component.consume, subscriber)
            toggler = components[-1]

            async def change_a_wish() -> None:
                # Runs while the reconnect is refused: the next connection's first
                # request must be the state as it is now, not as it was at the drop.
                index = COMPONENTS - 1
                specs[index] = component_specs(index, next(toggles))
                await bus.register_component(toggler, specs[index])

            async def recover(outages: int, what: str) -> None:
                def done() -> bool:
                    return all(component.recovered(outages) for component in components)

                try:
                    await tracker.wait_until(done, STEP_TIMEOUT)
                except TimeoutError:
                    states = "\n".join(component.describe() for component in components)
                    recent = list(sim.connections)[-3:]
                    sent = [r.raw for r in sim.requests if r.connection == recent[-1].id]
                    pytest.fail(
                        f"no recovery after {what} within {STEP_TIMEOUT} s:\n{states}\n"
                        f"simulator: last connections {recent}, requests on the last {sent}\n"
                        f"bus: {bus.get_connection_metrics()['public']}\n"
                        f"batcher: {bus.get_pending_task_status()['public']}"
                    )

            await recover(0, "the first connect")
            first = accepted(sim)[-1].id
            faults.append(Fault("start", 0, wanted()))
            for number in range(1, FAULTS + 1):
                kind = KINDS[(number - 1) % len(KINDS)]
                connection = accepted(sim)[-1].id
                await inject(sim, kind, connection, change_a_wish)
                faults.append(Fault(kind, connection, wanted()))
                await recover(number, f"fault {number} ({kind})")
                if kind == "stall":
                    sim.drop(connection)  # release the stalled socket
            metrics = bus.get_connection_metrics()["public"]
            consumers.cancel_scope.cancel()

    # Each accepted connection got exactly one request: the whole state wanted when
    # it connected (a fault's connection carries the state wanted after that fault).
    connections = [record.id for record in accepted(sim)]
    assert connections[0] == first
    assert len(connections) == FAULTS + 1
    requests = requests_by_connection(sim)
    assert sorted(requests) == connections
    for connection, fault in zip(connections, faults, strict=True):
        assert fault.connection < connection
        (request,) = requests[connection]
        streams = requested_streams(request)
        assert len(streams) == len(set(streams)), f"a stream asked twice on {connection}"
        assert set(streams) == fault.wanted, f"connection {connection} after {fault.kind}"
    changes = sum(kind in REFUSALS for kind in (fault.kind for fault in faults))
    assert len({fault.wanted for fault in faults}) == (2 if changes else 1)

    # Each component: connected, then exactly one gap and one reconnected per outage,
    # adjacent (no data can arrive between them), and data after every reconnect.
    for component in components:
        assert component.others == [], component.name  # nothing was dropped
        states = [state for state, _count, _detail in component.events]
        assert states == ["connected"] + ["gap", "reconnected"] * FAULTS, component.name
        counts = [count for _state, count, _detail in component.events] + [component.messages]
        assert counts[0] == 0, component.name  # nothing before the connect
        for outage, fault in enumerate(faults[1:], start=1):
            gap, reconnected = 2 * outage - 1, 2 * outage
            assert counts[gap - 1] < counts[gap], f"{component.name}: no data before {fault}"
            assert counts[gap] == counts[reconnected], f"{component.name}: data inside the gap"
            assert counts[reconnected] < counts[reconnected + 1], (
                f"{component.name}: no data after {fault}"
            )
            detail = component.events[gap][2]
            if fault.kind == "stall":
                assert "no pong" in detail
            elif fault.kind in ERRORS:
                assert f"error {ERRORS[fault.kind]}" in detail

    # The client saw each fault for what it was, and nothing else.
    count = {kind: sum(fault.kind == kind for fault in faults) for kind in KINDS}
    assert min(count.values()) >= FAULTS // len(KINDS)
    assert metrics["reconnects"] == FAULTS
    assert metrics["connects"] == FAULTS + 1
    assert metrics["heartbeat_timeouts"] == count["stall"]
    assert metrics["error_frames"] == count["error_close"] + count["too_many"]
    assert metrics["connect_failures"] >= sum(count[kind] for kind in REFUSALS)
    for kind, status in REFUSALS.items():
        refused = [
            record
            for record in sim.connections
            if record.status == status and (status or record.close_reason == "refused")
        ]
        assert len(refused) >= count[kind], kind
    assert list(sim.violations) == []
    assert sim.internal_errors == []
