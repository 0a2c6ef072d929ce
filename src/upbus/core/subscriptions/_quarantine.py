"""Finding the wishes behind a refused request, so the rest of the channel goes on.

The exchange answers a request it cannot take (``WRONG_FORMAT``, ``INVALID_PARAM``,
``NO_CODES``, ``NO_TYPE``) with one error frame and closes the connection
(docs/protocol.md, "Errors"). Re-sending the same state after the reconnect would be
refused again, forever, and every component of the channel would starve. Validation
(:mod:`upbus.core.subscriptions._specs`) refuses what it can before anything is registered; this
module handles what the exchange refuses anyway.

The unit is a *key*: (type, code, level), one merge group
(:mod:`upbus.core.subscriptions._merge`). :class:`RequestTracker` remembers the keys of the last
request the exchange accepted. When a request is refused, its *suspects* are its keys
that were not in that accepted state. One suspect is quarantined; several are
bisected: half of them is held back and the other half goes out on the next
connection with the accepted state, so each refusal narrows the search and each
acceptance clears a part (the held half is tried after an acceptance). With no
accepted state yet, every key is a suspect. Every attempt goes through the normal
connect limiter and reconnect path.

The exclusion itself lives in :class:`~upbus.core.subscriptions._manager.SubscriptionManager`:
quarantined keys stay out of the merged state until every component that holds them
has unregistered or re-registered without them.

A request counts as accepted when a data message arrives for a key it added to the
connection (proof: the exchange serves it), or when it has stood for a while on a
connection without an error (the connection's owner decides how long).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from upbus.core._errors import OptionError
from upbus.core.subscriptions._specs import Wish
from upbus.core.subscriptions._state import WireEntry

__all__ = (
    "REQUEST_ERRORS",
    "Key",
    "RequestTracker",
    "Verdict",
    "describe",
    "entry_keys",
    "wish_key",
)

Key = tuple[str, str | None, float]
"""(type, code, level): one merge group; ``code`` is ``None`` for a whole-account type."""

REQUEST_ERRORS: Final = frozenset({"WRONG_FORMAT", "INVALID_PARAM", "NO_CODES", "NO_TYPE"})
"""Error names that refuse a request's content (docs/protocol.md, "Errors").

Not here: rate limiting and bans (the request was fine, its timing was not),
``INVALID_AUTH`` (the connection, not the request), and ``NO_TICKET`` (upbus always
sends a ticket, so no wish can cause it).
"""


def wish_key(wish: Wish) -> Key:
    """The key of ``wish``: its merge group."""
    return (wish.type, wish.code, wish.level)


def entry_keys(entries: Iterable[WireEntry]) -> frozenset[Key]:
    """The keys a request made of ``entries`` carries (depth suffixes removed)."""
    keys: set[Key] = set()
    for entry in entries:
        if entry.codes is None:
            keys.add((entry.type, None, entry.level))
        else:
            keys.update((entry.type, code.partition(".")[0], entry.level) for code in entry.codes)
    return frozenset(keys)


def describe(key: Key) -> str:
    """A key for people: ``ticker KRW-BTC``, ``orderbook KRW-BTC level 10``, ``myAsset``."""
    kind, code, level = key
    text = kind if code is None else f"{kind} {code}"
    return f"{text} level {level:g}" if level else text


def key_order(key: Key) -> tuple[str, str, float]:
    """A total order on keys (``None`` codes first), so bisection is deterministic."""
    kind, code, level = key
    return (kind, code or "", level)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do next: quarantine keys found bad, hold suspects back, release some.

    ``suspects`` are the keys a refused request added to the last accepted state
    (empty for a step taken after an acceptance); ``detail`` is the refusal's.
    """

    quarantine: frozenset[Key] = frozenset()
    hold: frozenset[Key] = frozenset()
    release: frozenset[Key] = frozenset()
    suspects: frozenset[Key] = frozenset()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Request:
    id: int
    keys: frozenset[Key]
    proof: frozenset[tuple[str, str]]  # (type, code) of data that shows it was accepted
    any_code: frozenset[str]  # types whose every message shows it (myOrder everywhere)


@dataclass(slots=True, eq=False)
class _Block:
    """Suspects held back together, to be tried together."""

    keys: frozenset[Key]
    detail: str
    bad: bool = False  # known to hold a refused key: its sibling half was accepted


