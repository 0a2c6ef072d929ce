"""Incremental merging of wishes into one channel's wire entries.

Each (type, code, level) is a *group*. A group keeps reference counts of the
depths and modes its wishes ask for, so adding or removing one wish costs O(1)
and the group's effective wish (deepest book; snapshot-only, realtime-only or
both) is derived from the counts. Wishes that cannot be widened into one — an
orderbook with another ``level`` — fall into groups of their own and so into
entries of their own (the exchange allows several entries of one type per
request). The bus later narrows each message to each component's own wish.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from upbus.core.subscriptions._specs import DEFAULT_DEPTH, PRIVATE_TYPES, PUBLIC_TYPES, Mode, Wish
from upbus.core.subscriptions._state import WireEntry

__all__ = ("Merger", "RefCountMerger")

_K = TypeVar("_K")


class Merger(Protocol):
    """Merges wishes into wire entries for one channel. Made by ``upbus_make_merger``."""

    def add(self, wishes: Iterable[Wish]) -> bool:
        """Count ``wishes`` in; return whether the wire entries changed."""
        ...

    def remove(self, wishes: Iterable[Wish]) -> bool:
        """Count ``wishes`` out (each must have been added); return whether entries changed."""
        ...

    def entries(self) -> tuple[WireEntry, ...]:
        """The current wire entries, in a deterministic order."""
        ...

    def stats(self) -> dict[str, int]:
        """Sizes for the debug entry points."""
        ...


class _Group:
    """Reference counts for one (type, code, level)."""

    __slots__ = ("count", "depths", "modes")

    def __init__(self) -> None:
        self.count = 0
        self.depths: dict[int | None, int] = {}
        self.modes: dict[Mode, int] = {}

    def effective(self) -> tuple[int | None, Mode]:
        depth = max(self.depths, key=_depth_rank)
        if len(self.modes) == 1:
            (mode,) = self.modes
        else:  # different wishes: take both and let the bus filter per component
            mode = Mode.BOTH
        return depth, mode


def _depth_rank(depth: int | None) -> int:
    return depth or 0


def _count_in(group: _Group, wish: Wish) -> None:
    group.count += 1
    _inc(group.depths, wish.depth)
    _inc(group.modes, wish.mode)


def _count_out(group: _Group, wish: Wish) -> None:
    group.count -= 1
    _dec(group.depths, wish.depth)
    _dec(group.modes, wish.mode)


def _inc(counts: dict[_K, int], key: _K) -> None:
    counts[key] = counts.get(key, 0) + 1


def _dec(counts: dict[_K, int], key: _K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


_GroupKey = tuple[str, str | None, float]


class RefCountMerger:
    """The default merger: reference counts per (type, code, level), entries cached."""

    def __init__(self) -> None:
        self._groups: dict[_GroupKey, _Group] = {}
        self._wishes = 0
        self._cache: tuple[WireEntry, ...] | None = ()

    def add(self, wishes: Iterable[Wish]) -> bool:
        changed = False
        groups = self._groups
        for wish in wishes:
            self._wishes += 1
            key = (wish.type, wish.code, wish.level)
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group()
                _count_in(group, wish)
                changed = True
            elif wish.depth in group.depths and wish.mode in group.modes:
                _count_in(group, wish)  # nothing new for this group: it cannot change
            else:
                before = group.effective()
                _count_in(group, wish)
                changed = changed or group.effective() != before
        if changed:
            self._cache = None
        return changed

    def remove(self, wishes: Iterable[Wish]) -> bool:
        changed = False
        groups = self._groups
        for wish in wishes:
            self._wishes -= 1
            key = (wish.type, wish.code, wish.level)
            group = groups[key]
            if group.count == 1:
                del groups[key]
                changed = True
            elif group.depths[wish.depth] > 1 and group.modes[wish.mode] > 1:
                _count_out(group, wish)  # others still want the same: it cannot change
            else:
                before = group.effective()
                _count_out(group, wish)
                changed = changed or group.effective() != before
        if changed:
            self._cache = None
        return changed

    def entries(self) -> tuple[WireEntry, ...]:
        if self._cache is None:
            self._cache = self._build()
        return self._cache

    def stats(self) -> dict[str, int]:
        return {"wishes": self._wishes, "groups": len(self._groups)}

    def _build(self) -> tuple[WireEntry, ...]:
        # One entry per (type, level, mode); codes sorted so equal states compare equal.
        buckets: dict[tuple[str, float, Mode], list[str]] = {}
        whole_account: set[str] = set()
        for (kind, code, level), group in self._groups.items():
            depth, mode = group.effective()
            if kind in PRIVATE_TYPES:
                mode = Mode.BOTH  # private streams are realtime by nature; no flags
                if code is None:
                    whole_account.add(kind)
                    continue
            elif kind == "orderbook" and depth is not None and depth != DEFAULT_DEPTH:
                code = f"{code}.{depth}"
            assert code is not None
            buckets.setdefault((kind, level, mode), []).append(code)
        entries = [
            WireEntry(
                kind,
                tuple(sorted(codes)),
                level,
                mode is Mode.SNAPSHOT,
                mode is Mode.REALTIME,
            )
            for (kind, level, mode), codes in buckets.items()
            # myOrder on every market already covers the coded ones
            if kind not in whole_account
        ]
        entries.extend(WireEntry(kind, None) for kind in whole_account)
        entries.sort(key=_entry_order)
        return tuple(entries)


def _entry_order(entry: WireEntry) -> tuple[int, str, float, bool, bool]:
    return (
        0 if entry.type in PUBLIC_TYPES else 1,
        entry.type,
        entry.level,
        entry.only_snapshot,
        entry.only_realtime,
    )
