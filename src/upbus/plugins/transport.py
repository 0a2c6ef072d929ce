"""Default transport: an httpx upgrade followed by upbus's own wsproto read loop.

Each channel gets its own transport, and so its own long-lived ``httpx.AsyncClient``
(closed by the transport's ``aclose``). The heartbeat timeout bounds the upgrade
request and each closing step: a peer that cannot complete a round trip in that
time counts as dead anyway.

It answers when the ``transport`` setting is ``"auto"`` (as the last resort: it is
``trylast``, so any other transport plugin that can run is asked first) or ``"httpx"``.
"""

from __future__ import annotations

from upbus.core.wire._httpx import HttpxWsTransport
from upbus.plugin import hookimpl
from upbus.settings import Settings


@hookimpl(trylast=True)
def upbus_make_transport(settings: Settings) -> HttpxWsTransport | None:
    if settings.transport not in ("auto", "httpx"):
        return None
    return HttpxWsTransport(
        handshake_timeout=settings.heartbeat_timeout,
        close_timeout=settings.heartbeat_timeout,
    )
