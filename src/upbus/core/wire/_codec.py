"""Wire encoding of Upbit WebSocket frames.

Decoding: :class:`FrameDecoder` turns one server frame (binary or text) into the typed
messages of :mod:`upbus.core.wire._messages`, whatever format the connection is in. The
format is read from the frame itself, because the latest request on a connection
(even a ``LIST_SUBSCRIPTIONS``) switches every stream on it (docs/protocol.md, Requests):

* an array is a ``JSON_LIST`` / ``SIMPLE_LIST`` frame, an object a single message;
* an object whose first key is ``"type"`` is DEFAULT, ``"ty"`` is SIMPLE, and the
  first letters of the type name pick the message class, so the common frame costs
  one typed decode. Objects that start with any other key (``status``, ``error``,
  ``method``/``mthd``, or a data message whose keys were reordered) first go through
  a small "envelope" decode that reads only those keys;
* a list frame whose items are all of one kind is one typed decode too; a list of
  mixed kinds is split into raw items, each decoded as above.

SIMPLE frames decode into private subclasses that rename the fields to the SIMPLE keys;
each decoded object then has its ``__class__`` set back to the public class, so a
SIMPLE ``Ticker`` is an ordinary ``Ticker``, equal to the same message received in
DEFAULT. That assignment is sound because the subclass adds no storage: it redeclares
the base's fields in the base's slots, which is checked at import.

Encoding: :func:`encode_request` and :func:`encode_list_subscriptions` build request
frames, and :func:`to_default_dict` turns a message back into the exchange's DEFAULT
field names.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from types import GenericAlias, MappingProxyType
from typing import Any, Final

import msgspec
import orjson

from upbus.core._errors import FrameDecodeError, SpecError
from upbus.core.wire._messages import (
    MESSAGE_CLASSES,
    Asset,
    Candle,
    ErrorMessage,
    Message,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    ServerMessage,
    Status,
    SubscriptionEntry,
    SubscriptionList,
    Ticker,
    Trade,
)

__all__ = (
    "FORMATS",
    "SIMPLE_NAMES",
    "FrameDecoder",
    "encode_list_subscriptions",
    "encode_request",
    "new_ticket",
    "to_default_dict",
)

FORMATS: Final[tuple[str, ...]] = ("DEFAULT", "SIMPLE", "JSON_LIST", "SIMPLE_LIST")
"""The ``format`` values a request may carry (docs/protocol.md, Requests)."""

# The SIMPLE key of each field (docs/protocol.md, Messages). A field missing from a table keeps its
# DEFAULT name in SIMPLE frames too.
_TICKER_NAMES = {
    "type": "ty",
    "code": "cd",
    "opening_price": "op",
    "high_price": "hp",
    "low_price": "lp",
    "trade_price": "tp",
    "prev_closing_price": "pcp",
    "change": "c",
    "change_price": "cp",
    "signed_change_price": "scp",
    "change_rate": "cr",
    "signed_change_rate": "scr",
    "trade_volume": "tv",
    "acc_trade_volume": "atv",
    "acc_trade_volume_24h": "atv24h",
    "acc_trade_price": "atp",
    "acc_trade_price_24h": "atp24h",
    "trade_date": "tdt",
    "trade_time": "ttm",
    "trade_timestamp": "ttms",
    "ask_bid": "ab",
    "acc_ask_volume": "aav",
    "acc_bid_volume": "abv",
    "highest_52_week_price": "h52wp",
    "highest_52_week_date": "h52wdt",
    "lowest_52_week_price": "l52wp",
    "lowest_52_week_date": "l52wdt",
    "market_state": "ms",
    "is_trading_suspended": "its",
    "delisting_date": "dd",
    "market_warning": "mw",
    "timestamp": "tms",
    "stream_type": "st",
}
_TRADE_NAMES = {
    "type": "ty",
    "code": "cd",
    "trade_price": "tp",
    "trade_volume": "tv",
    "ask_bid": "ab",
    "prev_closing_price": "pcp",
    "change": "c",
    "change_price": "cp",
    "trade_date": "td",
    "trade_time": "ttm",
    "trade_timestamp": "ttms",
    "timestamp": "tms",
    "sequential_id": "sid",
    "best_ask_price": "bap",
    "best_ask_size": "bas",
    "best_bid_price": "bbp",
    "best_bid_size": "bbs",
    "stream_type": "st",
}
_ORDERBOOK_UNIT_NAMES = {"ask_price": "ap", "bid_price": "bp", "ask_size": "as", "bid_size": "bs"}
_ORDERBOOK_NAMES = {
    "type": "ty",
    "code": "cd",
    "total_ask_size": "tas",
    "total_bid_size": "tbs",
    "orderbook_units": "obu",
    "timestamp": "tms",
    "level": "lv",
    "stream_type": "st",
}
_CANDLE_NAMES = {
    "type": "ty",
    "code": "cd",
    "candle_date_time_utc": "cdttmu",
    "candle_date_time_kst": "cdttmk",
    "opening_price": "op",
    "high_price": "hp",
    "low_price": "lp",
    "trade_price": "tp",
    "candle_acc_trade_volume": "catv",
    "candle_acc_trade_price": "catp",
    "timestamp": "tms",
    "stream_type": "st",
}
_MY_ORDER_NAMES = {
    "type": "ty",
    "code": "cd",
    "uuid": "uid",
    "ask_bid": "ab",
    "order_type": "ot",
    "state": "s",
    "trade_uuid": "tuid",
    "price": "p",
    "avg_price": "ap",
    "volume": "v",
    "remaining_volume": "rv",
    "executed_volume": "ev",
    "trades_count": "tc",
    "reserved_fee": "rsf",
    "remaining_fee": "rmf",
    "paid_fee": "pf",
    "locked": "l",
    "executed_funds": "ef",
    "time_in_force": "tif",
    "trade_fee": "tf",
    "is_maker": "im",
    "identifier": "id",
    "smp_type": "smpt",
    "prevented_volume": "pv",
    "prevented_locked": "pl",
    "trade_timestamp": "ttms",
    "order_timestamp": "otms",
    "timestamp": "tms",
    "stream_type": "st",
}
_ASSET_NAMES = {"currency": "cu", "balance": "b", "locked": "l"}
_MY_ASSET_NAMES = {
    "type": "ty",
    "code": "cd",
    "asset_uuid": "astuid",
    "assets": "ast",
    "asset_timestamp": "asttms",
    "timestamp": "tms",
    "stream_type": "st",
}
_SUBSCRIPTION_ENTRY_NAMES = {"type": "ty", "codes": "cds", "level": "lv"}
_SUBSCRIPTION_LIST_NAMES = {"method": "mthd", "result": "rslt", "ticket": "tckt"}

SIMPLE_NAMES: Final[Mapping[type[msgspec.Struct], Mapping[str, str]]] = MappingProxyType(
    {
        Ticker: MappingProxyType(_TICKER_NAMES),
        Trade: MappingProxyType(_TRADE_NAMES),
        OrderbookUnit: MappingProxyType(_ORDERBOOK_UNIT_NAMES),
        Orderbook: MappingProxyType(_ORDERBOOK_NAMES),
        Candle: MappingProxyType(_CANDLE_NAMES),
        MyOrder: MappingProxyType(_MY_ORDER_NAMES),
        Asset: MappingProxyType(_ASSET_NAMES),
        MyAsset: MappingProxyType(_MY_ASSET_NAMES),
        SubscriptionEntry: MappingProxyType(_SUBSCRIPTION_ENTRY_NAMES),
        SubscriptionList: MappingProxyType(_SUBSCRIPTION_LIST_NAMES),
    }
)
"""The SIMPLE key of each field, per message class (docs/protocol.md, Messages)."""


def _simple_variant(
    cls: type[msgspec.Struct], nested: tuple[str, type[msgspec.Struct]] | None = None
) -> type[msgspec.Struct]:
    """A subclass of ``cls`` that decodes SIMPLE keys into the same slots.

    ``nested`` names a tuple field whose items need their own SIMPLE class. The
    subclass is not frozen so that the decoded object's ``__class__`` can be set to
    ``cls``.
    """
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for field in msgspec.structs.fields(cls):
        kind = field.type
        if nested and field.name == nested[0]:
            kind = GenericAlias(tuple, (nested[1], ...))
        if field.default is msgspec.NODEFAULT:
            fields.append((field.name, kind))
        else:
            fields.append((field.name, kind, field.default))
    variant = msgspec.defstruct(
        f"Simple{cls.__name__}",
        fields,
        bases=(cls,),
        module=__name__,
        rename=dict(SIMPLE_NAMES[cls]),
        frozen=False,
        gc=False,
        kw_only=True,
        omit_defaults=cls.__struct_config__.omit_defaults,
    )
    # The __class__ swap is only sound if the subclass reuses the base's layout.
    if variant.__struct_fields__ != cls.__struct_fields__ or (
        variant.__basicsize__ != cls.__basicsize__
    ):
        raise RuntimeError(f"SIMPLE variant of {cls.__name__} does not share its layout")
    return variant


_Decode = Callable[[bytes], Any]
"""Decodes one buffer: the ``decode`` of a msgspec decoder, or a SIMPLE wrapper of it."""


def _simple_functions(
    cls: type[msgspec.Struct], nested: tuple[str, type[msgspec.Struct]] | None = None
) -> tuple[_Decode, _Decode]:
    """Decoders of one SIMPLE object and of a list of them, into ``cls``.

    Each decoded object (and each item of its ``nested`` tuple field) gets its public
    class back. Closures rather than methods: the SIMPLE hot path saves the attribute
    look-ups.
    """
    if nested is None:
        variant = _simple_variant(cls)
    else:
        field, item_cls = nested
        variant = _simple_variant(cls, (field, _simple_variant(item_cls)))
    one: _Decode = msgspec.json.Decoder(variant).decode
    many: _Decode = msgspec.json.Decoder(list[variant]).decode  # type: ignore[valid-type]

    if nested is None:

        def decode(buf: bytes) -> Any:
            message = one(buf)
            message.__class__ = cls
            return message

        def decode_list(buf: bytes) -> Any:
            messages = many(buf)
            for message in messages:
                message.__class__ = cls
            return messages

    else:

        def decode(buf: bytes) -> Any:
            message = one(buf)
            for item in getattr(message, field):
                item.__class__ = item_cls
            message.__class__ = cls
            return message

        def decode_list(buf: bytes) -> Any:
            messages = many(buf)
            for message in messages:
                for item in getattr(message, field):
                    item.__class__ = item_cls
                message.__class__ = cls
            return messages

    return decode, decode_list


def _decoders() -> tuple[dict[bytes, _Decode], ...]:
    """Per data type name (as bytes): DEFAULT one, DEFAULT list, SIMPLE one, SIMPLE list."""
    nested: dict[type[msgspec.Struct], tuple[str, type[msgspec.Struct]]] = {
        Orderbook: ("orderbook_units", OrderbookUnit),
        MyAsset: ("assets", Asset),
    }
    functions = {
        cls: (
            msgspec.json.Decoder(cls).decode,
            msgspec.json.Decoder(list[cls]).decode,  # type: ignore[valid-type]
            *_simple_functions(cls, nested.get(cls)),
        )
        for cls in set(MESSAGE_CLASSES.values())
    }
    return tuple(
        {name.encode(): functions[cls][index] for name, cls in MESSAGE_CLASSES.items()}
        for index in range(4)
    )


def _routes(
    default: Mapping[bytes, _Decode], simple: Mapping[bytes, _Decode], lead: bytes = b""
) -> dict[bytes, _Decode]:
    """Decoders keyed by the first ``len(lead) + 12`` bytes of a frame.

    Twelve bytes are ``{"type":"`` and the type name's first three (``tic``, ``tra``,
    ``ord``, ``can``, ``myO``, ``myA``) or ``{"ty":"`` and its first five, which tell
    every data type apart. So the fast path routes a frame with one short slice and
    one dict look-up. A frame routed on a prefix (``"tick…"``) still has its whole
    ``type`` checked: each class's ``type`` is a ``Literal``.
    """
    routes: dict[bytes, _Decode] = {}
    for head, table in ((b'{"type":"', default), (b'{"ty":"', simple)):
        for name, decode in table.items():
            key = (lead + head + name)[: len(lead) + 12]
            if routes.setdefault(key, decode) is not decode:
                raise RuntimeError(f"two message types start with {key!r}")
    return routes


# Keyed by the type name as bytes, for the general path.
_DEFAULT, _DEFAULT_MANY, _SIMPLE, _SIMPLE_MANY = _decoders()
# Keyed by a frame's first bytes, for the fast paths.
_ROUTES: Final = _routes(_DEFAULT, _SIMPLE)
_LIST_ROUTES: Final = _routes(_DEFAULT_MANY, _SIMPLE_MANY, lead=b"[")
# What the connection handles itself; everything else is data for the components.
ControlMessage = Status | ErrorMessage | SubscriptionList
_CONTROL_CLASSES: Final = (Status, ErrorMessage, SubscriptionList)
# LIST_SUBSCRIPTIONS replies.
_DEFAULT_SUBSCRIPTIONS: Final = msgspec.json.Decoder(SubscriptionList).decode
_SIMPLE_SUBSCRIPTIONS: Final = _simple_functions(SubscriptionList, ("result", SubscriptionEntry))[0]
_ARRAY: Final = msgspec.json.Decoder(list[msgspec.Raw])


class _Envelope(msgspec.Struct, gc=False):
    """The keys that tell what an object is; everything else is skipped unparsed."""

    type: str | None = None
    ty: str | None = None
    status: str | None = None
    error: ErrorMessage | None = None
    method: str | None = None
    mthd: str | None = None


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)


class _Reject(Exception):
    """A frame that parsed but is not a message; turned into FrameDecodeError."""


def _decode_object(buf: bytes) -> ServerMessage:
    """Decode one JSON object (a whole frame, or one item of a list frame)."""
    decode = _ROUTES.get(buf[:12])  # The fast path, for the items of a mixed list.
    if decode is not None:
        return decode(buf)  # type: ignore[no-any-return]
    envelope = _ENVELOPE.decode(buf)
    if envelope.type is not None:
        decode = _DEFAULT.get(envelope.type.encode())
        if decode is None:
            raise _Reject(f"unknown message type {envelope.type!r}")
        return decode(buf)  # type: ignore[no-any-return]
    if envelope.ty is not None:
        decode = _SIMPLE.get(envelope.ty.encode())
        if decode is None:
            raise _Reject(f"unknown message type {envelope.ty!r}")
        return decode(buf)  # type: ignore[no-any-return]
    if envelope.error is not None:
        return envelope.error
    if envelope.status is not None:
        return Status(status=envelope.status)
    if envelope.method is not None:
        return _DEFAULT_SUBSCRIPTIONS(buf)
    if envelope.mthd is not None:
        return _SIMPLE_SUBSCRIPTIONS(buf)  # type: ignore[no-any-return]
    raise _Reject("object has none of the keys type, ty, status, error, method, mthd")


def _decode_any(buf: bytes) -> list[ServerMessage]:
    """The general path: list frames, and objects the fast path did not take."""
    # A list frame whose items are all of the first item's kind is one typed decode;
    # one of mixed kinds fails that (ValidationError) and is decoded item by item.
    decode = _LIST_ROUTES.get(buf[:13])
    if decode is not None:
        with suppress(msgspec.ValidationError):
            return decode(buf)  # type: ignore[no-any-return]
    if buf.lstrip()[:1] == b"[":
        items = _ARRAY.decode(buf)
        if not items:
            raise _Reject("empty list frame")
        return [_decode_object(bytes(item)) for item in items]
    return [_decode_object(buf)]


class FrameDecoder:
    """Decodes server frames in any of the four wire formats into typed messages.

    Stateless and safe to share; one instance per connection reader is customary.
    """

    __slots__ = ()

    def decode(self, data: bytes | bytearray | memoryview | str) -> list[ServerMessage]:
        """The messages of one frame, in frame order (one unless it is a list frame).

        Accepts the payload of a binary frame (``bytes``, ``bytearray`` or
        ``memoryview``) or of a text frame (``str``). Raises :class:`FrameDecodeError`
        for anything that is not a well-formed Upbit server message, and
        :class:`TypeError` only if ``data`` is not a frame payload at all.
        """
        try:
            if type(data) is bytes:
                # The common frame: one object whose first key is the type (see _routes).
                decode = _ROUTES.get(data[:12])
                if decode is not None:
                    return [decode(data)]
                return _decode_any(data)
            return _decode_any(_as_bytes(data))
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise FrameDecodeError(_sample(data), str(exc)) from exc
        except _Reject as exc:
            raise FrameDecodeError(_sample(data), str(exc)) from None
        except RecursionError:
            raise FrameDecodeError(_sample(data), "nested too deeply") from None
        except UnicodeEncodeError:
            raise FrameDecodeError(_sample(data), "text is not valid Unicode") from None

    def decode_batch(
        self, frames: Sequence[bytes | str]
    ) -> tuple[list[Message], list[ControlMessage], list[FrameDecodeError]]:
        """Decode one socket read's frames: (data messages, control messages, errors).

        Each list keeps frame order. A frame that does not decode is reported in the
        errors and skipped; the others still count. This is the receive loop's hot
        path: a data frame that the prefix table recognises costs one look-up and
        one typed decode, with no per-message type test.
        """
        data: list[Message] = []
        control: list[ControlMessage] = []
        errors: list[FrameDecodeError] = []
        routes = _ROUTES
        for frame in frames:
            if type(frame) is bytes:
                decode = routes.get(frame[:12])
                if decode is not None:
                    try:
                        data.append(decode(frame))
                        continue
                    except msgspec.DecodeError:
                        pass  # decode() below says what is wrong
            try:
                messages = self.decode(frame)
            except FrameDecodeError as exc:
                errors.append(exc)
                continue
            for message in messages:
                if isinstance(message, _CONTROL_CLASSES):
                    control.append(message)
                else:
                    data.append(message)
        return data, control, errors


def _as_bytes(data: object) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"a frame payload is bytes or str, not {type(data).__name__}")


def _sample(data: object) -> bytes | str:
    if isinstance(data, str | bytes):
        return data[:200]
    return _as_bytes(data)[:200]


def to_default_dict(message: ServerMessage) -> dict[str, object]:
    """``message`` as a dict with the exchange's DEFAULT field names and JSON types.

    Tuples become lists and nested messages dicts; ``None`` fields stay as ``None``
    (the server sends them as ``null``), except the absent keys of a LIST_SUBSCRIPTIONS
    entry. Decimals (myAsset ``balance`` and ``locked``) become strings, which keep
    every digit and which every JSON library can write; :class:`FrameDecoder` reads
    such a string back into the same Decimal. A myAsset dict has no ``code`` (the wire
    form has none), and an error is wrapped as ``{"error": {"name": …, "message": …}}``
    like the frame it came from.
    """
    out: dict[str, Any] = msgspec.to_builtins(message)
    # to_builtins keeps tuples as tuples; JSON has only lists.
    cls = message.__class__
    if cls is Orderbook:
        out["orderbook_units"] = list(out["orderbook_units"])
    elif cls is MyAsset:
        del out["code"]
        out["assets"] = list(out["assets"])
    elif cls is SubscriptionList:
        out["result"] = result = list(out["result"])
        for entry in result:
            if "codes" in entry:
                entry["codes"] = list(entry["codes"])
    elif cls is ErrorMessage:
        return {"error": out}
    return out


def new_ticket() -> str:
    """A fresh request ticket (a random UUID, as the exchange recommends)."""
    return str(uuid.uuid4())


def _check(ticket: str, fmt: str) -> None:
    if not isinstance(ticket, str) or not ticket:
        raise SpecError("ticket", "must be a non-empty string")
    if fmt not in FORMATS:
        raise SpecError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")


def encode_request(
    ticket: str, entries: Sequence[Mapping[str, object]], fmt: str = "DEFAULT"
) -> str:
    """The text of one subscription frame: ``[{"ticket"}, *entries, {"format"}]``.

    The frame replaces the connection's whole subscription set (docs/protocol.md, Requests), so
    ``entries`` must be the complete desired set, e.g.
    ``{"type": "orderbook", "codes": ["KRW-BTC.15"], "level": 10000}``. Raises
    :class:`SpecError` for an empty ticket or unknown format, and ``TypeError`` if an
    entry holds a value JSON cannot represent.
    """
    _check(ticket, fmt)
    return orjson.dumps([{"ticket": ticket}, *map(dict, entries), {"format": fmt}]).decode()


def encode_list_subscriptions(ticket: str, fmt: str) -> str:
    """The text of a ``LIST_SUBSCRIPTIONS`` request frame (docs/protocol.md, Requests).

    ``fmt`` has no default on purpose: the request re-applies its format to every
    stream of the connection, so it must repeat the connection's current format.
    """
    _check(ticket, fmt)
    return orjson.dumps(
        [{"ticket": ticket}, {"method": "LIST_SUBSCRIPTIONS"}, {"format": fmt}]
    ).decode()
