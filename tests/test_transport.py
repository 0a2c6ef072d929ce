"""The default transport against a scripted loopback WebSocket server.

Each test runs a real TCP listener on 127.0.0.1 whose handler drives a
``wsproto.WSConnection(SERVER)`` step by step, so every frame sequence (batched
writes, fragments, pings between fragments, bad handshakes, abrupt drops) is exact.
A fake network stream cuts frames at every byte boundary, and ``httpx.MockTransport``
stands in for responses a socket server can't easily give. Every wait is bounded
with ``anyio.fail_after``.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest
from anyio.streams.tls import TLSListener
from required import skip_unless_required
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as ProtoConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel
from upbus.core.wire._httpx import HttpxWsTransport, WsConnection, accept_token, safe_url
from upbus.core.wire._transport import (
    Connection,
    ConnectionClosed,
    HandshakeRejected,
    Transport,
    TransportError,
)
from upbus.settings import load_settings

WAIT = 5.0  # bound on every wait that should succeed
BOTH_BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


class Peer:
    """The server side of one loopback connection."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.events: deque[Event] = deque()
        self.request: Request | None = None

    async def next_event(self) -> Event | None:
        """The next event from the client; ``None`` once the socket hit EOF."""
        while not self.events:
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
            self.ws.receive_data(data)
            self.events.extend(self.ws.events())
        return self.events.popleft()

    async def read_request(self) -> Request:
        event = await self.next_event()
        assert isinstance(event, Request)
        self.request = event
        return event

    async def accept(self, *then: Event) -> None:
        """Answer the upgrade with 101, with ``then`` in the same TCP write."""
        await self.read_request()
        await self.send(AcceptConnection(), *then)

    async def send(self, *events: Event) -> None:
        """Send ``events`` as one TCP write."""
        await self.stream.send(b"".join(self.ws.send(event) for event in events))

    async def expect(self, kind: type[Event]) -> Event:
        """The next event, which must be a ``kind``; pings are answered on the way."""
        while True:
            event = await self.next_event()
            if isinstance(event, Ping) and kind is not Ping:
                await self.send(event.response())
                continue
            assert isinstance(event, kind), f"expected {kind.__name__}, got {event!r}"
            return event

    def header(self, name: bytes) -> bytes | None:
        assert self.request is not None
        for key, value in self.request.extra_headers:
            if key.lower() == name:
                return value
        return None


Handler = Callable[[Peer], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Run ``handler`` for each connection; yields the ``ws://`` (``wss://``) URL."""

    async def on_connect(stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await handler(Peer(stream))

    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    listener: anyio.abc.Listener[anyio.abc.ByteStream] = tcp
    if tls is not None:
        listener = TLSListener(tcp, tls, standard_compatible=False)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_connect)
        yield f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/websocket/v1"
        tg.cancel_scope.cancel()


@asynccontextmanager
async def connected(handler: Handler) -> AsyncIterator[WsConnection]:
    """A transport connected to a server running ``handler``; all closed on exit."""
    async with serve(handler) as url, HttpxWsTransport(handshake_timeout=WAIT) as transport:
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
        try:
            yield conn
        finally:
            await conn.aclose()


async def receive(conn: WsConnection) -> list[bytes | str]:
    with anyio.fail_after(WAIT):
        return await conn.receive_batch()


# -- connecting --------------------------------------------------------------------------


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_connect_sends_headers_and_text_reaches_server() -> None:
    seen: dict[str, object] = {}
    done = anyio.Event()

    async def handler(peer: Peer) -> None:
        await peer.accept()
        seen["authorization"] = peer.header(b"authorization")
        seen["target"] = peer.request.target if peer.request else None
        seen["text"] = (await peer.expect(TextMessage)).data  # type: ignore[attr-defined]
        seen["close"] = (await peer.expect(CloseConnection)).code  # type: ignore[attr-defined]
        done.set()

    async with serve(handler) as url, HttpxWsTransport() as transport:
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {"Authorization": "Bearer abc.def"})
            await conn.send_text('[{"ticket":"t1"},{"type":"ticker","codes":["KRW-BTC"]}]')
            await conn.aclose()
            await done.wait()
    assert seen == {
        "authorization": b"Bearer abc.def",
        "target": "/websocket/v1",
        "text": '[{"ticket":"t1"},{"type":"ticker","codes":["KRW-BTC"]}]',
        "close": 1000,
    }


