"""Subscription specs: what a component wants from the exchange.

A :class:`Spec` names one data type, its market codes and its options. Build one
with the helpers (:func:`ticker`, :func:`trade`, :func:`orderbook`, :func:`candle`,
:func:`my_order`, :func:`my_asset`) or pass the exchange's own request objects
(``{"type": "ticker", "codes": ["KRW-BTC"]}``, snake_case or camelCase flags, depth
suffixes such as ``"KRW-BTC.15"``) to :func:`parse_specs`. Every check happens here,
before anything is registered, and a bad spec raises :class:`SpecError` naming the
field.

A spec is flattened into :class:`Wish` items, one per (type, code): the unit the
merge counts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from upbus.core._errors import SpecError

__all__ = (
    "CANDLE_UNITS",
    "ORDERBOOK_DEPTHS",
    "PRIVATE_TYPES",
    "PUBLIC_TYPES",
    "Channel",
    "Mode",
    "Spec",
    "Wish",
    "candle",
    "my_asset",
    "my_order",
    "orderbook",
    "parse_specs",
    "ticker",
    "trade",
)


class Channel(StrEnum):
    """The two WebSocket endpoints: public market data and the private account stream."""

    PUBLIC = "public"
    PRIVATE = "private"


class Mode(StrEnum):
    """Which stream types a wish wants: snapshot, realtime, or both (the default)."""

    BOTH = "both"
    SNAPSHOT = "snapshot"
    REALTIME = "realtime"


CANDLE_UNITS: Final = ("1s", "1m", "3m", "5m", "10m", "15m", "30m", "60m", "240m")
PUBLIC_TYPES: Final = frozenset(
    {"ticker", "trade", "orderbook", *(f"candle.{unit}" for unit in CANDLE_UNITS)}
)
PRIVATE_TYPES: Final = frozenset({"myOrder", "myAsset"})
ORDERBOOK_DEPTHS: Final = (1, 5, 15, 30)
DEFAULT_DEPTH: Final = 30

# QUOTE-BASE in upper case. The exchange silently ignores lower-case codes, so a
# typo would otherwise subscribe to nothing without a word.
_CODE = re.compile(r"[A-Z0-9]{2,10}-[A-Z0-9]{1,20}")

_FLAG_NAMES: Final = {
    "is_only_snapshot": "only_snapshot",
    "isOnlySnapshot": "only_snapshot",
    "is_only_realtime": "only_realtime",
    "isOnlyRealtime": "only_realtime",
}
_SPEC_KEYS: Final = frozenset({"type", "codes", "level", *_FLAG_NAMES})
# Levels are prices; an integer beyond this is no price, and the wire's JSON
# encoder cannot carry integers past 64 bits at all.
_MAX_INT_LEVEL: Final = 2**53


@dataclass(frozen=True, slots=True)
class Wish:
    """One (type, code) a component wants, with its options; the unit of merging.

    ``code`` is ``None`` for myAsset and for myOrder on every market. ``depth`` is
    set for orderbooks only.
    """

    type: str
    code: str | None
    level: float = 0
    depth: int | None = None
    mode: Mode = Mode.BOTH

    @property
    def channel(self) -> Channel:
        return Channel.PRIVATE if self.type in PRIVATE_TYPES else Channel.PUBLIC


@dataclass(frozen=True, slots=True)
class Spec:
    """One subscription spec: a data type, its codes and options. Validated on creation.

    ``codes`` is empty for myAsset, and for myOrder it means every market.
    ``depth`` (orderbook) is one of 1, 5, 15, 30 (``None`` = the exchange's 30);
    ``level`` (orderbook, KRW markets only) groups prices, 0 = native tick.
    """

    type: str
    codes: tuple[str, ...] = ()
    depth: int | None = None
    level: float = 0
    only_snapshot: bool = False
    only_realtime: bool = False

    def __post_init__(self) -> None:
        # Accept any sequence of codes, but store a tuple so specs stay hashable.
        if isinstance(self.codes, list):
            object.__setattr__(self, "codes", tuple(self.codes))
        _validate(self)
        if not self.level:
            object.__setattr__(self, "level", 0)  # -0.0 and 0.0 mean the default, 0

    @property
    def channel(self) -> Channel:
        return Channel.PRIVATE if self.type in PRIVATE_TYPES else Channel.PUBLIC

    @property
    def mode(self) -> Mode:
        if self.only_snapshot:
            return Mode.SNAPSHOT
        if self.only_realtime:
            return Mode.REALTIME
        return Mode.BOTH

    def wishes(self) -> list[Wish]:
        """This spec flattened into one :class:`Wish` per code."""
        mode = self.mode
        if self.type == "orderbook":
            depth = self.depth or DEFAULT_DEPTH
            return [Wish(self.type, code, self.level, depth, mode) for code in self.codes]
        if not self.codes:  # myAsset, or myOrder on every market
            return [Wish(self.type, None, 0, None, mode)]
        return [Wish(self.type, code, 0, None, mode) for code in self.codes]


def _validate(spec: Spec) -> None:
    kind = spec.type
    if not isinstance(kind, str) or not kind:
        raise SpecError("type", f"must be a non-empty string, got {kind!r}")
    if kind not in PUBLIC_TYPES and kind not in PRIVATE_TYPES:
        known = ", ".join(sorted(PUBLIC_TYPES | PRIVATE_TYPES, key=_type_order))
        raise SpecError("type", f"{kind!r} is not a supported type (known: {known})")
    if not isinstance(spec.codes, tuple):
        raise SpecError("codes", f"must be a list of strings, got {type(spec.codes).__name__}")
    for index, code in enumerate(spec.codes):
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            raise SpecError(
                f"codes[{index}]",
                f"{code!r} is not a market code (expected upper case QUOTE-BASE, e.g. 'KRW-BTC')",
            )
    if len(set(spec.codes)) != len(spec.codes):
        duplicate = next(c for c in spec.codes if spec.codes.count(c) > 1)
        raise SpecError("codes", f"{duplicate!r} is listed twice")
    if kind == "myAsset":
        if spec.codes:
            raise SpecError("codes", "myAsset takes no codes (it always covers the whole account)")
    elif kind != "myOrder" and not spec.codes:
        raise SpecError("codes", f"{kind} needs at least one market code")
    for flag in ("only_snapshot", "only_realtime"):
        value = getattr(spec, flag)
        if not isinstance(value, bool):
            raise SpecError(flag, f"must be True or False, got {value!r}")
    if spec.only_snapshot and spec.only_realtime:
        raise SpecError("only_realtime", "cannot be combined with only_snapshot")
    if kind in PRIVATE_TYPES and spec.only_snapshot:
        raise SpecError("only_snapshot", f"{kind} is a realtime-only stream")
    # The level is checked before anything that reads its truth value: NaN is truthy
    # and would otherwise pass as "some level" and go out as JSON null.
    _check_level(spec.level)
    if kind != "orderbook":
        if spec.depth is not None:
            raise SpecError("depth", f"applies to orderbook only, not {kind}")
        if spec.level:
            raise SpecError("level", f"applies to orderbook only, not {kind}")
        return
    depth = spec.depth
    if depth is not None and (
        isinstance(depth, bool) or not isinstance(depth, int) or depth not in ORDERBOOK_DEPTHS
    ):
        raise SpecError("depth", f"{depth!r} is not supported (one of 1, 5, 15, 30)")
    if spec.level:
        for index, code in enumerate(spec.codes):
            if not code.startswith("KRW-"):
                raise SpecError(
                    f"codes[{index}]", f"level applies to KRW markets only, not {code!r}"
                )


def _check_level(level: object) -> None:
    """Refuse a level the wire cannot carry: not a number, NaN, infinite, negative, huge."""
    if isinstance(level, bool) or not isinstance(level, int | float):
        raise SpecError("level", f"must be a number >= 0, got {level!r}")
    if (isinstance(level, float) and not math.isfinite(level)) or level < 0:
        raise SpecError("level", f"{level!r} is not a finite number >= 0")
    if isinstance(level, int) and level > _MAX_INT_LEVEL:
        raise SpecError("level", f"{level!r} is too large (at most 2**53)")


def _type_order(kind: str) -> tuple[int, str]:
    return (0 if kind in PUBLIC_TYPES else 1, kind)


def _codes(codes: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(codes, str):
        return (codes,)
    return tuple(codes)


def ticker(*codes: str, only_snapshot: bool = False, only_realtime: bool = False) -> Spec:
    """Ticker (current price and day statistics) for ``codes``."""
    return Spec("ticker", codes, only_snapshot=only_snapshot, only_realtime=only_realtime)


def trade(*codes: str, only_snapshot: bool = False, only_realtime: bool = False) -> Spec:
    """Every trade on ``codes``."""
    return Spec("trade", codes, only_snapshot=only_snapshot, only_realtime=only_realtime)


def orderbook(
    *codes: str,
    depth: int | None = None,
    level: float = 0,
    only_snapshot: bool = False,
    only_realtime: bool = False,
) -> Spec:
    """Whole order books for ``codes``.

    ``depth`` is 1, 5, 15 or 30 units; ``level`` groups prices (KRW markets only).
    """
    return Spec(
        "orderbook",
        codes,
        depth=depth,
        level=level,
        only_snapshot=only_snapshot,
        only_realtime=only_realtime,
    )


def candle(
    unit: str, *codes: str, only_snapshot: bool = False, only_realtime: bool = False
) -> Spec:
    """Candles of ``unit`` (``"1s"``, ``"1m"`` … ``"240m"``) for ``codes``."""
    if unit not in CANDLE_UNITS:
        raise SpecError("unit", f"{unit!r} is not a candle unit (one of {', '.join(CANDLE_UNITS)})")
    return Spec(f"candle.{unit}", codes, only_snapshot=only_snapshot, only_realtime=only_realtime)


def my_order(*codes: str) -> Spec:
    """The account's order events, on ``codes`` or (no codes) on every market."""
    return Spec("myOrder", codes)


def my_asset() -> Spec:
    """The account's balance changes."""
    return Spec("myAsset")


def _from_mapping(obj: Mapping[str, Any], where: str) -> list[Spec]:
    unknown = sorted(str(key) for key in set(obj) - _SPEC_KEYS)
    if unknown:
        raise SpecError(f"{where}.{unknown[0]}", "is not a subscription field")
    if "type" not in obj:
        raise SpecError(f"{where}.type", "is missing")
    kind = obj["type"]
    flags = {"only_snapshot": False, "only_realtime": False}
    for key, name in _FLAG_NAMES.items():
        if key in obj:
            value = obj[key]
            if not isinstance(value, bool):
                raise SpecError(f"{where}.{key}", f"must be true or false, got {value!r}")
            flags[name] = value
    raw_codes = obj.get("codes", [])
    if isinstance(raw_codes, str) or not isinstance(raw_codes, list | tuple):
        raise SpecError(f"{where}.codes", f"must be a list of strings, got {raw_codes!r}")
    if "codes" in obj and not raw_codes and kind not in ("myOrder", "myAsset"):
        raise SpecError(f"{where}.codes", "is empty")
    # Orderbook codes may carry their own depth suffix ("KRW-BTC.15"); codes of
    # one depth become one spec, as the exchange treats each code on its own.
    by_depth: dict[int | None, list[str]] = {}
    for index, code in enumerate(raw_codes):
        depth: int | None = None
        if kind == "orderbook" and isinstance(code, str) and "." in code:
            code, _, suffix = code.partition(".")
            if not suffix.isdigit():
                raise SpecError(f"{where}.codes[{index}]", f"{suffix!r} is not a depth")
            depth = int(suffix)
        by_depth.setdefault(depth, []).append(code)
    level = obj.get("level", 0)
    if isinstance(level, str):  # the docs call level a numeric string
        try:
            level = float(level)
        except ValueError:
            raise SpecError(f"{where}.level", f"{level!r} is not a number") from None
        if level.is_integer():
            level = int(level)
    try:
        return [
            Spec(kind, tuple(codes), depth=depth, level=level, **flags)
            for depth, codes in (by_depth or {None: []}).items()
        ]
    except SpecError as exc:
        raise SpecError(f"{where}.{exc.field}", str(exc).partition(": ")[2]) from None


def parse_specs(specs: Spec | Mapping[str, Any] | Iterable[Spec | Mapping[str, Any]]) -> list[Spec]:
    """Validate ``specs`` (one or many :class:`Spec` objects or exchange request objects).

    A whole exchange request frame works too: its ``ticket`` and ``format`` objects
    are skipped, so examples from the exchange's documentation paste straight in.
    """
    if isinstance(specs, Spec | Mapping):
        items: list[Any] = [specs]
    elif isinstance(specs, str | bytes):
        raise SpecError("specs", "must be Spec objects or request mappings, not a string")
    else:
        try:
            items = list(specs)
        except TypeError:
            raise SpecError(
                "specs", f"must be a Spec, a mapping or a list, got {specs!r}"
            ) from None
    parsed: list[Spec] = []
    for index, item in enumerate(items):
        where = f"specs[{index}]"
        if isinstance(item, Spec):
            parsed.append(item)
        elif isinstance(item, Mapping):
            if "type" not in item and (set(item) <= {"ticket", "format"}) and item:
                continue
            parsed.extend(_from_mapping(item, where))
        else:
            raise SpecError(where, f"must be a Spec or a mapping, got {type(item).__name__}")
    return parsed
