"""The registry of components: who is registered, held by weak reference, and what for.

One registry serves a Bus: the
:class:`~upbus.core.subscriptions._manager.SubscriptionManager` keeps each
component's specs and wishes in its entry, and the bus keeps the component's
:class:`~upbus.core.delivery._router.Subscriber` there. A SubscriptionManager used
on its own makes a registry of its own.

Components are held weakly, so one that is garbage-collected leaves by itself. A
weakref callback can run at any bytecode, even in the middle of an update, so it
only appends the entry to a queue (the design invariant "weak references cannot
corrupt state"); :meth:`Registry.collect` drains the queue, and the manager calls
it at the start of every operation and before every send.

``id()`` values are reused as soon as an object is freed. An entry is found by its
component's id but belongs to the object only while its reference still points to
it, and each registration gets a token of its own, which outlives the id: the
quarantine counts its holders by token.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from upbus.core._errors import ComponentError

if TYPE_CHECKING:
    from upbus.core.delivery._buffer import Subscriber
    from upbus.core.subscriptions._specs import Spec, Wish

__all__ = ("Entry", "LeaveListener", "Registry")

_NONE: tuple[Wish, ...] = ()


class Entry(weakref.ref[Any]):
    """One registered component: the weak reference to it, and what is kept about it.

    Being the reference itself saves an object per component: an idle component
    costs only its bookkeeping. Compared by identity, never by the component's
    ``==`` or hash (a weak reference would otherwise delegate both to it).
    """

    __slots__ = ("key", "kind", "specs", "subscriber", "token", "wishes")
    token: int  # unique per registration; ids are not
    key: int  # id() of the component when it registered
    kind: str  # its class name, for the label
    specs: tuple[Spec, ...]
    #: Its wishes by channel, (public, private); set by the subscription manager.
    wishes: tuple[tuple[Wish, ...], tuple[Wish, ...]]
    #: Its buffer while a Bus delivers to it (:meth:`attach`), else ``None``.
    subscriber: Subscriber | None

    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__

    @property
    def label(self) -> str:
        """How logs and stats name the component, e.g. ``Chart@7f3a12c0``."""
        return f"{self.kind}@{self.key:x}"

    def attach(self, subscriber: Subscriber, starter: Callable[[Subscriber], None] | None) -> None:
        """Make ``subscriber`` the component's buffer.

        Its ``owner`` becomes this entry (the weak reference to the component), and
        ``starter``, if given, is called with it when an item reaches it idle (the
        bus starts the component's delivery task there).
        """
        subscriber.owner = self
        subscriber.starter = starter
        self.subscriber = subscriber

    def detach(self) -> Subscriber | None:
        """Take the component's buffer off this entry (it left the bus), if it had one."""
        subscriber, self.subscriber = self.subscriber, None
        return subscriber


LeaveListener = Callable[[Entry, str], None]
"""Called with an entry that left and why: ``"unregister"`` or ``"collected"``."""


class Registry:
    """The registered components, each by weak reference, and the dead ones not yet collected."""

    def __init__(self) -> None:
        self._by_key: dict[int, Entry] = {}
        self._by_token: dict[int, Entry] = {}
        # Weakref callbacks only enqueue the dead entry; one bound method serves every one.
        self._dead: deque[Entry] = deque()
        self._on_death = self._dead.append
        self._next_token = 0
        self._listeners: list[LeaveListener] = []

    def add_listener(self, listener: LeaveListener) -> None:
        """Call ``listener(entry, reason)`` for each entry that leaves, in the order added."""
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._by_token)

    def __iter__(self) -> Iterator[Entry]:
        """The entries in registration order (dead ones included until collected)."""
        return iter(self._by_token.values())

    @property
    def pending(self) -> int:
        """Dead components whose entries wait for :meth:`collect`."""
        return len(self._dead)

    def get(self, component: object) -> Entry | None:
        """``component``'s entry, or ``None``.

        Reads only, so the stall watch may call it from its thread.
        """
        entry = self._by_key.get(id(component))
        if entry is None or entry() is not component:
            # None, or the entry of a dead object whose id this one reuses.
            return None
        return entry

    def label_of(self, component: object) -> str | None:
        """The label of ``component`` if it is registered (reads only: any thread)."""
        entry = self.get(component)
        return None if entry is None else entry.label

    def add(self, component: object) -> Entry:
        """Make a new entry for ``component``, which has none.

        Raises :class:`~upbus.ComponentError` if it cannot be weakly referenced.
        """
        try:
            entry = Entry(component, self._on_death)
        except TypeError:
            raise ComponentError(
                f"{type(component).__name__} objects cannot be components: upbus holds "
                "components by weak reference (give the class a __weakref__ slot, or "
                "register an object of an ordinary class)"
            ) from None
        entry.token = self._next_token
        self._next_token += 1
        entry.key = id(component)
        entry.kind = type(component).__name__
        entry.specs = ()
        entry.wishes = (_NONE, _NONE)
        entry.subscriber = None
        self._by_key[entry.key] = entry
        self._by_token[entry.token] = entry
        return entry

    def remove(self, entry: Entry, reason: str = "unregister") -> None:
        """Forget ``entry`` and tell the listeners."""
        del self._by_token[entry.token]
        if self._by_key.get(entry.key) is entry:
            del self._by_key[entry.key]
        for listener in self._listeners:
            listener(entry, reason)

    def collect(self) -> int:
        """Remove the entries of garbage-collected components; return how many went."""
        collected = 0
        dead = self._dead
        by_token = self._by_token
        while dead:
            entry = dead.popleft()
            if by_token.get(entry.token) is entry:  # else it had unregistered first
                self.remove(entry, "collected")
                collected += 1
        return collected