@pytest.mark.anyio
async def test_frames_written_with_the_101_are_delivered() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(BytesMessage(b'{"type":"ticker"}'))
        await peer.next_event()

    async with connected(handler) as conn:
        assert await receive(conn) == [b'{"type":"ticker"}']


@pytest.mark.anyio
async def test_upgrade_refused_with_429_raises_handshake_rejected() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        body = b'{"error":{"name":"too_many_requests"}}'
        headers = [(b"content-length", str(len(body)).encode())]
        await peer.send(
            RejectConnection(status_code=429, headers=headers, has_body=True),
            RejectData(data=body),
        )

    async with serve(handler) as url, HttpxWsTransport() as transport:
        with anyio.fail_after(WAIT), pytest.raises(HandshakeRejected) as caught:
            await transport.connect(url, {})
    assert caught.value.status_code == 429
    assert "too_many_requests" in caught.value.body


@pytest.mark.anyio
async def test_refused_port_raises_transport_error_naming_url_without_secrets() -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/websocket/v1?token=query-secret"
    async with HttpxWsTransport() as transport:
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {"Authorization": "Bearer header-secret"})
    message = str(caught.value)
    assert f"ws://127.0.0.1:{port}/websocket/v1" in message
    assert "secret" not in message
    assert not isinstance(caught.value, HandshakeRejected)


@pytest.mark.anyio
async def test_wrong_sec_websocket_accept_is_rejected() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.stream.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"
        )
        await peer.next_event()

    async with serve(handler) as url, HttpxWsTransport() as transport:
        with anyio.fail_after(WAIT), pytest.raises(TransportError, match="Sec-WebSocket-Accept"):
            await transport.connect(url, {})


