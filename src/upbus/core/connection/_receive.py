"""The receive loop: decode every frame, count it, hand the data to ``deliver``.

This is the per-message path: the loop keeps what it needs in locals and makes
one ``deliver`` call per socket read.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Awaitable, Callable

from upbus.core.connection._metrics import ConnectionMetrics
from upbus.core.connection._refusals import Refusals
from upbus.core.hooks._hookspecs import FrameTap
from upbus.core.wire._codec import FrameDecoder
from upbus.core.wire._messages import ErrorMessage, Message, Status, SubscriptionList
from upbus.core.wire._transport import Connection

__all__ = ("ReceiveLoop",)

log = logging.getLogger("upbus.connection")

_TYPE_OF = operator.attrgetter("type")


class ReceiveLoop:
    """Reads one connection until it ends (the transport's error ends it).

    :param deliver: called with the data messages of each socket read; must not block.
    :param backpressure: awaited after each delivery (the ``block`` overflow policy).
    :param on_control: called with each status, error and subscription-list message.
    :param on_first_data: called once per connection, at its first data message.
    :param tap: called with the raw frames and the data messages of each read.
    """

    def __init__(
        self,
        channel: str,
        *,
        metrics: ConnectionMetrics,
        refusals: Refusals,
        deliver: Callable[[list[Message]], None],
        backpressure: Callable[[], Awaitable[None]] | None,
        on_control: Callable[[Status | ErrorMessage | SubscriptionList], None],
        on_first_data: Callable[[], None],
        tap: FrameTap | None = None,
    ) -> None:
        self._channel = channel
        self._metrics = metrics
        self._refusals = refusals
        self._deliver = deliver
        self._backpressure = backpressure
        self._on_control = on_control
        self._on_first_data = on_first_data
        self._tap = tap
        self._decoder = FrameDecoder()

    async def run(self, conn: Connection) -> None:
        """Receive from ``conn`` until its transport raises."""
        decode_batch = self._decoder.decode_batch
        deliver = self._deliver
        backpressure = self._backpressure
        on_control = self._on_control
        metrics = self._metrics
        counts = metrics.counts
        by_type = metrics.by_type
        tracker = self._refusals.tracker
        tap = self._tap
        carried = False  # this connection delivered data
        while True:
            frames = await conn.receive_batch()
            counts["frames_in"] += len(frames)
            counts["bytes_in"] += sum(map(len, frames))
            batch, control, errors = decode_batch(frames)
            if tap is not None:
                tap(frames, batch)
            for exc in errors:
                counts["decode_errors"] += 1
                log.warning("%s: %s", self._channel, exc)
            for message in control:
                on_control(message)
            if batch:
                counts["messages_in"] += len(batch)
                by_type.update(map(_TYPE_OF, batch))  # counted in C
                metrics.last_message_time = time.time()
                if not carried:
                    carried = True
                    self._on_first_data()
                if tracker.waiting:
                    self._refusals.witness(batch)
                deliver(batch)
                if backpressure is not None:
                    await backpressure()
