"""SubscriptionManager: every component's wishes merged into one state per channel.

Each operation is synchronous and contains no await, so it is atomic on the event
loop without a lock: validate, update the reference counts, bump the channel's
version when its wire entries changed, then tell the listeners.

Components are held weakly. A weakref callback can run at any bytecode, even in
the middle of an update, so it only appends a token to a queue; the queue is
drained at the start of every operation and before every send
(:meth:`SubscriptionManager.collect_garbage`).
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Tracer

from upbus.core.errors import ComponentError
from upbus.core.merge import Merger, RefCountMerger
from upbus.core.specs import Channel, Spec, Wish, parse_specs
from upbus.core.state import MergedState, StateChange
from upbus.core.telemetry import change_context, get_tracer

__all__ = ("Listener", "SubscriptionManager")

log = logging.getLogger("upbus.subscriptions")

CHANNELS = tuple(Channel)  # iterating the enum itself is slow on the hot-ish path
Listener = Callable[[StateChange], None]
SpecsArg = Spec | Mapping[str, Any] | Iterable[Spec | Mapping[str, Any]]


_Wishes = tuple[tuple[Wish, ...], tuple[Wish, ...]]  # (public, private)
_NONE: tuple[Wish, ...] = ()


class _ComponentRef(weakref.ref[Any]):
    """A weak reference to a component that carries its registration's token."""

    __slots__ = ("token",)
    token: int


@dataclass(slots=True, eq=False)
class _Registration:
    token: int
    key: int  # id() of the component when it registered
    ref: _ComponentRef
    kind: str  # the component's class name
    specs: tuple[Spec, ...]
    wishes: _Wishes

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.key:x}"


def _split(specs: Iterable[Spec]) -> _Wishes:
    public: list[Wish] = []
    private: list[Wish] = []
    for spec in specs:
        (public if spec.channel is Channel.PUBLIC else private).extend(spec.wishes())
    # The shared empty tuple: most components use one channel only.
    return (tuple(public) if public else _NONE, tuple(private) if private else _NONE)


def _of(wishes: _Wishes, channel: Channel) -> tuple[Wish, ...]:
    return wishes[0] if channel is Channel.PUBLIC else wishes[1]


