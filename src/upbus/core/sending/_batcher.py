"""The batcher: one pending send task per connection (the original design's "pending state").

A change while no task is pending creates one; a change while one is pending is
absorbed by it. The task waits the debounce delay, then the rate limiter, then
reads the *latest* state and sends it as one request.

The original design's sketch could lose a change that arrived after the task had
read the state. Here the task compares the state's version after each send and
goes round again until what it sent is the latest (no lost update), and it sends
nothing when the latest state equals what the connection already has (no useless
send).

The batcher owns the send path: it is given a sink (the channel's current
connection) and a limiter (that connection's message budget), and is told
through :meth:`Batcher.resend` when the connection holds nothing it can rely on.
It knows nothing of transports: a sink without a usable connection raises
:class:`SinkUnavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from anyio.abc import TaskGroup
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Tracer

from upbus.core import _telemetry as telemetry
from upbus.core._clock import AnyioClock, Clock
from upbus.core._errors import LimiterWaitExpired, OptionError
from upbus.core.subscriptions._specs import Channel
from upbus.core.subscriptions._state import MergedState, StateChange, WireEntry

__all__ = ("Batcher", "PendingTaskBatcher", "RequestLimiter", "RequestSink", "SinkUnavailable")

log = logging.getLogger("upbus.batcher")

# A send span links to the changes it carried; past this many it only counts them,
# so a burst of thousands of changes cannot make one span huge.
MAX_LINKS = 128


class SinkUnavailable(Exception):
    """The sink has no usable connection right now (none yet, or one about to close).

    Not a failure: the state stays wanted, and the batcher is told through
    :meth:`Batcher.resend` once a connection can take it.
    """


class RequestSink(Protocol):
    """Where a merged state goes: the connection of one channel."""

    async def send_state(self, state: MergedState) -> int:
        """Install ``state`` on the connection as one request; return the bytes sent.

        Raises :class:`SinkUnavailable` when there is no usable connection, any
        other exception when the send failed; either way :meth:`Batcher.resend`
        follows once a connection can take the whole state.
        """
        ...


class RequestLimiter(Protocol):
    """The part of a rate limiter the batcher uses (see :mod:`upbus.core.sending._ratelimit`)."""

    async def wait(self, max_wait: float | None = None) -> float:
        """Wait until one request may go, without taking it; return the seconds waited."""
        ...

    def take(self, now: float | None = None) -> None:
        """Record one request as sent now."""
        ...


class Batcher(Protocol):
    """Sends one channel's merged state. Made by the ``upbus_make_batcher`` hook."""

    def start(self, task_group: TaskGroup) -> None:
        """Run pending tasks in ``task_group`` from now on."""
        ...

    def notify(self, change: StateChange) -> None:
        """The channel's state changed (a :class:`SubscriptionManager` listener)."""
        ...

    def resend(self) -> None:
        """The connection holds nothing to rely on: send the whole latest state at once.

        Called through the sink's listeners after every connect (a reconnect's
        first request is the whole latest state, through the limiter), when the
        exchange's subscriptions were found to differ from what was sent, and
        when a connection that refused a send during an error turned out to stay open.
        """
        ...

    def status(self) -> dict[str, Any]:
        """The pending task's state and counters."""
        ...


