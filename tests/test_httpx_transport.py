"""What only the default (httpx) transport does; the shared contract is in ``test_transport``.

The upgrade goes through an ``httpx.AsyncClient`` (its TLS settings, its errors, the
client it was given or made), pongs to a server's pings are written by the next read,
and the frame reader is fed by a fake network stream that cuts frames at every byte.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection as ProtoConnection
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsservers import WAIT, Peer, read_forever, receive, serve, server_tls

from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel
from upbus.core.wire._frames import accept_token
from upbus.core.wire._httpx import HttpxWsTransport, WsConnection
from upbus.core.wire._transport import ConnectionClosed, HandshakeRejected, TransportError
from upbus.settings import load_settings

BOTH_BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


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

    async with serve(handler) as url, HttpxWsTransport(handshake_timeout=WAIT) as transport:
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            await ping_sent.wait()
        await conn.send_text("hello")
        # The first read holds only the ping; receive_batch reads on until a message.
        assert await receive(conn) == ["after the pong"]
        await conn.aclose()
    assert order == [TextMessage("hello"), Pong(b"hb-1")]


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

    async with serve(handler) as url, HttpxWsTransport(handshake_timeout=WAIT) as transport:
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            assert isinstance(conn, WsConnection)
            await conn._write(conn._proto.send(CloseConnection(1000)))
            await closing.wait()
            assert await conn.receive_batch() == ["late"]
            with pytest.raises(ConnectionClosed) as caught:
                await conn.receive_batch()
            await conn.aclose()
    assert caught.value.code == 1000


@pytest.mark.anyio
async def test_transport_aclose_closes_the_client_it_made() -> None:
    transport = HttpxWsTransport()
    async with serve(lambda peer: peer.accept()) as url:
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            await transport.aclose()
            await conn.aclose()
    client = transport._client
    assert isinstance(client, httpx.AsyncClient)
    assert client.is_closed


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