@pytest.mark.anyio
async def test_silent_server_times_the_handshake_out() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.next_event()  # never answers

    async with serve(handler) as url, HttpxWsTransport(handshake_timeout=0.2) as transport:
        with anyio.fail_after(WAIT), pytest.raises(TransportError, match="timed out") as caught:
            await transport.connect(url, {})
    assert url in str(caught.value)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate (and key) for 127.0.0.1, made with the openssl tool."""
    if shutil.which("openssl") is None:
        # A system tool, present where CI runs (there its absence fails the test);
        # elsewhere the TLS test may be skipped without hiding anything else.
        skip_unless_required("needs the openssl command")
    where = tmp_path_factory.mktemp("tls")
    command = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    command += " -days 1 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
    subprocess.run(
        [*command.split(), "-keyout", where / "key.pem", "-out", where / "cert.pem"],
        check=True,
        capture_output=True,
    )
    return where


def server_tls(certificate: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    return context


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_wss_through_httpx_tls_settings(certificate: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(TextMessage("over tls"))
        await peer.expect(CloseConnection)

    trust = ssl.create_default_context(cafile=certificate / "cert.pem")
    async with (
        serve(handler, server_tls(certificate)) as url,
        httpx.AsyncClient(verify=trust) as client,
        HttpxWsTransport(client) as transport,
    ):
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            assert await conn.receive_batch() == ["over tls"]
            await conn.aclose()
        assert not client.is_closed  # a client the transport was given stays open


@pytest.mark.anyio
async def test_untrusted_certificate_is_a_transport_error(certificate: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()

    async with serve(handler, server_tls(certificate)) as url, HttpxWsTransport() as transport:
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {"Authorization": "Bearer header-secret"})
    assert url in str(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert "secret" not in str(caught.value)


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.anyio
async def test_http_418_and_errors_inside_httpx_become_plain_transport_errors() -> None:
    def teapot(request: httpx.Request) -> httpx.Response:
        return httpx.Response(418, text="I'm a teapot (rate limited)")

    def grouped(request: httpx.Request) -> httpx.Response:
        raise ExceptionGroup("connect", [OverflowError("port must be 0-65535")])

    def switched(request: httpx.Request) -> httpx.Response:
        key = request.headers["sec-websocket-key"]
        headers = {"Upgrade": "websocket", "Connection": "Upgrade"}
        return httpx.Response(101, headers={**headers, "Sec-WebSocket-Accept": accept_token(key)})

    url = "wss://api.example/websocket/v1"
    async with mock_client(teapot) as client:
        with pytest.raises(HandshakeRejected) as rejected:
            await HttpxWsTransport(client).connect(url, {})
    assert (rejected.value.status_code, rejected.value.body) == (418, "I'm a teapot (rate limited)")
    async with mock_client(grouped) as client:
        with pytest.raises(TransportError, match="OverflowError: port must be") as caught:
            await HttpxWsTransport(client).connect(url, {})
    assert not isinstance(caught.value, BaseExceptionGroup)
    async with mock_client(switched) as client:
        with pytest.raises(TransportError, match="no network stream"):
            await HttpxWsTransport(client).connect(url, {})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ws://127.0.0.1:99999/", "does not parse"),
        ("ftp://127.0.0.1/", "expected a ws:// or wss:// URL"),
    ],
)
@pytest.mark.anyio
async def test_unusable_urls_are_transport_errors(url: str, message: str) -> None:
    async with HttpxWsTransport() as transport:
        with pytest.raises(TransportError, match=message):
            await transport.connect(url, {})


@pytest.mark.anyio
async def test_closed_transport_refuses_to_connect() -> None:
    transport = HttpxWsTransport()
    await transport.aclose()
    await transport.aclose()
    with pytest.raises(TransportError, match="closed"):
        await transport.connect("wss://example.invalid/", {})


def test_accept_token_matches_rfc_example() -> None:
    assert accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_safe_url_drops_credentials_and_query() -> None:
    assert safe_url("wss://user:pw@api.upbit.com:443/ws?jwt=x#f") == "wss://api.upbit.com:443/ws"


def test_default_plugin_provides_the_transport_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray upbus.toml
    settings = load_settings(_cwd=tmp_path, heartbeat_timeout=3.0)
    manager = PluginManager.load(settings)
    transport = manager.make_transport(Channel.PUBLIC, settings)
    assert isinstance(transport, HttpxWsTransport)
    assert transport._handshake_timeout == 3.0
    assert manager.make_transport(Channel.PRIVATE, settings) is not transport


# -- receiving ---------------------------------------------------------------------------


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_binary_and_text_messages_arrive_in_one_batch() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(BytesMessage(b'{"a":1}'), TextMessage('{"b":2}'))
        await peer.next_event()

    async with connected(handler) as conn:
        assert await receive(conn) == [b'{"a":1}', '{"b":2}']


@pytest.mark.anyio
async def test_many_small_frames_in_one_write_come_back_in_one_batch() -> None:
    frames = [BytesMessage(b'{"seq":%d,"pad":"%s"}' % (i, b"x" * 80)) for i in range(100)]

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(*frames)  # ~10 KB: one loopback segment, one client read
        await peer.next_event()

    async with connected(handler) as conn:
        assert await receive(conn) == [f.data for f in frames]


@pytest.mark.anyio
async def test_frames_split_across_reads_are_reassembled_in_order() -> None:
    # 3000 x ~300 B and one 200 kB frame: several 64 KiB reads, frames cut at read edges.
    small = [b'{"seq":%06d,"pad":"%s"}' % (i, b"y" * 280) for i in range(3000)]
    big = b"z" * 200_000

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(*(BytesMessage(data) for data in small[:1500]), BytesMessage(big))
        await peer.send(*(BytesMessage(data) for data in small[1500:]))
        await peer.next_event()

    received: list[bytes | str] = []
    batches = 0
    async with connected(handler) as conn:
        while len(received) < len(small) + 1:
            received += await receive(conn)
            batches += 1
    assert received == [*small[:1500], big, *small[1500:]]
    assert batches < 100


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_fragmented_messages_are_reassembled_around_a_ping() -> None:
    pongs: list[bytes] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(
            TextMessage("[{", message_finished=False),
            TextMessage('"a":', message_finished=False),
            Ping(b"between"),  # control frames may sit between fragments
            TextMessage("1}]", message_finished=True),
            BytesMessage(b"\x00\x01", message_finished=False),
            BytesMessage(b"\x02", message_finished=True),
        )
        pongs.append((await peer.expect(Pong)).payload)  # type: ignore[attr-defined]
        ponged.set()
        await peer.next_event()

    ponged = anyio.Event()
    async with connected(handler) as conn:
        assert await receive(conn) == ['[{"a":1}]', b"\x00\x01\x02"]
        with anyio.fail_after(WAIT):
            await ponged.wait()
    assert pongs == [b"between"]


@pytest.mark.anyio
async def test_server_ping_is_answered_on_the_next_read() -> None:
    """Pongs are written by ``receive_batch``: none goes out while nobody reads."""
    ping_sent = anyio.Event()
    order: list[object] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(Ping(b"hb-1"))
        ping_sent.set()
        # The client writes "hello" before it reads: the pong cannot come first.
        order.append(await peer.next_event())
        order.append(await peer.next_event())
        await peer.send(TextMessage("after the pong"))
        await peer.next_event()

    async with connected(handler) as conn:
        with anyio.fail_after(WAIT):
            await ping_sent.wait()
        await conn.send_text("hello")
        # The first read holds only the ping; receive_batch reads on until a message.
        assert await receive(conn) == ["after the pong"]
    assert order == [TextMessage("hello"), Pong(b"hb-1")]


@pytest.mark.anyio
async def test_unsolicited_pong_is_ignored() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(Pong(b"nobody asked"), TextMessage("still here"))
        await peer.next_event()

    async with connected(handler) as conn:
        assert await receive(conn) == ["still here"]


class ChunkedStream:
    """A fake network stream that returns ``data`` in reads of ``chunk`` bytes."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.chunks = deque(data[i : i + chunk] for i in range(0, len(data), chunk))
        self.written = bytearray()
        self.closed = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        assert not self.closed
        return self.chunks.popleft() if self.chunks else b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.written += buffer

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 127, 4096, 65_536])
@pytest.mark.anyio
async def test_frames_cut_at_any_byte_are_parsed_alike(chunk: int) -> None:
    server = ProtoConnection(ConnectionType.SERVER)
    sequence: list[Event] = [
        TextMessage("한글 시세 {}"),
        BytesMessage(b""),
        BytesMessage(b"m" * 200),  # 2-byte length
        TextMessage("frag-", message_finished=False),
        Ping(b"p1"),
        TextMessage("mented", message_finished=True),
        Pong(b"unsolicited"),
        BytesMessage(b"L" * 70_000),  # 8-byte length
        TextMessage("€" * 50),
    ]
    expected = ["한글 시세 {}", b"", b"m" * 200, "frag-mented", b"L" * 70_000, "€" * 50]
    stream = ChunkedStream(b"".join(server.send(event) for event in sequence), chunk)
    conn = WsConnection(stream, url="ws://fake/")
    received: list[bytes | str] = []
    with anyio.fail_after(WAIT), pytest.raises(ConnectionClosed) as caught:
        await read_forever(conn, received, reraise=True)
    assert received == expected
    assert caught.value.code is None  # the fake ends with EOF, no close frame
    assert stream.closed
    server.receive_data(bytes(stream.written))
    assert list(server.events()) == [Pong(b"p1")]


