"""SubscriptionManager: every component's wishes merged into one state per channel.

Each operation is synchronous and contains no await, so it is atomic on the event
loop without a lock: validate, update the reference counts, bump the channel's
version when its wire entries changed, then tell the listeners.

Components live in a :class:`~upbus.core._registry.Registry` (weakly held, one
entry per registration): the manager's own, or the Bus's, which its delivery
shares. Dead components are collected at the start of every operation and before
every send (:meth:`SubscriptionManager.collect_garbage`).

Keys (type, code, level) that the exchange refused are *excluded*: their wishes stay
registered but out of the merged state (see :mod:`upbus.core.subscriptions._quarantine`). A
quarantined key stays out until every component holding it has unregistered or
re-registered without it; a component that registers it meanwhile joins the holders
and is told. A *held* key is a suspect kept out for a moment while the others of a
refused request are tried; :meth:`SubscriptionManager.release` lets it back in.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Tracer

from upbus.core._registry import Entry, Registry
from upbus.core._telemetry import change_context, get_tracer
from upbus.core.subscriptions._merge import Merger, RefCountMerger
from upbus.core.subscriptions._quarantine import Key, describe, key_order, wish_key
from upbus.core.subscriptions._specs import Channel, Spec, Wish, parse_specs
from upbus.core.subscriptions._state import MergedState, StateChange

__all__ = ("Listener", "Rejected", "RejectionListener", "SubscriptionManager")

log = logging.getLogger("upbus.subscriptions")

CHANNELS = tuple(Channel)  # iterating the enum itself is slow on the hot-ish path
Listener = Callable[[StateChange], None]
Rejected = list[tuple[object, tuple[Wish, ...]]]
"""Components with the wishes of theirs that were quarantined."""
RejectionListener = Callable[[Channel, Rejected, str], None]
SpecsArg = Spec | Mapping[str, Any] | Iterable[Spec | Mapping[str, Any]]


_Wishes = tuple[tuple[Wish, ...], tuple[Wish, ...]]  # (public, private)
_NONE: tuple[Wish, ...] = ()


@dataclass(slots=True, eq=False)
class _Exclusion:
    """A key kept out of the merged state, and the registrations that hold it."""

    quarantined: bool  # False: a suspect held back while others are tried
    detail: str
    since: float  # wall-clock time of the decision
    holders: set[int]  # tokens

    def stats(self, key: Key) -> dict[str, Any]:
        kind, code, level = key
        return {
            "entry": describe(key),
            "type": kind,
            "code": code,
            "level": level,
            "detail": self.detail,
            "since": self.since,
            "components": len(self.holders),
        }


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
    :param registry: the components' registry, shared with a Bus's delivery; by
        default one of its own.
    """

    def __init__(
        self,
        merger_factory: Callable[[Channel], Merger] | None = None,
        *,
        tracer: Tracer | None = None,
        registry: Registry | None = None,
    ) -> None:
        make = merger_factory or (lambda _channel: RefCountMerger())
        self._mergers = {channel: make(channel) for channel in CHANNELS}
        self._versions = dict.fromkeys(Channel, 0)
        self._states = {channel: MergedState(channel, (), 0) for channel in CHANNELS}
        self._registry = registry if registry is not None else Registry()
        # First among the registry's listeners: the state is right before delivery hears.
        self._registry.add_listener(self._left)
        self._listeners: list[Listener] = []
        self._rejection_listeners: list[RejectionListener] = []
        self._excluded: dict[Channel, dict[Key, _Exclusion]] = {ch: {} for ch in CHANNELS}
        self._tracer = tracer or get_tracer()
        self._registered_total = 0
        self._collected_total = 0

    # -- listeners -------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` synchronously after each update that changed a channel's state."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def add_rejection_listener(self, listener: RejectionListener) -> None:
        """Call ``listener(channel, rejected, detail)`` when a component registers a
        wish whose key is quarantined already (it is kept out, and its owner should
        know). Decisions themselves are reported by whoever calls :meth:`quarantine`.
        """
        self._rejection_listeners.append(listener)

    # -- the API of the original design ------------------------------------------------

    def register_component(self, component: object, specs: SpecsArg) -> None:
        """Register ``component``'s specs, replacing any it registered before.

        Nothing changes if a spec is invalid (:class:`~upbus.SpecError`) or the
        component cannot be weakly referenced (:class:`~upbus.ComponentError`).
        """
        self.register(component, tuple(parse_specs(specs)))

    def register(self, component: object, specs: tuple[Spec, ...]) -> Entry:
        """:meth:`register_component` with specs :func:`parse_specs` has validated.

        Returns ``component``'s registry entry (the Bus adds its buffer there).
        """
        wishes = _split(specs)
        self.collect_garbage()
        entry = self._registry.get(component)
        if entry is not None:
            self._replace(entry, specs, wishes)
            return entry
        entry = self._registry.add(component)
        entry.specs = specs
        entry.wishes = wishes
        self._registered_total += 1
        changed = [ch for ch in CHANNELS if self._mergers[ch].add(self._effective(wishes, ch))]
        notices = self._note_holder(entry)
        self._announce(changed, "register", entry.label)
        self._tell(notices)
        return entry

    def unregister_component(self, component: object) -> bool:
        """Remove ``component``'s specs; return whether it was registered."""
        self.collect_garbage()
        entry = self._registry.get(component)
        if entry is None:
            return False
        self._registry.remove(entry, "unregister")
        return True

    def get_public_subscriptions(self) -> MergedState:
        """The latest merged public state (an immutable snapshot)."""
        return self.state(Channel.PUBLIC)

    def get_private_subscriptions(self) -> MergedState:
        """The latest merged private state (an immutable snapshot)."""
        return self.state(Channel.PRIVATE)

    def get_subscription_stats(self) -> dict[str, Any]:
        """Counts for debugging: live components, and per channel entries, codes and version.

        Per channel, ``quarantined`` lists the keys the exchange refused and ``held``
        the suspects kept out while a refused request is narrowed down, each as
        ``{"entry", "type", "code", "level", "detail", "since", "components"}``.
        """
        stats: dict[str, Any] = {
            "components": len(self._registry),
            "registered_total": self._registered_total,
            "collected_total": self._collected_total,
            "pending_garbage": self._registry.pending,
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
                "quarantined": self._exclusion_stats(channel, quarantined=True),
                "held": self._exclusion_stats(channel, quarantined=False),
            }
        return stats

    def _exclusion_stats(self, channel: Channel, *, quarantined: bool) -> list[dict[str, Any]]:
        excluded = self._excluded[channel]
        return [
            excluded[key].stats(key)
            for key in sorted(excluded, key=key_order)
            if excluded[key].quarantined is quarantined
        ]

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
        entry = self._registry.get(component)
        return None if entry is None else entry.specs

    def collect_garbage(self) -> int:
        """Remove the subscriptions of garbage-collected components; return how many went."""
        return self._registry.collect()

    # -- internals -------------------------------------------------------------------

    def _left(self, entry: Entry, reason: str) -> None:
        """``entry`` left the registry (unregistered or collected): take its wishes out."""
        changed = [
            ch for ch in CHANNELS if self._mergers[ch].remove(self._effective(entry.wishes, ch))
        ]
        # Only now: lifting an exclusion changes what _effective() leaves out.
        entry.wishes = (_NONE, _NONE)
        self._note_holder(entry)
        if reason == "collected":
            self._collected_total += 1
            log.debug("component %s was garbage-collected", entry.label)
        self._announce(changed, reason, entry.label)

    def _replace(self, old: Entry, specs: tuple[Spec, ...], wishes: _Wishes) -> None:
        changed = []
        for channel in CHANNELS:
            before = Counter(self._effective(old.wishes, channel))
            after = Counter(self._effective(wishes, channel))
            merger = self._mergers[channel]
            added = merger.add((after - before).elements())
            removed = merger.remove((before - after).elements())
            if added or removed:
                changed.append(channel)
        old.specs = specs
        old.wishes = wishes
        notices = self._note_holder(old)
        self._announce(changed, "register", old.label)
        self._tell(notices)

    # -- exclusions (quarantine) ---------------------------------------------------------

    def _effective(self, wishes: _Wishes, channel: Channel) -> tuple[Wish, ...]:
        """``wishes`` of ``channel`` less those whose key is excluded: what the merger holds."""
        mine = _of(wishes, channel)
        excluded = self._excluded[channel]
        if not excluded or not mine:
            return mine
        return tuple(wish for wish in mine if wish_key(wish) not in excluded)

    def _note_holder(self, entry: Entry) -> list[tuple[Channel, Rejected, str]]:
        """Bring the exclusions' holders up to date with ``entry``'s wishes.

        Lifts an exclusion nobody holds any more, and returns notices for the wishes
        of a newly holding component whose key is quarantined.
        """
        notices: list[tuple[Channel, Rejected, str]] = []
        token = entry.token
        for channel in CHANNELS:
            excluded = self._excluded[channel]
            if not excluded:
                continue
            mine: dict[Key, list[Wish]] = {}
            for wish in _of(entry.wishes, channel):
                key = wish_key(wish)
                if key in excluded:
                    mine.setdefault(key, []).append(wish)
            told: dict[str, list[Wish]] = {}
            for key, exclusion in list(excluded.items()):
                if key in mine:
                    if token not in exclusion.holders:
                        exclusion.holders.add(token)
                        if exclusion.quarantined:
                            told.setdefault(exclusion.detail, []).extend(mine[key])
                elif token in exclusion.holders:
                    exclusion.holders.discard(token)
                    if not exclusion.holders:
                        del excluded[key]
                        log.info(
                            "%s: %s is no longer %s: no component holds it",
                            channel.value,
                            describe(key),
                            "quarantined" if exclusion.quarantined else "held back",
                        )
            component = entry()
            if component is not None:
                for detail, wishes in told.items():
                    notices.append((channel, [(component, tuple(wishes))], detail))
        return notices

    def _tell(self, notices: list[tuple[Channel, Rejected, str]]) -> None:
        for channel, rejected, detail in notices:
            for component, wishes in rejected:
                log.warning(
                    "%s: %s registered %s, quarantined after the exchange refused it (%s); "
                    "it is not sent",
                    channel.value,
                    type(component).__name__,
                    ", ".join(sorted({describe(wish_key(wish)) for wish in wishes})),
                    detail,
                )
            for listener in list(self._rejection_listeners):
                try:
                    listener(channel, rejected, detail)
                except Exception:
                    log.exception("rejection listener %r failed", listener)

    def _exclude(
        self, channel: Channel, keys: Iterable[Key], detail: str, *, quarantined: bool
    ) -> Rejected:
        self.collect_garbage()
        keys = set(keys)
        excluded = self._excluded[channel]
        holders: dict[Key, set[int]] = {key: set() for key in keys}
        out: list[Wish] = []  # wishes still in the merger, to take out
        rejected: Rejected = []
        for entry in self._registry:
            mine = [wish for wish in _of(entry.wishes, channel) if wish_key(wish) in keys]
            if not mine:
                continue
            for wish in mine:
                key = wish_key(wish)
                holders[key].add(entry.token)
                if key not in excluded:
                    out.append(wish)
            component = entry()
            if component is not None:
                rejected.append((component, tuple(mine)))
        changed = self._mergers[channel].remove(out)
        now = time.time()
        for key in keys:
            if holders[key]:
                excluded[key] = _Exclusion(quarantined, detail, now, holders[key])
            else:
                excluded.pop(key, None)  # nobody wants it any more
        label = ", ".join(describe(key) for key in sorted(keys, key=key_order))
        self._announce([channel] if changed else [], "quarantine" if quarantined else "hold", label)
        return rejected

    def quarantine(self, channel: Channel, keys: Iterable[Key], detail: str) -> Rejected:
        """Keep ``keys`` out of ``channel``'s merged state: the exchange refused them.

        Each stays out until every component holding it has unregistered or
        re-registered without it. Returns the live components holding them, each with
        its wishes of those keys. ``detail`` (e.g. ``"INVALID_PARAM: codes field is
        empty"``) is kept for :meth:`get_subscription_stats` and later registrants.
        """
        return self._exclude(channel, keys, detail, quarantined=True)

    def hold(self, channel: Channel, keys: Iterable[Key], detail: str) -> None:
        """Keep suspects ``keys`` out of ``channel``'s state until :meth:`release`."""
        self._exclude(channel, keys, detail, quarantined=False)

    def release(self, channel: Channel, keys: Iterable[Key] | None = None) -> bool:
        """Let held ``keys`` (default: every held key) of ``channel`` back into the state.

        Returns whether the state changed.
        """
        self.collect_garbage()
        excluded = self._excluded[channel]
        wanted = None if keys is None else set(keys)
        held = {
            key
            for key, exclusion in excluded.items()
            if not exclusion.quarantined and (wanted is None or key in wanted)
        }
        if not held:
            return False
        for key in held:
            del excluded[key]
        back = [
            wish
            for entry in self._registry
            for wish in _of(entry.wishes, channel)
            if wish_key(wish) in held
        ]
        changed = self._mergers[channel].add(back)
        label = ", ".join(describe(key) for key in sorted(held, key=key_order))
        self._announce([channel] if changed else [], "release", label)
        return changed

    def held(self, channel: Channel) -> frozenset[Key]:
        """The keys of ``channel`` held back while a refused request is narrowed down."""
        self.collect_garbage()
        return frozenset(k for k, e in self._excluded[channel].items() if not e.quarantined)

    def quarantined(self, channel: Channel) -> dict[Key, str]:
        """The quarantined keys of ``channel``, each with the refusal's detail."""
        self.collect_garbage()
        return {k: e.detail for k, e in self._excluded[channel].items() if e.quarantined}

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