class PendingTaskBatcher:
    """The default batcher.

    :param channel: the channel whose state this batcher sends.
    :param source: returns the latest state (and collects dead components first).
    :param current_version: the channel's state version, read without side effects.
    :param sink: the connection.
    :param limiter: the connection's request limiter.
    :param debounce: seconds to collect further changes before sending.
    :param max_wait: the longest single limiter wait; on expiry the state stays
        pending and the wait starts again.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        source: Callable[[], MergedState],
        current_version: Callable[[], int],
        sink: RequestSink,
        limiter: RequestLimiter,
        debounce: float = 0.1,
        max_wait: float = 15.0,
        clock: Clock | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        if debounce < 0:
            raise OptionError(f"debounce must be >= 0, got {debounce!r}")
        if max_wait <= 0:
            raise OptionError(f"max_wait must be > 0, got {max_wait!r}")
        self.channel = channel
        self._source = source
        self._current_version = current_version
        self._sink = sink
        self._limiter = limiter
        self._debounce = debounce
        self._max_wait = max_wait
        self._clock = clock or AnyioClock()
        self._tracer = tracer or telemetry.get_tracer()
        self._task_group: TaskGroup | None = None
        self._pending = False
        self._immediate = False
        self._connects = 0  # resend() calls: a connection that has nothing to rely on
        self._phase = "idle"
        # What the connection has: a fresh connection has no subscriptions (empty
        # entries); None means unknown (a send failed halfway), so anything goes out.
        self._sent_entries: tuple[WireEntry, ...] | None = ()
        self._sent_version: int | None = None
        self._links: list[Link] = []
        self._coalesced = 0
        self._counts = {
            "tasks_created": 0,
            "changes_merged": 0,
            "requests_sent": 0,
            "nothing_to_send": 0,
            "limiter_expiries": 0,
            "send_failures": 0,
        }

    # -- Batcher protocol ------------------------------------------------------------

    def start(self, task_group: TaskGroup) -> None:
        self._task_group = task_group
        if self._pending:
            # Changes arrived before the bus started: their task starts now.
            task_group.start_soon(self._run, name=f"upbus {self.channel.value} pending send")

    def notify(self, change: StateChange) -> None:
        self._coalesced += 1
        if change.context is not None and len(self._links) < MAX_LINKS:
            self._links.append(_link(change.context, change))
        if self._pending:
            self._counts["changes_merged"] += 1
            log.debug(
                "%s: change merged into pending task (%s %s, version %d)",
                self.channel.value,
                change.reason,
                change.component,
                change.version,
            )
            return
        self._schedule()
        log.debug(
            "%s: pending send task created (%s %s, version %d)",
            self.channel.value,
            change.reason,
            change.component,
            change.version,
        )

    def resend(self) -> None:
        self._sent_entries = ()
        self._connects += 1
        self._immediate = True
        if not self._pending:
            self._schedule()

    def status(self) -> dict[str, Any]:
        return {
            "channel": self.channel.value,
            "pending": self._pending,
            "done": not self._pending,
            "phase": self._phase,
            "changes_waiting": self._coalesced,
            "sent_version": self._sent_version,
            "latest_version": self._current_version(),
            **self._counts,
        }

    # -- the pending task ------------------------------------------------------------

    def _schedule(self) -> None:
        self._pending = True
        self._counts["tasks_created"] += 1
        if self._task_group is not None:
            self._task_group.start_soon(self._run, name=f"upbus {self.channel.value} pending send")

    async def _run(self) -> None:
        try:
            while await self._cycle():
                pass
        finally:
            self._pending = False
            self._phase = "idle"

    async def _cycle(self) -> bool:
        """One debounce-limit-send round; return whether another round is needed."""
        clock = self._clock
        self._phase = "debounce"
        started = clock.now()
        if self._immediate:
            self._immediate = False
            await clock.sleep(0)
        else:
            await clock.sleep(self._debounce)
        debounce_wait = clock.now() - started

        state = self._source()
        if self._is_sent(state):
            return self._nothing_to_send()
        if not state.entries:
            return await self._send_empty(state)

        self._phase = "limiter"
        started = clock.now()
        while True:
            try:
                await self._limiter.wait(self._max_wait)
                break
            except LimiterWaitExpired as exc:
                # The wanted state stays pending: wait again rather than drop it.
                self._counts["limiter_expiries"] += 1
                log.warning("%s: %s; the state stays pending", self.channel.value, exc)
        limiter_wait = clock.now() - started

        # Read the latest state only now: everything that changed while we waited
        # goes out in this one request. No await between here and take().
        state = self._source()
        if self._is_sent(state):
            return self._nothing_to_send()
        connects = self._connects
        self._limiter.take()
        links, coalesced = self._links, self._coalesced
        self._links, self._coalesced = [], 0
        self._phase = "sending"
        if not await self._send(state, links, coalesced, debounce_wait, limiter_wait):
            return False
        if self._connects != connects:
            # A new connection came while this was in flight: it has nothing yet.
            self._sent_entries = ()
            return True
        # This request carried the whole latest state, which is what a resend()
        # during the waits asked for: the next change waits its debounce again.
        self._immediate = False
        # A change during the waits or the send has a newer version: go round again.
        return self._current_version() != state.version

    async def _send_empty(self, state: MergedState) -> bool:
        # Nothing is wanted any more. There is no unsubscribe message: the sink ends
        # the stream by closing the connection, which is not a request and takes no
        # slot from the message budget.
        self._links, self._coalesced = [], 0
        log.info("%s: nothing subscribed any more; ending the stream", self.channel.value)
        try:
            await self._sink.send_state(state)
        except Exception as exc:
            log.debug("%s: ending the stream: %s", self.channel.value, exc)
        self._sent_entries = ()
        self._sent_version = state.version
        return self._current_version() != state.version

    def _nothing_to_send(self) -> bool:
        self._counts["nothing_to_send"] += 1
        self._links, self._coalesced = [], 0
        log.debug("%s: nothing to send, the connection has the latest state", self.channel.value)
        return False

    def _is_sent(self, state: MergedState) -> bool:
        return self._sent_entries == state.entries

    async def _send(
        self,
        state: MergedState,
        links: list[Link],
        coalesced: int,
        debounce_wait: float,
        limiter_wait: float,
    ) -> bool:
        channel = self.channel.value
        types = sorted({entry.type for entry in state.entries})
        codes = state.code_count()
        log.info(
            "%s: sending merged state version %d (%d entries, %d codes, %d changes)",
            channel,
            state.version,
            len(state.entries),
            codes,
            coalesced,
        )
        with self._tracer.start_as_current_span(
            f"send upbit.{channel}",
            # A root span: the task inherited the context of whoever created it, but
            # it carries many callers' changes, each of them linked below.
            context=Context(),
            kind=SpanKind.CLIENT,
            links=links,
            record_exception=True,
            attributes={
                telemetry.SYSTEM: "upbit",
                telemetry.OPERATION_TYPE: "send",
                telemetry.OPERATION_NAME: "subscribe",
                telemetry.DESTINATION: channel,
                telemetry.BATCH_COUNT: coalesced,
                "upbus.state.version": state.version,
                "upbus.debounce.wait_s": debounce_wait,
                "upbus.limiter.wait_s": limiter_wait,
                "upbus.request.entries": len(state.entries),
                "upbus.request.codes": codes,
                "upbus.request.types": types,
            },
        ) as span:
            try:
                size = await self._sink.send_state(state)
            except SinkUnavailable:
                # Not a failure: the connection is being made, and its first
                # request after the connect is the whole latest state, which
                # then carries these changes (and their links).
                self._sent_entries = None
                self._links = (links + self._links)[:MAX_LINKS]
                self._coalesced += coalesced
                # The documented value of error.type for this case (docs/operations.md).
                span.set_attribute("error.type", "NotConnected")
                log.debug("%s: not connected yet; the state goes out after the connect", channel)
                return False
            except Exception as exc:
                # What the connection has is unknown now; resend() follows the
                # next connect, which restores the whole latest state.
                self._sent_entries = None
                self._counts["send_failures"] += 1
                span.set_attribute("error.type", type(exc).__name__)
                log.warning("%s: sending failed (%s); the state stays wanted", channel, exc)
                return False
            span.set_attribute(telemetry.BODY_SIZE, size)
        self._sent_entries = state.entries
        self._sent_version = state.version
        self._counts["requests_sent"] += 1
        log.info(
            "%s: sent state version %d: %d %s types (%s), %d bytes",
            channel,
            state.version,
            len(types),
            channel,
            ", ".join(types) or "nothing",
            size,
        )
        return True


def _link(context: SpanContext, change: StateChange) -> Link:
    return Link(
        context,
        {"upbus.change.reason": change.reason, "upbus.state.version": change.version},
    )
