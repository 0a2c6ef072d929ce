"""Delivery policy by stream kind, and components that block, raise or never return.

The defaults are what a user with real money needs: state streams conflate, every
trade counts (a loss is told in the stream), order and asset events are never
dropped, and one misbehaving component never holds up another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from factories import make_ticker, make_trade
from hypothesis import given, settings
from hypothesis import strategies as st
from simbus import ACCESS, SECRET, funded_config, make_bus

import upbus
from upbus.core.delivery._router import Router, Subscriber
from upbus.core.delivery._scheduler import REPORT_INTERVAL, TRACEBACKS
from upbus.core.delivery._stall_watch import StallWatch
from upbus.core.subscriptions._specs import Wish
from upbus.core.wire._messages import Message, MyOrder
from upbus.sim import SimConfig, Simulator

# No simulated market has this code: every message of it is one the test delivers.
QUIET = "KRW-QUIET"


def order(code: str, number: int) -> MyOrder:
    return MyOrder(
        code=code,
        uuid=f"order-{number}",
        ask_bid="BID",
        order_type="limit",
        state="wait",
        timestamp=1,
        stream_type="REALTIME",
    )


# -- the buffer, item by item ------------------------------------------------------------


def test_auto_conflates_state_streams_keeps_trades_in_order_and_never_drops_orders() -> None:
    subscriber = Subscriber("s", 3, "auto")
    router = Router()
    router.add(
        subscriber,
        [Wish("ticker", "KRW-BTC"), Wish("trade", "KRW-BTC"), Wish("myOrder", None)],
    )
    router.deliver([make_ticker(price, code="KRW-BTC") for price in (1, 2, 3)])
    router.deliver([order("KRW-BTC", n) for n in range(5)])
    router.deliver([make_trade("KRW-BTC", n) for n in range(4)])
    taken = subscriber.take_all()
    # Dropped first: of the four trades, the oldest three went to make room (the
    # buffer already held the ticker key and five orders, over its capacity of 3).
    assert taken[0] == upbus.Dropped(3, (("trade", "KRW-BTC", 3),))
    assert taken[1].trade_price == 3  # type: ignore[union-attr]  # the newest ticker
    assert [m.uuid for m in taken[2:7]] == [f"order-{n}" for n in range(5)]  # type: ignore[union-attr]
    assert [m.sequential_id for m in taken[7:]] == [3]  # type: ignore[union-attr]
    assert (subscriber.conflated, subscriber.dropped, subscriber.overflowed) == (2, 3, 3)


def test_a_dropped_event_counts_each_key_and_resets_once_taken() -> None:
    subscriber = Subscriber("s", 2, "drop_oldest")
    for n in range(3):
        subscriber.put(make_trade("KRW-BTC", n))
        subscriber.put(make_trade("KRW-ETH", n))
    first = subscriber.take()
    assert first == upbus.Dropped(4, (("trade", "KRW-BTC", 2), ("trade", "KRW-ETH", 2)))
    assert subscriber.take() == make_trade("KRW-BTC", 2)
    subscriber.put(make_trade("KRW-XRP", 0))
    subscriber.put(make_trade("KRW-XRP", 1))  # full: KRW-ETH 2 goes
    assert subscriber.take() == upbus.Dropped(1, (("trade", "KRW-ETH", 1),))
    assert [subscriber.take(), subscriber.take(), subscriber.take()] == [
        make_trade("KRW-XRP", 0),
        make_trade("KRW-XRP", 1),
        None,
    ]
    assert subscriber.take_unreported() == {("trade", "KRW-BTC"): 2, ("trade", "KRW-ETH"): 3}
    assert subscriber.take_unreported() == {}


def test_drop_oldest_never_drops_a_connection_event() -> None:
    subscriber = Subscriber("s", 2, "drop_oldest")
    gap = upbus.ConnectionEvent("public", "gap", "lost")
    subscriber.put(gap)
    for n in range(4):
        subscriber.put(make_trade("KRW-BTC", n))
    items = subscriber.take_all()
    assert items == [upbus.Dropped(3, (("trade", "KRW-BTC", 3),)), gap, make_trade("KRW-BTC", 3)]


# One step of a schedule: offer a message of a kind, or the consumer takes one item.
_steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["trade", "ticker", "myOrder"]), st.sampled_from("AB")),
        st.just(("take", "")),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(steps=_steps, capacity=st.integers(1, 6))
def test_auto_never_loses_silently(steps: list[tuple[str, str]], capacity: int) -> None:
    """Every trade and order is taken or counted in a Dropped event; orders never dropped;
    trades in order; the newest ticker of each key is always the one taken last."""
    subscriber = Subscriber("s", capacity, "auto")
    offered: dict[str, list[Message]] = {"trade": [], "myOrder": [], "ticker": []}
    taken: list[Any] = []
    for number, (kind, letter) in enumerate(steps):
        code = f"KRW-{letter}{letter}"
        if kind == "take":
            item = subscriber.take()
            if item is not None:
                taken.append(item)
            continue
        message: Message
        if kind == "trade":
            message = make_trade(code, number)
        elif kind == "myOrder":
            message = order(code, number)
        else:
            message = make_ticker(number, code=code)
        offered[kind].append(message)
        subscriber.put(message)
    taken += subscriber.take_all()

    drops = [item for item in taken if isinstance(item, upbus.Dropped)]
    dropped_keys: dict[tuple[str, str | None], int] = {}
    for drop in drops:
        assert drop.count == sum(count for _kind, _code, count in drop.keys)
        for kind, code, count in drop.keys:
            dropped_keys[(kind, code)] = dropped_keys.get((kind, code), 0) + count
    got = [item for item in taken if not isinstance(item, upbus.BusEvent)]
    assert [m for m in got if m.type == "myOrder"] == offered["myOrder"]
    got_trades = [m for m in got if m.type == "trade"]
    assert got_trades == [m for m in offered["trade"] if m in got_trades]  # in order
    for letter in "AB":
        code = f"KRW-{letter}{letter}"
        sent = [m for m in offered["trade"] if m.code == code]
        received = [m for m in got_trades if m.code == code]
        assert len(sent) == len(received) + dropped_keys.get(("trade", code), 0)
        tickers = [m for m in offered["ticker"] if m.code == code]
        got_tickers = [m for m in got if m.type == "ticker" and m.code == code]
        if tickers:
            assert got_tickers[-1] == tickers[-1]
    assert all(kind == "trade" for kind, _code in dropped_keys)
    assert subscriber.dropped == sum(dropped_keys.values())


# -- through the bus -----------------------------------------------------------------------


@pytest.fixture
def sim_config() -> SimConfig:
    return funded_config(rate=400.0, funds=10_000_000_000)  # the shared `sim` fixture runs this


class Slow:
    """An async component that takes ``delay`` seconds per message, with the defaults."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.items: list[Any] = []
        self.changed = anyio.Event()

    async def on_message(self, message: Message) -> None:
        self.items.append(message)
        self.changed.set()
        await anyio.sleep(self.delay)

    async def on_event(self, event: upbus.BusEvent) -> None:
        self.items.append(event)
        self.changed.set()

    @property
    def messages(self) -> list[Message]:
        return [item for item in self.items if not isinstance(item, upbus.BusEvent)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while not predicate():
                self.changed = anyio.Event()
                await self.changed.wait()


@pytest.mark.anyio
async def test_a_slow_consumer_with_defaults_loses_no_order_event(sim: Simulator) -> None:
    """20 orders x 4 events in a burst reach a component that takes 5 ms per message."""
    async with make_bus(sim, access_key=ACCESS, secret_key=SECRET) as bus:
        trader = Slow(0.005)
        await bus.register_component(trader, [upbus.my_order(), upbus.my_asset()])
        await sim.wait_until(
            lambda: any(c.is_open and c.endpoint == "private" for c in sim.connections)
        )
        await sim.wait_for_requests(1)
        uuids = []
        for _ in range(20):
            uuid = sim.place_order(ACCESS, "KRW-BTC", "BID", "limit", price="1000000", volume="1")
            sim.fill_order(uuid, volume="0.25")
            sim.fill_order(uuid, volume="0.25")
            sim.fill_order(uuid)
            uuids.append(uuid)
        await trader.wait_for(
            lambda: sum(isinstance(m, MyOrder) and m.state == "done" for m in trader.messages) == 20
        )
        orders = [m for m in trader.messages if isinstance(m, MyOrder)]
        for uuid in uuids:
            states = [m.state for m in orders if m.uuid == uuid]
            assert states == ["wait", "trade", "trade", "trade", "done"][: len(states)]
            assert states[0] == "wait"
            assert states[-1] == "done"
            assert states.count("trade") == 3
        assert not any(isinstance(item, upbus.Dropped) for item in trader.items)
        (stats,) = bus.get_subscription_stats()["subscribers"]
        assert (stats["policy"], stats["dropped"], stats["conflated"]) == ("auto", 0, 0)


@pytest.mark.anyio
async def test_a_slow_trade_consumer_is_told_exactly_what_it_lost(sim: Simulator) -> None:
    async with make_bus(sim) as bus:
        slow = Slow(0.01)
        reference = Slow(0.0)
        await bus.register_component(slow, [upbus.trade("KRW-BTC", "KRW-ETH")], capacity=20)
        await bus.register_component(reference, [upbus.trade("KRW-BTC", "KRW-ETH")])
        await slow.wait_for(lambda: any(isinstance(i, upbus.Dropped) for i in slow.items))
        await reference.wait_for(lambda: len(reference.messages) >= 300)
        await bus.unregister_component(slow)
        await bus.unregister_component(reference)
        await anyio.wait_all_tasks_blocked()
    # Everything the reference saw up to the slow one's last message is either in
    # the slow one's stream or counted, key by key, in its Dropped events.
    last = slow.messages[-1]
    seen = reference.messages[: reference.messages.index(last) + 1]
    counted: dict[str | None, int] = {}
    for item in slow.items:
        if isinstance(item, upbus.Dropped):
            for _kind, code, count in item.keys:
                counted[code] = counted.get(code, 0) + count
    for code in ("KRW-BTC", "KRW-ETH"):
        got = [m for m in slow.messages if m.code == code]
        expected = [m for m in seen if m.code == code]
        assert len(expected) == len(got) + counted.get(code, 0)
        assert got == [m for m in expected if m in got]  # in order, none invented


@pytest.mark.anyio
async def test_slow_state_streams_conflate_to_the_newest_without_dropped_events(
    sim: Simulator,
) -> None:
    async with make_bus(sim) as bus:
        slow = Slow(0.05)
        await bus.register_component(
            slow, [upbus.ticker("KRW-BTC"), upbus.orderbook("KRW-BTC", depth=5)]
        )
        await slow.wait_for(lambda: len(slow.messages) >= 10)
        (stats,) = bus.get_subscription_stats()["subscribers"]
        assert stats["conflated"] > 0
        assert stats["dropped"] == 0
    assert not any(isinstance(item, upbus.Dropped) for item in slow.items)
    assert {m.type for m in slow.messages} == {"ticker", "orderbook"}


# -- components that block, raise or never return -------------------------------------------


class Blocker:
    """A plain handler that sleeps a second per message (a synchronous HTTP call, say)."""

    def __init__(self) -> None:
        self.calls = 0
        self.thread: str | None = None

    def on_message(self, message: Message) -> None:
        self.calls += 1
        self.thread = threading.current_thread().name
        time.sleep(1.0)


class Counter:
    def __init__(self) -> None:
        self.count = 0

    async def on_message(self, message: Message) -> None:
        self.count += 1


@pytest.mark.anyio
async def test_a_blocking_plain_handler_does_not_stall_the_others(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    started = anyio.current_time()
    async with make_bus(sim, shutdown_drain=1.0) as bus:
        blocker, counter = Blocker(), Counter()
        holder = Weak()
        reference = await bus.register_component(holder, [upbus.trade("KRW-BTC")])
        await bus.register_component(blocker, [upbus.trade("KRW-BTC")])
        await bus.register_component(counter, [upbus.trade("KRW-BTC")])
        received = 0
        with anyio.fail_after(10):
            async for item in reference:
                received += not isinstance(item, upbus.BusEvent)
                if received >= 300:
                    break
            # A registration is not held up either.
            await bus.register_component(Counter(), [upbus.ticker("KRW-ETH")])
        await anyio.wait_all_tasks_blocked()
        assert counter.count >= 0.8 * received
        assert 1 <= blocker.calls <= 3
        assert blocker.thread is not None
        assert blocker.thread != threading.current_thread().name
        label = next(
            s["subscriber"]
            for s in bus.get_subscription_stats()["subscribers"]
            if s["subscriber"].startswith("Blocker")
        )
        stopping = anyio.current_time()
    # The blocker still held messages: the exit waited the drain limit, not for it.
    assert anyio.current_time() - stopping < 5
    assert anyio.current_time() - started < 15
    assert any(label in r.message and "drain limit" in r.message for r in caplog.records)


class Weak:
    """A plain object to hang a subscriber on."""


class Stuck:
    """A plain handler that never returns (until the test lets it go)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.connected = threading.Event()
        self.calls = 0

    def on_message(self, message: Message) -> None:
        self.calls += 1
        self.entered.set()
        self.release.wait(30)

    def on_connection_state(self, event: upbus.ConnectionEvent) -> None:
        self.connected.set()


@pytest.mark.anyio
async def test_shutdown_ends_within_the_drain_limit_and_names_a_stuck_component(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    stuck = Stuck()
    try:
        with anyio.fail_after(8):
            async with make_bus(sim, shutdown_drain=0.5) as bus:
                await bus.register_component(stuck, [upbus.trade(QUIET)])
                # The registration connects: its event is handled before the trades
                # come, or it could be among the items counted below.
                assert await anyio.to_thread.run_sync(stuck.connected.wait, 5)
                bus.router.deliver([make_trade(QUIET, n) for n in range(10)])  # one batch
                assert await anyio.to_thread.run_sync(stuck.entered.wait, 5)
                bus.router.deliver([make_trade(QUIET, n) for n in range(10, 15)])  # buffered
                label = bus.get_subscription_stats()["subscribers"][0]["subscriber"]
        (handler,) = [t for t in threading.enumerate() if t.name == f"upbus handler {label}"]
    finally:
        stuck.release.set()
    # Stopped between two items: the handler is not called after the bus has stopped.
    await anyio.to_thread.run_sync(handler.join, 5)
    assert not handler.is_alive()
    assert stuck.calls == 1
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    (drained,) = [w for w in warnings if label in w and "drain limit" in w]
    assert "shutdown drain limit (0.5s) ran out; 14 item(s) were not handled" in drained


class Failing:
    def __init__(self) -> None:
        self.calls = 0
        self.fifty = threading.Event()  # set from the handler's thread, if plain

    def handle(self, message: Message) -> None:
        self.calls += 1
        if self.calls == 50:
            self.fifty.set()
        raise ValueError(f"bad {self.calls}")


class FailingAsync(Failing):
    async def on_message(self, message: Message) -> None:
        self.handle(message)


class FailingPlain(Failing):
    def on_message(self, message: Message) -> None:
        self.handle(message)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", [FailingAsync, FailingPlain])
async def test_a_failing_component_logs_a_few_tracebacks_then_a_count(
    sim: Simulator, caplog: pytest.LogCaptureFixture, kind: type[Failing]
) -> None:
    caplog.set_level(logging.WARNING, logger="upbus.bus")
    async with make_bus(sim) as bus:
        failing = kind()
        subscriber = await bus.register_component(failing, [upbus.trade(QUIET)])
        for n in range(50):
            bus.router.deliver([make_trade(QUIET, n)])  # as the receive loop does
            await anyio.wait_all_tasks_blocked()
        assert await anyio.to_thread.run_sync(failing.fifty.wait, 5)
        assert failing.calls == 50
        assert subscriber.failures == 50
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == TRACEBACKS
        bus._delivery.report([], now=time.monotonic() + REPORT_INTERVAL + 1)
        summaries = [r.message for r in caplog.records if "more time(s)" in r.message]
        assert len(summaries) == 1
        assert f"failed {50 - TRACEBACKS} more time(s)" in summaries[0]
        assert "ValueError: bad 50" in summaries[0]
        bus._delivery.report([], now=time.monotonic() + 2 * REPORT_INTERVAL + 2)
        assert len([r for r in caplog.records if "more time(s)" in r.message]) == 1


@pytest.mark.anyio
async def test_drops_are_warned_once_per_interval_per_component(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_bus(sim) as bus:
        holder = Weak()
        subscriber = await bus.register_component(
            holder, [upbus.trade(QUIET)], overflow="drop_oldest", capacity=2
        )
        bus.router.deliver([make_trade(QUIET, n) for n in range(10)])
        now = time.monotonic()
        bus._delivery.report([subscriber], now=now)
        bus.router.deliver([make_trade(QUIET, n) for n in range(10, 15)])
        bus._delivery.report([subscriber], now=now + 1)  # within the interval: quiet
        warnings = [r.message for r in caplog.records if "dropped" in r.message]
        assert len(warnings) == 1
        assert subscriber.label in warnings[0]
        assert f"trade {QUIET}: 8" in warnings[0]
        bus._delivery.report([subscriber], now=now + REPORT_INTERVAL + 1)
        warnings = [r.message for r in caplog.records if "dropped" in r.message]
        assert len(warnings) == 2
        assert f"trade {QUIET}: 5" in warnings[1]
        items = subscriber.take_all()
        assert items[0] == upbus.Dropped(13, (("trade", QUIET, 13),))
        del holder


class Watcher:
    def __init__(self) -> None:
        self.events: list[upbus.BusEvent] = []
        self.states: list[str] = []

    async def on_message(self, message: Message) -> None:
        pass

    async def on_connection_state(self, event: upbus.ConnectionEvent) -> None:
        self.states.append(event.state)


class EventWatcher(Watcher):
    def on_event(self, event: upbus.BusEvent) -> None:
        self.events.append(event)


@pytest.mark.anyio
async def test_on_event_gets_every_event_and_on_connection_state_only_connections(
    sim: Simulator,
) -> None:
    async with make_bus(sim) as bus:
        plain, full = Watcher(), EventWatcher()
        for component in (plain, full):
            await bus.register_component(
                component, [upbus.trade(QUIET)], overflow="drop_oldest", capacity=1
            )
        bus.router.broadcast(frozenset({"trade"}), upbus.ConnectionEvent("public", "gap", "test"))
        bus.router.deliver([make_trade(QUIET, n) for n in range(3)])
        await anyio.wait_all_tasks_blocked()
    assert "gap" in plain.states  # connection events only: nothing else has a state
    assert full.states == []  # on_event takes precedence
    kinds = [type(event).__name__ for event in full.events]
    assert kinds.count("Dropped") == 1
    assert set(kinds) == {"Dropped", "ConnectionEvent"}


# -- misuse -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_stopped_bus_refuses_components_and_cannot_be_entered_again(
    sim: Simulator,
) -> None:
    bus = make_bus(sim)
    async with bus:
        pass
    holder = Weak()
    with pytest.raises(upbus.BusNotRunning, match="stopped: Weak was not registered"):
        await bus.register_component(holder, [upbus.ticker("KRW-BTC")])
    with pytest.raises(upbus.BusNotRunning, match="a Bus runs once"):
        async with bus:
            pass
    assert bus.get_subscription_stats()["components"] == 0


@pytest.mark.anyio
async def test_bad_overflow_options_change_nothing(sim: Simulator) -> None:
    async with make_bus(sim) as bus:
        holder = Weak()
        await bus.register_component(holder, [upbus.ticker("KRW-BTC")])
        with pytest.raises(ValueError, match="overflow must be one of auto, conflate"):
            await bus.register_component(holder, [upbus.trade("KRW-ETH")], overflow="lossy")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="capacity must be a whole number >= 1, got 0"):
            await bus.register_component(holder, [upbus.trade("KRW-ETH")], capacity=0)
        assert bus.subscriptions.get_public_subscriptions().codes_by_type() == {
            "ticker": {"KRW-BTC"}
        }


class BlocksTheLoop:
    """An async handler that blocks without awaiting, until the bus has said so."""

    def __init__(self, watch: Any) -> None:
        self.watch = watch

    async def on_message(self, message: Message) -> None:
        deadline = time.monotonic() + 10
        while not self.watch.stalls and time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251 - blocking the loop is the point


@pytest.mark.anyio
async def test_an_async_handler_that_blocks_the_loop_is_named(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_bus(sim) as bus:
        blocker = BlocksTheLoop(bus.stall_watch)
        subscriber = await bus.register_component(blocker, [upbus.trade(QUIET)])
        bus.router.deliver([make_trade(QUIET, 1)])
        await anyio.wait_all_tasks_blocked()
        assert bus.stall_watch.stalls == 1
    (warning,) = [r.message for r in caplog.records if "has not turned" in r.message]
    assert f"in component {subscriber.label}" in warning
    assert "BlocksTheLoop" not in warning.split(" in component")[0] or "on_message" in warning


class Spinner:
    def __init__(self, watch: StallWatch) -> None:
        self.watch = watch

    def spin(self) -> None:
        deadline = time.monotonic() + 10
        while not self.watch.stalls and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_the_stall_watch_names_the_blocking_code_on_both_backends(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    spinner: Spinner | None = None
    watch = StallWatch(lambda obj: "the spinner" if obj is spinner else None, threshold=0.3)
    spinner = Spinner(watch)
    watch.start()
    try:
        await anyio.sleep(0.05)  # a loop that turns is not reported
        assert watch.stalls == 0
        spinner.spin()
        await anyio.sleep(0.05)
    finally:
        watch.stop()
    assert watch.stalls == 1
    (warning,) = [r.message for r in caplog.records if "has not turned" in r.message]
    assert "in component the spinner" in warning
    assert "spin (" in warning or "sleep" in warning


class Busy:
    """An async handler that never awaits."""

    def __init__(self) -> None:
        self.calls = 0

    async def on_message(self, message: Message) -> None:
        self.calls += 1


class Watching:
    def __init__(self, busy: Busy) -> None:
        self.busy = busy
        self.saw: list[int] = []

    async def on_message(self, message: Message) -> None:
        self.saw.append(self.busy.calls)


@pytest.mark.anyio
async def test_an_async_handler_that_never_awaits_still_lets_others_run(sim: Simulator) -> None:
    async with make_bus(sim) as bus:
        busy = Busy()
        watching = Watching(busy)
        await bus.register_component(busy, [upbus.trade(QUIET)])
        await bus.register_component(watching, [upbus.trade(QUIET)])
        bus.router.deliver([make_trade(QUIET, n) for n in range(1000)])
        await anyio.wait_all_tasks_blocked()
    assert busy.calls == 1000
    assert len(watching.saw) == 1000
    assert watching.saw[0] < 1000  # it ran while the busy one still had work
