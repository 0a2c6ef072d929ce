"""Delivery: buffers and overflow policies, narrowing, the last-value cache, isolation."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import anyio
import orjson
import pytest
import simbus
from factories import make_ticker, make_trade

import upbus
from upbus.core._bus import Bus
from upbus.core.delivery._router import ConnectionEvent, Router, Subscriber
from upbus.core.hooks._hookspecs import hookimpl
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Mode, Wish
from upbus.core.wire._codec import FrameDecoder
from upbus.core.wire._messages import Message, Orderbook, Ticker
from upbus.sim import SimConfig, Simulator

DECODE = FrameDecoder().decode


def ticker(code: str, price: float, stream: str = "REALTIME") -> Ticker:
    return make_ticker(price, code=code, stream_type=stream)


def book(code: str, units: int, level: float = 0) -> Orderbook:
    frame = {
        "type": "orderbook",
        "code": code,
        "total_ask_size": float(units),
        "total_bid_size": float(2 * units),
        "orderbook_units": [
            {"ask_price": 100 + i, "bid_price": 99 - i, "ask_size": 1.0, "bid_size": 2.0}
            for i in range(units)
        ],
        "timestamp": 1,
        "level": level,
        "stream_type": "REALTIME",
    }
    (message,) = DECODE(orjson.dumps(frame))
    assert isinstance(message, Orderbook)
    return message


# -- buffers ------------------------------------------------------------------------------


def test_conflate_keeps_the_newest_per_key_and_events_keep_their_place() -> None:
    subscriber = Subscriber("s", 8, "conflate")
    subscriber.put(ticker("KRW-BTC", 1))
    subscriber.put(ticker("KRW-ETH", 10))
    subscriber.put(ticker("KRW-BTC", 2))  # replaces the waiting KRW-BTC
    subscriber.put(ConnectionEvent("public", "gap", "lost"))
    subscriber.put(ticker("KRW-BTC", 3))  # after the gap: must not jump ahead of it
    taken = [subscriber.take() for _ in range(len(subscriber))]
    assert [getattr(t, "trade_price", getattr(t, "state", None)) for t in taken] == [
        2,
        10,
        "gap",
        3,
    ]
    assert (subscriber.conflated, subscriber.dropped) == (1, 0)  # replaced, not lost
    assert subscriber.take() is None


def test_drop_oldest_keeps_the_newest_capacity_items() -> None:
    subscriber = Subscriber("s", 3, "drop_oldest")
    for price in range(10):
        subscriber.put(ticker("KRW-BTC", price))
    # The loss comes first, in the stream, counted per key.
    assert subscriber.take() == upbus.Dropped(7, (("ticker", "KRW-BTC", 7),))
    assert [subscriber.take().trade_price for _ in range(3)] == [7, 8, 9]  # type: ignore[union-attr]
    assert subscriber.dropped == 7
    assert subscriber.take() is None


@pytest.mark.anyio
async def test_block_loses_nothing_and_holds_the_producer_until_there_is_room() -> None:
    subscriber = Subscriber("s", 2, "block")
    router = Router()
    router.add(subscriber, [Wish("ticker", "KRW-BTC")])
    router.deliver([ticker("KRW-BTC", p) for p in range(5)])  # one socket read
    assert (len(subscriber), subscriber.overflowed, subscriber.dropped) == (5, 3, 0)
    released = anyio.Event()

    async def producer() -> None:
        await router.backpressure()
        released.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await anyio.wait_all_tasks_blocked()
        assert not released.is_set()
        prices = [subscriber.take().trade_price for _ in range(4)]  # type: ignore[union-attr]
        await released.wait()
    assert prices == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("policy", "capacity"), [("bogus", 1), ("conflate", 0)], ids=["policy", "capacity"]
)
def test_bad_buffer_options_are_refused(policy: Any, capacity: int) -> None:
    with pytest.raises(ValueError, match=policy if policy == "bogus" else "capacity"):
        Subscriber("s", capacity, policy)


# -- narrowing -------------------------------------------------------------------------------


def test_each_subscriber_gets_its_own_depth_level_and_stream_type() -> None:
    router = Router()
    five, full, grouped = (Subscriber(n, 8, "drop_oldest") for n in ("five", "full", "grouped"))
    snaps, live = Subscriber("snaps", 8, "drop_oldest"), Subscriber("live", 8, "drop_oldest")
    router.add(five, [Wish("orderbook", "KRW-BTC", 0, 5)])
    router.add(full, [Wish("orderbook", "KRW-BTC", 0, 30)])
    router.add(grouped, [Wish("orderbook", "KRW-BTC", 1000, 30)])
    router.add(snaps, [Wish("ticker", "KRW-BTC", mode=Mode.SNAPSHOT)])
    router.add(live, [Wish("ticker", "KRW-BTC", mode=Mode.REALTIME)])
    router.deliver([book("KRW-BTC", 15), ticker("KRW-BTC", 1, "SNAPSHOT"), ticker("KRW-BTC", 2)])

    trimmed = five.take()
    assert isinstance(trimmed, Orderbook)
    assert len(trimmed.orderbook_units) == 5
    assert (trimmed.total_ask_size, trimmed.total_bid_size) == (5.0, 10.0)
    whole = full.take()
    assert isinstance(whole, Orderbook)
    assert len(whole.orderbook_units) == 15
    assert len(grouped) == 0  # a level-1000 book is another stream
    assert [m.stream_type for m in (snaps.take(), live.take())] == ["SNAPSHOT", "REALTIME"]  # type: ignore[union-attr]
    assert len(snaps) == len(live) == 0


def test_a_snapshot_only_late_joiner_gets_the_cached_state_as_its_snapshot() -> None:
    router = Router()
    early = Subscriber("early", 8, "drop_oldest")
    router.add(early, [Wish("ticker", "KRW-BTC")])
    router.deliver([ticker("KRW-BTC", 5, "REALTIME")])
    late = Subscriber("late", 8, "drop_oldest")
    router.add(late, [Wish("ticker", "KRW-BTC", mode=Mode.SNAPSHOT)])
    cached = late.take()
    assert isinstance(cached, Ticker)
    assert cached.trade_price == 5
    realtime_only = Subscriber("rt", 8, "drop_oldest")
    router.add(realtime_only, [Wish("ticker", "KRW-BTC", mode=Mode.REALTIME)])
    assert len(realtime_only) == 0  # it wants only what happens from now on


def test_re_registering_replays_only_the_keys_a_subscriber_gains() -> None:
    router = Router()
    other, mine = Subscriber("other", 8, "auto"), Subscriber("mine", 8, "auto")
    router.add(other, [Wish("trade", "KRW-BTC"), Wish("ticker", "KRW-ETH")])
    router.add(mine, [Wish("trade", "KRW-BTC")])
    router.deliver([make_trade("KRW-BTC", 1), ticker("KRW-ETH", 7)])
    assert [m.type for m in mine.take_all()] == ["trade"]  # type: ignore[union-attr]
    # Still wanting the BTC trades: that trade was had already, and is not sent again.
    router.add(mine, [Wish("trade", "KRW-BTC"), Wish("ticker", "KRW-ETH")])
    again = mine.take_all()
    assert [(m.type, m.code) for m in again] == [("ticker", "KRW-ETH")]  # type: ignore[union-attr]


# -- through the bus and the simulator ------------------------------------------------------


class Counter:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.count = 0
        self.seen = anyio.Event()

    async def on_message(self, message: Message) -> None:
        self.count += 1
        self.seen.set()
        if self.delay:
            await anyio.sleep(self.delay)


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=400.0)  # the shared `sim` fixture runs this


def settings_for(sim: Simulator, **extra: Any) -> upbus.Settings:
    # The default reconnect back-off, unlike the shared helper's quick one.
    return simbus.settings_for(sim, debounce=0.02, reconnect={}, **extra)


@pytest.mark.anyio
async def test_a_slow_subscriber_never_slows_a_fast_one(sim: Simulator) -> None:
    specs = [upbus.ticker("KRW-BTC", "KRW-ETH", "KRW-XRP")]
    async with Bus(settings_for(sim)) as bus:
        fast, slow, lossy = Counter(), Counter(delay=0.05), Counter(delay=0.05)
        await bus.register_component(fast, specs, overflow="drop_oldest", capacity=10_000)
        await bus.register_component(slow, specs)  # auto: tickers conflate
        await bus.register_component(lossy, specs, overflow="drop_oldest", capacity=4)
        with anyio.fail_after(10):
            while bus.get_connection_metrics()["public"]["messages_in"] < 300:
                await fast.seen.wait()
                fast.seen = anyio.Event()
        await anyio.wait_all_tasks_blocked()
        received = bus.get_connection_metrics()["public"]["messages_in"]
        lost = {
            (s["policy"], s["capacity"]): s["dropped"] + s["conflated"]
            for s in bus.get_subscription_stats()["subscribers"]
        }
    assert fast.count == received  # every message, at full rate
    assert lost[("drop_oldest", 10_000)] == 0
    assert slow.count < received / 2
    assert lost[("auto", 4096)] > 0
    assert lossy.count < received / 2
    assert lost[("drop_oldest", 4)] > 0


@pytest.mark.anyio
async def test_a_late_joiner_gets_the_cached_value_without_a_new_request(sim: Simulator) -> None:
    async with Bus(settings_for(sim)) as bus:
        first = Counter()
        await bus.register_component(first, upbus.ticker("KRW-BTC"))
        with anyio.fail_after(5):
            await first.seen.wait()
        requests = len(sim.requests)
        late = Counter()
        subscriber = await bus.register_component(late, upbus.ticker("KRW-BTC"), overflow="block")
        assert len(subscriber) == 1  # served from the cache at once
        with anyio.fail_after(5):
            await late.seen.wait()
        assert isinstance(late, Counter)
        assert len(sim.requests) == requests


@pytest.mark.anyio
async def test_a_raising_component_or_plugin_does_not_disturb_the_others(sim: Simulator) -> None:
    class Broken:
        async def on_message(self, message: Message) -> None:
            raise RuntimeError("consumer bug")

    broken, healthy = Broken(), Counter()

    class BrokenPlugin:
        @hookimpl
        def upbus_startup(self, bus: Any) -> None:
            raise RuntimeError("plugin bug")

        @hookimpl
        def upbus_components(self, settings: Any) -> list[tuple[object, Any]]:
            return [(broken, upbus.ticker("KRW-BTC"))]

    class HealthyPlugin:
        started = False
        requests: ClassVar[list[int]] = []

        @hookimpl
        def upbus_request_sent(self, channel: Any, state: Any, size: int) -> None:
            HealthyPlugin.requests.append(size)

        @hookimpl
        def upbus_startup(self, bus: Any) -> None:
            HealthyPlugin.started = True

        @hookimpl
        def upbus_components(self, settings: Any) -> list[tuple[object, Any]]:
            return [(healthy, upbus.ticker("KRW-BTC"))]

    settings = settings_for(sim)
    plugins = PluginManager.load(settings)
    plugins.register(BrokenPlugin(), "broken")
    plugins.register(HealthyPlugin(), "healthy")
    async with Bus(settings, plugin_manager=plugins) as bus:
        with anyio.fail_after(10):
            while healthy.count < 20:
                await healthy.seen.wait()
                healthy.seen = anyio.Event()
        failures = {
            s["subscriber"].split("@")[0]: s["failures"]
            for s in bus.get_subscription_stats()["subscribers"]
        }
    assert HealthyPlugin.started
    assert len(HealthyPlugin.requests) == 1
    assert HealthyPlugin.requests[0] > 0
    assert plugins.failures["broken"] == 1
    assert failures["Broken"] > 0
    assert failures["Counter"] == 0


def test_blocking_bus_serves_code_outside_the_event_loop() -> None:
    class Window:
        pass

    with anyio.from_thread.start_blocking_portal() as portal:
        sim_cm = portal.wrap_async_context_manager(Simulator(SimConfig(rate=200.0)))
        with sim_cm as sim:
            results: list[Any] = []

            def gui_thread() -> None:
                window = Window()
                with upbus.BlockingBus(settings_for(sim)) as bus:
                    subscriber = bus.register_component(window, upbus.ticker("KRW-ETH"))
                    results.extend(bus.iterate(subscriber, limit=5, timeout=5))
                    results.append(bus.unregister_component(window))

            thread = threading.Thread(target=gui_thread)
            thread.start()
            thread.join(30)
    assert not thread.is_alive()
    messages = [item for item in results[:-1] if isinstance(item, Ticker)]
    assert [m.code for m in messages] == ["KRW-ETH"] * len(messages)
    assert len(results) == 6
    assert results[-1] is True


@pytest.mark.anyio
async def test_shutdown_lets_components_take_everything_buffered(sim: Simulator) -> None:
    slow = Counter(delay=0.005)
    async with Bus(settings_for(sim)) as bus:
        subscriber = await bus.register_component(
            slow, upbus.ticker("KRW-BTC", "KRW-ETH"), overflow="block", capacity=100_000
        )
        with anyio.fail_after(10):
            while len(subscriber) < 50:  # a backlog builds up behind the slow component
                await slow.seen.wait()
                slow.seen = anyio.Event()
        received = bus.get_connection_metrics()["public"]["messages_in"]
    assert len(subscriber) == 0
    assert subscriber.dropped == 0
    assert slow.count >= received  # everything that arrived, however slowly it was taken


@pytest.mark.anyio
async def test_an_error_in_the_body_reaches_the_caller_as_itself(sim: Simulator) -> None:
    async def use_the_bus() -> None:
        async with Bus(settings_for(sim)) as bus:
            await bus.register_component(Counter(), upbus.ticker("KRW-BTC"))
            raise ValueError("user bug")

    with pytest.raises(ValueError, match="user bug"):
        await use_the_bus()


def test_a_buffer_can_change_policy_and_keep_what_it_holds() -> None:
    subscriber = Subscriber("s", 8, "conflate")
    subscriber.put(ticker("KRW-BTC", 1))
    subscriber.configure(2, "drop_oldest")
    subscriber.put(ticker("KRW-BTC", 2))  # no longer conflated
    subscriber.put(ticker("KRW-BTC", 3))  # over the new bound: the oldest goes
    assert isinstance(subscriber.take(), upbus.Dropped)
    assert [subscriber.take().trade_price for _ in range(2)] == [2, 3]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="overflow must be one of"):
        subscriber.configure(2, "bogus")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_dead_components_leave_the_bus_and_dataclass_components_work(sim: Simulator) -> None:
    from dataclasses import dataclass

    @dataclass
    class Panel:  # eq=True makes it unhashable: the bus must not need hashing
        name: str

    async with Bus(settings_for(sim)) as bus:
        keep = Panel("keep")
        await bus.register_component(keep, upbus.ticker("KRW-BTC"))
        for i in range(50):
            await bus.register_component(Panel(f"gone {i}"), upbus.ticker("KRW-ETH"))
        counter = Counter()
        await bus.register_component(counter, upbus.trade("KRW-BTC"))  # drains the dead
        stats = bus.get_subscription_stats()
        assert stats["components"] == 2
        assert len(stats["subscribers"]) == 2
        assert bus.router.stats()["routes"] == 2  # ticker KRW-BTC and trade KRW-BTC


@pytest.mark.anyio
async def test_a_callback_component_has_a_delivery_task_only_while_it_has_work(
    sim: Simulator,
) -> None:
    # The simulator has no such market: every message here is one the test delivers.
    code = "KRW-QUIET"
    async with Bus(settings_for(sim)) as bus:
        counter = Counter()
        await bus.register_component(counter, upbus.ticker(code), overflow="drop_oldest")
        await anyio.wait_all_tasks_blocked()
        bus._delivery.dismiss_idle()  # the sweep, twice: the connected event's task ends
        bus._delivery.dismiss_idle()
        await anyio.wait_all_tasks_blocked()
        assert bus.get_subscription_stats()["delivery_tasks"] == 0
        for round_ in range(3):
            bus.router.deliver([ticker(code, round_)])  # as the receive loop does
            assert bus.get_subscription_stats()["delivery_tasks"] == 1
            await anyio.wait_all_tasks_blocked()
            assert counter.count == round_ + 1
            bus._delivery.dismiss_idle()
            bus._delivery.dismiss_idle()
            await anyio.wait_all_tasks_blocked()
            assert bus.get_subscription_stats()["delivery_tasks"] == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_consumer_parked_on_its_buffer_is_woken_on_either_backend() -> None:
    subscriber = Subscriber("s", 8, "drop_oldest")
    received: list[object] = []

    async def consume() -> None:
        async for item in subscriber:
            received.append(item)

    sent = [ticker("KRW-BTC", price) for price in range(5)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        for message in sent:
            await anyio.wait_all_tasks_blocked()  # the consumer is parked
            assert subscriber.waiting
            subscriber.put(message)
        await anyio.wait_all_tasks_blocked()
        subscriber.close()
    assert received == sent


def test_take_all_hands_over_everything_in_order_with_conflated_keys_resolved() -> None:
    subscriber = Subscriber("s", 8, "conflate")
    subscriber.put(ticker("KRW-BTC", 1))
    subscriber.put(ticker("KRW-ETH", 10))
    subscriber.put(ticker("KRW-BTC", 2))  # replaces the waiting KRW-BTC
    gap = ConnectionEvent("public", "gap", "lost")
    subscriber.put(gap)
    subscriber.put(ticker("KRW-BTC", 3))
    items = subscriber.take_all()
    assert [getattr(item, "trade_price", item) for item in items] == [2, 10, gap, 3]
    assert subscriber.take_all() == []
    assert (subscriber.delivered, subscriber.conflated) == (4, 1)
    subscriber.put(ticker("KRW-BTC", 4))  # the index was emptied with the buffer
    assert subscriber.take_all() == [ticker("KRW-BTC", 4)]


@pytest.mark.anyio
async def test_batches_lose_nothing_and_free_a_full_block_buffer() -> None:
    subscriber = Subscriber("s", 3, "block")
    sent = [ticker("KRW-BTC", price) for price in range(10)]
    received: list[object] = []
    sizes: list[int] = []

    async def produce() -> None:
        for message in sent:
            await subscriber.wait_for_room()  # as the receive loop does
            subscriber.put(message)
        subscriber.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        async for items in subscriber.batches():
            sizes.append(len(items))
            received += items
    assert received == sent
    assert max(sizes) <= 3
    assert subscriber.overflowed == 0


@pytest.mark.anyio
async def test_plain_and_async_handlers_get_every_message_in_order(sim: Simulator) -> None:
    code = "KRW-QUIET"  # nothing but what the test delivers

    class Plain:
        def __init__(self) -> None:
            self.prices: list[float] = []

        def on_message(self, message: Ticker) -> None:
            self.prices.append(message.trade_price)

    class Async(Plain):
        async def on_message(self, message: Ticker) -> None:  # type: ignore[override]
            await anyio.lowlevel.checkpoint()
            self.prices.append(message.trade_price)

    async with Bus(settings_for(sim)) as bus:
        plain, slow = Plain(), Async()
        for component in (plain, slow):
            await bus.register_component(
                component, upbus.ticker(code), overflow="drop_oldest", capacity=1000
            )
        for start in range(0, 300, 100):
            bus.router.deliver([ticker(code, price) for price in range(start, start + 100)])
            await anyio.wait_all_tasks_blocked()
    assert plain.prices == slow.prices == list(range(300))
