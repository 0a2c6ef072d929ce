"""Scale-out over NATS: remote buses, gateways, and one connect budget per host.

With ``upstream = "gateway"`` the bus's transport is NATS: its merged state becomes
a lease in a JetStream KV bucket, and its messages come from the subjects the
leading ``upbus gateway`` publishes to. With ``nats_url`` set on an exchange-mode
bus (a gateway's included), connects take their slot from a budget that every
process on the host shares through NATS. docs/scale-out.md has the whole picture.
"""

from __future__ import annotations

from upbus.core.sending._ratelimit import RateLimiter, upbit_connect_limiter
from upbus.plugin import LimiterKind, hookimpl
from upbus.settings import Settings

__all__ = ()


@hookimpl(tryfirst=True)
def upbus_make_rate_limiter(
    kind: LimiterKind, scope: str, settings: Settings
) -> RateLimiter | None:
    if kind != "connect" or settings.nats_url is None or settings.upstream != "exchange":
        return None
    from upbus.plugins.nats._limiter import SharedConnectLimiter

    limits = settings.rate_limit
    local = upbit_connect_limiter(
        f"connect {scope}",
        per_second=limits.connect_per_second,
        margin=limits.margin,
        max_wait=limits.max_wait,
        backoff_initial=limits.backoff_initial,
        backoff_max=limits.backoff_max,
    )
    return SharedConnectLimiter(settings, scope, local)
