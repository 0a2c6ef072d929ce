"""A component's bounded buffer and its overflow policy.

The router offers each message to a :class:`Subscriber` without awaiting; the
subscriber keeps it, conflates it with a waiting one of the same key, or drops the
oldest, as its policy says, so a slow or failing consumer never stalls the receive
loop or another consumer (invariant 8 in docs/architecture.md: a slow consumer
never stalls another). The component's delivery task or iterator takes from it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, cast

import anyio

from upbus.core._errors import OptionError
from upbus.core.delivery._events import BusEvent, Dropped
from upbus.core.subscriptions._specs import PRIVATE_TYPES, PUBLIC_TYPES, Wish
from upbus.core.wire._messages import Message

__all__ = (
    "DEFAULT_CAPACITY",
    "DEFAULT_OVERFLOW",
    "OVERFLOW_POLICIES",
    "STATE_TYPES",
    "Item",
    "Key",
    "Overflow",
    "RouteKey",
    "Subscriber",
    "check_overflow",
)

Overflow = Literal["auto", "conflate", "drop_oldest", "block"]
OVERFLOW_POLICIES: tuple[Overflow, ...] = ("auto", "conflate", "drop_oldest", "block")
DEFAULT_OVERFLOW: Overflow = "auto"
DEFAULT_CAPACITY = 4096

# What the default policy ("auto") does with each type: the newest state wins for
# state streams; every trade counts, so a full buffer drops the oldest and says so;
# an order or asset event is money, so it is never dropped.
STATE_TYPES: frozenset[str] = PUBLIC_TYPES - {"trade"}
_ALL_TYPES = PUBLIC_TYPES | PRIVATE_TYPES
_CONFLATE, _DROP, _KEEP = "conflate", "drop", "keep"

_Key = tuple[str, str | None]
Key = _Key
"""A message's (type, code): how :meth:`Subscriber.put` keys a conflated message."""


class RouteKey:
    """What the router keys a conflated message by in place of its (type, code).

    The router's per-key route derives from it, so a buffer tells keys from
    messages with one ``isinstance`` and needs nothing from the router.
    """

    __slots__ = ()


Item = Message | BusEvent
"""What a component's stream carries: exchange messages and the bus's events."""


def _release(waiter: asyncio.Future[None] | anyio.Event) -> None:
    if isinstance(waiter, asyncio.Future):
        if not waiter.done():
            waiter.set_result(None)
    else:
        waiter.set()


def _in_asyncio_task() -> bool:
    try:
        return asyncio.current_task() is not None
    except RuntimeError:  # no asyncio loop in this thread: trio
        return False


