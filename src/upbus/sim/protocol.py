"""Parsing and validating client request frames (docs/protocol.md, Requests and Errors).

A request is one JSON array of objects, recognised by their keys, not their position:
``ticket``, ``method``, ``format``, and data-type objects (anything else). The
result is a :class:`Subscribe` or a :class:`ListSubscriptions`; a bad frame raises
:class:`RequestError` carrying the exchange's error name.

Decisions where docs/protocol.md calls the exchange's behaviour unverified:

* Each object plays one role, by the first key found among ``ticket``, ``method``,
  ``format``; any other object is a data-type object.
* Checks run in this order: JSON array of objects (``WRONG_FORMAT``), ticket
  (``NO_TICKET``), method, format (``INVALID_PARAM``), then each data-type object in
  order (``NO_TYPE``, ``INVALID_PARAM``, ``NO_CODES``, ...). A frame without any data-type
  object gives ``NO_TYPE``.
* Private types on the public endpoint, and public types on the private one, give
  ``INVALID_PARAM`` ("... is not supported"), as an unknown type does.
* A request without a format object means ``DEFAULT``, for ``LIST_SUBSCRIPTIONS`` too.

A test knob, not exchange behaviour: codes listed in ``reject_codes`` are refused with
``INVALID_PARAM`` ("code … is not supported"), so that a test can make the exchange
refuse a request that client-side validation cannot catch. (The exchange itself
serves unknown codes with silence: docs/protocol.md, Requests.)
"""

from __future__ import annotations

import json
from collections.abc import Set
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

__all__ = (
    "CANDLE_TYPES",
    "FORMATS",
    "PRIVATE_TYPES",
    "PUBLIC_TYPES",
    "Entry",
    "ListSubscriptions",
    "RequestError",
    "Subscribe",
    "error_message",
    "parse_request",
)

FORMATS = ("DEFAULT", "SIMPLE", "JSON_LIST", "SIMPLE_LIST")
CANDLE_TYPES = frozenset(
    f"candle.{unit}" for unit in ("1s", "1m", "3m", "5m", "10m", "15m", "30m", "60m", "240m")
)
PUBLIC_TYPES = frozenset({"ticker", "trade", "orderbook"}) | CANDLE_TYPES
PRIVATE_TYPES = frozenset({"myOrder", "myAsset"})

Language = Literal["ko", "en"]

# (Korean text as on api.upbit.com, English text as on the global sites); "{}" is the
# offending value. Sources: samples/error.json.
_MESSAGES: dict[str, tuple[str, str]] = {
    "INVALID_AUTH": ("인증 정보가 올바르지 않습니다.", "Invalid authentication."),
    "WRONG_FORMAT": ("Format 이 맞지 않습니다.", "Requested using wrong format"),
    "NO_TICKET": ("티켓이 존재하지 않거나, 유효하지 않습니다.", "Ticket field must be contained."),
    "NO_TYPE": ("type 필드가 존재하지 않습니다.", "type field not exists."),
    "NO_CODES": ("codes 필드가 존재하지 않습니다.", "codes field not exists."),
    "EMPTY_CODES": ("codes 필드가 비어 있습니다.", "codes field is empty."),
    "BAD_TYPE": ("{} 은 지원하지 않는 타입입니다.", "type {} is not supported."),
    "BAD_FORMAT": ("format {} 은 지원하지 않는 형식입니다.", "format {} is not supported."),
    "BAD_METHOD": ("method {} 은 지원하지 않는 메소드입니다.", "method {} is not supported."),
    # Only for the reject_codes test knob; no source shows such a message.
    "BAD_CODE": ("{} 은 지원하지 않는 코드입니다.", "code {} is not supported."),
}


def error_message(key: str, language: Language, value: str = "") -> str:
    """The exchange's text for error ``key`` in ``language``."""
    korean, english = _MESSAGES[key]
    return (korean if language == "ko" else english).format(value)


class RequestError(Exception):
    """A request frame the exchange would refuse; ``name`` is the wire error name."""

    def __init__(self, name: str, key: str, value: str = "") -> None:
        self.name = name
        self.key = key
        self.value = value
        super().__init__(f"{name}: {error_message(key, 'en', value)}")

    def text(self, language: Language) -> str:
        """The error message as the exchange writes it."""
        return error_message(self.key, language, self.value)


@dataclass(frozen=True, slots=True)
class Entry:
    """One data-type object of a subscription, as the client sent it."""

    type: str
    codes: tuple[str, ...] | None
    is_only_snapshot: bool = False
    is_only_realtime: bool = False
    level: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Subscribe:
    """A subscription frame: it replaces the connection's whole set (docs/protocol.md, Requests)."""

    ticket: str
    entries: tuple[Entry, ...]
    format: str


