"""Refused requests: the wishes to blame are found and quarantined, the rest is served.

Also the two smaller faults of the connection's error handling: an error frame labels
only the close that follows it, and the "Too Many Requests" back-off is capped and
starts over once traffic flows.

The end-to-end tests run the connection manager, the real SubscriptionManager and
batcher against the strict simulator over loopback sockets; the simulator's
``reject_codes`` knob makes it refuse what client-side validation lets through.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from trio.testing import MockClock

import upbus
from upbus.core.connection._manager import WebSocketManager
from upbus.core.sending._batcher import PendingTaskBatcher
from upbus.core.sending._ratelimit import (
    RollingWindowLimiter,
    upbit_connect_limiter,
    upbit_message_limiter,
)
from upbus.core.subscriptions._manager import SubscriptionManager
from upbus.core.subscriptions._quarantine import Key, RequestTracker, describe, entry_keys, wish_key
from upbus.core.subscriptions._specs import (
    Channel,
    Spec,
    Wish,
    my_asset,
    my_order,
    orderbook,
    ticker,
    trade,
)
from upbus.core.subscriptions._state import StateChange
from upbus.core.wire._httpx import HttpxWsTransport
from upbus.core.wire._messages import Message
from upbus.sim import SimConfig, Simulator


class Component:
    """Any ordinary object can be a component."""


def body(raw: str) -> list[Any]:
    """A request frame without its ticket and format objects."""
    return [obj for obj in orjson.loads(raw) if "ticket" not in obj and "format" not in obj]


def subscribes(sim: Simulator) -> list[str]:
    """The raw subscription requests the simulator received, in order."""
    return [r.raw for r in sim.requests if r.raw.startswith("[") and "LIST" not in r.raw]


# -- the tracker on its own ------------------------------------------------------------------

BTC: Key = ("ticker", "KRW-BTC", 0)
ETH: Key = ("ticker", "KRW-ETH", 0)
BAD: Key = ("ticker", "KRW-BAD", 0)


def test_keys_of_wire_entries_drop_depth_suffixes_and_keep_levels() -> None:
    manager = SubscriptionManager()
    component = Component()
    manager.register_component(
        component, [orderbook("KRW-BTC", depth=15, level=10), ticker("KRW-ETH")]
    )
    keys = entry_keys(manager.state(Channel.PUBLIC).entries)
    assert keys == {("orderbook", "KRW-BTC", 10), ETH}
    assert {wish_key(w) for w in orderbook("KRW-BTC", depth=15, level=10).wishes()} <= keys
    assert describe(("orderbook", "KRW-BTC", 10)) == "orderbook KRW-BTC level 10"
    assert describe(("myAsset", None, 0)) == "myAsset"


def test_one_new_key_in_a_refused_request_is_quarantined() -> None:
    tracker = RequestTracker()
    first = tracker.sent(frozenset({BTC}))
    assert tracker.confirm(first)
    tracker.sent(frozenset({BTC, BAD}))
    verdict = tracker.rejected()
    assert verdict is not None
    assert verdict.quarantine == {BAD}
    assert not verdict.hold


def test_several_new_keys_are_bisected_and_with_nothing_accepted_all_are_suspects() -> None:
    tracker = RequestTracker()
    tracker.sent(frozenset({BTC, ETH, BAD}))
    verdict = tracker.rejected()
    assert verdict is not None
    assert verdict.suspects == {BTC, ETH, BAD}
    assert not verdict.quarantine
    assert verdict.hold
    assert len(verdict.hold) < 3  # the others go out next


def test_only_data_for_a_key_the_request_added_accepts_it() -> None:
    tracker = RequestTracker()
    tracker.connected()
    tracker.sent(frozenset({BTC}))
    assert tracker.witness("ticker", "KRW-BTC")  # a fresh connection: any of its keys
    tracker.sent(frozenset({BTC, BAD}))
    assert tracker.waiting
    # Frames of the replaced set may still come: they prove nothing.
    assert not tracker.witness("ticker", "KRW-BTC")
    verdict = tracker.rejected()
    assert verdict is not None
    assert verdict.quarantine == {BAD}


def test_refusals_no_new_key_explains_stop_trusting_the_accepted_state() -> None:
    tracker = RequestTracker(unattributed_limit=2)
    tracker.confirm(tracker.sent(frozenset({BTC, ETH})))
    for _ in range(2):
        tracker.connected()
        tracker.sent(frozenset({BTC, ETH}))
        assert tracker.rejected() is None
    # The same request refused again: now every key of it is a suspect.
    tracker.connected()
    tracker.sent(frozenset({BTC, ETH}))
    verdict = tracker.rejected()
    assert verdict is not None
    assert verdict.suspects == {BTC, ETH}


def test_an_error_with_nothing_in_flight_blames_nobody() -> None:
    tracker = RequestTracker()
    tracker.confirm(tracker.sent(frozenset({BTC})))
    assert tracker.rejected() is None
    tracker.sent(frozenset({BTC, BAD}))
    tracker.forget()  # rate limited, say: says nothing about the request
    assert tracker.rejected() is None


def drive(
    manager: SubscriptionManager, bad: set[str], limit: int = 200
) -> tuple[list[frozenset[Key]], int]:
    """Play an exchange that refuses any request holding a ``bad`` code, with the
    connection manager's moves: send the state; on a refusal quarantine or hold;
    after an acceptance (or with nothing else to send) try what is held.
    Returns the requests sent and how many were refused."""
    tracker = RequestTracker()
    public = Channel.PUBLIC

    def try_held() -> None:
        while (step := tracker.next_step()) is not None:
            if step.quarantine:
                manager.quarantine(public, step.quarantine, step.detail)
            if step.release and manager.release(public, step.release):
                return
        manager.release(public)

    sent: list[frozenset[Key]] = []
    refusals = 0
    for _ in range(limit):
        if manager.held(public) and not manager.state(public):
            try_held()
        state = manager.state(public)
        keys = entry_keys(state.entries)
        if not state or (sent and tracker.good == keys and not manager.held(public)):
            return sent, refusals  # accepted, and nothing left to try
        tracker.connected()
        request = tracker.sent(keys)
        sent.append(keys)
        if any(code in bad for _, code, _ in keys):
            refusals += 1
            verdict = tracker.rejected("INVALID_PARAM: test")
            assert verdict is not None, "a refusal with a bad key must blame some key"
            if verdict.quarantine:
                manager.quarantine(public, verdict.quarantine, verdict.detail)
            else:
                manager.hold(public, verdict.hold, verdict.detail)
        else:
            assert tracker.confirm(request)
            if manager.held(public):
                try_held()
    raise AssertionError("no stable state reached")


CODES = [f"KRW-C{i:02d}" for i in range(24)]


@given(
    wanted=st.lists(st.sampled_from(CODES), min_size=1, max_size=24, unique=True),
    bad=st.sets(st.sampled_from(CODES), max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_bisection_finds_exactly_the_bad_keys_in_few_requests(
    wanted: list[str], bad: set[str]
) -> None:
    manager = SubscriptionManager()
    components = [Component() for _ in wanted]
    for component, code in zip(components, wanted, strict=True):
        manager.register_component(component, ticker(code))
    sent, refusals = drive(manager, bad)
    bad_wanted = bad & set(wanted)
    assert {code for _, code, _ in manager.quarantined(Channel.PUBLIC)} == bad_wanted
    assert not manager.held(Channel.PUBLIC)
    assert manager.state(Channel.PUBLIC).codes_by_type().get("ticker", set()) == (set(wanted) - bad)
    # Each bad key costs at most one refusal per halving, plus one.
    halvings = max(1, len(wanted)).bit_length()
    assert refusals <= len(bad_wanted) * (halvings + 1) + 1
    # A refused request never goes out again; an accepted one goes out again at
    # most once per key quarantined (it is what the reconnect sends first).
    refused = [keys for keys in sent if any(code in bad for _, code, _ in keys)]
    assert len(refused) == len(set(refused)) == refusals
    assert all(a != b for a, b in itertools.pairwise(sent))
    assert max(Counter(sent).values()) <= len(bad_wanted) + 1
    del components


# -- the exclusion in the SubscriptionManager -------------------------------------------------


def test_quarantine_keeps_a_key_out_until_every_holder_lets_go() -> None:
    manager = SubscriptionManager()
    heard: list[StateChange] = []
    manager.add_listener(heard.append)
    good, bad, also = Component(), Component(), Component()
    manager.register_component(good, ticker("KRW-BTC"))
    manager.register_component(bad, [ticker("KRW-BAD"), trade("KRW-ETH")])
    manager.register_component(also, ticker("KRW-BAD", "KRW-BTC"))
    before = manager.version(Channel.PUBLIC)

    rejected = manager.quarantine(Channel.PUBLIC, [BAD], "INVALID_PARAM: code KRW-BAD")
    assert sorted(rejected, key=lambda pair: id(pair[0]) != id(bad)) == [
        (bad, (Wish("ticker", "KRW-BAD"),)),
        (also, (Wish("ticker", "KRW-BAD"),)),
    ]
    assert manager.version(Channel.PUBLIC) == before + 1
    assert heard[-1].reason == "quarantine"
    assert manager.state(Channel.PUBLIC).request_objects() == [
        {"type": "ticker", "codes": ["KRW-BTC"]},
        {"type": "trade", "codes": ["KRW-ETH"]},
    ]
    (entry,) = manager.get_subscription_stats()["public"]["quarantined"]
    assert entry["entry"] == "ticker KRW-BAD"
    assert entry["detail"] == "INVALID_PARAM: code KRW-BAD"
    assert entry["components"] == 2

    manager.unregister_component(bad)
    assert manager.quarantined(Channel.PUBLIC) == {BAD: "INVALID_PARAM: code KRW-BAD"}
    manager.register_component(also, ticker("KRW-BTC"))  # re-registered without it
    assert manager.quarantined(Channel.PUBLIC) == {}
    assert manager.get_subscription_stats()["public"]["quarantined"] == []
    # Lifted: a new wish for it goes out again (and would be tried again).
    manager.register_component(bad, ticker("KRW-BAD"))
    assert "KRW-BAD" in manager.state(Channel.PUBLIC).codes_by_type()["ticker"]


def test_a_garbage_collected_holder_lifts_the_quarantine() -> None:
    manager = SubscriptionManager()
    holder = Component()
    manager.register_component(holder, ticker("KRW-BAD"))
    manager.quarantine(Channel.PUBLIC, [BAD], "WRONG_FORMAT: test")
    del holder
    gc.collect()
    assert manager.quarantined(Channel.PUBLIC) == {}
    assert not manager.state(Channel.PUBLIC)


def test_a_later_registrant_of_a_quarantined_key_is_kept_out_and_told() -> None:
    manager = SubscriptionManager()
    told: list[tuple[Channel, list[tuple[object, tuple[Wish, ...]]], str]] = []
    manager.add_rejection_listener(lambda ch, rejected, detail: told.append((ch, rejected, detail)))
    first, later = Component(), Component()
    manager.register_component(first, ticker("KRW-BAD"))
    manager.quarantine(Channel.PUBLIC, [BAD], "INVALID_PARAM: no")
    version = manager.version(Channel.PUBLIC)
    manager.register_component(later, [ticker("KRW-BAD", "KRW-BTC")])
    assert told == [(Channel.PUBLIC, [(later, (Wish("ticker", "KRW-BAD"),))], "INVALID_PARAM: no")]
    assert manager.state(Channel.PUBLIC).codes_by_type() == {"ticker": {"KRW-BTC"}}
    assert manager.version(Channel.PUBLIC) == version + 1  # KRW-BTC only
    manager.register_component(later, [ticker("KRW-BAD", "KRW-ETH")])
    assert len(told) == 1  # told once, not at every re-registration
    manager.unregister_component(first)
    assert manager.quarantined(Channel.PUBLIC)  # `later` still holds it


def test_held_keys_come_back_on_release() -> None:
    manager = SubscriptionManager()
    a, b = Component(), Component()
    manager.register_component(a, ticker("KRW-BTC"))
    manager.register_component(b, [ticker("KRW-ETH"), my_asset()])
    manager.hold(Channel.PUBLIC, [ETH], "NO_CODES: test")
    assert manager.held(Channel.PUBLIC) == {ETH}
    assert manager.state(Channel.PUBLIC).codes_by_type() == {"ticker": {"KRW-BTC"}}
    assert manager.get_subscription_stats()["public"]["held"][0]["entry"] == "ticker KRW-ETH"
    assert manager.state(Channel.PRIVATE).request_objects() == [{"type": "myAsset"}]
    assert manager.release(Channel.PUBLIC)
    assert manager.state(Channel.PUBLIC).codes_by_type() == {"ticker": {"KRW-BTC", "KRW-ETH"}}
    assert not manager.release(Channel.PUBLIC)


def test_quarantining_every_market_orders_brings_the_coded_ones_back() -> None:
    manager = SubscriptionManager()
    a, b = Component(), Component()
    manager.register_component(a, my_order("KRW-BTC"))
    manager.register_component(b, my_order())
    assert manager.state(Channel.PRIVATE).request_objects() == [{"type": "myOrder"}]
    manager.quarantine(Channel.PRIVATE, [("myOrder", None, 0)], "WRONG_FORMAT: test")
    assert manager.state(Channel.PRIVATE).request_objects() == [
        {"type": "myOrder", "codes": ["KRW-BTC"]}
    ]


CODES_SM = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "BTC-ETH"]
_codes = st.lists(st.sampled_from(CODES_SM), min_size=1, max_size=3, unique=True)
_spec = st.one_of(
    st.builds(lambda c: ticker(*c), _codes),
    st.builds(lambda c: trade(*c), _codes),
    st.builds(lambda c, d: orderbook(*c, depth=d), _codes, st.sampled_from([None, 5, 15])),
    st.builds(lambda c: my_order(*c), st.lists(st.sampled_from(CODES_SM), max_size=2, unique=True)),
    st.just(my_asset()),
)
_keys = st.sets(
    st.one_of(
        st.tuples(st.sampled_from(["ticker", "trade", "orderbook"]), st.sampled_from(CODES_SM)),
        st.tuples(st.just("myOrder"), st.sampled_from([None, *CODES_SM])),
        st.just(("myAsset", None)),
    ),
    min_size=1,
    max_size=3,
)


class QuarantineMachine(RuleBasedStateMachine):
    """Registrations, garbage collection, quarantines, holds and releases in any order:
    the merged state is always the live wishes less the excluded keys, and an
    exclusion lasts exactly as long as a live component holds its key."""

    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.manager = SubscriptionManager()
        self.objects: dict[int, Component] = {}
        self.live: dict[int, tuple[Spec, ...]] = {}
        self.excluded: dict[Key, bool] = {}  # key -> quarantined (else held)
        self.next_handle = 0

    def _holds(self, key: Key) -> bool:
        return any(wish_key(w) == key for s in self.live.values() for x in s for w in x.wishes())

    def _prune(self) -> None:
        self.excluded = {k: q for k, q in self.excluded.items() if self._holds(k)}

    @rule(target=handles, specs=st.lists(_spec, max_size=3))
    def register_new(self, specs: list[Spec]) -> int:
        handle = self.next_handle
        self.next_handle += 1
        self.objects[handle] = Component()
        self.manager.register_component(self.objects[handle], specs)
        self.live[handle] = tuple(specs)
        self._prune()
        return handle

    @rule(handle=handles, specs=st.lists(_spec, max_size=3))
    def re_register(self, handle: int, specs: list[Spec]) -> None:
        if handle in self.objects:
            self.manager.register_component(self.objects[handle], specs)
            self.live[handle] = tuple(specs)
            self._prune()

    @rule(handle=handles)
    def unregister(self, handle: int) -> None:
        if handle in self.objects:
            self.manager.unregister_component(self.objects[handle])
            self.live.pop(handle, None)
            self._prune()

    @rule(handle=consumes(handles))
    def garbage_collect(self, handle: int) -> None:
        self.objects.pop(handle, None)
        self.live.pop(handle, None)
        self.manager.collect_garbage()
        self._prune()

    @rule(pairs=_keys, quarantined=st.booleans())
    def exclude(self, pairs: set[tuple[str, str | None]], quarantined: bool) -> None:
        keys = [(kind, code, 0) for kind, code in pairs]
        if quarantined:
            rejected = self.manager.quarantine(Channel.PUBLIC, keys, "test")
            rejected += self.manager.quarantine(Channel.PRIVATE, keys, "test")
            holders = {
                id(self.objects[h])
                for h, specs in self.live.items()
                if any(wish_key(w) in keys for s in specs for w in s.wishes())
            }
            assert {id(component) for component, _ in rejected} == holders
        else:
            self.manager.hold(Channel.PUBLIC, keys, "test")
            self.manager.hold(Channel.PRIVATE, keys, "test")
        for key in keys:
            if self._holds(key):
                self.excluded[key] = quarantined

    @rule()
    def release(self) -> None:
        for channel in Channel:
            self.manager.release(channel)
        self.excluded = {k: q for k, q in self.excluded.items() if q}

    @invariant()
    def state_is_the_live_wishes_less_the_excluded_keys(self) -> None:
        for channel in Channel:
            merged = self.manager.state(channel)
            # The expected state: a fresh manager given the same wishes, less the excluded.
            fresh = SubscriptionManager()
            keep = []
            for specs in self.live.values():
                component = Component()
                keep.append(component)
                kept = [
                    Spec(
                        s.type,
                        tuple(c for c in s.codes if (s.type, c, s.level) not in self.excluded),
                        depth=s.depth,
                        level=s.level,
                        only_snapshot=s.only_snapshot,
                        only_realtime=s.only_realtime,
                    )
                    for s in specs
                    if (s.codes and any((s.type, c, s.level) not in self.excluded for c in s.codes))
                    or (not s.codes and (s.type, None, s.level) not in self.excluded)
                ]
                fresh.register_component(component, kept)
            assert merged.entries == fresh.state(channel).entries
            got = {k: True for k in self.manager.quarantined(channel)} | dict.fromkeys(
                self.manager.held(channel), False
            )
            want = {
                k: q
                for k, q in self.excluded.items()
                if (k[0] in ("myOrder", "myAsset")) == (channel is Channel.PRIVATE)
            }
            assert got == want


TestQuarantineMachine = QuarantineMachine.TestCase
TestQuarantineMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


# -- end to end against the simulator ---------------------------------------------------------


class Harness:
    """One public channel: SubscriptionManager, batcher, connection manager, simulator."""

    def __init__(self, sim: Simulator, connect_limiter: RollingWindowLimiter, **options: Any):
        self.sim = sim
        self.subscriptions = SubscriptionManager()
        self.messages: list[Message] = []
        self.states: list[tuple[str, str]] = []
        self.rejections: list[tuple[list[tuple[object, tuple[Wish, ...]]], str]] = []
        self._changed = anyio.Event()
        # A client made up front: made lazily, the first connect takes longer from
        # the limiter's grant to the server than the later ones, by more than the
        # limiter's margin, and six quick connects could then break 5 per second.
        self.client = httpx.AsyncClient(timeout=5.0)
        self.transport = HttpxWsTransport(self.client, close_timeout=1.0)
        self.connect_limiter = connect_limiter
        self.manager = WebSocketManager(
            Channel.PUBLIC,
            url=sim.public_url,
            transport=self.transport,
            subscriptions=self.subscriptions,
            connect_limiter=connect_limiter,
            make_message_limiter=lambda name: upbit_message_limiter(name),
            deliver=self._deliver,
            on_state=self._on_state,
            on_rejected=self._on_rejected,
            reconnect_initial=0.05,
            reconnect_max=0.5,
            **options,
        )
        self.batcher = PendingTaskBatcher(
            Channel.PUBLIC,
            source=lambda: self.subscriptions.state(Channel.PUBLIC),
            current_version=lambda: self.subscriptions.version(Channel.PUBLIC),
            sink=self.manager.sink,
            limiter=self.manager.budget,
            debounce=0.02,
        )
        self.manager.sink.add_resync_listener(self.batcher.resend)
        self.subscriptions.add_listener(self._notify)

    def _notify(self, change: StateChange) -> None:
        if change.channel is Channel.PUBLIC:
            self.batcher.notify(change)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _deliver(self, batch: list[Message]) -> None:
        self.messages.extend(batch)
        self._wake()

    def _on_state(self, state: str, detail: str) -> None:
        self.states.append((state, detail))
        self._wake()

    def _on_rejected(self, rejected: list[tuple[object, tuple[Wish, ...]]], detail: str) -> None:
        self.rejections.append((rejected, detail))
        self._wake()

    def count(self, kind: str, code: str) -> int:
        return sum(1 for m in self.messages if m.type == kind and m.code == code)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manager.get_connection_metrics()


@asynccontextmanager
async def running(
    config: SimConfig,
    connect_limiter: RollingWindowLimiter | None = None,
    **options: Any,
) -> AsyncIterator[Harness]:
    async with Simulator(config) as sim:
        limiter = connect_limiter or upbit_connect_limiter("connect test")
        harness = Harness(sim, limiter, **options)
        try:
            async with anyio.create_task_group() as tg:
                harness.batcher.start(tg)
                tg.start_soon(harness.manager.run)
                yield harness
                tg.cancel_scope.cancel()
        finally:
            await harness.transport.aclose()
            await harness.client.aclose()


@pytest.mark.anyio
async def test_a_refused_code_is_quarantined_its_owner_told_and_the_rest_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "upbus.connection")
    config = SimConfig(rate=200.0, reject_codes=frozenset({"KRW-BAD"}))
    async with running(config) as bus:
        sim = bus.sim
        good, bad = Component(), Component()
        bus.subscriptions.register_component(good, ticker("KRW-BTC"))
        await bus.wait_for(lambda: bus.count("ticker", "KRW-BTC") >= 3)

        # Two new keys in one request, one of them refused: bisected, then quarantined.
        bus.subscriptions.register_component(bad, [ticker("KRW-BAD"), trade("KRW-ETH")])
        await bus.wait_for(lambda: bool(bus.rejections))
        ((rejected, detail),) = bus.rejections
        assert rejected == [(bad, (Wish("ticker", "KRW-BAD"),))]
        assert detail.startswith("INVALID_PARAM: ")
        assert "KRW-BAD" in detail

        # The good component's ticker flows again, and the bad one's other wish too.
        ticks = bus.count("ticker", "KRW-BTC")
        await bus.wait_for(
            lambda: bus.count("ticker", "KRW-BTC") > ticks + 3 and bus.count("trade", "KRW-ETH") > 0
        )
        assert body(subscribes(sim)[-1]) == [
            {"type": "ticker", "codes": ["KRW-BTC"]},
            {"type": "trade", "codes": ["KRW-ETH"]},
        ]
        requests = subscribes(sim)
        assert max(Counter(map(lambda raw: orjson.dumps(body(raw)), requests)).values()) <= 2
        assert sum("KRW-BAD" in raw for raw in requests) == 2  # the first, then alone
        refused = [r for r in sim.requests if r.error is not None]
        assert [r.error for r in refused] == ["INVALID_PARAM", "INVALID_PARAM"]
        assert {v.kind for v in sim.violations} == {"request_error"}

        (entry,) = bus.subscriptions.get_subscription_stats()["public"]["quarantined"]
        assert entry["entry"] == "ticker KRW-BAD"
        assert entry["components"] == 1
        assert bus.metrics["quarantine_decisions"] == 1
        assert bus.metrics["requests_refused"] == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("quarantined" in line and "ticker KRW-BAD" in line for line in errors)

        # A later registrant of the quarantined key is told too, after registering,
        # and nothing new is sent for it.
        count = len(subscribes(sim))
        later = Component()
        bus.subscriptions.register_component(later, ticker("KRW-BAD"))
        assert len(bus.rejections) == 1  # not from inside register_component
        await bus.wait_for(lambda: len(bus.rejections) == 2)
        assert bus.rejections[1] == ([(later, (Wish("ticker", "KRW-BAD"),))], detail)
        assert bus.batcher.status()["pending"] is False
        assert len(subscribes(sim)) == count

        # Once its holders let go, the quarantine lifts.
        bus.subscriptions.unregister_component(bad)
        bus.subscriptions.unregister_component(later)
        assert bus.subscriptions.get_subscription_stats()["public"]["quarantined"] == []
        await sim.wait_until(
            lambda: body(subscribes(sim)[-1]) == [{"type": "ticker", "codes": ["KRW-BTC"]}]
        )


@pytest.mark.anyio
async def test_with_nothing_accepted_yet_a_refused_first_request_is_narrowed_down() -> None:
    config = SimConfig(rate=200.0, reject_codes=frozenset({"KRW-BAD", "KRW-WORSE"}))
    codes = ["KRW-BTC", "KRW-ETH", "KRW-BAD", "KRW-XRP", "KRW-WORSE", "KRW-SOL"]
    async with running(config) as bus:
        components = [Component() for _ in codes]
        # Registered together: the very first request carries both bad codes.
        for component, code in zip(components, codes, strict=True):
            bus.subscriptions.register_component(component, ticker(code))
        good = {"KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL"}
        with anyio.fail_after(15):
            await bus.wait_for(
                lambda: (
                    {m.code for m in bus.messages[-50:]} >= good
                    and not bus.subscriptions.held(Channel.PUBLIC)
                ),
                timeout=15,
            )
        quarantined = bus.subscriptions.quarantined(Channel.PUBLIC)
        assert {code for _, code, _ in quarantined} == {"KRW-BAD", "KRW-WORSE"}
        assert sorted(
            (id(component), wishes)
            for rejected, _ in bus.rejections
            for component, wishes in rejected
        ) == sorted(
            [
                (id(components[2]), (Wish("ticker", "KRW-BAD"),)),
                (id(components[4]), (Wish("ticker", "KRW-WORSE"),)),
            ]
        )
        requests = [orjson.dumps(body(raw)) for raw in subscribes(bus.sim)]
        assert body(subscribes(bus.sim)[-1]) == [{"type": "ticker", "codes": sorted(good)}]
        assert max(Counter(requests).values()) <= 2
        assert len(requests) <= 12
        assert {v.kind for v in bus.sim.violations} == {"request_error"}


# -- an error frame labels only the close that follows it --------------------------------------


@pytest.mark.anyio
async def test_an_error_frame_that_is_not_followed_by_a_close_labels_no_later_gap() -> None:
    async with running(SimConfig(rate=200.0), error_close_grace=0.2) as bus:
        sim = bus.sim
        chart = Component()
        bus.subscriptions.register_component(chart, ticker("KRW-BTC"))
        (first,) = await sim.wait_for_requests(1)
        await bus.wait_for(lambda: bus.count("ticker", "KRW-BTC") >= 1)
        sim.send_error(first.connection, "SOMETHING_ODD", "no close follows", close=False)
        await bus.wait_for(lambda: bus.metrics["error_frames"] == 1)
        # A change meanwhile waits for the close that never comes, then goes out on
        # the same connection.
        other = Component()
        bus.subscriptions.register_component(other, trade("KRW-ETH"))
        await sim.wait_for_requests(2)
        assert sim.requests[1].connection == first.connection
        assert body(sim.requests[1].raw) == [
            {"type": "ticker", "codes": ["KRW-BTC"]},
            {"type": "trade", "codes": ["KRW-ETH"]},
        ]
        sim.drop(first.connection)
        await bus.wait_for(lambda: any(state == "gap" for state, _ in bus.states))
        (gap,) = [detail for state, detail in bus.states if state == "gap"]
        assert "after error" not in gap
        assert "SOMETHING_ODD" not in gap


@pytest.mark.anyio
async def test_the_close_that_follows_an_error_frame_is_labelled_with_it() -> None:
    async with running(SimConfig(rate=200.0)) as bus:
        sim = bus.sim
        chart = Component()
        bus.subscriptions.register_component(chart, ticker("KRW-BTC"))
        (first,) = await sim.wait_for_requests(1)
        await bus.wait_for(lambda: bus.count("ticker", "KRW-BTC") >= 1)
        sim.send_error(first.connection, "SOMETHING_ODD", "and then a close")
        await bus.wait_for(lambda: any(state == "gap" for state, _ in bus.states))
        (gap,) = [detail for state, detail in bus.states if state == "gap"]
        assert gap == "closed after error SOMETHING_ODD: and then a close"
        await sim.wait_for_requests(2)  # and the state is restored on the next one
        assert body(sim.requests[1].raw) == [{"type": "ticker", "codes": ["KRW-BTC"]}]
        assert not bus.subscriptions.quarantined(Channel.PUBLIC)


# -- the "Too Many Requests" back-off ----------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})])
@pytest.mark.anyio
async def test_back_off_doubles_to_a_cap_of_ten_seconds_and_starts_over_after_a_reset() -> None:
    for limiter in (upbit_connect_limiter("connect"), upbit_message_limiter("messages")):
        lengths = []
        for _ in range(7):
            lengths.append(limiter.back_off())
            await anyio.sleep(0.5)
        assert lengths == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
        # A block never outlasts the cap: the longest wait for a grant is 10 s.
        start = anyio.current_time()
        await limiter.acquire(max_wait=60.0)
        assert anyio.current_time() - start == pytest.approx(10.0 - 0.5, abs=1e-3)

        limiter.reset_back_off()  # traffic flowed without complaint
        assert limiter.back_off() == 1.0
        assert limiter.status()["last_back_off"] == 1.0
        await anyio.sleep(1.0 + 1e-3)
        assert limiter.delay() == 0.0


@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})])
@pytest.mark.anyio
async def test_a_reset_does_not_lift_a_block_in_force() -> None:
    limiter = upbit_connect_limiter("connect")
    limiter.back_off()
    limiter.back_off()  # 2 s
    limiter.reset_back_off()
    assert limiter.delay() == pytest.approx(2.0)


@pytest.mark.anyio
async def test_a_connection_that_carries_data_starts_the_back_off_over() -> None:
    limiter = upbit_connect_limiter("connect test", backoff_initial=0.05, backoff_max=5.0)
    async with running(SimConfig(rate=200.0), connect_limiter=limiter) as bus:
        sim = bus.sim
        chart = Component()
        bus.subscriptions.register_component(chart, ticker("KRW-BTC"))
        for round_ in range(1, 4):
            (*_, request) = await sim.wait_for_requests(round_)
            seen = bus.count("ticker", "KRW-BTC")
            await bus.wait_for(partial(lambda n: bus.count("ticker", "KRW-BTC") > n, seen))
            sim.send_error(request.connection, "TOO_MANY_REQUEST", "slow down")
            await bus.wait_for(partial(lambda n: limiter.status()["back_offs"] == n, round_))
            # Without the reset each would double the last: 0.05, 0.1, 0.2.
            assert limiter.status()["last_back_off"] == 0.05
        assert bus.metrics["quarantine_decisions"] == 0
        assert not bus.subscriptions.quarantined(Channel.PUBLIC)


class _Holder:
    """A component that iterates its Subscriber."""


@pytest.mark.anyio
async def test_through_the_bus_the_owner_is_told_in_its_stream_and_the_rest_is_served() -> None:
    config = SimConfig(rate=200.0, reject_codes=frozenset({"KRW-BAD"}))
    async with Simulator(config) as sim:
        settings = upbus.Settings(
            public_url=sim.public_url,
            debounce=0.02,
            reconnect={"initial": 0.05, "maximum": 0.5},
        )
        async with upbus.Bus(settings) as bus:
            good, bad = _Holder(), _Holder()
            good_stream = await bus.register_component(good, upbus.ticker("KRW-BTC"))
            bad_stream = await bus.register_component(
                bad, [upbus.ticker("KRW-BAD"), upbus.trade("KRW-ETH")]
            )
            with anyio.fail_after(10):
                rejected = None
                while rejected is None:
                    item = await bad_stream.get()
                    if isinstance(item, upbus.Rejected):
                        rejected = item
            assert rejected.wishes == (Wish("ticker", "KRW-BAD"),)
            assert rejected.channel == "public"
            assert rejected.detail.startswith("INVALID_PARAM: ")
            good_stream.take_all()
            with anyio.fail_after(10):
                fresh = 0
                while fresh < 5:  # the others are served again: new data, not a backlog
                    item = await good_stream.get()
                    fresh += not isinstance(item, upbus.BusEvent)
                while (await bad_stream.get()).type != "trade":
                    pass
            assert bus.get_connection_metrics()["public"]["quarantine_decisions"] == 1
            (entry,) = bus.get_subscription_stats()["public"]["quarantined"]
            assert entry["entry"] == "ticker KRW-BAD"
