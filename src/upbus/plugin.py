"""Everything a plugin author needs, in one module.

A plugin is a module (or a class, or an instance) whose functions are marked with
:data:`hookimpl` and named after the hooks in :class:`UpbusHookSpecs`. A
distribution makes it known through an entry point in the ``upbus`` group::

    [project.entry-points.upbus]
    my_plugin = "my_package.upbus_plugin"

What it holds:

- :data:`hookimpl`, and the hook specifications with their kinds (:data:`HOOKS`);
- the objects the policy hooks return, as protocols: :class:`Merger`,
  :class:`Batcher` (with the :class:`RequestSink` and :class:`RequestLimiter`
  it is given), :class:`RateLimiter`, :class:`Transport` and :class:`Connection`;
- the values hooks and components see: :class:`Channel`, :class:`Wish` and
  :class:`Spec`, :class:`MergedState`, :class:`WireEntry`, :class:`StateChange`;
- the message types (:data:`Message` is their union) and the events a
  component's stream carries (:class:`BusEvent` and its subclasses);
- :data:`Overflow`, the buffer policies a component declares as ``upbus_overflow``;
- the errors a transport raises (:class:`TransportError` and its subclasses).

See docs/plugins.md for the hooks, their arguments and an example distribution.
"""

from __future__ import annotations

from upbus.core.delivery._buffer import Overflow, Subscriber
from upbus.core.delivery._events import BusEvent, ConnectionEvent, Dropped, Rejected
from upbus.core.hooks._hookspecs import (
    HOOKS,
    ConnectionState,
    FrameTap,
    HookKind,
    HookSpec,
    LimiterKind,
    RateLimiter,
    UpbusHookSpecs,
    hookimpl,
)
from upbus.core.sending._batcher import Batcher, RequestLimiter, RequestSink, SinkUnavailable
from upbus.core.subscriptions._merge import Merger
from upbus.core.subscriptions._specs import PRIVATE_TYPES, PUBLIC_TYPES, Channel, Mode, Spec, Wish
from upbus.core.subscriptions._state import MergedState, StateChange, WireEntry
from upbus.core.wire._messages import (
    Asset,
    Candle,
    Message,
    MyAsset,
    MyOrder,
    Orderbook,
    OrderbookUnit,
    Ticker,
    Trade,
)
from upbus.core.wire._transport import (
    ConnectFailed,
    Connection,
    ConnectionClosed,
    HandshakeRejected,
    Transport,
    TransportError,
)

__all__ = (
    "HOOKS",
    "PRIVATE_TYPES",
    "PUBLIC_TYPES",
    "Asset",
    "Batcher",
    "BusEvent",
    "Candle",
    "Channel",
    "ConnectFailed",
    "Connection",
    "ConnectionClosed",
    "ConnectionEvent",
    "ConnectionState",
    "Dropped",
    "FrameTap",
    "HandshakeRejected",
    "HookKind",
    "HookSpec",
    "LimiterKind",
    "MergedState",
    "Merger",
    "Message",
    "Mode",
    "MyAsset",
    "MyOrder",
    "Orderbook",
    "OrderbookUnit",
    "Overflow",
    "RateLimiter",
    "Rejected",
    "RequestLimiter",
    "RequestSink",
    "SinkUnavailable",
    "Spec",
    "StateChange",
    "Subscriber",
    "Ticker",
    "Trade",
    "Transport",
    "TransportError",
    "UpbusHookSpecs",
    "WireEntry",
    "Wish",
    "hookimpl",
)