@dataclass(frozen=True, slots=True)
class ListSubscriptions:
    """A ``LIST_SUBSCRIPTIONS`` request (docs/protocol.md, Requests)."""

    ticket: str
    format: str


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; the stdlib would accept them.
    raise ValueError(name)


def _load(text: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except ValueError:
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT")
    return value


def _flag(obj: dict[str, Any], snake: str, camel: str) -> bool:
    # Current docs use snake_case; older docs and many clients camelCase
    # (docs/protocol.md, Requests).
    value = obj.get(snake, obj.get(camel, False))
    if not isinstance(value, bool):
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT")
    return value


def _level(obj: dict[str, Any]) -> Decimal | None:
    if "level" not in obj:
        return None
    raw = obj["level"]
    # The docs call it a numeric string; the probe sent a number. Accept both.
    if isinstance(raw, bool) or not isinstance(raw, int | Decimal | str):
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT")
    try:
        level = Decimal(raw)
    except InvalidOperation:
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT") from None
    if not level.is_finite() or level < 0:
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT")
    return level


def _codes(obj: dict[str, Any]) -> tuple[str, ...] | None:
    if "codes" not in obj:
        return None
    codes = obj["codes"]
    if not isinstance(codes, list) or not all(isinstance(code, str) for code in codes):
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT")
    return tuple(codes)


def _entry(obj: dict[str, Any], private: bool, reject_codes: Set[str]) -> Entry:
    if "type" not in obj:
        raise RequestError("NO_TYPE", "NO_TYPE")
    kind = obj["type"]
    if not isinstance(kind, str):
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT")
    allowed = PRIVATE_TYPES if private else PUBLIC_TYPES
    if kind not in allowed:
        raise RequestError("INVALID_PARAM", "BAD_TYPE", kind)
    codes = _codes(obj)
    for code in codes or ():
        if code.partition(".")[0] in reject_codes:
            raise RequestError("INVALID_PARAM", "BAD_CODE", code)
    if kind == "myAsset":
        if codes is not None:
            raise RequestError("WRONG_FORMAT", "WRONG_FORMAT")
        return Entry(type=kind, codes=None)
    if kind == "myOrder":
        # Omitted or empty codes mean every market (docs/protocol.md, Requests).
        return Entry(type=kind, codes=codes or None)
    if codes is None:
        raise RequestError("NO_CODES", "NO_CODES")
    if not codes:
        raise RequestError("INVALID_PARAM", "EMPTY_CODES")
    return Entry(
        type=kind,
        codes=codes,
        is_only_snapshot=_flag(obj, "is_only_snapshot", "isOnlySnapshot"),
        is_only_realtime=_flag(obj, "is_only_realtime", "isOnlyRealtime"),
        level=_level(obj) if kind == "orderbook" else None,
    )


def parse_request(
    text: str, *, private: bool, reject_codes: Set[str] = frozenset()
) -> Subscribe | ListSubscriptions:
    """Parse one request frame for the public (or private) endpoint.

    ``reject_codes`` (a test knob) are codes refused with ``INVALID_PARAM``.
    """
    objects = _load(text)
    ticket: Any = None
    method: Any = None
    fmt: Any = "DEFAULT"
    data_objects: list[dict[str, Any]] = []
    for obj in objects:
        if "ticket" in obj:
            if ticket is None:
                ticket = obj["ticket"]
        elif "method" in obj:
            method = obj["method"]
        elif "format" in obj:
            fmt = obj["format"]
        else:
            data_objects.append(obj)
    if not isinstance(ticket, str) or not ticket:
        raise RequestError("NO_TICKET", "NO_TICKET")
    if method is not None and method != "LIST_SUBSCRIPTIONS":
        raise RequestError("INVALID_PARAM", "BAD_METHOD", str(method))
    if not isinstance(fmt, str):
        raise RequestError("WRONG_FORMAT", "WRONG_FORMAT")
    if fmt not in FORMATS:
        raise RequestError("INVALID_PARAM", "BAD_FORMAT", fmt)
    if method is not None:
        return ListSubscriptions(ticket=ticket, format=fmt)
    if not data_objects:
        raise RequestError("NO_TYPE", "NO_TYPE")
    entries = tuple(_entry(obj, private, reject_codes) for obj in data_objects)
    return Subscribe(ticket=ticket, entries=entries, format=fmt)
