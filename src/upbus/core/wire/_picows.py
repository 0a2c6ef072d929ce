"""WebSocket connections over picows: frames arrive by callback, batches leave by await.

This module needs the optional ``picows`` package (``pip install 'upbus[fast]'``) and
the asyncio backend; :mod:`upbus.plugins.picows_transport` imports it only when both
are there.

picows parses frames in Cython and calls :meth:`PicowsConnection.on_ws_frame` for
each frame of a socket read, synchronously, from the event loop's read callback.
The connection copies each data message out of picows's buffer into a list and, at
the read's last frame, wakes the task waiting in
:meth:`PicowsConnection.receive_batch` (an asyncio future: one wakeup per read, not
per frame). The common frame (whole, final text or binary) costs one Python call, an
append and a few attribute reads; everything else (fragments, pongs, close frames)
takes :meth:`PicowsConnection._other_frame`.

Control frames are handled as they arrive, whether or not a task is reading: pings
are answered and pongs settle :meth:`PicowsConnection.ping` waiters at once. What
picows checks (opcodes, masking, length encodings, control frame sizes, close
codes, the frame size limit) it answers with a close frame; what it leaves to the
application (reserved header bits, fragment sequencing, UTF-8 of text messages, the
size of a reassembled message) is checked here, with the same close codes as the
default transport (1002, 1007, 1009). Pings are answered here too, not by picows's
auto-pong, which would answer a ping before its reserved bits could be checked.

A reader that falls behind does not make the connection buffer without bound:
once ``max_pending`` messages wait, reading from the socket pauses (TCP pushes
back on the server) until :meth:`~PicowsConnection.receive_batch` takes them.
While reading is paused, a pong may be queued behind data nobody may read yet, so
the timeout of :meth:`~PicowsConnection.ping` stops counting: a consumer that does
not read never makes the connection look dead, and a server that stops answering
is found whenever the connection can read. The default transport
(:mod:`upbus.core.wire._httpx`) behaves the same.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import weakref
from collections.abc import Mapping
from urllib.parse import urlsplit
from urllib.request import getproxies_environment, proxy_bypass

import anyio
from picows import (
    WSCloseCode,
    WSError,
    WSFrame,
    WSHandshakeError,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    ws_connect,
)

from upbus.core._errors import ConfigError
from upbus.core.wire._frames import (
    INVALID_URL,
    MAX_ERROR_BODY,
    MAX_MESSAGE_SIZE,
    MAX_PENDING,
    PingWaiter,
    exception_leaves,
    safe_url,
)
from upbus.core.wire._transport import ConnectionClosed, HandshakeRejected, TransportError

__all__ = ("PicowsConnection", "PicowsTransport", "proxy_from_environment")

logger = logging.getLogger("upbus.transport")

_MAX_BATCH = 256  # messages one receive_batch call returns at most
# The socket's receive buffer (Linux doubles it): 2 MiB in flight is ~7 MB/s at a
# 300 ms round trip, far above the exchange's rates, and bounds one read's size.
_RECEIVE_BUFFER = 1024 * 1024

# Looked up once: reading WSFrame.msg_type builds an enum member, so the hot path
# compares identities with these.
_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG
_CLOSE = WSMsgType.CLOSE

# Stands in for the fragment list once the connection is finished: any value but
# None sends every later frame down the slow path, which drops it.
_FINISHED: list[bytes] = []


class PicowsConnection(WSListener):
    """One open WebSocket connection; picows's listener for it, too.

    Implements :class:`upbus.core.wire._transport.Connection`. One task at a time may call
    :meth:`receive_batch`; :meth:`send_text`, :meth:`ping` and :meth:`aclose` may be
    called from other tasks meanwhile. Made by :class:`PicowsTransport` once the
    upgrade succeeds; picows then calls the ``on_ws_*`` methods.

    :param url: the endpoint, for messages only (passed through
        :func:`~upbus.core.wire._frames.safe_url`).
    :param close_timeout: bound on :meth:`aclose` waiting for the socket to close.
    :param max_message_size: a longer fragmented message closes the connection with
        code 1009 (picows checks single frames against the same limit).
    :param max_pending: reading pauses while this many messages wait.
    :param receive_buffer: ``SO_RCVBUF`` for the socket once connected, or ``None``.
    """

    __slots__ = (
        "_abandoned",
        "_backlog",
        "_batch",
        "_changed",
        "_close_info",
        "_close_timeout",
        "_closing",
        "_fragments",
        "_fragments_size",
        "_fragments_text",
        "_loop",
        "_max_message_size",
        "_max_pending",
        "_ping_seq",
        "_pings",
        "_read_paused",
        "_receive_buffer",
        "_transport",
        "_url",
        "_waiter",
        "_writable",
    )

    def __init__(
        self,
        *,
        url: str,
        close_timeout: float = 5.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_pending: int = MAX_PENDING,
        receive_buffer: int | None = _RECEIVE_BUFFER,
    ) -> None:
        super().__init__()
        self._url = url
        self._close_timeout = close_timeout
        self._max_message_size = max_message_size
        self._max_pending = max_pending
        self._receive_buffer = receive_buffer
        self._loop = asyncio.get_running_loop()
        self._transport: WSTransport | None = None
        self._batch: list[bytes | str] = []  # complete messages not yet returned
        self._waiter: asyncio.Future[None] | None = None  # receive_batch's wakeup
        self._read_paused = False
        self._backlog = False  # the last receive_batch call left messages behind
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused
        self._fragments: list[bytes] | None = None  # pieces of a fragmented message
        self._fragments_size = 0
        self._fragments_text = False
        self._pings: dict[bytes, PingWaiter] = {}
        self._ping_seq = 0
        self._changed: anyio.Event | None = None  # set by _notify
        # (code, reason) once the connection is finished, for every later call to raise.
        self._close_info: tuple[int | None, str] | None = None
        self._closing = False
        self._abandoned = False  # connect() gave up before this connection was handed out

    @property
    def url(self) -> str:
        """The endpoint, without user info or query."""
        return self._url

    @property
    def closed(self) -> bool:
        """True once the connection is finished (closed by either side or lost)."""
        return self._close_info is not None

    # -- picows callbacks (on the event loop, from the socket's read callback) ----------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        if self._abandoned:
            transport.disconnect(False)
            return
        if self._receive_buffer is not None:
            # picows doubles its read buffer whenever a read fills it, and a read
            # takes all the kernel holds: under a burst both grow to many megabytes
            # and stay. A bounded socket buffer bounds what one read can bring.
            sock = transport.underlying_transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # a few ns: plain C fields
            self._fail(1002, "reserved bits set, but no extension was negotiated")
        elif kind is _BINARY and frame.fin and self._fragments is None:
            self._batch.append(frame.get_payload_as_bytes())
        elif kind is _TEXT and frame.fin and self._fragments is None:
            try:
                self._batch.append(frame.get_payload_as_utf8_text())
            except UnicodeDecodeError:
                self._fail(1007, "a text message is not valid UTF-8")
        else:
            self._other_frame(transport, frame, kind)
        if frame.last_in_buffer:
            # The read is parsed: hand its messages over with one wakeup.
            waiter = self._waiter
            if waiter is not None and self._batch:
                self._waiter = None
                if not waiter.done():
                    waiter.set_result(None)
            if len(self._batch) >= self._max_pending and not self._read_paused:
                self._read_paused = True
                transport.underlying_transport.pause_reading()
                self._notify()  # ping() clocks stop

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._close_info is None:
            handshake = transport.close_handshake
            if handshake is not None and handshake.sent is not None:
                # picows found a protocol violation and sent the close frame itself.
                sent = handshake.sent
                self._finish(sent.code.value, f"protocol error: {sent.reason}")
            else:
                self._finish(
                    None,
                    f"connection to {self._url} lost: the TCP connection closed "
                    "without a close frame",
                )
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def _other_frame(self, transport: WSTransport, frame: WSFrame, kind: WSMsgType) -> None:
        """Every frame but a whole text or binary message outside a fragmented one."""
        if self._close_info is not None:
            return  # nothing after the close counts
        if kind is _PONG:
            if self._pings:
                self._on_pong(frame.get_payload_as_bytes())
            return  # unsolicited pongs (RFC 6455 §5.5.3 allows them) are ignored
        if kind is _CLOSE:
            self._on_close(transport, frame.get_payload_as_bytes())
            return
        if kind is _PING:
            transport.send_pong(frame.get_payload_as_bytes())
            return
        fragments = self._fragments
        if kind is _CONTINUATION:
            if fragments is None:
                self._fail(1002, "a continuation frame without a message to continue")
                return
        elif fragments is not None:
            self._fail(1002, "a new message began inside a fragmented one")
            return
        else:  # the first frame of a fragmented text or binary message
            fragments = self._fragments = []
            self._fragments_size = 0
            self._fragments_text = kind is _TEXT
        self._fragments_size += frame.payload_size
        if self._fragments_size > self._max_message_size:
            self._fail(1009, "a fragmented message is too big")
            return
        fragments.append(frame.get_payload_as_bytes())
        if not frame.fin:
            return
        self._fragments = None
        data = b"".join(fragments)
        if not self._fragments_text:
            self._batch.append(data)
            return
        try:
            self._batch.append(data.decode())  # joined first: a character may span frames
        except UnicodeDecodeError:
            self._fail(1007, "a text message is not valid UTF-8")

    def _on_pong(self, payload: bytes) -> None:
        pings = self._pings
        if payload not in pings:
            return
        now = self._loop.time()
        # A peer may answer only the latest of several pings (§5.5.3), so a pong
        # also settles every ping sent before the one it matches.
        for key in list(pings):
            pings.pop(key).answered_at = now
            if key == payload:
                break
        self._notify()

    def _on_close(self, transport: WSTransport, payload: bytes) -> None:
        """The server's close frame (picows has checked its code and reason)."""
        if len(payload) >= 2:
            code = int.from_bytes(payload[:2])
            reason = payload[2:].decode("utf-8", "replace")
        else:
            code, reason = 1005, ""  # no status code in the frame (RFC 6455 §7.1.5)
        self._finish(code, reason)
        if not transport.is_close_frame_sent:
            # Echo the code (§5.5.1); a frame without one is answered with 1000.
            transport.send_close(WSCloseCode(1000 if code == 1005 else code))
        transport.disconnect()

    def _fail(self, code: int, reason: str) -> None:
        """Finish the connection for a protocol violation: close frame, then close."""
        self._finish(code, f"protocol error: {reason}")
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(code), reason.encode())
            transport.disconnect()

    def _finish(self, code: int | None, reason: str) -> None:
        """Mark the connection finished; wake the reader and every ping waiter."""
        if self._close_info is not None:
            return
        self._close_info = (code, reason)
        self._fragments = _FINISHED
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._pings = {}  # their answered_at stays None: ping() raises ConnectionClosed
        self._notify()

    def _notify(self) -> None:
        """Wake :meth:`ping` waiters: a pong came, reading paused or resumed, or the end."""
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    def _closed_error(self) -> ConnectionClosed:
        # A fresh exception per raise: re-raising one instance grows its traceback.
        code, reason = self._close_info or (None, "closed")
        return ConnectionClosed(code, reason)

    # -- the Connection interface -------------------------------------------------------

    async def receive_batch(self) -> list[bytes | str]:
        """Wait for messages and return those that have arrived (at most 256), in order.

        Binary messages come as ``bytes``, text messages as ``str``; the list is
        never empty. Messages that arrived ahead of a close frame are returned
        first; the call after that raises :class:`ConnectionClosed` with the close
        frame's code and reason. A lost connection raises ``ConnectionClosed(None, …)``.
        """
        if self._backlog:
            # One socket read can bring thousands of messages (the kernel buffers
            # megabytes on loopback). Between slices of such a backlog, let the
            # consumers run, so they take what the last slice delivered before the
            # next one is decoded; nothing is taken yet, so a cancel here loses nothing.
            self._backlog = False
            await asyncio.sleep(0)
        while True:
            batch = self._batch
            if batch:
                if len(batch) > _MAX_BATCH:
                    # Bounded, so that what one call decodes and delivers at once (and
                    # so the process's memory high-water mark) stays small.
                    taken = batch[:_MAX_BATCH]
                    del batch[:_MAX_BATCH]
                    self._backlog = True
                else:
                    taken = batch
                    self._batch = []
                if self._read_paused and len(self._batch) < self._max_pending:
                    self._read_paused = False
                    if self._transport is not None and not self._transport.is_disconnected:
                        self._transport.underlying_transport.resume_reading()
                    self._notify()  # ping() clocks run again
                return taken
            if self._close_info is not None:
                raise self._closed_error()
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    async def send_text(self, text: str) -> None:
        """Send one text frame; :class:`ConnectionClosed` if the connection is finished.

        picows writes the whole frame to the socket or to the transport's buffer at
        once, so a cancelled send never leaves half a frame behind. While the
        buffer is over its high-water mark, this waits for it to drain first.
        """
        while self._writable is not None and self._close_info is None:
            await asyncio.shield(self._writable)
        transport = self._transport
        if self._close_info is not None or transport is None:
            raise self._closed_error()
        transport.send(_TEXT, text)

    async def ping(self, timeout: float) -> float:
        """Send a ping and return the seconds until its pong arrived.

        The pong is read whether or not a task is in :meth:`receive_batch`. While
        reading is paused because ``max_pending`` messages wait for the reader, the
        timeout's clock stops: the pong may be queued behind them. The round trip
        returned includes any time the clock stood still. Raises ``TimeoutError``
        once ``timeout`` seconds have counted without a pong and
        :class:`ConnectionClosed` if the connection ends first.
        """
        transport = self._transport
        if self._close_info is not None or transport is None:
            raise self._closed_error()
        self._ping_seq += 1
        payload = self._ping_seq.to_bytes(8, "big")
        waiter = PingWaiter()
        self._pings[payload] = waiter
        loop = self._loop
        try:
            waiter.sent_at = loop.time()
            transport.send_ping(payload)
            remaining = timeout
            while waiter.answered_at is None and self._close_info is None:
                if self._read_paused:
                    await self._wait_change()  # the reader is behind: the clock stops
                    continue
                if remaining <= 0:
                    raise TimeoutError
                started = loop.time()
                with anyio.move_on_after(remaining):
                    await self._wait_change()
                remaining -= loop.time() - started
        finally:
            self._pings.pop(payload, None)
        if waiter.answered_at is None:  # woken because the connection finished
            raise self._closed_error()
        return waiter.answered_at - waiter.sent_at

    async def _wait_change(self) -> None:
        changed = self._changed
        if changed is None:
            changed = self._changed = anyio.Event()
        await changed.wait()

    @property
    def reading_paused(self) -> bool:
        """True while ``max_pending`` messages wait and the socket is not read."""
        return self._read_paused

    async def aclose(self, code: int = 1000) -> None:
        """Send a close frame (if still possible) and close the socket; idempotent.

        Waits up to ``close_timeout`` (shielded from cancellation) for the socket
        to close, then aborts it. The server's answering close frame is not awaited.
        """
        if self._closing:
            return
        self._closing = True
        transport = self._transport
        if self._close_info is None:
            self._finish(code, "closed by this client")
            if transport is not None and not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(code))
        if transport is None:
            return
        transport.disconnect()  # graceful: what is buffered is written first
        with anyio.move_on_after(self._close_timeout, shield=True):
            try:
                # Also collects the error picows keeps for a failure it detected.
                await transport.wait_disconnected()
            except Exception as exc:
                logger.debug("connection to %s ended with %r", self._url, exc)
        if not transport.is_disconnected:
            transport.disconnect(False)