@pytest.mark.anyio
async def test_classes_implement_the_interfaces() -> None:
    # mypy checks the assignments structurally; the runtime part just cleans up.
    ws = WsConnection(ChunkedStream(b"", 1), url="ws://fake/")
    httpx_ws = HttpxWsTransport()
    conn: Connection = ws
    transport: Transport = httpx_ws
    assert conn is ws
    assert transport is httpx_ws
    await ws.aclose()
    await httpx_ws.aclose()


# -- ping --------------------------------------------------------------------------------


async def read_forever(
    conn: WsConnection,
    into: list[bytes | str],
    arrived: anyio.Event | None = None,
    *,
    reraise: bool = False,
) -> None:
    """The receive loop: collects messages, sets ``arrived`` at the first."""
    try:
        while True:
            into += await conn.receive_batch()
            if arrived is not None:
                arrived.set()
    except ConnectionClosed:
        if reraise:
            raise


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_client_ping_returns_round_trip_time() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.expect(CloseConnection)  # answers pings on the way

    received: list[bytes | str] = []
    async with connected(handler) as conn, anyio.create_task_group() as tg:
        tg.start_soon(read_forever, conn, received)
        rtts = [await conn.ping(WAIT) for _ in range(3)]
        await conn.aclose()
    assert all(0 < rtt < WAIT for rtt in rtts)


