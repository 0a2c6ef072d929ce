"""WebSocketManager: one channel's connection, kept alive and in sync.

It connects when the channel first has subscriptions (through the bus's connect
limiter of its scope), makes the first request after every connect the
whole latest state (through a message limiter of that connection), pings to catch
half-open sockets, reconnects with capped, fully jittered exponential backoff, and
decodes every frame in its own receive loop, handing the messages to ``deliver``
in one plain call per socket read.

It does not send the state itself, nor know the batcher: the batcher is given
:attr:`WebSocketManager.sink` (the current connection) and
:attr:`WebSocketManager.budget` (the current connection's message limiter), and
hears through the sink's listeners when a connection needs the whole state.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from upbus.core._clock import AnyioClock, Clock
from upbus.core._errors import LimiterWaitExpired
from upbus.core.connection._heartbeat import heartbeat
from upbus.core.connection._metrics import ConnectionMetrics
from upbus.core.connection._receive import ReceiveLoop
from upbus.core.connection._refusals import OnRejected, Refusals
from upbus.core.connection._sink import ConnectionSink
from upbus.core.connection._verify import DriftCheck
from upbus.core.sending._ratelimit import ConnectionBudget, RateLimiter
from upbus.core.subscriptions._manager import SubscriptionManager
from upbus.core.subscriptions._quarantine import REQUEST_ERRORS
from upbus.core.subscriptions._specs import Channel
from upbus.core.subscriptions._state import MergedState, StateChange
from upbus.core.wire._messages import ErrorMessage, Message, Status, SubscriptionList
from upbus.core.wire._transport import (
    ConnectFailed,
    Connection,
    ConnectionClosed,
    HandshakeRejected,
    Transport,
    TransportError,
)

if TYPE_CHECKING:
    from upbus.core.hooks._hookspecs import ConnectionState, FrameTap

__all__ = ("OnRejected", "WebSocketManager")

log = logging.getLogger("upbus.connection")

# Error names the exchange uses (or may use) for rate limiting; the wire form is
# not documented, so every known spelling counts.
TOO_MANY = frozenset({"Too Many Requests", "TOO_MANY_REQUEST", "TOO_MANY_REQUESTS"})
BANNED = frozenset({"I'm a teapot"})


class WebSocketManager:
    """Holds one channel's connection: connect, auth, heartbeat, reconnect, resubscribe, receive.

    :param deliver: called with the data messages of each socket read, on the event
        loop; it must not block (the bus puts them into per-subscriber buffers).
    :param on_state: called with ``(state, detail)`` on ``connecting``,
        ``connected``, ``reconnected``, ``gap`` and ``closed``.
    :param headers: builds the upgrade headers for each connect (a fresh JWT for
        the private channel).
    :param on_rejected: called once per quarantine decision with, for each live
        component affected, ``(component, its quarantined wishes)``, and a detail
        such as ``"INVALID_PARAM: codes field is empty."``; also when a component
        registers a wish that is quarantined already. Never called from inside
        :meth:`SubscriptionManager.register_component`: a registration's notice
        comes from a task of :meth:`run`, after the registration returned.
    :param confirm_after: seconds a request must stand on its connection without an
        error to count as accepted, when no data for a key it added arrived first.
    :param tap: sees the raw frames and data messages of every read (``upbus_frame_tap``).
    :param error_close_grace: seconds after an error frame within which a close is
        that error's doing (the exchange closes 150-180 ms after the frame);
        meanwhile nothing is sent on the connection. A connection still open after
        it is used again.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        url: str,
        transport: Transport,
        subscriptions: SubscriptionManager,
        connect_limiter: RateLimiter,
        make_message_limiter: Callable[[str], RateLimiter],
        deliver: Callable[[list[Message]], None],
        backpressure: Callable[[], Awaitable[None]] | None = None,
        on_state: Callable[[ConnectionState, str], None] | None = None,
        on_sent: Callable[[MergedState, int], None] | None = None,
        on_rejected: OnRejected | None = None,
        headers: Callable[[], Mapping[str, str]] = dict,
        fmt: str = "DEFAULT",
        heartbeat_interval: float = 30.0,
        heartbeat_timeout: float = 10.0,
        text_ping: bool = False,
        verify_subscriptions: bool = False,
        verify_delay: float = 1.0,
        reconnect_initial: float = 0.5,
        reconnect_max: float = 30.0,
        reconnect_multiplier: float = 2.0,
        max_attempts: int | None = None,
        confirm_after: float = 1.0,
        error_close_grace: float = 1.0,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        tap: FrameTap | None = None,
    ) -> None:
        self.channel = channel
        self.url = url
        self._transport = transport
        self._subscriptions = subscriptions
        self._connect_limiter = connect_limiter
        self._make_message_limiter = make_message_limiter
        self._on_state = on_state
        self._on_sent = on_sent
        self._error_close_grace = error_close_grace
        self._rate_limited = False  # this connection got a rate-limit error
        self._headers = headers
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._text_ping = text_ping
        self._verify = verify_subscriptions
        self._conn_tasks: TaskGroup | None = None
        self._reconnect = (reconnect_initial, reconnect_max, reconnect_multiplier)
        self._max_attempts = max_attempts
        self._clock = clock or AnyioClock()
        self._rng = rng or random.Random()
        self._wake: anyio.Event | None = None
        self._ever_connected = False
        self._error_at = 0.0
        self._metrics = ConnectionMetrics()
        self.budget = ConnectionBudget()
        """The current connection's message budget: the batcher's limiter."""
        self.sink = ConnectionSink(
            channel, budget=self.budget, metrics=self._metrics, on_sent=self._sent, fmt=fmt
        )
        """The current connection: the batcher's sink."""
        self._refusals = Refusals(
            channel,
            subscriptions=subscriptions,
            sink=self.sink,
            metrics=self._metrics,
            clock=self._clock,
            confirm_after=confirm_after,
            on_rejected=on_rejected,
        )
        self._drift = DriftCheck(
            self.sink, self._metrics, clock=self._clock, delay=verify_delay, fmt=fmt
        )
        self._receive = ReceiveLoop(
            channel.value,
            metrics=self._metrics,
            refusals=self._refusals,
            deliver=deliver,
            backpressure=backpressure,
            on_control=self._control,
            on_first_data=self._first_data,
            tap=tap,
        )
        subscriptions.add_listener(self._on_change)

    # -- debug entry point ------------------------------------------------------------

    def get_connection_metrics(self) -> dict[str, Any]:
        """State, connect counts, frames and bytes each way, messages by type, errors, ping RTT."""
        return self._metrics.snapshot(self.channel.value, self.url, self.budget.status())

    # -- the connection loop ------------------------------------------------------------

    async def run(self) -> None:
        """Keep the channel connected while it has subscriptions; runs until cancelled."""
        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            self._refusals.tasks = tasks
            try:
                await self._run()
            except Exception as exc:
                failure = exc  # raised as itself, not inside an exception group
            finally:
                self._refusals.tasks = None
                tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _run(self) -> None:
        attempt = 0
        while True:
            await self._wait_for_subscriptions()
            conn = await self._connect()
            if conn is None:
                attempt += 1
                if self._max_attempts is not None and attempt >= self._max_attempts:
                    raise ConnectFailed(
                        f"{self.channel.value}: gave up after {attempt} failed connect "
                        f"attempt(s) to {self.url}: {self._metrics.last_error}"
                    )
                await self._back_off(attempt)
                continue
            carried = await self._serve(conn)
            # Reset the backoff only after a connection that carried data: one that
            # the server closes at once (a bad request, a ban) must keep backing off.
            # A refusal that narrowed the state down is progress, not a repeat: the
            # next connection sends another state, after a short pause only.
            if carried:
                attempt = 0
            elif self._refusals.progress:
                attempt = 1
            else:
                attempt += 1
            if not self.sink.closing and attempt:
                await self._back_off(attempt)

    def _on_change(self, change: StateChange) -> None:
        if change.channel is self.channel and self._wake is not None:
            self._wake.set()

    async def _wait_for_subscriptions(self) -> None:
        self.sink.closing = False
        while True:
            self._refusals.release_if_idle()
            if self._subscriptions.state(self.channel):
                return
            self._set_state("idle", "no subscriptions")
            self._wake = anyio.Event()
            await self._wake.wait()

    async def _connect(self) -> Connection | None:
        while True:
            try:
                await self._connect_limiter.acquire()
                break
            except LimiterWaitExpired as exc:
                log.warning("%s: %s; still waiting to connect", self.channel.value, exc)
        self._set_state("connecting", self.url)
        try:
            return await self._transport.connect(self.url, self._headers())
        except HandshakeRejected as exc:
            if exc.status_code in (418, 429):
                # The exchange says we connect too often: slow the whole scope down.
                self._connect_limiter.back_off()
            self._connect_failed(exc)
        except TransportError as exc:
            self._connect_failed(exc)
        return None

    def _connect_failed(self, exc: Exception) -> None:
        self._metrics.counts["connect_failures"] += 1
        self._metrics.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("%s: connect to %s failed: %s", self.channel.value, self.url, exc)

    async def _back_off(self, attempt: int) -> None:
        initial, maximum, multiplier = self._reconnect
        ceiling = min(maximum, initial * multiplier ** (attempt - 1))
        delay = self._rng.uniform(0, ceiling)  # full jitter: reconnects of many clients spread out
        self._set_state("backoff", f"{delay:.3f}s before attempt {attempt + 1}")
        await self._clock.sleep(delay)

    async def _serve(self, conn: Connection) -> bool:
        """Use one connection until it ends; return whether it carried any data."""
        metrics = self._metrics
        counts = metrics.counts
        sink = self.sink
        counts["connects"] += 1
        sink.open(conn, self._make_message_limiter(f"{self.channel.value}#{counts['connects']}"))
        metrics.connected_since = time.time()
        if self._ever_connected:
            counts["reconnects"] += 1
            self._set_state("reconnected", self.url)
        else:
            self._set_state("connected", self.url)
        self._ever_connected = True
        messages_before = counts["messages_in"]
        reason = "closed"
        self._rate_limited = False
        self._refusals.connected()
        timeouts = counts["heartbeat_timeouts"]
        try:
            async with anyio.create_task_group() as tg:
                self._conn_tasks = tg
                # A reconnect restores the whole latest state in its first request,
                # through the limiter (invariant 7 in docs/architecture.md): the
                # sink's listener, the batcher, sends it.
                sink.resync()
                tg.start_soon(
                    functools.partial(
                        heartbeat,
                        conn,
                        tg.cancel_scope,
                        sink=sink,
                        metrics=metrics,
                        clock=self._clock,
                        interval=self._heartbeat_interval,
                        timeout=self._heartbeat_timeout,
                        text_ping=self._text_ping,
                    )
                )
                try:
                    await self._receive.run(conn)
                except ConnectionClosed as exc:
                    reason = str(exc)
                except TransportError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                tg.cancel_scope.cancel()
            if counts["heartbeat_timeouts"] != timeouts:
                reason = metrics.last_error or "heartbeat timeout"
            elif sink.error_frame is not None and (
                self._clock.now() - self._error_at <= self._error_close_grace
            ):
                # Only the close that follows an error frame is that error's doing.
                reason = f"closed after error {sink.error_frame}"
        finally:
            sink.close()
            self._conn_tasks = None
            self._drift.reset()
            metrics.connected_since = None
            with anyio.CancelScope(shield=True):
                await conn.aclose()
        if sink.closing:
            self._set_state("closed", "no subscriptions left")
        else:
            metrics.last_error = reason
            log.warning("%s: connection lost (%s); reconnecting", self.channel.value, reason)
            self._set_state("gap", reason)
        return counts["messages_in"] > messages_before

    def _sent(self, conn: Connection, state: MergedState, size: int) -> None:
        # The sink sent a request: track it for refusals, tell the hook, verify later.
        self._refusals.sent(conn, state, self._conn_tasks)
        if self._on_sent is not None:
            self._on_sent(state, size)
        if self._verify and self._conn_tasks is not None:
            self._conn_tasks.start_soon(self._drift.later, state)

    def _control(self, message: Status | ErrorMessage | SubscriptionList) -> None:
        if isinstance(message, SubscriptionList):
            self._drift.check(message)
        elif isinstance(message, ErrorMessage):
            metrics = self._metrics
            metrics.counts["error_frames"] += 1
            metrics.last_error = f"{message.name}: {message.message}"
            log.error(
                "%s: the exchange answered with error %s: %s",
                self.channel.value,
                message.name,
                message.message,
            )
            sink = self.sink
            if sink.error_frame is not None:
                return  # the close of the first error is awaited; this adds nothing
            sink.pause(metrics.last_error)
            self._error_at = self._clock.now()
            if message.name in TOO_MANY or message.name in BANNED:
                # The server closes this connection next, and the new one gets a
                # fresh message budget: the back-off must outlive both, so the
                # reconnect itself waits (the connect limiter of this scope).
                self._rate_limited = True
                self.budget.back_off()
                self._connect_limiter.back_off()
                self._refusals.tracker.forget()
            elif message.name in REQUEST_ERRORS:
                self._refusals.refused(metrics.last_error)
            else:
                self._refusals.tracker.forget()
            if self._conn_tasks is not None and sink.conn is not None:
                self._conn_tasks.start_soon(self._error_grace, sink.conn, metrics.last_error)
            # The server closes the connection after an error; the reconnect
            # re-sends the whole wanted state, which was never dropped (less what
            # a refusal put in quarantine).

    def _first_data(self) -> None:
        if not self._rate_limited:
            # Traffic flows without complaint: the next "Too Many Requests" starts
            # the back-off over, instead of doubling an old one.
            reset = getattr(self._connect_limiter, "reset_back_off", None)
            if reset is not None:
                reset()

    async def _error_grace(self, conn: Connection, label: str) -> None:
        await self._clock.sleep(self._error_close_grace)
        sink = self.sink
        if sink.conn is not conn or sink.error_frame != label:
            return
        # Still open: this error did not close the connection after all. A later
        # close is not its doing, and sending may resume.
        log.info(
            "%s: the connection stayed open after error %s; using it again",
            self.channel.value,
            label,
        )
        sink.resume()

    def _set_state(self, state: ConnectionState, detail: str) -> None:
        self._metrics.state = state
        log.debug("%s: %s (%s)", self.channel.value, state, detail)
        if self._on_state is not None:
            try:
                self._on_state(state, detail)
            except Exception:
                log.exception("%s: connection-state listener failed", self.channel.value)
