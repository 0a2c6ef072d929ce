"""Delivery: each message to exactly the subscribers that asked for it.

The receive loop calls :meth:`Router.deliver` once per socket read. For each
message it looks up the subscribers of its (type, code), narrows the message to
each one's own wish (orderbook depth trimmed, snapshot or realtime filtered, level
matched) and puts it into that subscriber's bounded buffer without awaiting, so a
slow or failing subscriber can never stall the receive loop or another subscriber
(invariant 8). It also keeps the latest message per key for late joiners.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import msgspec

from upbus.core.messages import Message, Orderbook
from upbus.core.specs import Mode, Wish

__all__ = ("ConnectionEvent", "Overflow", "Router", "Subscriber")

log = logging.getLogger("upbus.bus")

Overflow = Literal["conflate", "drop_oldest", "block"]
OVERFLOW_POLICIES: tuple[Overflow, ...] = ("conflate", "drop_oldest", "block")

_Key = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """A connection changed state: ``connected``, ``gap`` or ``reconnected``.

    It reaches every subscriber of the channel in order with the data: messages
    received after a gap come after the ``gap`` and ``reconnected`` events.
    """

    channel: str
    state: str
    detail: str
    type: str = "connection"


Item = Message | ConnectionEvent


class _Cell:
    """One buffered item; a conflating buffer replaces ``item`` in place."""

    __slots__ = ("item",)

    def __init__(self, item: Item) -> None:
        self.item = item


class Subscriber:
    """One component's bounded buffer and its overflow policy.

    ``conflate`` keeps only the newest message per (type, code) that the consumer
    has not taken yet (right for charts and book views; wrong for trades, where
    every message counts); ``drop_oldest`` keeps the newest ``capacity`` messages;
    ``block`` loses nothing: when its buffer is full the channel's receive loop
    waits for room after the current socket read (backpressure), which delays
    every subscriber of that channel, so use it only for consumers that keep up
    on average (recorders, storage). Heartbeats keep running meanwhile.
    """

    def __init__(self, label: str, capacity: int, policy: Overflow) -> None:
        _check(capacity, policy)
        self.label = label
        self.capacity = capacity
        self.policy = policy
        self.wishes: dict[_Key, list[Wish]] = {}
        self._buffer: deque[_Cell | Item] = deque()
        self._index: dict[object, _Cell] = {}
        self._ready: anyio.Event | None = None
        self._room: anyio.Event | None = None
        self.closed = False
        self.delivered = 0
        self.dropped = 0
        self.overflowed = 0
        self.failures = 0

    def configure(self, capacity: int, policy: Overflow) -> None:
        """Change the bound and the policy; what is buffered stays, in order."""
        _check(capacity, policy)
        if self.policy == "conflate" and policy != "conflate":
            self._index.clear()
        self.capacity = capacity
        self.policy = policy

    def put(self, item: Item) -> None:
        """Buffer ``item`` (never awaits)."""
        if self.policy == "conflate":
            if isinstance(item, ConnectionEvent):
                # Later data must not jump ahead of the event by replacing an older slot.
                self._index.clear()
            else:
                key = (item.type, item.code)
                cell = self._index.get(key)
                if cell is not None:
                    cell.item = item
                    self.dropped += 1
                    return
                cell = self._index[key] = _Cell(item)
                self._buffer.append(cell)
                self._wake()
                return
        elif len(self._buffer) >= self.capacity:
            if self.policy == "drop_oldest":
                self._buffer.popleft()
                self.dropped += 1
            else:
                self.overflowed += 1  # past capacity within one socket read
        # Only a conflating buffer replaces items in place; the others hold items bare.
        self._buffer.append(item)
        self._wake()

    def _wake(self) -> None:
        ready = self._ready
        if ready is not None:
            self._ready = None
            ready.set()

    def take(self) -> Item | None:
        """The oldest buffered item, or ``None`` when empty."""
        if not self._buffer:
            return None
        entry = self._buffer.popleft()
        room = self._room
        if room is not None and len(self._buffer) < self.capacity:
            self._room = None
            room.set()
        self.delivered += 1
        if not isinstance(entry, _Cell):
            return entry
        item = entry.item
        if not isinstance(item, ConnectionEvent):
            key = (item.type, item.code)
            if self._index.get(key) is entry:
                del self._index[key]
        return item

    def __len__(self) -> int:
        return len(self._buffer)

    async def get(self) -> Item:
        """Wait for the next item; raises ``anyio.EndOfStream`` once closed and drained."""
        while True:
            item = self.take()
            if item is not None:
                return item
            if self.closed:
                raise anyio.EndOfStream
            self._ready = anyio.Event()
            await self._ready.wait()

    @property
    def full(self) -> bool:
        return len(self._buffer) >= self.capacity

    async def wait_for_room(self) -> None:
        """Wait until the buffer is below capacity (or closed)."""
        while self.full and not self.closed:
            self._room = anyio.Event()
            await self._room.wait()

    def close(self) -> None:
        self.closed = True
        self._wake()
        if self._room is not None:
            self._room.set()

    async def __aiter__(self) -> AsyncIterator[Item]:
        while True:
            try:
                yield await self.get()
            except anyio.EndOfStream:
                return

    def stats(self) -> dict[str, Any]:
        return {
            "subscriber": self.label,
            "policy": self.policy,
            "capacity": self.capacity,
            "buffered": len(self._buffer),
            "delivered": self.delivered,
            "dropped": self.dropped,
            "overflowed": self.overflowed,
            "failures": self.failures,
        }


def _check(capacity: int, policy: str) -> None:
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity!r}")
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {policy!r}")


class Router:
    """Routes messages by (type, code) to subscribers and keeps the last value per key."""

    def __init__(self) -> None:
        self._routes: dict[_Key, list[Subscriber]] = {}
        self._last: dict[tuple[str, str | None, float], Message] = {}
        self._blocking: list[Subscriber] = []
        self.unrouted = 0

    def add(self, subscriber: Subscriber, wishes: Iterable[Wish]) -> None:
        """Route ``wishes`` to ``subscriber`` (replacing what it had) and replay cached values."""
        self.remove(subscriber)
        by_key: dict[_Key, list[Wish]] = {}
        for wish in wishes:
            by_key.setdefault((wish.type, wish.code), []).append(wish)
        for kind, code in list(by_key):
            if code is not None and (kind, None) in by_key:
                del by_key[(kind, code)]  # the whole account already covers this market
        subscriber.wishes = by_key
        if subscriber.policy == "block" and subscriber not in self._blocking:
            self._blocking.append(subscriber)
        for key in by_key:
            self._routes.setdefault(key, []).append(subscriber)
        for (kind, code), key_wishes in by_key.items():
            for wish in key_wishes:
                cached = self._last.get((kind, code, wish.level))
                if cached is None or wish.mode is Mode.REALTIME:
                    continue
                # The cached message is the current state, whatever its stream
                # type: a snapshot-only joiner gets it as its snapshot.
                narrowed = _narrow(cached, Wish(kind, code, wish.level, wish.depth), {})
                if narrowed is not None:
                    subscriber.put(narrowed)
                    break

    def remove(self, subscriber: Subscriber) -> None:
        for key in subscriber.wishes:
            subscribers = self._routes.get(key)
            if subscribers is not None and subscriber in subscribers:
                subscribers.remove(subscriber)
                if not subscribers:
                    del self._routes[key]
        subscriber.wishes = {}
        if subscriber in self._blocking:
            self._blocking.remove(subscriber)

    async def backpressure(self) -> None:
        """Wait while a lossless (``block``) subscriber's buffer is full."""
        for subscriber in self._blocking:
            if subscriber.full:
                await subscriber.wait_for_room()

    def broadcast(self, channel_types: frozenset[str], event: ConnectionEvent) -> None:
        """Put ``event`` into the buffer of every subscriber of the channel's types."""
        seen: set[int] = set()
        for (kind, _code), subscribers in self._routes.items():
            if kind in channel_types:
                for subscriber in subscribers:
                    if id(subscriber) not in seen:
                        seen.add(id(subscriber))
                        subscriber.put(event)

    def deliver(self, messages: list[Message]) -> None:
        """The per-message hot path: route, narrow, buffer. Never awaits."""
        routes = self._routes
        last = self._last
        for message in messages:
            kind = message.type
            code: str | None = message.code
            level = message.level if type(message) is Orderbook else 0
            last[(kind, code, level)] = message
            subscribers = routes.get((kind, code))
            if kind == "myOrder" or kind == "myAsset":
                # Wishes for the whole account have no code.
                everywhere = routes.get((kind, None))
                if everywhere is not None:
                    subscribers = everywhere + subscribers if subscribers else everywhere
                if kind == "myAsset":
                    last[(kind, None, 0)] = message
            if subscribers is None:
                self.unrouted += 1
                continue
            is_book = type(message) is Orderbook
            trimmed: dict[int, Message] | None = None
            for subscriber in subscribers:
                wishes = subscriber.wishes.get((kind, code)) or subscriber.wishes[(kind, None)]
                if not is_book and len(wishes) == 1 and wishes[0].mode is Mode.BOTH:
                    subscriber.put(message)  # the common case: it wants this as it is
                    continue
                if trimmed is None:
                    trimmed = {}  # trimmed books shared by subscribers of one depth
                for wish in wishes:
                    narrowed = _narrow(message, wish, trimmed)
                    if narrowed is not None:
                        subscriber.put(narrowed)
                        break

    def stats(self) -> dict[str, Any]:
        return {"routes": len(self._routes), "cached": len(self._last), "unrouted": self.unrouted}


def _narrow(message: Message, wish: Wish, trimmed: dict[int, Message]) -> Message | None:
    """``message`` as ``wish`` wants it, or ``None`` if it does not want it at all."""
    mode = wish.mode
    if mode is not Mode.BOTH:
        snapshot = message.stream_type == "SNAPSHOT"
        if snapshot != (mode is Mode.SNAPSHOT):
            return None
    if type(message) is not Orderbook:
        return message
    if not math.isclose(message.level, wish.level):
        return None
    depth = wish.depth or 30
    units = message.orderbook_units
    if len(units) <= depth:
        return message
    book = trimmed.get(depth)
    if book is None:
        kept = units[:depth]
        # Totals are sums over the units delivered, as the exchange computes them.
        book = trimmed[depth] = msgspec.structs.replace(
            message,
            orderbook_units=kept,
            total_ask_size=sum(unit.ask_size for unit in kept),
            total_bid_size=sum(unit.bid_size for unit in kept),
        )
    return book
