"""Delivery: each message to exactly the subscribers that asked for it.

The receive loop calls :meth:`Router.deliver` once per socket read. For each
message it looks up the subscribers of its (type, code), narrows the message to
each one's own wish (orderbook depth trimmed, snapshot or realtime filtered, level
matched) and puts it into that subscriber's bounded buffer without awaiting, so a
slow or failing subscriber can never stall the receive loop or another subscriber
(invariant 8 in docs/architecture.md: a slow consumer never stalls another). It
also keeps the latest message per key for late joiners; the buffers are in
:mod:`upbus.core.delivery._buffer`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from types import MethodType
from typing import Any, cast

import msgspec

from upbus.core.delivery._buffer import (
    DEFAULT_CAPACITY,
    DEFAULT_OVERFLOW,
    Item,
    Overflow,
    RouteKey,
    Subscriber,
    check_overflow,
)
from upbus.core.delivery._buffer import Key as _Key
from upbus.core.delivery._events import BusEvent, ConnectionEvent, Dropped
from upbus.core.subscriptions._specs import Mode, Wish
from upbus.core.wire._messages import Message, MyAsset, MyOrder, Orderbook

# The buffer's names are re-exported while modules that imported them from here
# move to upbus.core.delivery._buffer.
__all__ = (
    "DEFAULT_CAPACITY",
    "DEFAULT_OVERFLOW",
    "BusEvent",
    "ConnectionEvent",
    "Dropped",
    "Item",
    "Overflow",
    "Router",
    "Subscriber",
    "check_overflow",
)

log = logging.getLogger("upbus.bus")

# Their wishes may cover the whole account (no code): see Router._deliver_account.
_ACCOUNT_CLASSES = frozenset({MyOrder, MyAsset})


class _Route(RouteKey):
    """The subscribers of one (type, code), and its latest message."""

    __slots__ = ("books", "last", "narrowing", "offers")

    def __init__(self) -> None:
        # Subscribers that want every message of the key as it is: just their offer().
        self.offers: list[Callable[[_Route, Message], None]] = []
        # The others, with their wishes, to narrow each message (books, modes, levels).
        self.narrowing: list[_Narrowing] = []
        # The last-value cache: the latest message, or for books the latest per level.
        self.last: Message | None = None
        self.books: dict[float, Orderbook] = {}

    def __bool__(self) -> bool:
        return bool(self.offers or self.narrowing)

    def subscribers(self) -> list[Subscriber]:
        # Each offer is a subscriber's bound method.
        owners = [_offer_owner(offer) for offer in self.offers]
        return owners + [subscriber for subscriber, _wishes, _offer in self.narrowing]

    def cached(self, level: float) -> Message | None:
        return self.books.get(level) if self.books else self.last


# A subscriber whose wishes need narrowing, with them and its offer method.
_Narrowing = tuple[Subscriber, tuple[Wish, ...], Callable[[_Route, Message], None]]


def _offer_owner(offer: Callable[[_Route, Message], None]) -> Subscriber:
    # Each offer is a subscriber's bound method.
    return cast(Subscriber, cast(MethodType, offer).__self__)


class Router:
    """Routes messages by (type, code) to subscribers and keeps the last value per key.

    The routes are looked up by type, then by code: a message's type is one shared
    string (cheap to hash and compare), and no key tuple is built per message.
    The cached last value lives in the route, so it goes when the key's last
    subscriber does (a new one is subscribed afresh, and gets a fresh snapshot).
    """

    def __init__(self) -> None:
        self._routes: dict[str, dict[str | None, _Route]] = {}
        self._blocking: list[Subscriber] = []
        self.unrouted = 0

    def add(self, subscriber: Subscriber, wishes: Iterable[Wish]) -> None:
        """Route ``wishes`` to ``subscriber`` (replacing what it had) and replay cached values.

        Only a key the subscriber gains (or wants differently) is replayed: one it
        keeps as it was already had that message, and a trade consumer would count
        it twice.
        """
        before = dict(subscriber.wishes)
        self.remove(subscriber)
        by_key: dict[_Key, list[Wish]] = {}
        for wish in wishes:
            by_key.setdefault((wish.type, wish.code), []).append(wish)
        for kind, code in list(by_key):
            if code is not None and (kind, None) in by_key:
                del by_key[(kind, code)]  # the whole account already covers this market
        subscriber.wishes = tuple((key, tuple(key_wishes)) for key, key_wishes in by_key.items())
        if subscriber.policy == "block":
            self._blocking.append(subscriber)
        for (kind, code), key_wishes in subscriber.wishes:
            by_code = self._routes.setdefault(kind, {})
            route = by_code.get(code)
            fresh = route is None
            if route is None:
                route = by_code[code] = _Route()
            offer = subscriber.offer_for(kind)
            only = key_wishes[0]
            if len(key_wishes) == 1 and only.mode is Mode.BOTH and only.type != "orderbook":
                route.offers.append(offer)
            else:
                route.narrowing.append((subscriber, key_wishes, offer))
            if not fresh and before.get((kind, code)) != key_wishes:
                self._replay(subscriber, route, key_wishes)

    def _replay(self, subscriber: Subscriber, route: _Route, wishes: tuple[Wish, ...]) -> None:
        # A late joiner to a live key causes no request: it gets the cached value.
        for wish in wishes:
            cached = route.cached(wish.level)
            if cached is None or wish.mode is Mode.REALTIME:
                continue
            # The cached message is the current state, whatever its stream type:
            # a snapshot-only joiner gets it as its snapshot.
            plain = Wish(wish.type, wish.code, wish.level, wish.depth)
            narrowed = _narrow(cached, plain, None)
            if narrowed is not None:
                subscriber.offer(route, narrowed)
                return

    def remove(self, subscriber: Subscriber) -> None:
        for (kind, code), _wishes in subscriber.wishes:
            by_code = self._routes.get(kind)
            route = None if by_code is None else by_code.get(code)
            if by_code is None or route is None:
                continue
            # By owner, not by method: the policy, and so the method, may have changed.
            route.offers = [o for o in route.offers if _offer_owner(o) is not subscriber]
            route.narrowing = [entry for entry in route.narrowing if entry[0] is not subscriber]
            if not route:
                del by_code[code]
                if not by_code:
                    del self._routes[kind]
        subscriber.wishes = ()
        if subscriber in self._blocking:
            self._blocking.remove(subscriber)

    async def backpressure(self) -> None:
        """Wait while a lossless (``block``) subscriber's buffer is full."""
        for subscriber in self._blocking:
            if subscriber.full:
                await subscriber.wait_for_room()

    def broadcast(self, channel_types: frozenset[str], event: ConnectionEvent) -> None:
        """Put ``event`` into the buffer of every subscriber of the channel's types."""
        seen: set[Subscriber] = set()
        for kind, by_code in self._routes.items():
            if kind in channel_types:
                for route in by_code.values():
                    for subscriber in route.subscribers():
                        if subscriber not in seen:
                            seen.add(subscriber)
                            subscriber.put(event)

    def deliver(self, messages: list[Message]) -> None:
        """The per-message hot path: route, narrow, buffer. Never awaits."""
        routes = self._routes
        for message in messages:
            by_code = routes.get(message.type)
            route = None if by_code is None else by_code.get(message.code)
            # isinstance, not casts: typing.cast is a call, and the hot path pays it.
            if isinstance(message, Orderbook):
                self._deliver_book(message, route)
            elif type(message) in _ACCOUNT_CLASSES:
                self._deliver_account(message, by_code, route)
            elif route is None:
                self.unrouted += 1
            else:
                route.last = message
                for offer in route.offers:
                    offer(route, message)
                if route.narrowing:
                    _offer_narrowed(route, message, None)

    def _deliver_book(self, message: Orderbook, route: _Route | None) -> None:
        if route is None:
            self.unrouted += 1
            return
        route.books[message.level] = message
        _offer_narrowed(route, message, {})

    def _deliver_account(
        self, message: Message, by_code: dict[str | None, _Route] | None, route: _Route | None
    ) -> None:
        # Wishes for the whole account have no code.
        everywhere = None if by_code is None else by_code.get(None)
        if route is None and everywhere is None:
            self.unrouted += 1
            return
        for found in (route, everywhere):
            if found is not None:
                found.last = message
                for offer in found.offers:
                    offer(found, message)
                if found.narrowing:
                    _offer_narrowed(found, message, None)

    def stats(self) -> dict[str, Any]:
        routes = [route for by_code in self._routes.values() for route in by_code.values()]
        cached = sum(len(route.books) or route.last is not None for route in routes)
        return {"routes": len(routes), "cached": cached, "unrouted": self.unrouted}


def _offer_narrowed(route: _Route, message: Message, trimmed: dict[int, Message] | None) -> None:
    for _subscriber, wishes, offer in route.narrowing:
        for wish in wishes:
            narrowed = _narrow(message, wish, trimmed)
            if narrowed is not None:
                offer(route, narrowed)
                break


def _narrow(message: Message, wish: Wish, trimmed: dict[int, Message] | None) -> Message | None:
    """``message`` as ``wish`` wants it, or ``None`` if it does not want it at all.

    ``trimmed`` holds the books already cut to each depth for this message.
    """
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
    book = None if trimmed is None else trimmed.get(depth)
    if book is None:
        kept = units[:depth]
        # Totals are sums over the units delivered, as the exchange computes them.
        book = msgspec.structs.replace(
            message,
            orderbook_units=kept,
            total_ask_size=sum(unit.ask_size for unit in kept),
            total_bid_size=sum(unit.bid_size for unit in kept),
        )
        if trimmed is not None:
            trimmed[depth] = book
    return book