class RequestTracker:
    """One channel's requests: which the exchange accepted, and what a refusal means.

    Pure bookkeeping, no I/O and no clock; the connection's owner reports what
    happens: :meth:`connected`, :meth:`sent`, :meth:`witness` (data arrived),
    :meth:`confirm` (a request stood long enough), :meth:`rejected`, :meth:`forget`;
    after an acceptance it asks :meth:`next_step` which held suspects to try next.

    The search is a bisection over a stack of held blocks. A refused request's
    suspects are split: the first half stays in the state, the second is held as a
    block. If the first half is accepted, the held half must hold the refused key,
    so it is split in turn when its time comes (one key left: quarantined without
    another refusal); if the first half is refused too, it is split again. After
    each acceptance the most recently held block is tried next.

    :param unattributed_limit: refusals in a row that no new key explains (the
        refused request carried only accepted keys) before the accepted state is
        no longer trusted: the next refusal then suspects every key. The exchange
        may have changed its mind about a key, and a stale accepted state must not
        make the same refused request go out forever.
    """

    def __init__(self, *, unattributed_limit: int = 3) -> None:
        if unattributed_limit < 1:
            raise OptionError(f"unattributed_limit must be >= 1, got {unattributed_limit!r}")
        self.good: frozenset[Key] = frozenset()
        self._limit = unattributed_limit
        self._pending: list[_Request] = []
        self._previous: frozenset[Key] = frozenset()
        self._next_id = 0
        self._unattributed = 0
        self._blocks: list[_Block] = []
        # The half tried after a split, and the block of the other half: if the
        # tried half is accepted, the other half holds the refused key.
        self._probe: tuple[frozenset[Key], _Block] | None = None

    @property
    def waiting(self) -> bool:
        """Whether a data message could accept a request in flight (see :meth:`witness`)."""
        return any(request.proof for request in self._pending)

    @property
    def held(self) -> frozenset[Key]:
        """Every suspect held back, over all blocks."""
        return frozenset[Key]().union(*(block.keys for block in self._blocks))

    def connected(self) -> None:
        """A new connection: it has no subscription, and no request is in flight on it."""
        self._pending.clear()
        self._previous = frozenset()

    def sent(self, keys: frozenset[Key]) -> int:
        """A request carrying ``keys`` went out; return its id (for :meth:`confirm`)."""
        self._next_id += 1
        new = keys - self._previous
        proof = frozenset((kind, code or "") for kind, code, _ in new)
        any_code = frozenset(kind for kind, code, _ in new if code is None)
        self._pending.append(_Request(self._next_id, keys, proof, any_code))
        self._previous = keys
        return self._next_id

    def witness(self, kind: str, code: str) -> bool:
        """A data message of ``(kind, code)`` arrived; return whether it accepted a request.

        Only a key that a request added to the connection proves it: frames of the
        replaced set may still arrive just after a new request (docs/protocol.md,
        "Requests": each request replaces the connection's whole subscription set).
        """
        pending = self._pending
        for index in range(len(pending) - 1, -1, -1):
            request = pending[index]
            if (kind, code) in request.proof or kind in request.any_code:
                self._accept(index)
                return True
        return False

    def confirm(self, request: int) -> bool:
        """Request ``request`` stood without an error; return whether it was still pending."""
        for index, pending in enumerate(self._pending):
            if pending.id == request:
                self._accept(index)
                return True
        return False

    def _accept(self, index: int) -> None:
        # The exchange handles requests in order: the earlier ones were accepted too,
        # and were replaced by this one.
        self.good = self._pending[index].keys
        del self._pending[: index + 1]
        self._unattributed = 0
        probe, self._probe = self._probe, None
        if probe is not None:
            tried, other = probe
            if tried <= self.good:
                other.bad = True

    def forget(self) -> None:
        """The connection ends for a reason that says nothing about its requests."""
        self._pending.clear()

    def rejected(self, detail: str = "") -> Verdict | None:
        """The exchange refused a request; return what to do, or None if no key is to blame.

        The refused request is one of those in flight on this connection (the first
        the exchange could not take; it ignores the rest), so every key they added
        to the accepted state is a suspect.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return None  # nothing in flight: the error is not about a request of ours
        suspects = frozenset[Key]().union(*(request.keys for request in pending)) - self.good
        if not suspects:
            self._unattributed += 1
            if self._unattributed >= self._limit:
                self.good = frozenset()
                self._unattributed = 0
            return None
        self._unattributed = 0
        self._probe = None
        if len(suspects) == 1:
            return Verdict(quarantine=suspects, suspects=suspects, detail=detail)
        tried, held = _halves(suspects)
        block = _Block(held, detail)
        self._blocks.append(block)
        self._probe = (tried, block)
        return Verdict(hold=held, suspects=suspects, detail=detail)

    def next_step(self) -> Verdict | None:
        """After an acceptance (or with nothing else to send): the held suspects to try
        next (``release``), or a held key now known bad (``quarantine``); None if no
        suspect is held. The caller keeps asking while a step changes nothing."""
        if not self._blocks:
            return None
        block = self._blocks.pop()
        if not block.bad:
            return Verdict(release=block.keys, detail=block.detail)
        if len(block.keys) == 1:
            return Verdict(quarantine=block.keys, detail=block.detail)
        tried, rest = _halves(block.keys)
        other = _Block(rest, block.detail)
        self._blocks.append(other)
        self._probe = (tried, other)
        return Verdict(release=tried, detail=block.detail)


def _halves(keys: frozenset[Key]) -> tuple[frozenset[Key], frozenset[Key]]:
    ordered = sorted(keys, key=key_order)
    middle = len(ordered) // 2
    return frozenset(ordered[:middle]), frozenset(ordered[middle:])
