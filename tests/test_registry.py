"""The one registry of components, shared by the subscriptions and the delivery."""

from __future__ import annotations

import gc
from collections.abc import Iterable

import pytest

import upbus
from upbus.core._bus import Bus
from upbus.core._errors import ComponentError
from upbus.core._registry import Entry, Registry
from upbus.core.subscriptions._manager import SubscriptionManager
from upbus.core.subscriptions._merge import RefCountMerger
from upbus.core.subscriptions._specs import Channel, Wish, ticker, trade


class Component:
    pass


def idle_bus() -> Bus:
    # Never entered: components without on_message may register before it runs.
    return Bus(upbus.Settings(autoload_plugins=False))


def codes(manager: SubscriptionManager) -> set[str]:
    return {code for entry in manager.state(Channel.PUBLIC).entries for code in entry.codes or ()}


# -- the registry alone -------------------------------------------------------------------


def test_entries_are_found_by_component_and_leave_through_the_listeners_in_order() -> None:
    registry = Registry()
    heard: list[tuple[str, str, str]] = []
    registry.add_listener(lambda entry, reason: heard.append(("first", entry.label, reason)))
    registry.add_listener(lambda entry, reason: heard.append(("second", entry.label, reason)))
    component = Component()
    entry = registry.add(component)
    assert registry.get(component) is entry
    assert entry() is component
    assert registry.label_of(component) == entry.label == f"Component@{id(component):x}"
    assert list(registry) == [entry]
    assert len(registry) == 1
    registry.remove(entry)
    assert registry.get(component) is None
    assert len(registry) == 0
    assert heard == [("first", entry.label, "unregister"), ("second", entry.label, "unregister")]


def test_a_dead_component_is_only_queued_until_collected() -> None:
    registry = Registry()
    heard: list[str] = []
    registry.add_listener(lambda entry, reason: heard.append(reason))
    component = Component()
    registry.add(component)
    del component
    gc.collect()
    assert heard == []
    assert registry.pending == 1
    assert len(registry) == 1
    assert registry.collect() == 1
    assert heard == ["collected"]
    assert registry.pending == 0
    assert len(registry) == 0


def test_a_reused_id_gets_a_new_entry_and_token() -> None:
    registry = Registry()
    tokens: set[int] = set()
    reused = 0
    for _ in range(200):  # ids of freed objects are reused quickly in CPython
        gone = Component()
        dead_id = id(gone)
        tokens.add(registry.add(gone).token)
        del gone
        newcomer = Component()
        # Before the queue is drained, the dead entry is not the newcomer's.
        assert registry.get(newcomer) is None
        reused += id(newcomer) == dead_id
        tokens.add(registry.add(newcomer).token)
        registry.collect()
        assert registry.get(newcomer) is not None
        registry.remove(registry.get(newcomer))  # type: ignore[arg-type]
    assert reused  # the case this test is about did happen
    assert len(tokens) == 400
    assert len(registry) == 0


def test_entries_compare_by_identity_even_for_unhashable_components() -> None:
    from dataclasses import dataclass

    @dataclass
    class Panel:  # eq=True: equal to any other Panel of the same name, and unhashable
        name: str

    registry = Registry()
    a, b = Panel("x"), Panel("x")
    entry_a, entry_b = registry.add(a), registry.add(b)
    assert entry_a != entry_b
    assert len({entry_a, entry_b}) == 2  # hashable, though Panel is not


@pytest.mark.parametrize("component", [42, "chart", (1, 2), None])
@pytest.mark.anyio
async def test_the_bus_and_the_manager_refuse_the_same_way(component: object) -> None:
    with pytest.raises(ComponentError) as from_manager:
        SubscriptionManager().register_component(component, ticker("KRW-BTC"))
    bus = idle_bus()
    with pytest.raises(ComponentError) as from_bus:
        await bus.register_component(component, ticker("KRW-BTC"))
    assert str(from_bus.value) == str(from_manager.value)
    assert "weak reference" in str(from_bus.value)
    assert bus.get_subscription_stats()["components"] == 0


# -- shared by the subscriptions and the delivery -------------------------------------------


