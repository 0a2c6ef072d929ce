"""Default rate-limit policy: the exchange's documented limits over rolling windows.

The bus asks once per scope and shares the connect limiter among the connections
of that scope (every public connection shares the IP's budget; private ones share
the account's); each connection gets a message limiter of its own, fresh at every
connect, because the exchange counts messages per connection.
"""

from __future__ import annotations

from upbus.core._errors import OptionError
from upbus.core.sending._ratelimit import (
    RollingWindowLimiter,
    upbit_connect_limiter,
    upbit_message_limiter,
)
from upbus.plugin import LimiterKind, hookimpl
from upbus.settings import Settings


def connect_limiter(scope: str, settings: Settings) -> RollingWindowLimiter:
    """The connect limiter of ``scope`` per the ``rate_limit`` settings."""
    limits = settings.rate_limit
    return upbit_connect_limiter(
        f"connect {scope}",
        per_second=limits.connect_per_second,
        margin=limits.margin,
        max_wait=limits.max_wait,
        backoff_initial=limits.backoff_initial,
        backoff_max=limits.backoff_max,
    )


@hookimpl(trylast=True)
def upbus_make_rate_limiter(
    kind: LimiterKind, scope: str, settings: Settings
) -> RollingWindowLimiter:
    limits = settings.rate_limit
    if kind == "connect":
        return connect_limiter(scope, settings)
    if kind == "message":
        return upbit_message_limiter(
            f"messages {scope}",
            per_second=limits.messages_per_second,
            per_minute=limits.messages_per_minute,
            margin=limits.margin,
            max_wait=limits.max_wait,
            backoff_initial=limits.backoff_initial,
            backoff_max=limits.backoff_max,
        )
    raise OptionError(f"unknown rate limiter kind {kind!r} (expected 'connect' or 'message')")