@pytest.mark.anyio
async def test_ping_times_out_when_server_stalls_and_late_pong_is_ignored() -> None:
    got_ping = anyio.Event()
    release = anyio.Event()

    async def handler(peer: Peer) -> None:
        await peer.accept()
        ping = await peer.next_event()
        assert isinstance(ping, Ping)
        got_ping.set()
        await release.wait()  # stall, then answer far too late
        await peer.send(ping.response(), TextMessage("late pong was harmless"))
        await peer.next_event()

    received: list[bytes | str] = []
    arrived = anyio.Event()
    async with connected(handler) as conn, anyio.create_task_group() as tg:
        tg.start_soon(read_forever, conn, received, arrived)
        with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
            await conn.ping(0.2)
        assert got_ping.is_set()
        release.set()
        with anyio.fail_after(WAIT):
            await arrived.wait()
        assert received == ["late pong was harmless"]
        await conn.aclose()


@pytest.mark.anyio
async def test_pending_ping_fails_fast_when_connection_drops() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        assert isinstance(await peer.next_event(), Ping)
        # Leaving the handler closes the socket without a close frame.

    async with connected(handler) as conn, anyio.create_task_group() as tg:
        tg.start_soon(read_forever, conn, [])
        with anyio.fail_after(WAIT), pytest.raises(ConnectionClosed) as caught:
            await conn.ping(60)
    assert caught.value.code is None


# -- closing -----------------------------------------------------------------------------


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_server_close_delivers_earlier_messages_then_raises() -> None:
    answer: list[object] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(TextMessage("last words"), CloseConnection(4000, "bye"))
        event = await peer.next_event()
        answer.append(event.code if isinstance(event, CloseConnection) else event)

    async with connected(handler) as conn:
        assert await receive(conn) == ["last words"]
        with pytest.raises(ConnectionClosed) as caught:
            await receive(conn)
        assert (caught.value.code, caught.value.reason) == (4000, "bye")
        with pytest.raises(ConnectionClosed):
            await conn.send_text("too late")
        with pytest.raises(ConnectionClosed):
            await conn.ping(1)
        assert conn.closed
    assert answer == [4000]  # the close frame was answered


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_abrupt_tcp_drop_raises_transport_error() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        # Returning closes the socket: no close frame.

    async with connected(handler) as conn:
        with pytest.raises(TransportError) as caught:
            await receive(conn)
    assert isinstance(caught.value, ConnectionClosed)
    assert caught.value.code is None