@pytest.mark.anyio
async def test_the_bus_keeps_one_entry_per_component_for_both_state_and_delivery() -> None:
    bus = idle_bus()
    component = Component()
    subscriber = await bus.register_component(component, [ticker("KRW-BTC"), trade("KRW-ETH")])
    entry = bus._registry.get(component)
    assert entry is not None
    assert entry.subscriber is subscriber
    assert subscriber.owner is entry
    assert subscriber.label == entry.label
    assert bus.stall_watch._label_of(component) == subscriber.label
    # The router routes on the manager's own Wish objects: the specs were parsed once.
    (public, _private) = entry.wishes
    routed = [wish for _key, wishes in subscriber.wishes for wish in wishes]
    assert sorted(map(id, routed)) == sorted(map(id, public))


@pytest.mark.anyio
async def test_unregistering_through_the_manager_also_ends_delivery() -> None:
    bus = idle_bus()
    component = Component()
    subscriber = await bus.register_component(component, ticker("KRW-BTC"))
    assert bus.subscriptions.unregister_component(component)
    assert subscriber.closed
    assert subscriber.owner is not None
    assert subscriber.owner() is component  # the buffer still names its component
    assert bus.router.stats()["routes"] == 0
    assert bus.get_subscription_stats()["subscribers"] == []
    assert not await bus.unregister_component(component)


@pytest.mark.anyio
async def test_a_dead_component_leaves_state_and_delivery_at_the_next_operation() -> None:
    bus = idle_bus()
    keep = Component()
    await bus.register_component(keep, ticker("KRW-BTC"))
    gone = Component()
    subscriber = await bus.register_component(gone, ticker("KRW-ETH"))
    del gone
    gc.collect()
    assert not subscriber.closed  # only queued so far
    # Any state operation drains the queue, e.g. the batcher reading the state to send.
    assert codes(bus.subscriptions) == {"KRW-BTC"}
    assert subscriber.closed
    stats = bus.get_subscription_stats()
    assert (stats["components"], stats["collected_total"], len(stats["subscribers"])) == (1, 1, 1)
    assert bus.router.stats()["routes"] == 1


@pytest.mark.anyio
async def test_re_registering_keeps_the_entry_and_its_buffer() -> None:
    bus = idle_bus()
    component = Component()
    first = await bus.register_component(component, ticker("KRW-BTC"))
    entry = bus._registry.get(component)
    again = await bus.register_component(component, ticker("KRW-ETH"), capacity=16)
    assert again is first
    assert bus._registry.get(component) is entry
    assert first.capacity == 16
    assert codes(bus.subscriptions) == {"KRW-ETH"}


def test_a_manager_inside_a_bus_shares_its_registry() -> None:
    bus = idle_bus()
    component = Component()
    bus.subscriptions.register_component(component, ticker("KRW-BTC"))
    entry = bus._registry.get(component)
    assert entry is not None
    assert entry.subscriber is None
    assert bus.get_subscription_stats()["subscribers"] == []


# -- death at any bytecode ----------------------------------------------------------------


class Killing(RefCountMerger):
    """A merger that drops the last reference to a component in the middle of an update."""

    def __init__(self, victims: list[object]) -> None:
        super().__init__()
        self.victims = victims

    def add(self, wishes: Iterable[Wish]) -> bool:
        changed = super().add(wishes)
        self.victims.clear()  # its weakref callback runs right here
        return changed


def test_a_component_dying_mid_update_is_collected_at_the_next_operation() -> None:
    victims: list[object] = []
    manager = SubscriptionManager(lambda channel: Killing(victims))
    victim = Component()
    manager.register_component(victim, ticker("KRW-ETH"))
    victims.append(victim)
    del victim
    keep = Component()
    manager.register_component(keep, ticker("KRW-BTC"))  # the victim dies inside
    assert manager.get_subscription_stats()["pending_garbage"] == 1
    assert codes(manager) == {"KRW-BTC"}
    stats = manager.get_subscription_stats()
    assert (stats["components"], stats["collected_total"], stats["pending_garbage"]) == (1, 1, 0)


def test_entry_is_a_weak_reference() -> None:
    component = Component()
    entry = Registry().add(component)
    assert isinstance(entry, Entry)
    del component
    gc.collect()
    assert entry() is None
