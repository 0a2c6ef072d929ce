"""upbus: one merged, rate-limited set of Upbit WebSocket subscriptions for many components.

The names most programs need are here::

    import upbus

    manager = upbus.SubscriptionManager()
    specs = [upbus.ticker("KRW-BTC"), upbus.orderbook("KRW-BTC", depth=15)]
    manager.register_component(chart, specs)

Plugin authors decorate hook implementations with :data:`upbus.hookimpl`; everything
else they need (protocols, hook kinds, the transport errors) is in :mod:`upbus.plugin`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from upbus.core._blocking import BlockingBus
from upbus.core._bus import Bus
from upbus.core._errors import (
    BusNotRunning,
    ComponentError,
    ConfigError,
    LimiterWaitExpired,
    OptionError,
    PluginError,
    PluginLoadError,
    SpecError,
    UpbusError,
    UsageError,
)
from upbus.core.delivery._buffer import Overflow, Subscriber
from upbus.core.delivery._events import BusEvent, ConnectionEvent, Dropped, Rejected
from upbus.core.hooks._hookspecs import RateLimiter, hookimpl
from upbus.core.hooks._manager import PluginManager
from upbus.core.sending._batcher import Batcher, PendingTaskBatcher
from upbus.core.sending._ratelimit import RollingWindowLimiter
from upbus.core.subscriptions._manager import SubscriptionManager
from upbus.core.subscriptions._merge import Merger
from upbus.core.subscriptions._specs import (
    Channel,
    Spec,
    candle,
    my_asset,
    my_order,
    orderbook,
    parse_specs,
    ticker,
    trade,
)
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
from upbus.settings import Settings, load_settings

__all__ = (
    "Asset",
    "Batcher",
    "BlockingBus",
    "Bus",
    "BusEvent",
    "BusNotRunning",
    "Candle",
    "Channel",
    "ComponentError",
    "ConfigError",
    "ConnectFailed",
    "Connection",
    "ConnectionClosed",
    "ConnectionEvent",
    "Dropped",
    "HandshakeRejected",
    "LimiterWaitExpired",
    "MergedState",
    "Merger",
    "Message",
    "MyAsset",
    "MyOrder",
    "OptionError",
    "Orderbook",
    "OrderbookUnit",
    "Overflow",
    "PendingTaskBatcher",
    "PluginError",
    "PluginLoadError",
    "PluginManager",
    "RateLimiter",
    "Rejected",
    "RollingWindowLimiter",
    "Settings",
    "Spec",
    "SpecError",
    "StateChange",
    "Subscriber",
    "SubscriptionManager",
    "Ticker",
    "Trade",
    "Transport",
    "TransportError",
    "UpbusError",
    "UsageError",
    "WireEntry",
    "__version__",
    "candle",
    "hookimpl",
    "load_settings",
    "my_asset",
    "my_order",
    "orderbook",
    "parse_specs",
    "ticker",
    "trade",
)