@pytest.mark.anyio
async def test_malformed_frame_closes_with_protocol_error() -> None:
    answer: list[object] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.stream.send(b"\x8f\x00")  # opcode 0xF does not exist
        event = await peer.next_event()
        answer.append(event.code if isinstance(event, CloseConnection) else event)

    async with connected(handler) as conn:
        with pytest.raises(ConnectionClosed, match="protocol error") as caught:
            await receive(conn)
    assert caught.value.code == 1002
    assert answer == [1002]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param(b"\x82\x85abcd" + b"12345", 1002, id="masked-server-frame"),
        pytest.param(b"\x82\x7e\x00\x05hello", 1002, id="non-minimal-length"),
        pytest.param(b"\xc2\x02hi", 1002, id="reserved-bit"),
        pytest.param(b"\x80\x02hi", 1002, id="continuation-without-start"),
        pytest.param(b"\x09\x02hi", 1002, id="fragmented-ping"),
        pytest.param(b"\x81\x02\xff\xfe", 1007, id="invalid-utf8"),
        pytest.param(b"\x82\x7f" + (1 << 40).to_bytes(8, "big"), 1009, id="huge-frame"),
        pytest.param(b"\x82\x7f" + (1 << 63).to_bytes(8, "big"), 1002, id="length-msb-set"),
        pytest.param(b"\x89\x7e\x01\x00", 1002, id="ping-over-125-bytes-not-waited-for"),
    ],
)
@pytest.mark.anyio
async def test_protocol_violations_close_with_the_right_code(raw: bytes, code: int) -> None:
    answer: list[object] = []

    async def handler(peer: Peer) -> None:
        # A valid message first: it must still be delivered.
        await peer.accept()
        await peer.stream.send(peer.ws.send(TextMessage("ok")) + raw)
        event = await peer.next_event()
        answer.append(event.code if isinstance(event, CloseConnection) else event)

    async with connected(handler) as conn:
        assert await receive(conn) == ["ok"]
        with pytest.raises(ConnectionClosed, match="protocol error") as caught:
            await receive(conn)
    assert caught.value.code == code
    assert answer == [code]


@pytest.mark.anyio
async def test_fragmented_message_over_the_size_limit_closes_with_1009() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        for _ in range(5):
            await peer.send(BytesMessage(b"x" * 400, message_finished=False))
        await peer.next_event()

    async with serve(handler) as url, HttpxWsTransport(max_message_size=1000) as transport:
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            with pytest.raises(ConnectionClosed) as caught:
                await read_forever(conn, [], reraise=True)
            await conn.aclose()
    assert caught.value.code == 1009


@pytest.mark.anyio
async def test_server_ping_after_client_close_does_not_break_the_reader() -> None:
    closing = anyio.Event()

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.expect(CloseConnection)
        closing.set()
        # Late traffic after the client's close frame: a ping, a message, the close
        # answer. Raw bytes: wsproto refuses to send anything but a close now.
        await peer.stream.send(b"\x89\x04late" + b"\x81\x04late" + b"\x88\x02\x03\xe8")
        await peer.next_event()

    async with connected(handler) as conn:
        with anyio.fail_after(WAIT):
            await conn._write(conn._proto.send(CloseConnection(1000)))
            await closing.wait()
            assert await conn.receive_batch() == ["late"]
            with pytest.raises(ConnectionClosed) as caught:
                await conn.receive_batch()
    assert caught.value.code == 1000


@BOTH_BACKENDS
@pytest.mark.anyio
async def test_aclose_is_idempotent_and_ends_a_running_receive_loop() -> None:
    closes: list[int] = []
    loop_error: list[ConnectionClosed] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        closes.append((await peer.expect(CloseConnection)).code)  # type: ignore[attr-defined]

    async def loop(conn: WsConnection) -> None:
        try:
            await conn.receive_batch()
        except ConnectionClosed as exc:
            loop_error.append(exc)

    async with connected(handler) as conn:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(loop, conn)
                await anyio.wait_all_tasks_blocked()  # the loop is in its read
                await conn.aclose(4001)
                await conn.aclose()
        await conn.aclose()
    assert [e.code for e in loop_error] == [4001]
    assert closes == [4001]


@pytest.mark.anyio
async def test_transport_aclose_closes_its_client_and_connections() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.next_event()

    async with serve(handler) as url:
        transport = HttpxWsTransport()
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            await transport.aclose()
            with pytest.raises(ConnectionClosed):
                await conn.receive_batch()
            await conn.aclose()
    client = transport._client
    assert isinstance(client, httpx.AsyncClient)
    assert client.is_closed
