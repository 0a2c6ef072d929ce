"""WebSocketManager: one channel's connection, kept alive and in sync.

It connects when the channel first has subscriptions (through the bus's connect
limiter of its scope), makes the first request after every connect the
whole latest state (through a message limiter of that connection), pings to catch
half-open sockets, reconnects with capped, fully jittered exponential backoff, and
decodes every frame in its own receive loop, handing the messages to ``deliver``
in one plain call per socket read.

It is both the batcher's sink (``send_state``) and its limiter (``wait``/``take``
go to the current connection's message limiter, since the exchange counts
messages per connection).

When the exchange refuses a request (an error frame such as ``INVALID_PARAM``, then
the close), the manager finds the wishes that caused it and has the
:class:`~upbus.core.subscriptions._manager.SubscriptionManager` keep them out of the state
(:mod:`upbus.core.subscriptions._quarantine`), so the reconnect serves everything else instead of
sending the same refused state again; ``on_rejected`` tells their owners.
"""

from __future__ import annotations

import logging
import operator
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup

from upbus.core._clock import AnyioClock, Clock
from upbus.core._errors import LimiterWaitExpired
from upbus.core.sending._batcher import Batcher, SinkUnavailable
from upbus.core.sending._ratelimit import RollingWindowLimiter
from upbus.core.subscriptions._manager import Rejected, SubscriptionManager
from upbus.core.subscriptions._quarantine import (
    REQUEST_ERRORS,
    Key,
    RequestTracker,
    Verdict,
    describe,
    entry_keys,
)
from upbus.core.subscriptions._specs import Channel, Wish
from upbus.core.subscriptions._state import MergedState, StateChange
from upbus.core.wire._codec import (
    FrameDecoder,
    encode_list_subscriptions,
    encode_request,
    new_ticket,
)
from upbus.core.wire._messages import ErrorMessage, Message, Status, SubscriptionList
from upbus.core.wire._transport import (
    ConnectFailed,
    Connection,
    ConnectionClosed,
    HandshakeRejected,
    Transport,
    TransportError,
)

__all__ = ("WebSocketManager",)

log = logging.getLogger("upbus.connection")

# Error names the exchange uses (or may use) for rate limiting; the wire form is
# not documented, so every known spelling counts.
TOO_MANY = frozenset({"Too Many Requests", "TOO_MANY_REQUEST", "TOO_MANY_REQUESTS"})
BANNED = frozenset({"I'm a teapot"})
_TYPE_OF = operator.attrgetter("type")

