"""Typed messages the Upbit WebSocket server sends.

One set of classes and one set of field names for every wire format: the field names
are the exchange's DEFAULT names (docs/protocol.md, Messages), so ``msg.trade_price`` reads the same
whether the frame said ``"trade_price"`` or ``"tp"``. :mod:`upbus.core.wire._codec` decodes
frames into these classes and turns them back into DEFAULT dicts.

The classes are frozen :class:`msgspec.Struct` types: one decoded message is shared by
every component that asked for it, so none of them may change it for the others. They
are also ``gc=False``: a frozen struct whose containers are tuples cannot be part of a
reference cycle, so the garbage collector need not track millions of them.

Every class is declared ``frozen=True, gc=False, kw_only=True``; keyword-only
construction lets the fields follow the wire order although optional fields come before
required ones.

``type`` is a ``Literal`` field that decoding checks, so a type checker narrows a
:data:`Message` by it: after ``if msg.type == "orderbook":`` ``msg`` is an
:class:`Orderbook`.

Numbers: prices and volumes are ``float``, millisecond times and ids are ``int``, and
myAsset ``balance`` / ``locked`` are :class:`~decimal.Decimal` built from the number's
own text (a balance can carry more digits than a double holds).

Fields the server no longer sends in every frame, or sends as ``null``, are
``X | None = None``. Extra fields (legacy ``trade_status``, future additions) are
ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

from msgspec import Struct

__all__ = (
    "CANDLE_TYPES",
    "DATA_TYPES",
    "MESSAGE_CLASSES",
    "PRIVATE_TYPES",
    "PUBLIC_TYPES",
    "Asset",
    "Candle",
    "CandleType",
    "DelistingDate",
    "ErrorMessage",
    "Message",
    "MyAsset",
    "MyOrder",
    "Orderbook",
    "OrderbookUnit",
    "ServerMessage",
    "Status",
    "SubscriptionEntry",
    "SubscriptionList",
    "Ticker",
    "Trade",
)

CandleType: TypeAlias = Literal[
    "candle.1s",
    "candle.1m",
    "candle.3m",
    "candle.5m",
    "candle.10m",
    "candle.15m",
    "candle.30m",
    "candle.60m",
    "candle.240m",
]
"""Every ``candle.{unit}`` type the server accepts and echoes (docs/protocol.md, Requests)."""


class DelistingDate(Struct, frozen=True, gc=False, kw_only=True):
    """``delisting_date`` when the server sends it as an object (the official SDK's model).

    The non-null wire shape is unverified (docs/protocol.md, Messages); a plain string is kept as a
    ``str`` instead.
    """

    year: int
    month: int
    day: int


class Ticker(Struct, frozen=True, gc=False, kw_only=True):
    """A ``ticker`` frame: the pair's price and day statistics (docs/protocol.md, Messages)."""

    type: Literal["ticker"] = "ticker"
    code: str
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    prev_closing_price: float
    change: str
    """``RISE``, ``EVEN`` or ``FALL``."""
    change_price: float
    signed_change_price: float
    change_rate: float
    signed_change_rate: float
    trade_volume: float
    acc_trade_volume: float
    acc_trade_volume_24h: float
    acc_trade_price: float
    acc_trade_price_24h: float
    trade_date: str
    """``yyyyMMdd`` (UTC); note the trade stream spells it ``yyyy-MM-dd``."""
    trade_time: str
    """``HHmmss`` (UTC)."""
    trade_timestamp: int
    ask_bid: str
    acc_ask_volume: float
    acc_bid_volume: float
    highest_52_week_price: float
    highest_52_week_date: str
    lowest_52_week_price: float
    lowest_52_week_date: str
    market_state: str
    is_trading_suspended: bool | None = None
    """Deprecated by the exchange but still sent."""
    delisting_date: str | DelistingDate | None = None
    market_warning: str | None = None
    """Deprecated by the exchange but still sent."""
    timestamp: int
    stream_type: str
    """``SNAPSHOT`` or ``REALTIME``."""


class Trade(Struct, frozen=True, gc=False, kw_only=True):
    """A ``trade`` frame: one fill on the pair (docs/protocol.md, Messages)."""

    type: Literal["trade"] = "trade"
    code: str
    trade_price: float
    trade_volume: float
    ask_bid: str
    """``ASK``: seller-initiated; ``BID``: buyer-initiated."""
    prev_closing_price: float
    change: str
    change_price: float
    trade_date: str
    """``yyyy-MM-dd`` (UTC)."""
    trade_time: str
    """``HH:mm:ss`` (UTC)."""
    trade_timestamp: int
    timestamp: int
    sequential_id: int
    """Unique trade id, for de-duplication only: its order is not guaranteed."""
    best_ask_price: float | None = None
    """The ``best_*`` fields are absent from frames recorded before about 2024."""
    best_ask_size: float | None = None
    best_bid_price: float | None = None
    best_bid_size: float | None = None
    stream_type: str


class OrderbookUnit(Struct, frozen=True, gc=False, kw_only=True):
    """One price level of an orderbook; index 0 holds the best ask and the best bid."""

    ask_price: float
    bid_price: float
    ask_size: float
    bid_size: float


class Orderbook(Struct, frozen=True, gc=False, kw_only=True):
    """An ``orderbook`` frame: always a whole book, never a delta (docs/protocol.md, Messages)."""

    type: Literal["orderbook"] = "orderbook"
    code: str
    """The pair without the ``.n`` depth suffix of the request."""
    total_ask_size: float
    total_bid_size: float
    orderbook_units: tuple[OrderbookUnit, ...]
    timestamp: int
    level: float = 0.0
    """Price-grouping unit, 0 = none (absent from frames recorded before 2022)."""
    stream_type: str


class Candle(Struct, frozen=True, gc=False, kw_only=True):
    """A ``candle.{unit}`` frame; ``type`` names the unit, e.g. ``candle.1m`` (§8.4)."""

    type: CandleType
    code: str
    candle_date_time_utc: str
    """Candle start, ``yyyy-MM-ddTHH:mm:ss`` (UTC)."""
    candle_date_time_kst: str
    opening_price: float
    high_price: float
    low_price: float
    trade_price: float
    candle_acc_trade_volume: float
    candle_acc_trade_price: float
    timestamp: int
    stream_type: str


class MyOrder(Struct, frozen=True, gc=False, kw_only=True):
    """A private ``myOrder`` frame: an order event of the account (docs/protocol.md, Messages).

    Everything except the order's identity may be ``null`` on the wire or absent in
    older frames (a market buy in state ``wait`` has no volumes; fills alone carry
    ``trade_*``), so those fields are optional: a private event must not be dropped
    because one field was null.
    """

    type: Literal["myOrder"] = "myOrder"
    code: str
    uuid: str
    ask_bid: str
    order_type: str
    """``limit``, ``price`` (market buy by amount), ``market`` (market sell) or ``best``."""
    state: str
    """``wait``, ``watch``, ``trade``, ``done``, ``cancel`` or ``prevented``."""
    trade_uuid: str | None = None
    price: float | None = None
    avg_price: float | None = None
    volume: float | None = None
    remaining_volume: float | None = None
    executed_volume: float | None = None
    trades_count: int | None = None
    reserved_fee: float | None = None
    remaining_fee: float | None = None
    paid_fee: float | None = None
    locked: float | None = None
    executed_funds: float | None = None
    time_in_force: str | None = None
    trade_fee: float | None = None
    is_maker: bool | None = None
    identifier: str | None = None
    smp_type: str | None = None
    prevented_volume: float | None = None
    prevented_locked: float | None = None
    trade_timestamp: int | None = None
    order_timestamp: int | None = None
    timestamp: int
    stream_type: str


class Asset(Struct, frozen=True, gc=False, kw_only=True):
    """One currency's balance in a ``myAsset`` frame, exact to the last digit sent."""

    currency: str
    balance: Decimal
    """Orderable amount."""
    locked: Decimal
    """Amount locked in open orders."""

    def __post_init__(self) -> None:
        # msgspec also accepts a JSON string for a Decimal, which lets "NaN" or "sNaN"
        # in; a balance is always a finite number, and a signalling NaN would make
        # comparing or hashing the message raise far from here.
        if not (self.balance.is_finite() and self.locked.is_finite()):
            raise ValueError("balance and locked must be finite numbers")


class MyAsset(Struct, frozen=True, gc=False, kw_only=True):
    """A private ``myAsset`` frame: the account's changed balances (docs/protocol.md, Messages).

    The wire form has no ``code``; ``code`` is ``""`` so that every message class can
    be read the same way, and :func:`upbus.core.wire._codec.to_default_dict` leaves it out.
    """

    type: Literal["myAsset"] = "myAsset"
    code: str = ""
    asset_uuid: str
    assets: tuple[Asset, ...]
    asset_timestamp: int
    timestamp: int
    stream_type: str


class Status(Struct, frozen=True, gc=False, kw_only=True):
    """The keepalive reply ``{"status":"UP"}`` to a text ``PING`` (docs/protocol.md, Keepalive)."""

    status: str


class ErrorMessage(Struct, frozen=True, gc=False, kw_only=True):
    """An error frame ``{"error":{"name":…,"message":…}}``, flattened (docs/protocol.md, Errors).

    The server closes the connection shortly after sending one.
    """

    name: str
    """``INVALID_AUTH``, ``WRONG_FORMAT``, ``NO_TICKET``, ``NO_TYPE``, ``NO_CODES``, …"""
    message: str = ""
    """Human-readable text, Korean on api.upbit.com and English on the regional sites."""


class SubscriptionEntry(Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """One stream in a ``LIST_SUBSCRIPTIONS`` reply.

    ``codes`` is ``None`` when the entry has none (myAsset); ``level`` is set on
    orderbook entries only.
    """

    type: str
    codes: tuple[str, ...] | None = None
    level: float | None = None


class SubscriptionList(Struct, frozen=True, gc=False, kw_only=True, omit_defaults=True):
    """The reply to a ``LIST_SUBSCRIPTIONS`` request (docs/protocol.md, Requests).

    ``ticket`` is the ticket of the request that asked.
    """

    method: str
    result: tuple[SubscriptionEntry, ...]
    ticket: str | None = None


Message: TypeAlias = Ticker | Trade | Orderbook | Candle | MyOrder | MyAsset
"""A market or account data message."""

ServerMessage: TypeAlias = Message | Status | ErrorMessage | SubscriptionList
"""Anything one server frame can carry."""

CANDLE_TYPES: Final[tuple[CandleType, ...]] = (
    "candle.1s",
    "candle.1m",
    "candle.3m",
    "candle.5m",
    "candle.10m",
    "candle.15m",
    "candle.30m",
    "candle.60m",
    "candle.240m",
)
PUBLIC_TYPES: Final[tuple[str, ...]] = ("ticker", "trade", "orderbook", *CANDLE_TYPES)
"""Data types of the quotation endpoint (``/websocket/v1``)."""
PRIVATE_TYPES: Final[tuple[str, ...]] = ("myOrder", "myAsset")
"""Data types of the private endpoint (``/websocket/v1/private``)."""
DATA_TYPES: Final[tuple[str, ...]] = PUBLIC_TYPES + PRIVATE_TYPES
"""Every data type string upbus understands, as sent in ``type``."""

MESSAGE_CLASSES: Final[Mapping[str, type[Message]]] = MappingProxyType(
    {
        "ticker": Ticker,
        "trade": Trade,
        "orderbook": Orderbook,
        **dict.fromkeys(CANDLE_TYPES, Candle),
        "myOrder": MyOrder,
        "myAsset": MyAsset,
    }
)
"""The class of each data type string (read-only)."""
