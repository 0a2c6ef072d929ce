"""The channel's current connection as the batcher's sink, and the route of every frame.

Requests go out through :meth:`ConnectionSink.send_state`; the batcher took their
slot from the :class:`~upbus.core.sending._ratelimit.ConnectionBudget` first.
Every other frame (a keepalive text ``PING``, a ``LIST_SUBSCRIPTIONS``) goes
through :meth:`ConnectionSink.send_extra`, which takes its slot from the same
budget. The exchange counts requests and ``LIST_SUBSCRIPTIONS`` against one
per-connection limit; whether a text ``PING`` counts is unverified, so it is
charged too (docs/protocol.md, "Limits").
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from upbus.core._errors import LimiterWaitExpired
from upbus.core.connection._metrics import ConnectionMetrics
from upbus.core.sending._batcher import SinkUnavailable
from upbus.core.sending._ratelimit import ConnectionBudget, RateLimiter
from upbus.core.subscriptions._specs import Channel
from upbus.core.subscriptions._state import MergedState
from upbus.core.wire._codec import encode_request, new_ticket
from upbus.core.wire._transport import Connection, TransportError

__all__ = ("ConnectionSink",)

log = logging.getLogger("upbus.connection")

OnSent = Callable[[Connection, MergedState, int], None]
"""``on_sent(connection, state, size)``: a request installing ``state`` went out."""


class ConnectionSink:
    """The current connection of one channel (a :class:`~upbus.core.sending._batcher.RequestSink`).

    The manager opens it on every connect and closes it when the connection
    ends; the batcher holds it for the channel's lifetime. Listeners added with
    :meth:`add_resync_listener` (the bus adds the batcher's ``resend``) hear when
    the connection holds nothing to rely on and needs the whole latest state.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        budget: ConnectionBudget,
        metrics: ConnectionMetrics,
        on_sent: OnSent,
        fmt: str = "DEFAULT",
    ) -> None:
        self.channel = channel
        self.budget = budget
        self._metrics = metrics
        self._on_sent = on_sent
        self._format = fmt
        self._listeners: list[Callable[[], None]] = []
        self.conn: Connection | None = None
        # An empty state closed the connection on purpose: the end is not a gap.
        self.closing = False
        # An error frame whose close is awaited; meanwhile nothing is sent.
        self.error_frame: str | None = None
        self._send_refused = False  # a send was refused while an error frame was pending
        self.last_sent: MergedState | None = None

    def add_resync_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever the connection needs the whole latest state."""
        self._listeners.append(listener)

    # -- the manager's side -------------------------------------------------------------

    def open(self, conn: Connection, limiter: RateLimiter) -> None:
        """Send on ``conn`` from now on, charged to ``limiter``."""
        self.conn = conn
        self.budget.use(limiter)
        self.error_frame = None
        self._send_refused = False

    def close(self) -> None:
        """The connection ended: sends raise :class:`SinkUnavailable` until the next one."""
        self.conn = None
        self.error_frame = None
        self.budget.use(None)

    def resync(self) -> None:
        """Tell the listeners that the connection needs the whole latest state."""
        for listener in self._listeners:
            listener()

    def pause(self, error_frame: str) -> None:
        """The exchange sent an error frame and closes the connection next: send nothing."""
        self.error_frame = error_frame

    def resume(self) -> None:
        """The connection stayed open after the error frame: sending may resume."""
        self.error_frame = None
        if self._send_refused:
            self._send_refused = False
            self.resync()

    # -- the batcher's side -------------------------------------------------------------

    async def send_state(self, state: MergedState) -> int:
        conn = self.conn
        if conn is None:
            raise SinkUnavailable(f"{self.channel.value}: not connected")
        if self.error_frame is not None:
            # The exchange closes this connection next; a request now would be
            # ignored, and the state goes out on the next connection instead.
            self._send_refused = True
            raise SinkUnavailable(
                f"{self.channel.value}: the connection is closing after error {self.error_frame}"
            )
        if not state:
            # There is no unsubscribe message: an empty state ends the stream by
            # closing the connection; the next subscription reconnects.
            log.info("%s: no subscriptions left, closing the connection", self.channel.value)
            self.closing = True
            await conn.aclose()
            return 0
        text = encode_request(new_ticket(), state.request_objects(), self._format)
        await conn.send_text(text)
        size = len(text.encode())
        self._metrics.count_out(size)
        self.last_sent = state
        self._on_sent(conn, state, size)
        return size

    # -- every other frame --------------------------------------------------------------

    async def send_extra(self, text: str) -> bool:
        """Send a frame that is not a subscription request, charged to this connection's budget.

        The one route for keepalive ``PING`` and ``LIST_SUBSCRIPTIONS`` frames.
        Returns ``False`` (and logs at DEBUG) when there is no connection, the
        budget's wait expired, or the send failed.
        """
        conn = self.conn
        try:
            if conn is None or not await self.budget.acquire():
                return False
            await conn.send_text(text)
        except (LimiterWaitExpired, TransportError) as exc:
            log.debug("%s: could not send %s: %s", self.channel.value, text[:20], exc)
            return False
        self._metrics.count_out(len(text.encode()))
        return True