OnRejected = Callable[[list[tuple[object, tuple[Wish, ...]]], str], None]
"""``on_rejected(rejected, detail)``: per live component, the wishes the exchange refused."""


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
        connect_limiter: RollingWindowLimiter,
        make_message_limiter: Callable[[str], RollingWindowLimiter],
        deliver: Callable[[list[Message]], None],
        backpressure: Callable[[], Awaitable[None]] | None = None,
        on_state: Callable[[str, str], None] | None = None,
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
    ) -> None:
        self.channel = channel
        self.url = url
        self._transport = transport
        self._subscriptions = subscriptions
        self._connect_limiter = connect_limiter
        self._make_message_limiter = make_message_limiter
        self._deliver = deliver
        self._backpressure = backpressure
        self._on_state = on_state
        self._on_sent = on_sent
        self._on_rejected = on_rejected
        self._confirm_after = confirm_after
        self._error_close_grace = error_close_grace
        self._tracker = RequestTracker()
        self._tasks: TaskGroup | None = None  # run()'s own, for deferred notices
        self._progress = False  # this connection's refusal led to a new, narrower state
        self._rate_limited = False  # this connection got a rate-limit error
        self._carried = False  # this connection delivered data
        self._send_refused = False  # a send was refused while an error frame was pending
        self._headers = headers
        self._format = fmt
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._text_ping = text_ping
        self._verify = verify_subscriptions
        self._verify_delay = verify_delay
        self._verify_expected: MergedState | None = None
        self._conn_tasks: TaskGroup | None = None
        self._reconnect = (reconnect_initial, reconnect_max, reconnect_multiplier)
        self._max_attempts = max_attempts
        self._clock = clock or AnyioClock()
        self._rng = rng or random.Random()
        self._decoder = FrameDecoder()
        self._batcher: Batcher | None = None
        self._conn: Connection | None = None
        self._message_limiter: RollingWindowLimiter | None = None
        self._wake: anyio.Event | None = None
        self._closing = False
        self._ever_connected = False
        self._state = "idle"
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._error_frame: str | None = None  # an error frame whose close is awaited
        self._error_at = 0.0
        self._last_sent: MergedState | None = None
        self._ping_rtt: float | None = None
        self._last_message_time: float | None = None
        self._by_type: Counter[str] = Counter()
        self._counts = {
            "connects": 0,
            "reconnects": 0,
            "connect_failures": 0,
            "frames_in": 0,
            "bytes_in": 0,
            "frames_out": 0,
            "bytes_out": 0,
            "messages_in": 0,
            "decode_errors": 0,
            "error_frames": 0,
            "heartbeat_timeouts": 0,
            "verifications": 0,
            "verified": 0,
            "drift_detected": 0,
            "requests_refused": 0,
            "quarantine_decisions": 0,
        }
        subscriptions.add_listener(self._on_change)
        subscriptions.add_rejection_listener(self._on_late_rejection)

    def attach(self, batcher: Batcher) -> None:
        """The batcher that sends this channel's state (made with this manager as sink)."""
        self._batcher = batcher

    # -- RequestSink and RequestLimiter for the batcher ------------------------------

    async def send_state(self, state: MergedState) -> int:
        conn = self._conn
        if conn is None:
            raise SinkUnavailable(f"{self.channel.value}: not connected")
        if self._error_frame is not None:
            # The exchange closes this connection next; a request now would be
            # ignored, and the state goes out on the next connection instead.
            self._send_refused = True
            raise SinkUnavailable(
                f"{self.channel.value}: the connection is closing after error {self._error_frame}"
            )
        if not state:
            # There is no unsubscribe message: an empty state ends the stream by
            # closing the connection; the next subscription reconnects.
            log.info("%s: no subscriptions left, closing the connection", self.channel.value)
            self._closing = True
            await conn.aclose()
            return 0
        text = encode_request(new_ticket(), state.request_objects(), self._format)
        await conn.send_text(text)
        size = len(text.encode())
        self._count_out(size)
        self._last_sent = state
        request = self._tracker.sent(entry_keys(state.entries))
        if self._conn_tasks is not None:
            self._conn_tasks.start_soon(self._confirm_later, conn, request)
        if self._on_sent is not None:
            self._on_sent(state, size)
        if self._verify and self._conn_tasks is not None:
            self._conn_tasks.start_soon(self._verify_later, conn, state)
        return size

    def _count_out(self, size: int) -> None:
        self._counts["frames_out"] += 1
        self._counts["bytes_out"] += size

    async def wait(self, max_wait: float | None = None) -> float:
        limiter = self._message_limiter
        return 0.0 if limiter is None else await limiter.wait(max_wait)

    def take(self, now: float | None = None) -> None:
        if self._message_limiter is not None:
            self._message_limiter.take(now)

    # -- debug entry point ------------------------------------------------------------

    def get_connection_metrics(self) -> dict[str, Any]:
        """State, connect counts, frames and bytes each way, messages by type, errors, ping RTT."""
        limiter = self._message_limiter
        return {
            "channel": self.channel.value,
            "url": self.url,
            "state": self._state,
            "connected_since": self._connected_since,
            **self._counts,
            "messages_by_type": dict(self._by_type),
            "last_message_time": self._last_message_time,
            "ping_rtt": self._ping_rtt,
            "last_error": self._last_error,
            "message_limiter": None if limiter is None else limiter.status(),
        }

    # -- the connection loop ------------------------------------------------------------

    async def run(self) -> None:
        """Keep the channel connected while it has subscriptions; runs until cancelled."""
        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            try:
                await self._run()
            except Exception as exc:
                failure = exc  # raised as itself, not inside an exception group
            finally:
                self._tasks = None
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
                        f"attempt(s) to {self.url}: {self._last_error}"
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
            elif self._progress:
                attempt = 1
            else:
                attempt += 1
            if not self._closing and attempt:
                await self._back_off(attempt)

    def _on_change(self, change: StateChange) -> None:
        if change.channel is self.channel and self._wake is not None:
            self._wake.set()

    async def _wait_for_subscriptions(self) -> None:
        self._closing = False
        while True:
            self._release_if_idle()
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
        self._counts["connect_failures"] += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.warning("%s: connect to %s failed: %s", self.channel.value, self.url, exc)

    async def _back_off(self, attempt: int) -> None:
        initial, maximum, multiplier = self._reconnect
        ceiling = min(maximum, initial * multiplier ** (attempt - 1))
        delay = self._rng.uniform(0, ceiling)  # full jitter: reconnects of many clients spread out
        self._set_state("backoff", f"{delay:.3f}s before attempt {attempt + 1}")
        await self._clock.sleep(delay)

    async def _serve(self, conn: Connection) -> bool:
        """Use one connection until it ends; return whether it carried any data."""
        self._counts["connects"] += 1
        self._message_limiter = self._make_message_limiter(
            f"{self.channel.value}#{self._counts['connects']}"
        )
        self._conn = conn
        self._connected_since = time.time()
        if self._ever_connected:
            self._counts["reconnects"] += 1
            self._set_state("reconnected", self.url)
        else:
            self._set_state("connected", self.url)
        self._ever_connected = True
        messages_before = self._counts["messages_in"]
        reason = "closed"
        self._error_frame = None
        self._progress = self._rate_limited = self._carried = self._send_refused = False
        self._tracker.connected()
        timeouts = self._counts["heartbeat_timeouts"]
        try:
            async with anyio.create_task_group() as tg:
                self._conn_tasks = tg
                if self._batcher is not None:
                    self._batcher.resend()  # invariant 7: the first request is the whole state
                tg.start_soon(self._heartbeat, conn, tg.cancel_scope)
                try:
                    await self._receive(conn)
                except ConnectionClosed as exc:
                    reason = str(exc)
                except TransportError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                tg.cancel_scope.cancel()
            if self._counts["heartbeat_timeouts"] != timeouts:
                reason = self._last_error or "heartbeat timeout"
            elif self._error_frame is not None and (
                self._clock.now() - self._error_at <= self._error_close_grace
            ):
                # Only the close that follows an error frame is that error's doing.
                reason = f"closed after error {self._error_frame}"
        finally:
            self._error_frame = None
            self._conn = None
            self._conn_tasks = None
            self._verify_expected = None
            self._message_limiter = None
            self._connected_since = None
            with anyio.CancelScope(shield=True):
                await conn.aclose()
        if self._closing:
            self._set_state("closed", "no subscriptions left")
        else:
            self._last_error = reason
            log.warning("%s: connection lost (%s); reconnecting", self.channel.value, reason)
            self._set_state("gap", reason)
        return self._counts["messages_in"] > messages_before

    async def _heartbeat(self, conn: Connection, scope: CancelScope) -> None:
        while True:
            await self._clock.sleep(self._heartbeat_interval)
            if self._text_ping and not await self._send_extra(conn, "PING"):
                return
            try:
                self._ping_rtt = await conn.ping(self._heartbeat_timeout)
            except TimeoutError:
                # No pong: the socket is half-open. Drop it; run() reconnects.
                self._counts["heartbeat_timeouts"] += 1
                self._last_error = f"no pong within {self._heartbeat_timeout}s"
                log.warning(
                    "%s: %s; replacing the connection", self.channel.value, self._last_error
                )
                scope.cancel()
                return
            except TransportError:
                return  # the receive loop sees the same failure

    async def _send_extra(self, conn: Connection, text: str) -> bool:
        """Send a frame that is not a subscription, charged to this connection's budget."""
        limiter = self._message_limiter
        if limiter is None:
            return False
        try:
            await limiter.acquire()
            await conn.send_text(text)
        except (LimiterWaitExpired, TransportError) as exc:
            log.debug("%s: could not send %s: %s", self.channel.value, text[:20], exc)
            return False
        self._count_out(len(text.encode()))
        return True

    async def _verify_later(self, conn: Connection, state: MergedState) -> None:
        await self._clock.sleep(self._verify_delay)
        if self._last_sent is not state:
            return  # a newer request went out; its own check follows
        self._verify_expected = state
        self._counts["verifications"] += 1
        await self._send_extra(conn, encode_list_subscriptions(new_ticket(), self._format))

    def _check_drift(self, reply: SubscriptionList) -> None:
        expected, self._verify_expected = self._verify_expected, None
        if expected is None or expected is not self._last_sent:
            return
        wanted = _streams((entry.type, entry.codes or ()) for entry in expected.entries)
        seen = _streams((entry.type, entry.codes or ()) for entry in reply.result)
        if wanted == seen:
            self._counts["verified"] += 1
        else:
            self._counts["drift_detected"] += 1
            log.warning(
                "%s: the exchange's subscriptions differ from the state sent "
                "(missing %d, unexpected %d); re-sending it",
                self.channel.value,
                len(wanted - seen),
                len(seen - wanted),
            )
            if self._batcher is not None:
                self._batcher.resend()

    async def _receive(self, conn: Connection) -> None:
        decode_batch = self._decoder.decode_batch
        deliver = self._deliver
        backpressure = self._backpressure
        counts = self._counts
        by_type = self._by_type
        while True:
            frames = await conn.receive_batch()
            counts["frames_in"] += len(frames)
            counts["bytes_in"] += sum(map(len, frames))
            batch, control, errors = decode_batch(frames)
            for exc in errors:
                counts["decode_errors"] += 1
                log.warning("%s: %s", self.channel.value, exc)
            for message in control:
                self._control(message)
            if batch:
                counts["messages_in"] += len(batch)
                by_type.update(map(_TYPE_OF, batch))  # counted in C
                self._last_message_time = time.time()
                if not self._carried:
                    self._first_data()
                if self._tracker.waiting:
                    self._witness(batch)
                deliver(batch)
                if backpressure is not None:
                    await backpressure()

    def _control(self, message: Status | ErrorMessage | SubscriptionList) -> None:
        if isinstance(message, SubscriptionList):
            self._check_drift(message)
        elif isinstance(message, ErrorMessage):
            self._counts["error_frames"] += 1
            self._last_error = f"{message.name}: {message.message}"
            log.error(
                "%s: the exchange answered with error %s: %s",
                self.channel.value,
                message.name,
                message.message,
            )
            if self._error_frame is not None:
                return  # the close of the first error is awaited; this adds nothing
            self._error_frame = self._last_error
            self._error_at = self._clock.now()
            if message.name in TOO_MANY or message.name in BANNED:
                # The server closes this connection next, and the new one gets a
                # fresh message budget: the back-off must outlive both, so the
                # reconnect itself waits (the connect limiter of this scope).
                self._rate_limited = True
                if self._message_limiter is not None:
                    self._message_limiter.back_off()
                self._connect_limiter.back_off()
                self._tracker.forget()
            elif message.name in REQUEST_ERRORS:
                self._refused(self._last_error)
            else:
                self._tracker.forget()
            if self._conn_tasks is not None and self._conn is not None:
                self._conn_tasks.start_soon(self._error_grace, self._conn, self._error_frame)
            # The server closes the connection after an error; the reconnect
            # re-sends the whole wanted state, which was never dropped (less what
            # a refusal put in quarantine).

    # -- refusals and quarantine --------------------------------------------------------

    def _refused(self, detail: str) -> None:
        """The exchange refused a request of this connection: find the wishes to blame."""
        self._counts["requests_refused"] += 1
        verdict = self._tracker.rejected(detail)
        if verdict is None:
            log.warning(
                "%s: the exchange refused a request that added nothing to the last "
                "accepted state (%s); sending the state again after the reconnect",
                self.channel.value,
                detail,
            )
            return
        self._progress = True
        if verdict.quarantine:
            self._quarantine(verdict.quarantine, detail)
        else:
            self._hold(verdict)
        self._release_if_idle()

    def _quarantine(self, keys: frozenset[Key], detail: str) -> None:
        self._counts["quarantine_decisions"] += 1
        rejected = self._subscriptions.quarantine(self.channel, keys, detail)
        entries = ", ".join(sorted(describe(key) for key in keys))
        owners = ", ".join(sorted({type(component).__name__ for component, _ in rejected}))
        log.error(
            "%s: the exchange refused %s (%s); quarantined, no longer sent, for %d component(s)%s",
            self.channel.value,
            entries,
            detail,
            len(rejected),
            f" ({owners})" if owners else "",
        )
        self._report(rejected, detail)

    def _hold(self, verdict: Verdict) -> None:
        self._subscriptions.hold(self.channel, verdict.hold, verdict.detail)
        tried = verdict.suspects - verdict.hold
        log.warning(
            "%s: the exchange refused a request adding %d entries (%s); trying %s "
            "first, holding back %s",
            self.channel.value,
            len(verdict.suspects),
            verdict.detail,
            ", ".join(sorted(describe(key) for key in tried)),
            ", ".join(sorted(describe(key) for key in verdict.hold)),
        )

    def _try_held(self) -> None:
        """Put the next held suspects back into the state (or quarantine a block of one
        that must be bad), until the state changed or nothing is held."""
        subscriptions = self._subscriptions
        while (step := self._tracker.next_step()) is not None:
            if step.quarantine:
                self._quarantine(step.quarantine, step.detail)
            if step.release:
                log.info(
                    "%s: trying %s, held back after a refusal",
                    self.channel.value,
                    ", ".join(sorted(describe(key) for key in step.release)),
                )
                if subscriptions.release(self.channel, step.release):
                    return
        # Nothing left to try, yet something held (the search was interrupted):
        # it all goes out again, and a refusal starts a new search.
        subscriptions.release(self.channel)

    def _release_if_idle(self) -> None:
        # Held keys wait for an accepted request; with nothing else left to send,
        # none would ever come: they are what goes out next.
        subscriptions = self._subscriptions
        if subscriptions.held(self.channel) and not subscriptions.state(self.channel):
            self._try_held()

    def _report(self, rejected: Rejected, detail: str) -> None:
        if not rejected or self._on_rejected is None:
            return
        try:
            self._on_rejected(rejected, detail)
        except Exception:
            log.exception("%s: rejection listener failed", self.channel.value)

    def _on_late_rejection(self, channel: Channel, rejected: Rejected, detail: str) -> None:
        # A component registered a key that is quarantined already. This runs inside
        # register_component: report from a task, once the registration is complete.
        if channel is not self.channel:
            return
        if self._tasks is None:
            self._report(rejected, detail)
        else:
            self._tasks.start_soon(self._report_soon, rejected, detail)

    async def _report_soon(self, rejected: Rejected, detail: str) -> None:
        self._report(rejected, detail)

    def _accepted(self) -> None:
        """A request of this connection was accepted: try what was held back."""
        if self._subscriptions.held(self.channel):
            self._try_held()

    def _witness(self, batch: list[Message]) -> None:
        witness = self._tracker.witness
        for message in batch:
            if witness(message.type, message.code):
                self._accepted()
                return

    async def _confirm_later(self, conn: Connection, request: int) -> None:
        await self._clock.sleep(self._confirm_after)
        if self._conn is conn and self._error_frame is None and self._tracker.confirm(request):
            self._accepted()

    def _first_data(self) -> None:
        self._carried = True
        if not self._rate_limited:
            # Traffic flows without complaint: the next "Too Many Requests" starts
            # the back-off over, instead of doubling an old one.
            reset = getattr(self._connect_limiter, "reset_back_off", None)
            if reset is not None:
                reset()

    async def _error_grace(self, conn: Connection, label: str) -> None:
        await self._clock.sleep(self._error_close_grace)
        if self._conn is not conn or self._error_frame != label:
            return
        # Still open: this error did not close the connection after all. A later
        # close is not its doing, and sending may resume.
        log.info(
            "%s: the connection stayed open after error %s; using it again",
            self.channel.value,
            label,
        )
        self._error_frame = None
        if self._send_refused:
            self._send_refused = False
            if self._batcher is not None:
                self._batcher.resend()

    def _set_state(self, state: str, detail: str) -> None:
        self._state = state
        log.debug("%s: %s (%s)", self.channel.value, state, detail)
        if self._on_state is not None:
            try:
                self._on_state(state, detail)
            except Exception:
                log.exception("%s: connection-state listener failed", self.channel.value)


def _streams(entries: Iterable[tuple[str, tuple[str, ...]]]) -> set[tuple[str, str]]:
    # Whether the exchange echoes depth suffixes is not documented: compare without.
    return {(kind, code.partition(".")[0]) for kind, codes in entries for code in codes or ("",)}
