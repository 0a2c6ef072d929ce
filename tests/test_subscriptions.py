"""SubscriptionManager: exact merged state under any interleaving.

Invariants 1 ("merged state is exact") and 6 ("weak references cannot corrupt state").
"""

from __future__ import annotations

import gc
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from upbus.core._errors import ComponentError, SpecError
from upbus.core.subscriptions._manager import SubscriptionManager
from upbus.core.subscriptions._specs import (
    Channel,
    Spec,
    candle,
    my_asset,
    my_order,
    orderbook,
    ticker,
    trade,
)
from upbus.core.subscriptions._state import StateChange, WireEntry


class Component:
    """A stand-in for a chart or a strategy: any ordinary object will do."""


def entries(manager: SubscriptionManager, channel: Channel) -> list[dict[str, Any]]:
    return manager.state(channel).request_objects()


def test_two_components_share_one_entry_and_the_deepest_book() -> None:
    manager = SubscriptionManager()
    chart, book = Component(), Component()
    manager.register_component(chart, [ticker("KRW-BTC"), orderbook("KRW-BTC", depth=5)])
    manager.register_component(book, [ticker("KRW-BTC", "KRW-ETH"), orderbook("KRW-BTC", depth=15)])
    assert entries(manager, Channel.PUBLIC) == [
        {"type": "orderbook", "codes": ["KRW-BTC.15"]},
        {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
    ]
    manager.unregister_component(book)
    assert entries(manager, Channel.PUBLIC) == [
        {"type": "orderbook", "codes": ["KRW-BTC.5"]},
        {"type": "ticker", "codes": ["KRW-BTC"]},
    ]
    assert manager.get_public_subscriptions().codes_by_type() == {
        "orderbook": {"KRW-BTC"},
        "ticker": {"KRW-BTC"},
    }


def test_modes_widen_to_both_and_levels_split_entries() -> None:
    manager = SubscriptionManager()
    a, b, c = Component(), Component(), Component()
    manager.register_component(a, [ticker("KRW-BTC", only_snapshot=True), orderbook("KRW-BTC")])
    manager.register_component(b, [ticker("KRW-ETH", only_realtime=True)])
    manager.register_component(c, [orderbook("KRW-BTC", level=10000, depth=30)])
    assert entries(manager, Channel.PUBLIC) == [
        {"type": "orderbook", "codes": ["KRW-BTC"]},
        {"type": "orderbook", "codes": ["KRW-BTC"], "level": 10000},
        {"type": "ticker", "codes": ["KRW-ETH"], "is_only_realtime": True},
        {"type": "ticker", "codes": ["KRW-BTC"], "is_only_snapshot": True},
    ]
    manager.register_component(b, [ticker("KRW-BTC", only_realtime=True)])  # replaces b's specs
    assert entries(manager, Channel.PUBLIC)[2:] == [{"type": "ticker", "codes": ["KRW-BTC"]}]


def test_private_state_is_kept_apart_and_every_market_covers_codes() -> None:
    manager = SubscriptionManager()
    a, b = Component(), Component()
    manager.register_component(a, [my_order("KRW-BTC"), ticker("KRW-BTC")])
    assert entries(manager, Channel.PRIVATE) == [{"type": "myOrder", "codes": ["KRW-BTC"]}]
    manager.register_component(b, [my_order(), my_asset()])
    assert entries(manager, Channel.PRIVATE) == [{"type": "myAsset"}, {"type": "myOrder"}]
    assert entries(manager, Channel.PUBLIC) == [{"type": "ticker", "codes": ["KRW-BTC"]}]
    manager.unregister_component(b)
    assert entries(manager, Channel.PRIVATE) == [{"type": "myOrder", "codes": ["KRW-BTC"]}]


def test_listeners_hear_each_real_change_once_and_no_op_changes_not_at_all() -> None:
    manager = SubscriptionManager()
    heard: list[StateChange] = []
    manager.add_listener(heard.append)
    a, b = Component(), Component()
    manager.register_component(a, ticker("KRW-BTC"))
    manager.register_component(b, ticker("KRW-BTC"))  # already wanted: no change
    manager.register_component(a, ticker("KRW-BTC"))  # same specs again: no change
    manager.unregister_component(a)  # b still wants it: no change
    manager.unregister_component(b)
    assert [(c.channel, c.version, c.reason) for c in heard] == [
        (Channel.PUBLIC, 1, "register"),
        (Channel.PUBLIC, 2, "unregister"),
    ]
    assert manager.get_public_subscriptions().entries == ()
    assert not manager.unregister_component(a)


def test_a_failing_listener_does_not_corrupt_state_or_silence_others() -> None:
    manager = SubscriptionManager()
    heard: list[int] = []

    def broken(change: StateChange) -> None:
        raise RuntimeError("listener bug")

    manager.add_listener(broken)
    manager.add_listener(lambda change: heard.append(change.version))
    manager.register_component(Component(), ticker("KRW-BTC"))
    assert heard == [1]


def test_bad_specs_register_nothing() -> None:
    manager = SubscriptionManager()
    component = Component()
    manager.register_component(component, ticker("KRW-BTC"))
    with pytest.raises(SpecError):
        manager.register_component(component, [ticker("KRW-ETH"), {"type": "nope", "codes": []}])
    assert manager.specs_of(component) == (ticker("KRW-BTC"),)
    assert entries(manager, Channel.PUBLIC) == [{"type": "ticker", "codes": ["KRW-BTC"]}]


@pytest.mark.parametrize("component", [42, "chart", (1, 2), None])
def test_objects_that_cannot_be_weakly_referenced_get_a_clear_error(component: object) -> None:
    manager = SubscriptionManager()
    with pytest.raises(ComponentError, match="weak reference"):
        manager.register_component(component, ticker("KRW-BTC"))
    assert manager.get_subscription_stats()["components"] == 0


def test_garbage_collected_components_leave_safely() -> None:
    manager = SubscriptionManager()
    heard: list[str] = []
    manager.add_listener(lambda change: heard.append(change.reason))
    keep = Component()
    manager.register_component(keep, ticker("KRW-BTC"))
    gone = Component()
    manager.register_component(gone, [ticker("KRW-ETH"), orderbook("KRW-ETH")])
    del gone
    gc.collect()
    # The weakref callback only queued the component; the next read collects it.
    assert manager.get_subscription_stats()["pending_garbage"] == 1
    assert entries(manager, Channel.PUBLIC) == [{"type": "ticker", "codes": ["KRW-BTC"]}]
    assert heard == ["register", "register", "collected"]
    stats = manager.get_subscription_stats()
    assert (stats["components"], stats["collected_total"], stats["pending_garbage"]) == (1, 1, 0)


def test_a_reused_id_never_takes_over_a_dead_components_registration() -> None:
    manager = SubscriptionManager()
    for _ in range(200):  # ids of freed objects are reused quickly in CPython
        component = Component()
        manager.register_component(component, ticker("KRW-BTC"))
        del component
        newcomer = Component()
        manager.register_component(newcomer, ticker("KRW-ETH"))
        manager.unregister_component(newcomer)
        del newcomer
    gc.collect()
    manager.collect_garbage()
    assert manager.get_subscription_stats()["components"] == 0
    assert entries(manager, Channel.PUBLIC) == []


# -- the hypothesis state machine -------------------------------------------------------

CODES = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "BTC-ETH"]
codes = st.lists(st.sampled_from(CODES), min_size=1, max_size=3, unique=True)
modes = st.sampled_from([{}, {"only_snapshot": True}, {"only_realtime": True}])
krw_codes = st.lists(st.sampled_from(CODES[:3]), min_size=1, max_size=3, unique=True)
spec_strategy = st.one_of(
    st.builds(lambda c, m: ticker(*c, **m), codes, modes),
    st.builds(lambda c, m: trade(*c, **m), codes, modes),
    st.builds(lambda c: candle("1m", *c), codes),
    st.builds(
        lambda c, d, m: orderbook(*c, depth=d, **m), codes, st.sampled_from([None, 1, 5, 15]), modes
    ),
    st.builds(lambda c, lv: orderbook(*c, level=lv), krw_codes, st.sampled_from([10, 1000])),
    st.builds(lambda c: my_order(*c), st.lists(st.sampled_from(CODES), max_size=2, unique=True)),
    st.just(my_asset()),
)
specs_strategy = st.lists(spec_strategy, max_size=4)