class SubscriptionManager:
    """Merges the subscription specs of many components into one state per channel.

    :param merger_factory: makes the :class:`Merger` of each channel (the
        ``upbus_make_merger`` hook's answer); the default counts references.
    :param tracer: where change spans go; the global tracer by default.
    """

    def __init__(
        self,
        merger_factory: Callable[[Channel], Merger] | None = None,
        *,
        tracer: Tracer | None = None,
    ) -> None:
        make = merger_factory or (lambda _channel: RefCountMerger())
        self._mergers = {channel: make(channel) for channel in CHANNELS}
        self._versions = dict.fromkeys(Channel, 0)
        self._states = {channel: MergedState(channel, (), 0) for channel in CHANNELS}
        self._by_key: dict[int, _Registration] = {}
        self._by_token: dict[int, _Registration] = {}
        # Weakref callbacks may run at any bytecode (even mid-update): they only
        # enqueue the dead reference. One bound method serves every reference.
        self._dead: deque[_ComponentRef] = deque()
        self._on_death = self._dead.append
        self._next_token = 0
        self._listeners: list[Listener] = []
        self._tracer = tracer or get_tracer()
        self._registered_total = 0
        self._collected_total = 0

    # -- listeners -------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` synchronously after each update that changed a channel's state."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    # -- the seed's API ----------------------------------------------------------

    def register_component(self, component: object, specs: SpecsArg) -> None:
        """Register ``component``'s specs, replacing any it registered before.

        Nothing changes if a spec is invalid (:class:`~upbus.SpecError`) or the
        component cannot be weakly referenced (:class:`~upbus.ComponentError`).
        """
        parsed = tuple(parse_specs(specs))
        wishes = _split(parsed)
        self.collect_garbage()
        old = self._lookup(component)
        if old is not None:
            self._replace(old, parsed, wishes)
            return
        token = self._next_token
        self._next_token += 1
        try:
            ref = _ComponentRef(component, self._on_death)
        except TypeError:
            raise ComponentError(
                f"{type(component).__name__} objects cannot be components: upbus holds "
                "components by weak reference (give the class a __weakref__ slot, or "
                "register an object of an ordinary class)"
            ) from None
        ref.token = token
        kind = type(component).__name__
        registration = _Registration(token, id(component), ref, kind, parsed, wishes)
        self._by_key[registration.key] = registration
        self._by_token[token] = registration
        self._registered_total += 1
        changed = [ch for ch in CHANNELS if self._mergers[ch].add(_of(wishes, ch))]
        self._announce(changed, "register", registration.label)

    def unregister_component(self, component: object) -> bool:
        """Remove ``component``'s specs; return whether it was registered."""
        self.collect_garbage()
        registration = self._lookup(component)
        if registration is None:
            return False
        self._drop(registration)
        changed = [ch for ch in CHANNELS if self._mergers[ch].remove(_of(registration.wishes, ch))]
        self._announce(changed, "unregister", registration.label)
        return True

    def get_public_subscriptions(self) -> MergedState:
        """The latest merged public state (an immutable snapshot)."""
        return self.state(Channel.PUBLIC)

    def get_private_subscriptions(self) -> MergedState:
        """The latest merged private state (an immutable snapshot)."""
        return self.state(Channel.PRIVATE)

    def get_subscription_stats(self) -> dict[str, Any]:
        """Counts for debugging: live components, and per channel entries, codes and version."""
        stats: dict[str, Any] = {
            "components": len(self._by_token),
            "registered_total": self._registered_total,
            "collected_total": self._collected_total,
            "pending_garbage": len(self._dead),
        }
        for channel in CHANNELS:
            state = self._states[channel]
            if state.version != self._versions[channel]:
                state = self.state(channel)
            stats[channel.value] = {
                "version": state.version,
                "entries": len(state.entries),
                "codes": state.code_count(),
                "types": sorted({entry.type for entry in state.entries}),
                **self._mergers[channel].stats(),
            }
        return stats

    # -- for the batcher and the bus ----------------------------------------------

    def state(self, channel: Channel) -> MergedState:
        """The latest merged state of ``channel``, after collecting dead components."""
        self.collect_garbage()
        state = self._states[channel]
        version = self._versions[channel]
        if state.version != version:
            state = MergedState(channel, self._mergers[channel].entries(), version)
            self._states[channel] = state
        return state

    def version(self, channel: Channel) -> int:
        """The version of ``channel``'s state; it grows with every change."""
        return self._versions[channel]

    def specs_of(self, component: object) -> tuple[Spec, ...] | None:
        """The specs ``component`` registered, or ``None``."""
        registration = self._lookup(component)
        return None if registration is None else registration.specs

    def collect_garbage(self) -> int:
        """Remove the subscriptions of garbage-collected components; return how many went."""
        collected = 0
        dead = self._dead
        while dead:
            registration = self._by_token.get(dead.popleft().token)
            if registration is None:
                continue
            self._drop(registration)
            self._collected_total += 1
            collected += 1
            changed = [
                ch for ch in CHANNELS if self._mergers[ch].remove(_of(registration.wishes, ch))
            ]
            log.debug("component %s was garbage-collected", registration.label)
            self._announce(changed, "collected", registration.label)
        return collected

    # -- internals -------------------------------------------------------------------

    def _lookup(self, component: object) -> _Registration | None:
        registration = self._by_key.get(id(component))
        if registration is None:
            return None
        if registration.ref() is component:
            return registration
        # The id belongs to a dead component whose callback has not been drained yet
        # (ids are reused); it is not this component's registration.
        return None

    def _drop(self, registration: _Registration) -> None:
        del self._by_token[registration.token]
        if self._by_key.get(registration.key) is registration:
            del self._by_key[registration.key]

    def _replace(self, old: _Registration, specs: tuple[Spec, ...], wishes: _Wishes) -> None:
        changed = []
        for channel in CHANNELS:
            before = Counter(_of(old.wishes, channel))
            after = Counter(_of(wishes, channel))
            merger = self._mergers[channel]
            added = merger.add((after - before).elements())
            removed = merger.remove((before - after).elements())
            if added or removed:
                changed.append(channel)
        old.specs = specs
        old.wishes = wishes
        self._announce(changed, "register", old.label)

    def _announce(self, channels: list[Channel], reason: str, label: str) -> None:
        for channel in channels:
            self._versions[channel] += 1
            context = change_context(self._tracer, channel.value, reason, label)
            change = StateChange(channel, self._versions[channel], reason, label, context)
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:
                    # The state is already updated and consistent; a broken listener
                    # must not undo or block that.
                    log.exception("subscription listener %r failed", listener)
