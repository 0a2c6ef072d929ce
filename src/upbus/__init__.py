"""upbus: one merged, rate-limited set of Upbit WebSocket subscriptions for many components.

The names most programs need are here::

    import upbus

    manager = upbus.SubscriptionManager()
    specs = [upbus.ticker("KRW-BTC"), upbus.orderbook("KRW-BTC", depth=15)]
    manager.register_component(chart, specs)

Plugin authors decorate hook implementations with :data:`upbus.hookimpl`.
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
    PluginError,
    PluginLoadError,
    SpecError,
    UpbusError,
)
from upbus.core.delivery._events import BusEvent, ConnectionEvent, Dropped, Rejected
from upbus.core.delivery._router import Subscriber
from upbus.core.hooks._hookspecs import hookimpl
from upbus.core.hooks._manager import PluginManager
from upbus.core.sending._batcher import PendingTaskBatcher
from upbus.core.sending._ratelimit import RollingWindowLimiter
from upbus.core.subscriptions._manager import SubscriptionManager
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
from upbus.core.wire._transport import ConnectFailed, TransportError
from upbus.settings import Settings, load_settings

__all__ = (
    "BlockingBus",
    "Bus",
    "BusEvent",
    "BusNotRunning",
    "Channel",
    "ComponentError",
    "ConfigError",
    "ConnectFailed",
    "ConnectionEvent",
    "Dropped",
    "LimiterWaitExpired",
    "MergedState",
    "PendingTaskBatcher",
    "PluginError",
    "PluginLoadError",
    "PluginManager",
    "Rejected",
    "RollingWindowLimiter",
    "Settings",
    "Spec",
    "SpecError",
    "StateChange",
    "Subscriber",
    "SubscriptionManager",
    "TransportError",
    "UpbusError",
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
