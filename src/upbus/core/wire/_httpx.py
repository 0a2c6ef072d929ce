"""WebSocket connections: an httpx upgrade, then upbus's own tight read loop.

:class:`HttpxWsTransport` does the HTTP/1.1 upgrade through a long-lived
``httpx.AsyncClient`` (:mod:`upbus.core.wire._upgrade`), so proxies, TLS settings
and timeouts are httpx's. After the ``101`` it hands the raw network stream to
:class:`WsConnection`, which runs its own receive path: one ``await`` per socket
read, every complete message of that read returned as one list. There is no
background task and no per-message task hop or timeout scope, which is what made
httpx-ws's own session (a zero-buffer memory stream and a timeout scope per
message) over ten times slower than this.

Framing is split in two. The common frame (whole, final, unmasked text or binary) is
cut out of the read buffer directly. Every other frame's header is checked as soon as
it is read (reserved bits, opcode, masking, control frame size and fragmentation,
length encoding: close code 1002, as picows's parser does; the rules are in
:mod:`upbus.core.wire._frames`), so a frame that can never be valid is not waited
for; a valid one (control frames, fragments) goes whole to a ``wsproto.Connection``,
which checks the rest (fragment order, UTF-8, close codes) and keeps the protocol
state, and which also builds every outgoing frame. Feeding every frame to wsproto
cost ~12 µs of Python per message, more than ``websockets`` spends in total.

Whoever reads handles the control frames: pings are answered and pongs matched to
:meth:`WsConnection.ping` waiters by the task in :meth:`WsConnection.receive_batch`,
or, while none is there, by :meth:`WsConnection.ping` itself. A receive loop may
therefore stop reading for a while (a lossless consumer's buffer is full) and
heartbeats still work: ``ping`` reads on, keeping the data messages it reads for the
next ``receive_batch``, but only up to ``max_pending`` of them. Then it stops
reading, so TCP pushes back on the server as the consumer asked, and its timeout
stops counting, since the pong may be queued behind data that may not be read yet:
a consumer that does not read never makes the connection look dead, and a server
that stops answering is found whenever the connection can read. picows's transport
(:mod:`upbus.core.wire._picows`) behaves the same.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import anyio
import httpcore
import httpx
from wsproto.connection import Connection as _WsProto
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage
from wsproto.utilities import LocalProtocolError

from upbus.core.wire._frames import (
    MAX_MESSAGE_SIZE,
    MAX_PENDING,
    PingWaiter,
    accept_token,
    header_problem,
    safe_url,
)
from upbus.core.wire._transport import ConnectionClosed, TransportError
from upbus.core.wire._upgrade import check_url, upgrade

__all__ = ("HttpxWsTransport", "NetworkStream", "WsConnection", "accept_token", "safe_url")

logger = logging.getLogger("upbus.transport")

_READ_SIZE = 65_536
# What a read or write on an httpcore network stream raises when the socket fails;
# httpcore maps its backends' errors to these, OSError covers anything unmapped.
_NETWORK_ERRORS = (httpcore.NetworkError, httpcore.TimeoutException, OSError)


class NetworkStream(Protocol):
    """The part of ``httpcore.AsyncNetworkStream`` a :class:`WsConnection` uses."""

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes: ...

    async def write(self, buffer: bytes, timeout: float | None = None) -> None: ...

    async def aclose(self) -> None: ...


class WsConnection:
    """One open WebSocket connection over an already upgraded network stream.

    Implements :class:`upbus.core.wire._transport.Connection`. One task at a time may call
    :meth:`receive_batch`; :meth:`send_text`, :meth:`ping` and :meth:`aclose` may be
    called from other tasks meanwhile (writes are serialised by a lock).

    :param stream: the upgraded stream (``response.extensions["network_stream"]``).
    :param url: the endpoint, for messages only (pass it through :func:`safe_url`).
    :param response: the ``101`` response; closing it returns the socket to httpx,
        which closes it. Without one the stream is closed directly.
    :param read_size: bytes asked of each socket read.
    :param close_timeout: bound on sending the close frame and on closing the stream.
    :param max_message_size: a longer frame or fragmented message closes the
        connection with code 1009 instead of being buffered.
    :param max_pending: messages :meth:`ping` keeps for :meth:`receive_batch`
        before it stops reading (see :meth:`ping`).
    """

    __slots__ = (
        "_changed",
        "_close_info",
        "_close_timeout",
        "_closing",
        "_fragments",
        "_fragments_size",
        "_max_message_size",
        "_max_pending",
        "_pending",
        "_pending_needed",
        "_pending_size",
        "_ping_seq",
        "_pings",
        "_proto",
        "_read_size",
        "_reading",
        "_receiving",
        "_response",
        "_stream",
        "_stream_closed",
        "_unread",
        "_url",
        "_write_lock",
    )

    def __init__(
        self,
        stream: NetworkStream,
        *,
        url: str,
        response: httpx.Response | None = None,
        read_size: int = _READ_SIZE,
        close_timeout: float = 5.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._stream = stream
        self._url = url
        self._response = response
        self._read_size = read_size
        self._close_timeout = close_timeout
        self._proto = _WsProto(ConnectionType.CLIENT)
        self._write_lock = anyio.Lock()
        self._max_message_size = max_message_size
        self._fragments: list[Any] | None = None  # pieces of a fragmented message
        self._fragments_size = 0
        self._pending: list[bytes] = []  # reads holding the start of an unfinished frame
        self._pending_size = 0
        self._pending_needed = 0  # bytes that frame needs in all; 0: header incomplete
        self._pings: dict[bytes, PingWaiter] = {}
        self._ping_seq = 0
        self._max_pending = max_pending
        self._unread: list[bytes | str] = []  # messages read, not yet returned
        self._receiving = False  # a task is in receive_batch
        self._reading = False  # a socket read is under way (receive_batch's or ping's)
        self._changed: anyio.Event | None = None  # set by _notify
        # (code, reason) once the connection is finished, for every later call to raise.
        self._close_info: tuple[int | None, str] | None = None
        self._closing = False
        self._stream_closed = False

    @property
    def url(self) -> str:
        """The endpoint, without user info or query."""
        return self._url

    @property
    def closed(self) -> bool:
        """True once the connection is finished (closed by either side or lost)."""
        return self._close_info is not None

    # -- receiving ----------------------------------------------------------------------

    async def receive_batch(self) -> list[bytes | str]:
        """Wait for a socket read that completes messages; return them all, in order.

        Binary messages come as ``bytes``, text messages as ``str``. Pings are
        answered (the pong is written before this returns), pongs wake :meth:`ping`
        waiters, unsolicited pongs are ignored. Messages that a :meth:`ping` read
        while no task was here come first, without a read. A read that completes no
        message is followed by another read, so the list is never empty. Messages
        that arrived ahead of a close frame are returned first; the call after that
        raises :class:`ConnectionClosed` with the close frame's code and reason. A
        lost connection raises ``ConnectionClosed(None, …)``.
        """
        self._receiving = True
        try:
            while True:
                batch = self._unread
                if batch:
                    self._unread = []
                    return batch
                if self._close_info is not None:
                    raise self._closed_error()
                if self._reading:
                    # A ping() is in a read; what it reads is ours.
                    await self._wait_change()
                    continue
                await self._read()
        finally:
            self._receiving = False
            if self._changed is not None:
                self._notify()  # a waiting ping() reads from now on

    async def _read(self) -> None:
        """One socket read: its messages go to ``_unread``, its control frames are handled.

        Raises :class:`ConnectionClosed` if the socket failed or hit EOF; after a
        close frame or a protocol error it returns normally with the connection
        finished, so the messages read before it are handed over first.
        """
        self._reading = True
        try:
            try:
                data = await self._stream.read(self._read_size)
            except _NETWORK_ERRORS as exc:
                error = self._lost(f"{type(exc).__name__}: {exc}")
                await self._close_stream()
                raise error from exc
            if not data:
                error = self._lost("the server closed the TCP connection without a close frame")
                await self._close_stream()
                raise error
            pending = self._pending
            if pending:
                # The previous read ended inside a frame. Collect reads until the
                # frame is whole, then join once: re-joining per read would copy a
                # large frame over and over.
                pending.append(data)
                self._pending_size += len(data)
                if self._pending_size < self._pending_needed:
                    return
                data = b"".join(pending)
                pending.clear()
            replies = self._split(data, self._unread)
            if replies:
                # Answer pings before handing the messages over, so a slow consumer
                # cannot delay them. A failed write has finished the connection: the
                # messages read are still handed over, the next call raises.
                with contextlib.suppress(ConnectionClosed):
                    await self._write(replies)
            if self._close_info is not None:
                await self._close_stream()
        finally:
            self._reading = False
            if self._changed is not None:
                self._notify()

    async def _wait_change(self) -> None:
        """Wait until a read ends, a pong arrives, a reader comes or goes, or the end."""
        changed = self._changed
        if changed is None:
            changed = self._changed = anyio.Event()
        await changed.wait()

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    @property
    def reading_paused(self) -> bool:
        """True while ``max_pending`` messages wait and :meth:`ping` reads no more."""
        return len(self._unread) >= self._max_pending

    def _split(self, data: bytes, batch: list[bytes | str]) -> bytes:
        """Cut ``data`` into frames, append finished messages to ``batch`` and return
        the control frames to answer with; keep an unfinished last frame for later.

        The common frame (whole, final, unmasked, text or binary, outside a
        fragmented message) is decoded right here: a few byte tests and a slice,
        where wsproto spends 10–20 µs of Python per frame. Every other frame's header
        is checked here as soon as it is in (:func:`header_problem`, the same checks
        and close codes as picows's parser); a valid one (control frames,
        fragments) then goes to wsproto whole, so wsproto checks what needs state or
        the payload (fragment order, UTF-8, close codes), keeps the protocol state,
        and is always at a frame boundary.
        """
        replies = b""
        limit = self._max_message_size
        size = len(data)
        pos = 0
        needed = 0
        while size - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            canonical = True
            if length < 126:
                start = pos + 2
            elif length == 126:
                if size - pos < 4:
                    break
                start = pos + 4
                length = int.from_bytes(data[pos + 2 : start])
                canonical = length >= 126  # RFC 6455 §5.2: the shortest length form
            else:
                if size - pos < 10:
                    break
                start = pos + 10
                length = int.from_bytes(data[pos + 2 : start])
                canonical = 65_536 <= length < 1 << 63
            if (b0 != 0x82 and b0 != 0x81) or b1 & 0x80 or not canonical:
                # Checked as soon as the header is in, not once the payload is:
                # a frame that can never be valid must not be waited for.
                problem = header_problem(b0, b1, length, canonical)
                if problem is not None:
                    return replies + self._fail_protocol(1002, problem)
            if length > limit:
                replies += self._fail_protocol(1009, f"a frame of {length} bytes is too big")
                return replies
            end = start + length
            if end > size:
                needed = end - pos
                break
            if self._fragments is None:
                if b0 == 0x82:  # FIN + binary
                    batch.append(data[start:end])
                    pos = end
                    continue
                if b0 == 0x81:  # FIN + text
                    try:
                        batch.append(data[start:end].decode())
                        pos = end
                        continue
                    except UnicodeDecodeError:
                        pass  # wsproto closes with 1007
            replies += self._slow_frame(data[pos:end], batch)
            pos = end
            if self._close_info is not None:
                return replies  # nothing after a close frame counts
        if pos < size:
            self._pending.append(data[pos:])
            self._pending_size = size - pos
            self._pending_needed = needed
        return replies

    def _slow_frame(self, frame: bytes, batch: list[bytes | str]) -> bytes:
        """Let wsproto handle one whole frame; return what to answer it with."""
        proto = self._proto
        proto.receive_data(frame)
        replies = b""
        for event in proto.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                replies += self._reassemble(event, batch)
            elif isinstance(event, Ping):
                if proto.state is ConnectionState.OPEN:  # not once our close is sent
                    replies += proto.send(event.response())
            elif isinstance(event, Pong):
                if self._pings:
                    self._on_pong(event.payload)
            elif isinstance(event, CloseConnection):
                replies += self._on_close(event)
                break
        return replies

    def _reassemble(self, event: BytesMessage | TextMessage, batch: list[bytes | str]) -> bytes:
        """Collect one fragment; return a close frame if the message grows too big."""
        fragments: list[Any] | None = self._fragments
        if fragments is None:
            if event.message_finished:
                batch.append(event.data)  # type: ignore[arg-type]  # bytes, never bytearray
                return b""
            fragments = self._fragments = []
            self._fragments_size = 0
        fragments.append(event.data)
        self._fragments_size += len(event.data)
        if self._fragments_size > self._max_message_size:
            # Checked on every fragment, the last one included.
            self._fragments = None
            return self._fail_protocol(1009, "a fragmented message is too big")
        if event.message_finished:
            self._fragments = None
            # All str (text) or all bytes (binary): wsproto rejects a continuation
            # that changes the type.
            batch.append(("" if isinstance(event, TextMessage) else b"").join(fragments))
        return b""

    def _on_pong(self, payload: bytes) -> None:
        pings = self._pings
        if payload not in pings:
            return  # unsolicited (RFC 6455 §5.5.3 allows it): ignore
        now = anyio.current_time()
        # A peer may answer only the latest of several pings (§5.5.3), so a pong
        # also settles every ping sent before the one it matches.
        for key in list(pings):
            waiter = pings.pop(key)
            waiter.answered_at = now
            if key == payload:
                break
        self._notify()

    def _on_close(self, event: CloseConnection) -> bytes:
        """Record the close and return the close frame to answer with (maybe empty)."""
        proto = self._proto
        code, reason = int(event.code), event.reason or ""
        if proto.state is ConnectionState.OPEN:
            # wsproto reports a malformed frame as a close event without changing
            # state; tell the server why we are leaving.
            return self._fail_protocol(code, reason)
        reply = b""
        if proto.state is ConnectionState.REMOTE_CLOSING:
            reply = proto.send(event.response())
        # else LOCAL_CLOSING -> CLOSED: the server answered our own close.
        self._finish(code, reason)
        return reply

    def _fail_protocol(self, code: int, reason: str) -> bytes:
        """Finish the connection for a protocol violation; return the close frame."""
        self._finish(code, f"protocol error: {reason}")
        if self._proto.state is ConnectionState.OPEN:
            return self._proto.send(CloseConnection(code, reason))
        return b""

    # -- sending ------------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one text frame; :class:`ConnectionClosed` if the connection is finished.

        Cancelling a send while it writes ends the connection: part of the frame may
        already be on the wire, and nothing sent after it would parse.
        """
        await self._write(self._frame(TextMessage(text)))

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame."""
        await self._write(self._frame(BytesMessage(data)))

    async def ping(self, timeout: float) -> float:
        """Send a ping and return the seconds until its pong was read.

        While a task is in :meth:`receive_batch`, that task reads the pong. While
        none is (the caller's receive loop waits on a slow consumer, say), this
        reads the socket itself: it answers pings, settles pongs and keeps the
        messages it reads for the next :meth:`receive_batch`. It keeps at most
        ``max_pending`` of them (plus the rest of one read): once that many wait, it
        reads no more, so TCP pushes back on the server, and the timeout's clock
        stops, because the pong may be queued behind data nobody may read yet. A
        consumer that does not read therefore never makes the connection look dead,
        while a server that stops answering is still found whenever the connection
        can read. The round trip returned includes any time the clock stood still.

        Raises ``TimeoutError`` once ``timeout`` seconds have counted without a pong
        and :class:`ConnectionClosed` if the connection ends first.
        """
        self._ping_seq += 1
        payload = self._ping_seq.to_bytes(8, "big")
        data = self._frame(Ping(payload))
        waiter = PingWaiter()
        self._pings[payload] = waiter
        try:
            waiter.sent_at = anyio.current_time()
            with anyio.fail_after(timeout):
                await self._write(data)
            await self._await_pong(waiter, timeout - (anyio.current_time() - waiter.sent_at))
        finally:
            self._pings.pop(payload, None)
        if waiter.answered_at is None:  # woken because the connection finished
            raise self._closed_error()
        return waiter.answered_at - waiter.sent_at

    async def _await_pong(self, waiter: PingWaiter, remaining: float) -> None:
        """Wait for ``waiter``'s pong, reading while no one else does (see :meth:`ping`)."""
        while waiter.answered_at is None and self._close_info is None:
            if not self._receiving and len(self._unread) >= self._max_pending:
                await self._wait_change()  # the consumer is behind: the clock stops
                continue
            if remaining <= 0:
                raise TimeoutError
            started = anyio.current_time()
            with anyio.move_on_after(remaining):
                if self._receiving or self._reading:
                    await self._wait_change()
                else:
                    try:
                        await self._read()
                    except ConnectionClosed:
                        return  # the connection finished: ping() raises
            remaining -= anyio.current_time() - started

    def _frame(self, event: Event) -> bytes:
        if self._close_info is not None:
            raise self._closed_error()
        try:
            return self._proto.send(event)
        except LocalProtocolError:  # the close handshake has started
            raise self._closed_error() from None

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            if self._stream_closed:
                raise self._closed_error()
            try:
                await self._stream.write(data)
            except _NETWORK_ERRORS as exc:
                error = self._lost(f"{type(exc).__name__}: {exc}")
                await self._close_stream()
                raise error from exc
            except BaseException:
                # Cancelled mid-write: part of a frame may be on the wire, so nothing
                # sent after it would parse. The connection is unusable; end it now
                # so the reader finds out at once instead of at the next heartbeat.
                self._finish(None, "a write was interrupted")
                await self._close_stream()
                raise

    # -- closing ------------------------------------------------------------------------

    async def aclose(self, code: int = 1000) -> None:
        """Send a close frame (if still possible) and close the socket; idempotent.

        Each step is bounded by ``close_timeout`` and shielded from cancellation. The
        server's answering close frame is not awaited: the reader may be another
        task, and the socket goes away either way.
        """
        if self._closing:
            return
        self._closing = True
        if self._close_info is None:
            self._finish(code, "closed by this client")
            if self._proto.state is ConnectionState.OPEN:
                # A failed write means the socket is gone: closing it is all that is left.
                with (
                    anyio.move_on_after(self._close_timeout, shield=True),
                    contextlib.suppress(TransportError),
                ):
                    await self._write(self._proto.send(CloseConnection(code)))
        await self._close_stream()

    async def _close_stream(self) -> None:
        if self._stream_closed:
            return
        self._stream_closed = True
        with anyio.move_on_after(self._close_timeout, shield=True):
            try:
                if self._response is not None:
                    # Lets httpx's pool forget the connection as well as closing it.
                    await self._response.aclose()
                else:
                    await self._stream.aclose()
            except Exception as exc:  # best effort: the socket is abandoned either way
                logger.debug("closing the stream to %s failed: %r", self._url, exc)

    def _finish(self, code: int | None, reason: str) -> None:
        """Mark the connection finished and wake every ping waiter."""
        if self._close_info is not None:
            return
        self._close_info = (code, reason)
        self._pings = {}  # their answered_at stays None: ping() raises
        self._notify()

    def _lost(self, detail: str) -> ConnectionClosed:
        self._finish(None, f"connection to {self._url} lost: {detail}")
        return self._closed_error()

    def _closed_error(self) -> ConnectionClosed:
        # A fresh exception per raise: re-raising one instance grows its traceback.
        code, reason = self._close_info or (None, "closed")
        return ConnectionClosed(code, reason)


class HttpxWsTransport:
    """Opens :class:`WsConnection` objects through one long-lived ``httpx.AsyncClient``.

    Implements :class:`upbus.core.wire._transport.Transport`. ``ws://``/``wss://`` URLs are
    requested as ``http://``/``https://`` so httpx's proxy settings (``HTTPS_PROXY``
    and friends) apply; through a proxy, ``https`` targets are tunnelled with
    ``CONNECT``.

    :param client: an httpx client to use (HTTP/1.1 only: a WebSocket upgrade cannot
        run over HTTP/2). The transport does not close a client it was given.
        Without one it creates its own at the first :meth:`connect`.
    :param handshake_timeout: httpx timeout for the upgrade request (connect, TLS,
        response); only used for a client the transport creates.
    :param close_timeout: bound on each closing step of a connection.
    :param read_size: bytes asked of each socket read.
    :param max_message_size: longest message accepted; a longer one closes the
        connection with code 1009.
    :param max_pending: messages a connection's :meth:`~WsConnection.ping` reads
        ahead for a receive loop that is not reading, before it stops reading.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        handshake_timeout: float = 10.0,
        close_timeout: float = 5.0,
        read_size: int = _READ_SIZE,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._max_message_size = max_message_size
        self._max_pending = max_pending
        self._owns_client = client is None
        self._handshake_timeout = handshake_timeout
        self._close_timeout = close_timeout
        self._read_size = read_size
        self._closed = False
        # Made now, not on the first connect: building it (its TLS context above
        # all) takes tens of milliseconds, and on the first connect that time would
        # fall between the connect limiter's grant and the server seeing the
        # connect, squeezing the first connects closer together on the server's
        # clock than the limiter spaced them.
        self._client = client if client is not None else self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self._handshake_timeout,
            # Upgraded connections never return to the pool: keep none idle and
            # cap none, so many connections never wait on a pool slot.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
        )

    def _get_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise TransportError("the transport is closed")
        return self._client

    async def connect(self, url: str, headers: Mapping[str, str]) -> WsConnection:
        """Upgrade ``url`` to a WebSocket, sending ``headers`` with the request.

        Raises :class:`HandshakeRejected` when the server answers with another status
        than 101 (429 and 418 are the exchange's rate limiting), and
        :class:`TransportError` naming the URL for a failed connect (DNS, refused,
        timeout, TLS) or an invalid upgrade response. Header values never appear in
        messages.
        """
        where, http_url = check_url(url)
        client = self._get_client()
        response, stream = await upgrade(
            client, http_url, headers, where=where, close_timeout=self._close_timeout
        )
        return WsConnection(
            stream,
            url=where,
            response=response,
            read_size=self._read_size,
            close_timeout=self._close_timeout,
            max_message_size=self._max_message_size,
            max_pending=self._max_pending,
        )

    async def aclose(self) -> None:
        """Close the httpx client if the transport made it; idempotent.

        Closing the client also closes every connection it still holds.
        """
        if self._closed:
            return
        self._closed = True
        if self._client is not None and self._owns_client:
            with anyio.move_on_after(self._close_timeout, shield=True):
                await self._client.aclose()

    async def __aenter__(self) -> HttpxWsTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