def expected_entries(live_specs: list[tuple[Spec, ...]], channel: Channel) -> set[WireEntry]:
    """The full recomputation of the original design, written plainly and apart from the merger."""
    wanted: dict[tuple[str, str | None, float], list[tuple[int, str]]] = defaultdict(list)
    for specs in live_specs:
        for spec in specs:
            if spec.channel is not channel:
                continue
            for code in spec.codes or (None,):
                wanted[(spec.type, code, spec.level)].append((spec.depth or 30, spec.mode.value))
    everything = {kind for (kind, code, _level) in wanted if code is None}
    by_entry: dict[tuple[str, float, bool, bool], set[str]] = defaultdict(set)
    for (kind, code, level), wishes in wanted.items():
        if kind in everything:
            continue
        assert code is not None
        depth = max(d for d, _ in wishes)
        found = {m for _, m in wishes}
        snapshot = found == {"snapshot"} and channel is Channel.PUBLIC
        realtime = found == {"realtime"} and channel is Channel.PUBLIC
        if kind == "orderbook" and depth != 30:
            code = f"{code}.{depth}"
        by_entry[(kind, level, snapshot, realtime)].add(code)
    result = {WireEntry(k, tuple(sorted(c)), lv, s, r) for (k, lv, s, r), c in by_entry.items()}
    return result | {WireEntry(kind, None) for kind in everything}


