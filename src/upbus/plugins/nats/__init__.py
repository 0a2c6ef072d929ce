"""Scale-out over NATS: remote buses, gateways, and one connect budget per host.

With ``upstream = "gateway"`` the bus's transport is NATS: its merged state becomes
a lease in a JetStream KV bucket, and its messages come from the subjects the
leading ``upbus gateway`` publishes to. With ``nats_url`` set on an exchange-mode
bus (a gateway's included), connects take their slot from a budget that every
process on the host shares through NATS. docs/scale-out.md has the whole picture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upbus.core.sending._ratelimit import RateLimiter
from upbus.core.subscriptions._specs import Channel
from upbus.plugin import LimiterKind, hookimpl
from upbus.plugins.ratelimit import connect_limiter
from upbus.settings import Settings

if TYPE_CHECKING:
    from upbus.plugins.nats._gateway import Gateway
    from upbus.plugins.nats._remote import RemoteTransport

__all__ = ("Gateway",)


def __getattr__(name: str) -> object:
    # The gateway imports the bus; importing it lazily keeps plugin loading light.
    if name == "Gateway":
        from upbus.plugins.nats._gateway import Gateway

        return Gateway
    raise AttributeError(name)


@hookimpl(tryfirst=True)
def upbus_make_transport(channel: Channel, settings: Settings) -> RemoteTransport | None:
    if settings.upstream != "gateway":
        return None
    from upbus.plugins.nats._remote import RemoteTransport

    return RemoteTransport(channel, settings)


@hookimpl(tryfirst=True)
def upbus_make_rate_limiter(
    kind: LimiterKind, scope: str, settings: Settings
) -> RateLimiter | None:
    if kind != "connect" or settings.nats_url is None or settings.upstream != "exchange":
        return None
    from upbus.plugins.nats._limiter import SharedConnectLimiter

    # The host's budget is shared; the local one still holds this process's back-off.
    local = connect_limiter(scope, settings)
    return SharedConnectLimiter(settings, scope, local)
