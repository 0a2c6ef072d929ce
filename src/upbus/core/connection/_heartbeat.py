"""Pings that catch half-open sockets (docs/protocol.md, "Keepalive")."""

from __future__ import annotations

import logging

from anyio import CancelScope

from upbus.core._clock import Clock
from upbus.core.connection._metrics import ConnectionMetrics
from upbus.core.connection._sink import ConnectionSink
from upbus.core.wire._transport import Connection, TransportError

__all__ = ("heartbeat",)

log = logging.getLogger("upbus.connection")


async def heartbeat(
    conn: Connection,
    scope: CancelScope,
    *,
    sink: ConnectionSink,
    metrics: ConnectionMetrics,
    clock: Clock,
    interval: float,
    timeout: float,
    text_ping: bool,
) -> None:
    """Ping ``conn`` every ``interval`` seconds; cancel ``scope`` when no pong comes in time.

    With ``text_ping`` a text ``PING`` frame goes first, through the sink's
    :meth:`~ConnectionSink.send_extra` (it counts against the message budget).
    """
    channel = sink.channel.value
    while True:
        await clock.sleep(interval)
        if text_ping and not await sink.send_extra("PING"):
            return
        try:
            metrics.ping_rtt = await conn.ping(timeout)
        except TimeoutError:
            # No pong: the socket is half-open. Drop it; the manager reconnects.
            metrics.counts["heartbeat_timeouts"] += 1
            metrics.last_error = f"no pong within {timeout}s"
            log.warning("%s: %s; replacing the connection", channel, metrics.last_error)
            scope.cancel()
            return
        except TransportError:
            return  # the receive loop sees the same failure