class SubscriptionMachine(RuleBasedStateMachine):
    """Any interleaving of register, unregister, re-register and garbage collection."""

    # Hypothesis keeps what a bundle holds, so the bundle holds handles and this
    # machine holds the only strong reference to each component.
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.manager = SubscriptionManager()
        self.objects: dict[int, Component] = {}
        self.live: dict[int, tuple[Spec, ...]] = {}
        self.next_handle = 0
        self.versions_seen: dict[Channel, list[int]] = defaultdict(list)
        self.manager.add_listener(
            lambda change: self.versions_seen[change.channel].append(change.version)
        )

    @rule(target=handles, specs=specs_strategy)
    def register_new(self, specs: list[Spec]) -> int:
        handle = self.next_handle
        self.next_handle += 1
        self.objects[handle] = Component()
        self.manager.register_component(self.objects[handle], specs)
        self.live[handle] = tuple(specs)
        return handle

    @rule(handle=handles, specs=specs_strategy)
    def re_register(self, handle: int, specs: list[Spec]) -> None:
        if handle in self.objects:
            self.manager.register_component(self.objects[handle], specs)
            self.live[handle] = tuple(specs)

    @rule(handle=handles)
    def unregister(self, handle: int) -> None:
        if handle in self.objects:
            assert self.manager.unregister_component(self.objects[handle]) == (handle in self.live)
            self.live.pop(handle, None)

    @rule(handle=consumes(handles))
    def garbage_collect(self, handle: int) -> None:
        # Drop the only strong reference: reference counting frees the component
        # at once, and its weakref callback runs right there, between two bytecodes.
        self.objects.pop(handle, None)
        self.live.pop(handle, None)

    @invariant()
    def merged_state_is_the_union_of_live_specs(self) -> None:
        live_specs = list(self.live.values())
        for channel in Channel:
            got = set(self.manager.state(channel).entries)
            assert got == expected_entries(live_specs, channel)
        assert self.manager.get_subscription_stats()["components"] == len(self.live)

    @invariant()
    def versions_only_grow(self) -> None:
        for seen in self.versions_seen.values():
            assert seen == sorted(set(seen))


TestSubscriptionMachine = SubscriptionMachine.TestCase
TestSubscriptionMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