class PicowsTransport:
    """Opens :class:`PicowsConnection` objects with :func:`picows.ws_connect`.

    Implements :class:`upbus.core.wire._transport.Transport`; asyncio only. Like the
    default transport it takes the proxy for a URL from the environment
    (``HTTPS_PROXY`` for ``wss://``, ``HTTP_PROXY`` for ``ws://``, ``ALL_PROXY``,
    ``NO_PROXY``) unless ``trust_env`` is false or ``proxy`` is given; picows
    speaks to HTTP(S) and SOCKS proxies. Redirects are not followed: a 3xx answer
    is a :class:`HandshakeRejected`.

    :param handshake_timeout: bound on the whole connect (TCP, TLS, proxy, upgrade).
    :param close_timeout: bound on each connection's :meth:`~PicowsConnection.aclose`.
    :param max_message_size: longest message accepted (frame or reassembled
        message); a longer one closes the connection with code 1009.
    :param max_pending: messages a connection holds for its reader before it stops
        reading from the socket.
    :param ssl_context: TLS settings for ``wss://``; default: httpx's, as the default
        transport has them (certifi's CA bundle, ``SSL_CERT_FILE``/``SSL_CERT_DIR``
        when ``trust_env``).
    :param receive_buffer: the socket's receive buffer in bytes (``SO_RCVBUF``;
        ``None`` leaves the kernel's autotuning): bounds how much one read brings.
    :param proxy: a proxy URL for every connection, instead of the environment's.
    :param trust_env: read proxy settings from the environment.
    """

    def __init__(
        self,
        *,
        handshake_timeout: float = 10.0,
        close_timeout: float = 5.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_pending: int = MAX_PENDING,
        receive_buffer: int | None = _RECEIVE_BUFFER,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
        trust_env: bool = True,
    ) -> None:
        self._handshake_timeout = handshake_timeout
        self._close_timeout = close_timeout
        self._max_message_size = max_message_size
        self._max_pending = max_pending
        self._receive_buffer = receive_buffer
        self._ssl_context = ssl_context
        self._proxy = proxy
        self._trust_env = trust_env
        self._connections: weakref.WeakSet[PicowsConnection] = weakref.WeakSet()
        self._closed = False

    async def connect(self, url: str, headers: Mapping[str, str]) -> PicowsConnection:
        """Upgrade ``url`` to a WebSocket, sending ``headers`` with the request.

        Raises :class:`HandshakeRejected` when the server answers with another status
        than 101 (429 and 418 are the exchange's rate limiting), and
        :class:`TransportError` naming the URL for a failed connect (DNS, refused,
        timeout, TLS, proxy) or an invalid upgrade response. Header values never
        appear in messages. :class:`~upbus.core._errors.ConfigError` if the running
        event loop is not asyncio's.
        """
        if self._closed:
            raise TransportError("the transport is closed")
        where = safe_url(url)
        scheme = url.partition(":")[0].lower()
        if where == INVALID_URL:
            raise TransportError("cannot connect: the URL does not parse")
        if scheme not in ("ws", "wss"):
            raise TransportError(f"cannot connect to {where}: expected a ws:// or wss:// URL")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError(
                "transport 'picows' runs on the asyncio backend only; "
                "set transport = 'httpx' (or 'auto') for another event loop"
            ) from None
        proxy = self._proxy
        if proxy is None and self._trust_env:
            proxy = proxy_from_environment(url)
        ssl_context = self._ssl_context
        if ssl_context is None and scheme == "wss":
            # Made once, at the first wss:// connect: loading the CA bundle takes a while.
            # httpx is imported here, not at the top, so that this module and its
            # frame path load without the default transport's packages.
            import httpx

            ssl_context = self._ssl_context = httpx.create_ssl_context(trust_env=self._trust_env)

        attempt = _Attempt()

        def make_listener(
            request: WSUpgradeRequest, response: WSUpgradeResponse
        ) -> PicowsConnection:
            conn = PicowsConnection(
                url=where,
                close_timeout=self._close_timeout,
                max_message_size=self._max_message_size,
                max_pending=self._max_pending,
                receive_buffer=self._receive_buffer,
            )
            conn._abandoned = attempt.abandoned
            attempt.conn = conn
            return conn

        try:
            with anyio.fail_after(self._handshake_timeout):
                ws_transport, listener = await ws_connect(
                    make_listener,
                    url,
                    extra_headers=dict(headers),
                    ssl_context=ssl_context,
                    websocket_handshake_timeout=self._handshake_timeout,
                    # Answered in _other_frame, after the reserved bits are checked.
                    enable_auto_pong=False,
                    max_frame_size=self._max_message_size,
                    max_redirects=0,
                    proxy=proxy,
                )
        except BaseException as exc:
            # Cancelled or failed with the socket open: picows may still complete the
            # upgrade later and make a listener, which then disconnects at once; one
            # already made is disconnected here.
            attempt.abandoned = True
            conn = attempt.conn
            if conn is not None and conn._transport is not None:
                conn._transport.disconnect(False)
            if isinstance(exc, Exception):
                raise _connect_error(exc, where) from exc
            raise
        if not isinstance(listener, PicowsConnection):
            # picows completes "successfully" without a listener when the socket
            # closed before the upgrade was answered.
            ws_transport.disconnect(False)
            raise TransportError(
                f"cannot connect to {where}: the connection closed before the upgrade was answered"
            )
        self._connections.add(listener)
        return listener

    async def aclose(self) -> None:
        """Close every connection this transport opened that is still open; idempotent."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._connections):
            await conn.aclose()

    async def __aenter__(self) -> PicowsTransport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Attempt:
    """One :meth:`PicowsTransport.connect` call, as its listener factory sees it."""

    __slots__ = ("abandoned", "conn")

    def __init__(self) -> None:
        self.abandoned = False
        self.conn: PicowsConnection | None = None


def _connect_error(exc: Exception, where: str) -> TransportError:
    """The upbus error for what :func:`picows.ws_connect` raised."""
    if isinstance(exc, TimeoutError):
        return TransportError(f"cannot connect to {where}: timed out")
    if isinstance(exc, WSHandshakeError):
        status = _status_of(exc)
        if status is not None and status != 101:
            body = (exc.raw_body or b"").decode("utf-8", "replace")[:MAX_ERROR_BODY]
            return HandshakeRejected(status, body)
        return TransportError(f"invalid WebSocket upgrade from {where}: {exc}")
    if isinstance(exc, ExceptionGroup):
        causes = "; ".join(f"{type(e).__name__}: {e}" for e in exception_leaves(exc))
        return TransportError(f"cannot connect to {where}: {causes}")
    if isinstance(exc, (OSError, WSError, ValueError)):
        return TransportError(f"cannot connect to {where}: {type(exc).__name__}: {exc}")
    # Anything else (a proxy library's own error, say) is still a failed connect.
    return TransportError(f"cannot connect to {where}: {type(exc).__name__}: {exc}")


def _status_of(exc: WSHandshakeError) -> int | None:
    """The HTTP status of a failed upgrade, also when picows could not parse the response."""
    if exc.response is not None:
        return int(exc.response.status)
    # An unregistered status code (HTTPStatus(499) fails) leaves only the raw head.
    status_line = (exc.raw_header or b"").split(b"\r\n", 1)[0].split(b" ")
    if len(status_line) >= 2 and status_line[0].startswith(b"HTTP/") and status_line[1].isdigit():
        return int(status_line[1])
    return None


def proxy_from_environment(url: str) -> str | None:
    """The proxy the environment names for ``url``, as httpx would pick it.

    ``wss://`` uses ``HTTPS_PROXY`` and ``ws://`` ``HTTP_PROXY`` (the default
    transport requests them as ``https://`` and ``http://``), either falling back to
    ``ALL_PROXY``; a host matched by ``NO_PROXY`` gets none.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return None
    proxies = getproxies_environment()
    proxy = proxies.get("https" if parts.scheme.lower() == "wss" else "http") or proxies.get("all")
    if proxy is None:
        return None
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    # With a proxy in the environment, proxy_bypass() reads NO_PROXY alone.
    if proxy_bypass(netloc):
        return None
    return proxy