class Subscriber:
    """One component's bounded buffer and its overflow policy.

    The policy says what happens when the component falls behind:

    - ``auto`` (the default) decides by type: ``ticker``, ``orderbook`` and
      ``candle.*`` are state streams and conflate (the newest message per
      (type, code) wins); ``trade`` is never conflated: past ``capacity`` the
      oldest trade is dropped and a :class:`~upbus.Dropped` event says so;
      ``myOrder`` and ``myAsset`` are never dropped (an order event is money), and
      a backlog past ``capacity`` is counted in ``overflowed`` and logged.
    - ``conflate``: the newest message per (type, code) for every type.
    - ``drop_oldest``: keep the newest ``capacity`` items; each loss is reported
      with a :class:`~upbus.Dropped` event before the next item taken.
    - ``block``: lose nothing; when the buffer is full the channel's receive loop
      waits for room after the current socket read (backpressure), which delays
      every subscriber of that channel: only for consumers that keep up on average
      (recorders, storage). Heartbeats keep running meanwhile.
    """

    # Slots, and a buffer made on the first message: an idle subscriber is small.
    __slots__ = (
        "__weakref__",
        "_buffer",
        "_drop_kinds",
        "_index",
        "_lost",
        "_room",
        "_unreported",
        "_waiter",
        "capacity",
        "closed",
        "conflated",
        "delivered",
        "dropped",
        "failures",
        "label",
        "overflowed",
        "owner",
        "policy",
        "starter",
        "wishes",
    )

    def __init__(self, label: str, capacity: int, policy: Overflow) -> None:
        check_overflow(capacity, policy)
        self.label = label
        self.capacity = capacity
        self.policy = policy
        # The types whose oldest message may be dropped when the buffer is full.
        self._drop_kinds = _drop_kinds(policy)
        #: (type, code) and the wishes for it, per key this subscriber is routed on.
        self.wishes: tuple[tuple[_Key, tuple[Wish, ...]], ...] = ()
        # Items; for a conflated type the buffer holds a key standing for a
        # message's (type, code) instead, and the newest message of each waiting
        # key is in _index. The router's keys are its routes; put() uses the
        # (type, code) tuple.
        self._buffer: deque[Item | RouteKey | _Key] | None = None
        self._index: dict[RouteKey | _Key, Message] = {}
        # Dropped since the component last took an item: (type, code) -> count.
        self._lost: dict[_Key, int] | None = None
        # Dropped since the last warning in the log: (type, code) -> count.
        self._unreported: dict[_Key, int] | None = None
        self._waiter: asyncio.Future[None] | anyio.Event | None = None
        self._room: anyio.Event | None = None
        #: The component this buffer serves: a weak reference (its registry entry),
        #: set with ``starter`` by :meth:`~upbus.core._registry.Entry.attach`.
        self.owner: weakref.ref[Any] | None = None
        #: Called with this subscriber when an item arrives and no consumer waits
        #: for one, then cleared (the delivery task sets it again when it ends): a
        #: component's delivery task runs only while there is work.
        self.starter: Callable[[Subscriber], None] | None = None
        self.closed = False
        self.delivered = 0
        self.conflated = 0
        self.dropped = 0
        self.overflowed = 0
        self.failures = 0

    def configure(self, capacity: int, policy: Overflow) -> None:
        """Change the bound and the policy; what is buffered stays, in order.

        The router must be told afterwards (:meth:`Router.add`): it chooses how
        to offer each type by the policy.
        """
        check_overflow(capacity, policy)
        if self._index and policy != self.policy:
            self._freeze()
        self.capacity = capacity
        self.policy = policy
        self._drop_kinds = _drop_kinds(policy)

    def offer_for(self, kind: str) -> Callable[[RouteKey | _Key, Message], None]:
        """The method that buffers messages of type ``kind`` under this policy."""
        how = self._how(kind)
        if how == _CONFLATE:
            return self._offer_conflated
        if how == _DROP:
            return self._offer_droppable
        return self._offer_kept

    def _how(self, kind: str) -> str:
        policy = self.policy
        if policy == "auto":
            if kind in STATE_TYPES:
                return _CONFLATE
            return _DROP if kind == "trade" else _KEEP
        if policy == "conflate":
            return _CONFLATE
        return _DROP if policy == "drop_oldest" else _KEEP

    def put(self, item: Item) -> None:
        """Buffer ``item`` (never awaits)."""
        if isinstance(item, BusEvent):
            if self._index:
                # Later data must not jump ahead of the event by replacing a message
                # waiting before it: those become plain entries, no longer replaceable.
                self._freeze()
            self._append(item)
        else:
            self.offer((item.type, item.code), item)

    def offer(self, key: RouteKey | _Key, message: Message) -> None:
        """Buffer ``message``; ``key`` stands for its (type, code)."""
        self.offer_for(message.type)(key, message)

    # The router calls one of these three per message and subscriber: the hot path.

    def _offer_conflated(self, key: RouteKey | _Key, message: Message) -> None:
        index = self._index
        if key in index:
            index[key] = message  # keeps its place in the queue
            self.conflated += 1
            return
        index[key] = message
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = deque()
        buffer.append(key)
        if len(buffer) == 1:
            self._wake()  # only the first item wakes: with more, it was woken already

    def _offer_droppable(self, key: RouteKey | _Key, message: Message) -> None:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = deque()
        elif len(buffer) >= self.capacity:
            self._drop_oldest(buffer)
        buffer.append(message)
        if len(buffer) == 1:
            self._wake()  # only the first item wakes: with more, it was woken already

    def _offer_kept(self, key: RouteKey | _Key, message: Message) -> None:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = deque()
        elif len(buffer) >= self.capacity:
            # Kept all the same: for block, past capacity within one socket read;
            # for orders under auto, a backlog the bus warns about.
            self.overflowed += 1
        buffer.append(message)
        if len(buffer) == 1:
            self._wake()  # only the first item wakes: with more, it was woken already

    def _drop_oldest(self, buffer: deque[Item | RouteKey | _Key]) -> None:
        # The oldest droppable message: never an event, never a conflated key (at
        # most one per key, so bounded anyway), never an order event under auto.
        kinds = self._drop_kinds
        for position, entry in enumerate(buffer):
            kind = getattr(entry, "type", None)
            if kind in kinds and not isinstance(entry, BusEvent):
                del buffer[position]
                self._count_loss(cast(Message, entry))
                return

    def _count_loss(self, message: Message) -> None:
        self.dropped += 1
        key = (message.type, message.code)
        if self._lost is None:
            self._lost = {}
        self._lost[key] = self._lost.get(key, 0) + 1
        if self._unreported is None:
            self._unreported = {}
        self._unreported[key] = self._unreported.get(key, 0) + 1

    def _freeze(self) -> None:
        # Replace each waiting key by its message: the buffer's order is kept.
        index = self._index
        if self._buffer:
            self._buffer = deque(_unkey(index, entry) for entry in self._buffer)
        index.clear()

    def _append(self, entry: Item | RouteKey | _Key) -> None:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = deque()
        buffer.append(entry)
        if len(buffer) == 1:
            # Only the first item wakes: with more, the consumer was woken already.
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            _release(waiter)
        elif self.starter is not None:
            starter, self.starter = self.starter, None
            starter(self)

    def take(self) -> Item | None:
        """The oldest buffered item, or ``None`` when empty.

        After a loss, a :class:`~upbus.Dropped` event comes first.
        """
        buffer = self._buffer
        if not buffer:
            return None
        if self._lost is not None:
            return self._take_lost()
        entry = buffer.popleft()
        if self._room is not None:
            self._release_room()
        self.delivered += 1
        if isinstance(entry, _KEY_CLASSES):  # a conflated type's key: its newest message
            return self._index.pop(entry)
        return entry

    def take_all(self) -> list[Item]:
        """Every buffered item, oldest first (empty when nothing is buffered)."""
        buffer = self._buffer
        if not buffer:
            return []
        if self._index:
            index = self._index
            items = [_unkey(index, entry) for entry in buffer]
            index.clear()
        else:
            items = cast(list[Item], list(buffer))
        buffer.clear()
        self.delivered += len(items)
        if self._lost is not None:
            items.insert(0, self._take_lost())
        if self._room is not None:
            self._release_room()
        return items

    def _take_lost(self) -> Dropped:
        lost, self._lost = self._lost or {}, None
        keys = tuple((kind, code, count) for (kind, code), count in lost.items())
        return Dropped(sum(lost.values()), keys)

    def take_unreported(self) -> dict[_Key, int]:
        """What was dropped since the last call, per (type, code): for the bus's warnings."""
        unreported, self._unreported = self._unreported or {}, None
        return unreported

    def _release_room(self) -> None:
        if self._room is not None and len(self) < self.capacity:
            room, self._room = self._room, None
            room.set()

    def __len__(self) -> int:
        buffer = self._buffer
        return 0 if buffer is None else len(buffer)

    async def get(self) -> Item:
        """Wait for the next item; raises ``anyio.EndOfStream`` once closed and drained."""
        while True:
            item = self.take()
            if item is not None:
                return item
            if self.closed:
                raise anyio.EndOfStream
            await self.wait()

    async def wait(self) -> None:
        """Wait until an item arrives or the buffer is closed (one waiter at a time)."""
        if self._buffer or self.closed:
            return
        if _in_asyncio_task():
            # A bare future is several times cheaper than anyio.Event, and this is
            # paid on every wakeup of every component.
            future = asyncio.get_running_loop().create_future()
            self._waiter = future
            try:
                await future
            finally:
                if self._waiter is future:
                    self._waiter = None
        else:
            event = self._waiter = anyio.Event()
            try:
                await event.wait()
            finally:
                if self._waiter is event:
                    self._waiter = None

    @property
    def waiting(self) -> bool:
        """Whether a consumer is parked in :meth:`wait`."""
        return self._waiter is not None

    def wake(self) -> None:
        """Release a consumer parked in :meth:`wait`, even with nothing buffered."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            _release(waiter)

    @property
    def full(self) -> bool:
        return len(self) >= self.capacity

    async def wait_for_room(self) -> None:
        """Wait until the buffer is below capacity (or closed)."""
        while self.full and not self.closed:
            self._room = anyio.Event()
            await self._room.wait()

    def close(self) -> None:
        self.closed = True
        self.starter = None
        self._wake()
        if self._room is not None:
            self._room.set()

    async def __aiter__(self) -> AsyncIterator[Item]:
        # get() inlined: no coroutine per item while items are waiting.
        take = self.take
        while True:
            item = take()
            if item is not None:
                yield item
            elif self.closed:
                return
            else:
                await self.wait()

    async def batches(self) -> AsyncIterator[list[Item]]:
        """Iterate lists of items: each time, everything buffered (never empty).

        For consumers that handle items in bulk (a recorder writing rows): one
        wakeup and one call hand over everything that arrived meanwhile. Items in
        a list already taken are no longer conflated or dropped; a ``block``
        buffer makes room for the next ones as soon as a list is taken.
        """
        while True:
            items = self.take_all()
            if items:
                yield items
            elif self.closed:
                return
            else:
                await self.wait()

    def stats(self) -> dict[str, Any]:
        return {
            "subscriber": self.label,
            "policy": self.policy,
            "capacity": self.capacity,
            "buffered": len(self),
            "delivered": self.delivered,
            "conflated": self.conflated,
            "dropped": self.dropped,
            "overflowed": self.overflowed,
            "failures": self.failures,
        }


def _drop_kinds(policy: str) -> frozenset[str]:
    if policy == "drop_oldest":
        return _ALL_TYPES
    return frozenset({"trade"}) if policy == "auto" else frozenset()


def check_overflow(capacity: object, policy: object) -> None:
    """Raise :class:`OptionError` (a ``ValueError``) naming what is wrong with a buffer's
    capacity or policy."""
    if type(capacity) is not int or capacity < 1:
        raise OptionError(f"capacity must be a whole number >= 1, got {capacity!r}")
    if policy not in OVERFLOW_POLICIES:
        raise OptionError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {policy!r}")


# What a conflating buffer may hold in place of a message.
_KEY_CLASSES = (tuple, RouteKey)


def _unkey(index: dict[RouteKey | _Key, Message], entry: Item | RouteKey | _Key) -> Item:
    if isinstance(entry, _KEY_CLASSES):
        return index[entry]
    return entry
