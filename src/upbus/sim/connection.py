"""One open WebSocket connection: read requests, send data, keepalive, close.

Three tasks share the socket: the reader (client frames, pongs, request handling),
the writer (queued control frames first, then snapshots, then paced realtime data)
and an idle watchdog. Every write goes through one lock so frames never interleave.

Decisions where docs/protocol.md calls the exchange's behaviour unverified:

* Every text ``PING`` is answered at once with ``{"status":"UP"}``; the first one also
  starts one per-connection timer sending UP every ``up_interval`` seconds.
* Traffic in either direction, UP frames included, resets the idle timer; the idle
  close is abrupt (no close frame), as the probe saw (1006).
* Snapshots go out in a burst; only realtime messages are paced by ``rate``.
* After an error frame nothing else is sent; the close (1000) follows after
  ``error_close_delay``, and client frames meanwhile are recorded but ignored.

With ``rate="max"`` the realtime data is a ring of pre-encoded frames built when the
subscription (or the format) changes, in a task of its own, and written one large
chunk per socket write (:mod:`upbus.sim.flood`); the writer takes queued control
frames between chunks and the reader keeps answering, so pings and new subscriptions
are served during the flood. Snapshots still go out first, one frame per write.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    TextMessage,
)

from upbus.sim.config import Rate, SimConfig
from upbus.sim.encode import encode_error, encode_frame, encode_status, is_list_format
from upbus.sim.feed import Feed
from upbus.sim.flood import Ring, RingCache
from upbus.sim.limits import MessageLimiter
from upbus.sim.market import Market
from upbus.sim.markets import markets_for
from upbus.sim.orders import PrivateEvent
from upbus.sim.protocol import (
    Entry,
    ListSubscriptions,
    RequestError,
    Subscribe,
    parse_request,
)
from upbus.sim.records import ConnectionRecord, Journal, Parsed, RequestRecord, Violation

__all__ = ("Connection",)

_OUTBOX_LIMIT = 10_000  # queued control and private frames; beyond this the client is too slow
_READ_SIZE = 65536
_FLOOD_IDLE = 0.001  # flood mode, when a step produced nothing (throttled candles)


@dataclass(frozen=True, slots=True)
class _Out:
    """A queued write: a WebSocket message, or raw bytes (fault injection)."""

    payload: bytes
    binary: bool = True
    raw: bool = False


class Connection:
    """The server side of one accepted WebSocket."""

    def __init__(
        self,
        record: ConnectionRecord,
        stream: anyio.abc.SocketStream,
        ws: WSConnection,
        config: SimConfig,
        journal: Journal,
        rate: Rate,
        *,
        rings: RingCache | None = None,
    ) -> None:
        self.id = record.id
        self.endpoint = record.endpoint or "public"
        self.record = record
        self.access_key = record.access_key
        self.rate = rate
        self.stalled = False
        self.reset = False  # close with RST instead of FIN
        self.end_reason: str | None = None
        self.released = anyio.Event()  # a stalled connection's socket may now close
        self._stream = stream
        self._ws = ws
        self._config = config
        self._journal = journal
        self._format = "DEFAULT"
        self._entries: tuple[Entry, ...] = ()
        self._my_order: frozenset[str] | None = None  # None: every market
        self._wants_order = False
        self._wants_asset = False
        self._feed = Feed(Market(config.seed, config.start_ms, markets_for(config.region)))
        self._limiter = MessageLimiter(config.message_limits)
        self._outbox: deque[_Out] = deque()
        self._wake = anyio.Event()
        self._lock = anyio.Lock()
        self._closing = False
        self._fail_reason: str | None = None
        self._peer_closed = anyio.Event()
        self._up_running = False
        self._fragments: list[str] = []
        self._fragment_bytes = 0
        self._last_activity = anyio.current_time()
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._rings = rings if rings is not None else RingCache(config)
        self._ring: Ring | None = None  # rate="max": the current subscription's frames
        self._ring_next = 0  # the chunk written next
        self._ring_scope: anyio.CancelScope | None = None  # the ring being loaded

    # -- lifecycle --------------------------------------------------------------

    async def run(self, *, auth_error: tuple[str, str] | None = None) -> None:
        """Serve until the connection ends; ``auth_error`` sends INVALID_AUTH first."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._scope = tg.cancel_scope
            tg.start_soon(self._reader)
            tg.start_soon(self._writer)
            if self._config.idle_timeout is not None:
                tg.start_soon(self._idle_watchdog, self._config.idle_timeout)
            if auth_error is not None:
                self._begin_fail(*auth_error)
            if self.end_reason is not None:
                tg.cancel_scope.cancel()

    def end(self, reason: str) -> None:
        """Stop serving; the first reason given is the one recorded."""
        if self.end_reason is None:
            self.end_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    async def close_going_away(self) -> None:
        """Best-effort close frame (1001) when the simulator shuts down."""
        with anyio.move_on_after(0.2, shield=True):
            await self._send_close(1001)

    # -- fault injection and pushes from the simulator --------------------------

    def drop(self, *, reset: bool = False) -> None:
        """Close the TCP socket without a close frame (``reset``: with RST)."""
        self.reset = reset
        self.end("dropped")
        self.released.set()

    def stall(self) -> None:
        """Stop reading and writing but keep the socket open (a half-open peer)."""
        self.stalled = True
        self.end("stalled")

    def send_raw(self, data: bytes) -> None:
        """Queue bytes written to the socket as they are, outside any frame."""
        self._queue(_Out(data, raw=True))

    def send_frame(self, payload: bytes, *, binary: bool = True) -> None:
        """Queue one message frame carrying ``payload``."""
        self._queue(_Out(payload, binary=binary))

    def send_error(self, name: str, message: str, *, close: bool = True) -> None:
        """Send an error frame, then close as after a refused request (unless not ``close``)."""
        if close:
            self._begin_fail(name, message)
        elif not self._closing:
            self._queue(
                _Out(encode_error(name, message), binary=self._config.binary_control_frames)
            )

    def set_rate(self, rate: Rate) -> None:
        self.rate = rate
        self._refresh_ring()
        self._wake.set()

    def push_private(self, event: PrivateEvent) -> None:
        """Queue a myOrder / myAsset message if the subscription wants it."""
        if self._closing:
            return
        if event.type == "myAsset" and not self._wants_asset:
            return
        if event.type == "myOrder":
            if not self._wants_order:
                return
            if self._my_order is not None and event.code not in self._my_order:
                return
        self._queue(_Out(encode_frame([(event.type, event.fields)], self._format)))

    def _queue(self, out: _Out) -> None:
        if len(self._outbox) >= _OUTBOX_LIMIT:
            self.end("slow_consumer")
            return
        self._outbox.append(out)
        self._wake.set()

    # -- writing ----------------------------------------------------------------

    def _touch(self) -> None:
        self._last_activity = anyio.current_time()

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.end("broken")
            await anyio.lowlevel.checkpoint()  # raises the cancellation just requested
            return
        self._touch()

    async def _send_event(self, event: Event) -> None:
        async with self._lock:
            if self._ws.state is not ConnectionState.OPEN:
                return
            await self._write(self._ws.send(event))

    async def _send_payload(self, payload: bytes, binary: bool) -> None:
        if binary:
            await self._send_event(BytesMessage(data=payload))
        else:
            await self._send_event(TextMessage(data=payload.decode()))

    async def _send_control(self, payload: bytes) -> None:
        await self._send_payload(payload, self._config.binary_control_frames)

    async def _send_close(self, code: int) -> None:
        async with self._lock:
            if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                await self._write(self._ws.send(CloseConnection(code=code)))

    async def _send_messages(self, messages: list[tuple[str, dict[str, Any]]]) -> None:
        # Plain formats carry one message per frame; *_LIST formats up to list_batch.
        size = self._config.list_batch if is_list_format(self._format) else 1
        for start in range(0, len(messages), size):
            frame = encode_frame(messages[start : start + size], self._format)
            await self._send_payload(frame, True)

    def _refresh_ring(self) -> None:
        """Drop the ring; with rate="max", load the one of the current subscription."""
        if self._ring_scope is not None:
            self._ring_scope.cancel()
            self._ring_scope = None
        self._ring = None
        self._ring_next = 0
        if self.rate == "max" and self._feed.has_realtime and self._tg is not None:
            scope = self._ring_scope = anyio.CancelScope()
            self._tg.start_soon(self._load_ring, scope, self._entries, self._format)

    async def _load_ring(
        self, scope: anyio.CancelScope, entries: tuple[Entry, ...], fmt: str
    ) -> None:
        with scope:
            ring = await self._rings.get(entries, fmt)
            self._ring_scope = None
            self._ring = ring
            self._wake.set()

    async def _send_chunk(self, ring: Ring) -> None:
        index = self._ring_next
        self._ring_next = (index + 1) % len(ring.chunks)
        async with self._lock:
            if self._ws.state is ConnectionState.OPEN:
                await self._write(ring.chunks[index])
                return
        await self._wake.wait()  # closing: no more data

    async def _writer(self) -> None:
        next_at = anyio.current_time()
        while True:  # ends when the connection's task group is cancelled
            self._wake = anyio.Event()
            if self._outbox:
                out = self._outbox.popleft()
                if out.raw:
                    async with self._lock:
                        await self._write(out.payload)
                else:
                    await self._send_payload(out.payload, out.binary)
                continue
            if self._closing:
                await self._wake.wait()
                continue
            if self._feed.has_snapshots:
                batch = self._config.list_batch if is_list_format(self._format) else 1
                messages: list[tuple[str, dict[str, Any]]] = []
                while len(messages) < batch and (message := self._feed.next_snapshot()):
                    messages.append(message)
                await self._send_messages(messages)
                continue
            if not self._feed.has_realtime:
                await self._wake.wait()
                continue
            if self.rate == "max":
                ring = self._ring
                if ring is None:  # being built
                    await self._wake.wait()
                    continue
                if ring.chunks:
                    await self._send_chunk(ring)
                    continue
                # Nothing fitted in a ring (candles only, rarely due): generate them.
            rate = self.rate if isinstance(self.rate, int | float) else None
            now = anyio.current_time()
            if rate is not None and now < next_at:
                with anyio.move_on_after(next_at - now):
                    await self._wake.wait()
                continue
            messages = self._feed.step()
            await self._send_messages(messages)
            if rate is not None:
                # Pace by steps as well as messages, so throttled candles cannot spin.
                next_at = max(next_at, now) + max(1, len(messages)) / rate
            elif not messages:
                await anyio.sleep(_FLOOD_IDLE)

    # -- reading ----------------------------------------------------------------

    async def _reader(self) -> None:
        while True:  # ends at EOF, on close, or when the task group is cancelled
            try:
                data = await self._stream.receive(_READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.end("eof")
                return
            self._touch()
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, Ping):
                    await self._send_event(event.response())
                elif isinstance(event, CloseConnection):
                    await self._on_close(event)
                    return
                elif isinstance(event, Message):
                    await self._on_fragment(event)

    async def _on_close(self, event: CloseConnection) -> None:
        state = self._ws.state
        if state is ConnectionState.REMOTE_CLOSING:
            async with self._lock:
                await self._write(self._ws.send(event.response()))
            self.end(f"client_close:{event.code}")
        elif state is ConnectionState.CLOSED:
            self._peer_closed.set()  # the reply to our close
            self.end(self._fail_reason or f"closed:{event.code}")
        else:
            # wsproto reports a malformed client frame as a close event: fail with it.
            await self._send_close(event.code)
            self.end(f"protocol_error:{event.code}")

    async def _on_fragment(self, event: Message[Any]) -> None:
        data = event.data
        text = data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")
        self._fragment_bytes += len(text)
        if self._fragment_bytes > self._config.max_message_bytes:
            await self._send_close(1009)
            self.end("message_too_big")
            return
        self._fragments.append(text)
        if event.message_finished:
            message = "".join(self._fragments)
            self._fragments.clear()
            self._fragment_bytes = 0
            self._on_request(message)

    def _record(self, raw: str, parsed: Parsed, error: str | None = None) -> None:
        now = anyio.current_time()
        self._journal.add_request(RequestRecord(now, self.id, self.endpoint, raw, parsed, error))

    def _violation(self, kind: str, detail: str) -> None:
        now = anyio.current_time()
        self._journal.add_violation(Violation(kind, self.id, now, detail))

    def _on_request(self, text: str) -> None:
        if self._closing:
            self._record(text, None, "IGNORED_WHILE_CLOSING")
            return
        is_ping = text == "PING"
        if not is_ping or self._config.count_text_ping:
            broken = self._limiter.hit(anyio.current_time())
            if broken is not None:
                limit, window = broken
                name = self._config.too_many_name
                self._record(text, None, name)
                self._violation("message_rate", f"more than {limit} requests in {window:g} s")
                self._begin_fail(name, self._config.too_many_message)
                return
        if is_ping:
            self._record(text, "PING")
            self._queue(_Out(encode_status(), binary=self._config.binary_control_frames))
            if not self._up_running and self._tg is not None:
                self._up_running = True
                self._tg.start_soon(self._up_loop)
            return
        try:
            request = parse_request(
                text,
                private=self.endpoint == "private",
                reject_codes=self._config.reject_codes,
            )
        except RequestError as error:
            self._record(text, None, error.name)
            self._violation("request_error", error.name)
            self._begin_fail(error.name, error.text(self._config.language))
            return
        self._record(text, request)
        if isinstance(request, Subscribe):
            self._install(request)
        else:
            self._list(request)

    def _install(self, request: Subscribe) -> None:
        """Replace the whole subscription set and the format (docs/protocol.md, Requests)."""
        self._format = request.format
        self._entries = request.entries
        self._feed.install(request.entries)
        self._refresh_ring()
        orders = [entry for entry in request.entries if entry.type == "myOrder"]
        self._wants_order = bool(orders)
        self._wants_asset = any(entry.type == "myAsset" for entry in request.entries)
        if any(entry.codes is None for entry in orders):
            self._my_order = None
        else:
            self._my_order = frozenset(code for entry in orders for code in entry.codes or ())
        self._wake.set()
        # The request was recorded before it was installed; waiters on "who wants
        # private data" must look again now.
        self._journal.changed()

    @property
    def wants_private(self) -> bool:
        """Whether the current subscription asks for myOrder or myAsset."""
        return self._wants_order or self._wants_asset

    def _list(self, request: ListSubscriptions) -> None:
        """Answer LIST_SUBSCRIPTIONS and switch the connection's format (§2.8)."""
        if request.format != self._format:
            self._format = request.format
            self._refresh_ring()
        result: list[dict[str, Any]] = []
        for entry in self._entries:
            item: dict[str, Any] = {"type": entry.type}
            if entry.codes is not None:
                item["codes"] = list(entry.codes)  # as sent, suffixes included
            if entry.type == "orderbook":
                item["level"] = entry.level if entry.level is not None else Decimal(0)
            result.append(item)
        reply = {"method": "LIST_SUBSCRIPTIONS", "result": result, "ticket": request.ticket}
        self._queue(_Out(encode_frame([("list", reply)], self._format)))

    # -- errors, keepalive, idle ------------------------------------------------

    def _begin_fail(self, name: str, message: str) -> None:
        if self._closing or self._tg is None:
            return
        self._closing = True
        self._fail_reason = f"error:{name}"
        self._outbox.clear()
        self._wake.set()
        self._tg.start_soon(self._fail, name, message)

    async def _fail(self, name: str, message: str) -> None:
        await self._send_control(encode_error(name, message))
        await anyio.sleep(self._config.error_close_delay)
        await self._send_close(1000)
        with anyio.move_on_after(self._config.close_timeout):
            await self._peer_closed.wait()
        self.end(f"error:{name}")

    async def _up_loop(self) -> None:
        while True:  # ends when the connection's task group is cancelled
            await anyio.sleep(self._config.up_interval)
            if not self._closing:
                self._queue(_Out(encode_status(), binary=self._config.binary_control_frames))

    async def _idle_watchdog(self, timeout: float) -> None:
        while True:  # ends when the connection's task group is cancelled
            remaining = self._last_activity + timeout - anyio.current_time()
            if remaining <= 0:
                self.end("idle_timeout")
                return
            await anyio.sleep(remaining)


def set_reset_on_close(stream: anyio.abc.SocketStream) -> None:
    """Make the next close send RST instead of FIN (SO_LINGER with zero timeout)."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
