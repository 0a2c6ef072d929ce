"""The picows transport against scripted loopback servers, and how the plugin is chosen.

The servers are the default transport's test servers (``serve`` and ``Peer`` from
``test_transport``): a real TCP listener whose handler drives a wsproto server
connection frame by frame. The transport runs on asyncio only; every wait is
bounded with ``anyio.fail_after``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from test_transport import WAIT, Handler, Peer, serve, server_tls
from test_transport import certificate as certificate  # a fixture: the TLS tests' certificate
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    TextMessage,
)

import upbus
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel
from upbus.core.wire._httpx import HttpxWsTransport
from upbus.core.wire._messages import Ticker
from upbus.core.wire._picows import PicowsConnection, PicowsTransport, proxy_from_environment
from upbus.core.wire._transport import (
    Connection,
    ConnectionClosed,
    HandshakeRejected,
    Transport,
    TransportError,
)
from upbus.plugins import picows_transport
from upbus.plugins.replay import ReplayTransport
from upbus.sim import SimConfig, Simulator


@asynccontextmanager
async def connected(
    handler: Handler, transport: PicowsTransport | None = None
) -> AsyncIterator[PicowsConnection]:
    """A picows connection to a server running ``handler``; all closed on exit."""
    async with serve(handler) as url, transport or PicowsTransport(trust_env=False) as tr:
        with anyio.fail_after(WAIT):
            conn = await tr.connect(url, {})
        try:
            yield conn
        finally:
            await conn.aclose()


async def receive(conn: PicowsConnection) -> list[bytes | str]:
    with anyio.fail_after(WAIT):
        return await conn.receive_batch()


async def read_forever(
    conn: PicowsConnection,
    into: list[bytes | str],
    arrived: anyio.Event | None = None,
    *,
    reraise: bool = False,
) -> None:
    """The receive loop: collects messages, sets ``arrived`` at the first batch."""
    try:
        while True:
            into += await conn.receive_batch()
            if arrived is not None:
                arrived.set()
    except ConnectionClosed:
        if reraise:
            raise


async def close_code(peer: Peer) -> object:
    """The client's close frame code (or whatever came instead)."""
    event = await peer.next_event()
    return event.code if isinstance(event, CloseConnection) else event


# -- connecting --------------------------------------------------------------------------


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

    async with serve(handler) as url, PicowsTransport(trust_env=False) as transport:
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


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, b'{"error":{"name":"too_many_requests"}}'),
        (418, b"I'm a teapot (banned for a while)"),
        (401, b'{"error":{"name":"invalid_access_key"}}'),
        (499, b"a status HTTPStatus does not know"),
    ],
)
@pytest.mark.anyio
async def test_refused_upgrade_raises_handshake_rejected(status: int, body: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        headers = [(b"content-length", str(len(body)).encode())]
        await peer.send(
            RejectConnection(status_code=status, headers=headers, has_body=True),
            RejectData(data=body),
        )

    async with serve(handler) as url, PicowsTransport(trust_env=False) as transport:
        with anyio.fail_after(WAIT), pytest.raises(HandshakeRejected) as caught:
            await transport.connect(url, {"Authorization": "Bearer header-secret"})
    assert caught.value.status_code == status
    assert caught.value.body == body.decode()
    assert "secret" not in str(caught.value)


@pytest.mark.anyio
async def test_refused_port_raises_transport_error_naming_url_without_secrets() -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/websocket/v1?token=query-secret"
    async with PicowsTransport(trust_env=False) as transport:
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {"Authorization": "Bearer header-secret"})
    message = str(caught.value)
    assert f"ws://127.0.0.1:{port}/websocket/v1" in message
    assert "ConnectionRefusedError" in message
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

    async with serve(handler) as url, PicowsTransport(trust_env=False) as transport:
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {})
    assert "sec-websocket-accept" in str(caught.value).lower()
    assert url in str(caught.value)


@pytest.mark.anyio
async def test_silent_server_times_the_handshake_out_and_cancel_leaves_no_socket() -> None:
    ended = anyio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.next_event()  # never answers; returns at EOF
        ended.set()

    async with (
        serve(handler) as url,
        PicowsTransport(handshake_timeout=0.2, trust_env=False) as transport,
    ):
        with anyio.fail_after(WAIT), pytest.raises(TransportError, match="timed out") as caught:
            await transport.connect(url, {})
        assert url in str(caught.value)
        with anyio.fail_after(WAIT):
            await ended.wait()  # the socket of the abandoned attempt was closed

        ended = anyio.Event()
        with anyio.move_on_after(0.05):  # a caller that gives up (bus shutdown, say)
            await transport.connect(url, {})
        with anyio.fail_after(WAIT):
            await ended.wait()


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 101 Switching"], ids=["nothing", "half"])
@pytest.mark.anyio
async def test_a_server_that_hangs_up_during_the_upgrade_is_a_transport_error(
    answer: bytes,
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if answer:
            await peer.stream.send(answer)
        # Returning closes the socket before the upgrade is answered.

    async with serve(handler) as url, PicowsTransport(trust_env=False) as transport:
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {})
    assert type(caught.value) is TransportError
    assert url in str(caught.value)


@pytest.mark.anyio
async def test_an_upgrade_completed_after_the_caller_gave_up_is_closed() -> None:
    gave_up = anyio.Event()
    ended = anyio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await gave_up.wait()
        await peer.send(AcceptConnection())  # the 101 comes too late
        assert await peer.next_event() is None  # EOF: the client hung up at once
        ended.set()

    async with serve(handler) as url, PicowsTransport(trust_env=False) as transport:
        with anyio.move_on_after(0.1):
            await transport.connect(url, {})
        gave_up.set()
        with anyio.fail_after(WAIT):
            await ended.wait()


@pytest.mark.anyio
async def test_wss_with_a_given_tls_context(certificate: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(TextMessage("over tls"))
        await peer.expect(CloseConnection)

    trust = ssl.create_default_context(cafile=certificate / "cert.pem")
    async with (
        serve(handler, server_tls(certificate)) as url,
        PicowsTransport(ssl_context=trust, trust_env=False) as transport,
    ):
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            assert await conn.receive_batch() == ["over tls"]
            await conn.aclose()


@pytest.mark.anyio
async def test_untrusted_certificate_is_a_transport_error(certificate: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()

    async with (
        serve(handler, server_tls(certificate)) as url,
        PicowsTransport(trust_env=False) as transport,
    ):
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {"Authorization": "Bearer header-secret"})
    assert url in str(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ws://127.0.0.1:99999/", "does not parse"),
        ("https://127.0.0.1/", "expected a ws:// or wss:// URL"),
    ],
)
@pytest.mark.anyio
async def test_unusable_urls_are_transport_errors(url: str, message: str) -> None:
    async with PicowsTransport() as transport:
        with pytest.raises(TransportError, match=message):
            await transport.connect(url, {})


@pytest.mark.anyio
async def test_closed_transport_refuses_to_connect() -> None:
    transport = PicowsTransport()
    await transport.aclose()
    await transport.aclose()
    with pytest.raises(TransportError, match="closed"):
        await transport.connect("wss://example.invalid/", {})


@pytest.mark.anyio
async def test_connect_goes_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tunnels: list[bytes] = []

    async def proxy(client: anyio.abc.SocketStream) -> None:
        """A minimal HTTP CONNECT proxy."""
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await client.receive()
            request_line = head.split(b"\r\n", 1)[0]
            tunnels.append(request_line)
            host, port = request_line.split(b" ")[1].rsplit(b":", 1)
            async with await anyio.connect_tcp(host.decode(), int(port)) as upstream:
                await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")

                async def pipe(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                    try:
                        async for chunk in a:
                            await b.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    with anyio.CancelScope(shield=True):
                        await b.send_eof()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(pipe, client, upstream)
                    tg.start_soon(pipe, upstream, client)

    async def handler(peer: Peer) -> None:
        await peer.accept(TextMessage("through the tunnel"))
        await peer.expect(CloseConnection)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy_port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg, serve(handler) as url:
        tg.start_soon(listener.serve, proxy)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with PicowsTransport() as transport:
            with anyio.fail_after(WAIT):
                conn = await transport.connect(url, {})
                assert await conn.receive_batch() == ["through the tunnel"]
                await conn.aclose()
        tg.cancel_scope.cancel()
    server_port = url.split(":")[2].split("/")[0]
    assert tunnels == [f"CONNECT 127.0.0.1:{server_port} HTTP/1.1".encode()]


def test_proxy_from_environment_follows_httpx_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    proxy_for = proxy_from_environment
    assert proxy_for("wss://api.upbit.com/websocket/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://secure-proxy:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy:3128")
    assert proxy_for("wss://api.upbit.com/websocket/v1") == "http://secure-proxy:3128"
    assert proxy_for("ws://127.0.0.1:8765/websocket/v1") == "http://plain-proxy:3128"
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert proxy_for("ws://127.0.0.1:8765/websocket/v1") is None
    assert proxy_for("wss://api.upbit.com/websocket/v1") == "http://secure-proxy:3128"
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("ALL_PROXY", "socks5://socks:1080")
    assert proxy_for("wss://api.upbit.com/websocket/v1") == "socks5://socks:1080"


# -- receiving ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_frames_written_with_the_101_are_delivered() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(BytesMessage(b'{"type":"ticker"}'))
        await peer.next_event()

    async with connected(handler) as conn:
        assert await receive(conn) == [b'{"type":"ticker"}']


@pytest.mark.anyio
async def test_binary_and_text_messages_arrive_as_bytes_and_str_in_one_batch() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(BytesMessage(b'{"a":1}'), TextMessage('{"b":"한글"}'), BytesMessage(b""))
        await peer.next_event()

    async with connected(handler) as conn:
        batch = await receive(conn)
    assert batch == [b'{"a":1}', '{"b":"한글"}', b""]
    assert [type(m) for m in batch] == [bytes, str, bytes]


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
async def test_frames_split_across_reads_are_delivered_in_order() -> None:
    # 3000 x ~300 B and one 200 kB frame: many reads, frames cut at read edges.
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
    assert batches < 200


@pytest.mark.anyio
async def test_a_reader_that_falls_behind_pauses_the_socket_and_loses_nothing() -> None:
    frames = [BytesMessage(b"%05d" % i) for i in range(2000)]

    async def handler(peer: Peer) -> None:
        await peer.accept()
        for start in range(0, len(frames), 100):
            await peer.send(*frames[start : start + 100])
        await peer.next_event()

    transport = PicowsTransport(max_pending=50, trust_env=False)
    received: list[bytes | str] = []
    async with connected(handler, transport) as conn:
        with anyio.fail_after(WAIT):
            # Nobody reads: the socket stops being read. (Polled: no event to wait on.)
            while not conn._read_paused:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert 50 <= len(conn._batch) < 2000
        while len(received) < len(frames):
            received += await receive(conn)
    assert received == [f.data for f in frames]


@pytest.mark.anyio
async def test_a_backlog_comes_back_in_bounded_batches_in_order() -> None:
    frames = [BytesMessage(b"%05d" % i) for i in range(3000)]

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(*frames)
        await peer.next_event()

    transport = PicowsTransport(max_pending=1000, trust_env=False)
    sizes: list[int] = []
    received: list[bytes | str] = []
    async with connected(handler, transport) as conn:
        with anyio.fail_after(WAIT):
            while not conn._read_paused:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            while len(received) < len(frames):
                batch = await conn.receive_batch()
                sizes.append(len(batch))
                received += batch
    assert received == [f.data for f in frames]
    assert max(sizes) == 256  # the backlog was over 256 and came back in slices


@pytest.mark.parametrize("size", [300_000, None])
@pytest.mark.anyio
async def test_the_socket_receive_buffer_is_bounded_unless_told_otherwise(
    size: int | None,
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.next_event()

    transport = PicowsTransport(receive_buffer=size, trust_env=False)
    async with connected(handler, transport) as conn:
        assert conn._transport is not None
        sock = conn._transport.underlying_transport.get_extra_info("socket")
        actual = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if size is None:
        with socket.socket() as fresh:  # what the kernel gives a socket nobody set
            assert actual == fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    else:
        assert actual == 2 * size  # Linux doubles the value set, for its bookkeeping


@pytest.mark.anyio
async def test_fragmented_messages_are_reassembled_around_a_ping() -> None:
    pongs: list[bytes] = []
    ponged = anyio.Event()

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

    async with connected(handler) as conn:
        assert await receive(conn) == ['[{"a":1}]', b"\x00\x01\x02"]
        with anyio.fail_after(WAIT):
            await ponged.wait()
    assert pongs == [b"between"]


@pytest.mark.anyio
async def test_a_character_split_between_fragments_is_decoded_whole() -> None:
    encoded = "시세".encode()  # 6 bytes; cut inside the first character

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.stream.send(b"\x01\x02" + encoded[:2] + b"\x80\x04" + encoded[2:])
        await peer.next_event()

    async with connected(handler) as conn:
        assert await receive(conn) == ["시세"]


@pytest.mark.anyio
async def test_server_ping_is_answered_without_a_reader() -> None:
    """picows answers pings as they arrive, unlike the default transport."""
    answered = anyio.Event()
    pongs: list[bytes] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(Ping(b"hb-1"))
        pongs.append((await peer.expect(Pong)).payload)  # type: ignore[attr-defined]
        answered.set()
        await peer.send(TextMessage("after the pong"))
        await peer.next_event()

    async with connected(handler) as conn:
        with anyio.fail_after(WAIT):
            await answered.wait()  # nobody is in receive_batch
        assert await receive(conn) == ["after the pong"]
    assert pongs == [b"hb-1"]


@pytest.mark.anyio
async def test_unsolicited_pong_is_ignored() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(Pong(b"nobody asked"), TextMessage("still here"))
        await peer.next_event()

    async with connected(handler) as conn:
        assert await receive(conn) == ["still here"]


# -- ping --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_client_ping_returns_round_trip_time_with_or_without_a_reader() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.expect(CloseConnection)  # answers pings on the way

    async with connected(handler) as conn:
        alone = [await conn.ping(WAIT) for _ in range(2)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_forever, conn, [])
            reading = [await conn.ping(WAIT) for _ in range(2)]
            await conn.aclose()
    assert all(0 < rtt < WAIT for rtt in alone + reading)


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

    async with connected(handler) as conn:
        with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
            await conn.ping(0.2)
        assert got_ping.is_set()
        assert conn._pings == {}
        release.set()
        assert await receive(conn) == ["late pong was harmless"]


@pytest.mark.anyio
async def test_pending_ping_fails_fast_when_connection_drops() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        assert isinstance(await peer.next_event(), Ping)
        # Leaving the handler closes the socket without a close frame.

    async with connected(handler) as conn:
        with anyio.fail_after(WAIT), pytest.raises(ConnectionClosed) as caught:
            await conn.ping(60)
    assert caught.value.code is None


# -- closing -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_close_delivers_earlier_messages_then_raises() -> None:
    answer: list[object] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        last = peer.ws.send(TextMessage("last words")) + peer.ws.send(CloseConnection(4000, "bye"))
        await peer.stream.send(last + b"\x81\x05ghost")  # nothing after a close counts
        answer.append(await close_code(peer))

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


@pytest.mark.anyio
async def test_abrupt_tcp_drop_raises_connection_closed() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(TextMessage("before the drop"))
        # Returning closes the socket: no close frame.

    async with connected(handler) as conn:
        assert await receive(conn) == ["before the drop"]
        with pytest.raises(TransportError) as caught:
            await receive(conn)
    assert isinstance(caught.value, ConnectionClosed)
    assert caught.value.code is None
    assert "ws://127.0.0.1:" in caught.value.reason


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param(b"\x8f\x00", 1002, id="unknown-opcode"),
        pytest.param(b"\x82\x85abcd" + b"12345", 1002, id="masked-server-frame"),
        pytest.param(b"\x82\x7e\x00\x05hello", 1002, id="non-minimal-length"),
        pytest.param(b"\xc2\x02hi", 1002, id="reserved-bit"),
        pytest.param(b"\xc9\x02hi", 1002, id="reserved-bit-on-a-ping"),
        pytest.param(b"\x80\x02hi", 1002, id="continuation-without-start"),
        pytest.param(b"\x01\x02hi\x81\x02hi", 1002, id="new-message-inside-fragmented"),
        pytest.param(b"\x09\x02hi", 1002, id="fragmented-ping"),
        pytest.param(b"\x81\x02\xff\xfe", 1007, id="invalid-utf8"),
        pytest.param(b"\x01\x01\xff\x80\x01\xfe", 1007, id="invalid-utf8-fragmented"),
        pytest.param(b"\x82\x7f" + (1 << 40).to_bytes(8, "big"), 1009, id="huge-frame"),
        pytest.param(
            b"\x02\x7e\x03\x00" + b"x" * 768 + b"\x80\x7e\x01\x00" + b"x" * 256,
            1009,
            id="huge-fragmented-message",
        ),
    ],
)
@pytest.mark.anyio
async def test_protocol_violations_close_with_the_right_code(raw: bytes, code: int) -> None:
    answer: list[object] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        # A valid message first, in the same write: it must still be delivered.
        await peer.stream.send(peer.ws.send(TextMessage("ok")) + raw)
        answer.append(await close_code(peer))

    transport = PicowsTransport(max_message_size=1000, trust_env=False)
    async with connected(handler, transport) as conn:
        assert await receive(conn) == ["ok"]
        with pytest.raises(ConnectionClosed, match="protocol error") as caught:
            await receive(conn)
    assert caught.value.code == code
    assert answer == [code]


@pytest.mark.anyio
async def test_aclose_is_idempotent_and_ends_a_running_receive_loop() -> None:
    closes: list[object] = []
    loop_error: list[ConnectionClosed] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        closes.append(await close_code(peer))

    async def loop(conn: PicowsConnection) -> None:
        try:
            await conn.receive_batch()
        except ConnectionClosed as exc:
            loop_error.append(exc)

    async with connected(handler) as conn:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(loop, conn)
                await anyio.wait_all_tasks_blocked()  # the loop waits for data
                await conn.aclose(4001)
                await conn.aclose()
        await conn.aclose()
    assert [e.code for e in loop_error] == [4001]
    assert closes == [4001]


@pytest.mark.anyio
async def test_a_cancelled_reader_leaves_the_connection_usable() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.expect(TextMessage)
        await peer.send(TextMessage("after the cancel"))
        await peer.next_event()

    async with connected(handler) as conn:
        with anyio.move_on_after(0.05):
            await conn.receive_batch()
        await conn.send_text("go on")
        assert await receive(conn) == ["after the cancel"]


@pytest.mark.anyio
async def test_transport_aclose_closes_its_connections() -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.next_event()

    async with serve(handler) as url:
        transport = PicowsTransport(trust_env=False)
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            await transport.aclose()
            with pytest.raises(ConnectionClosed):
                await conn.receive_batch()
            await conn.aclose()


@pytest.mark.anyio
async def test_classes_implement_the_interfaces() -> None:
    # mypy checks the assignments structurally.
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.next_event()

    async with connected(handler) as opened:
        conn: Connection = opened
        transport: Transport = PicowsTransport()
        assert conn is opened
        await transport.aclose()


# -- choosing the transport --------------------------------------------------------------


def load(**settings: object) -> tuple[PluginManager, upbus.Settings]:
    loaded = upbus.Settings(**settings)  # type: ignore[arg-type]
    return PluginManager.load(loaded), loaded


@pytest.mark.anyio
async def test_auto_on_asyncio_with_picows_installed_chooses_picows() -> None:
    manager, settings = load(heartbeat_timeout=3.0)
    transport = manager.make_transport(Channel.PUBLIC, settings)
    assert isinstance(transport, PicowsTransport)
    assert (transport._handshake_timeout, transport._close_timeout) == (3.0, 3.0)
    assert manager.make_transport(Channel.PRIVATE, settings) is not transport
    await transport.aclose()


@pytest.mark.anyio
async def test_httpx_setting_chooses_the_default_transport() -> None:
    manager, settings = load(transport="httpx")
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), HttpxWsTransport)


@pytest.mark.anyio
async def test_a_configured_recording_still_beats_auto(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    manager, settings = load(plugins={"replay": {"path": str(path)}})
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), ReplayTransport)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_on_trio_auto_falls_back_and_picows_is_refused() -> None:
    manager, settings = load()
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), HttpxWsTransport)
    manager, settings = load(transport="picows")
    with pytest.raises(upbus.ConfigError, match="asyncio backend") as caught:
        manager.make_transport(Channel.PUBLIC, settings)
    assert "running on trio" in str(caught.value)
    assert "pip install 'upbus[fast]'" in str(caught.value)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_connect_refuses_trio() -> None:
    with pytest.raises(upbus.ConfigError, match="asyncio backend only"):
        await PicowsTransport().connect("ws://127.0.0.1:9/", {})


def test_outside_an_event_loop_auto_keeps_the_default() -> None:
    manager, settings = load()
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), HttpxWsTransport)
    manager, settings = load(transport="picows")  # checked again at connect
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), PicowsTransport)


@pytest.mark.anyio
async def test_without_picows_auto_falls_back_and_picows_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(picows_transport, "picows_installed", lambda: False)
    manager, settings = load()
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), HttpxWsTransport)
    manager, settings = load(transport="picows")
    with pytest.raises(upbus.ConfigError, match="picows package is not installed"):
        manager.make_transport(Channel.PUBLIC, settings)


def test_the_plugin_module_loads_without_picows() -> None:
    script = """
import sys
sys.modules["picows"] = None  # import picows now raises ImportError
import asyncio
import upbus
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel
from upbus.core.wire._httpx import HttpxWsTransport

async def main():
    settings = upbus.Settings()
    manager = PluginManager.load(settings)
    assert not manager.errors, manager.errors
    assert manager.is_registered("picows")
    transport = manager.make_transport(Channel.PUBLIC, settings)
    assert isinstance(transport, HttpxWsTransport), transport
    settings = upbus.Settings(transport="picows")
    try:
        manager.make_transport(Channel.PUBLIC, settings)
    except upbus.ConfigError as exc:
        print(exc)
    assert "upbus.core.wire._picows" not in sys.modules

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "needs the picows package (pip install 'upbus[fast]')" in result.stdout


# -- end to end --------------------------------------------------------------------------


class Tickers:
    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.codes: list[str] = []
        self.enough = anyio.Event()

    async def on_message(self, message: Ticker) -> None:
        self.codes.append(message.code)
        if len(self.codes) >= self.wanted:
            self.enough.set()


@pytest.mark.anyio
async def test_a_bus_on_picows_delivers_tickers_from_the_simulator() -> None:
    async with Simulator(SimConfig(rate=200.0)) as sim:
        settings = upbus.Settings(public_url=sim.public_url, transport="picows", debounce=0.02)
        async with upbus.Bus(settings) as bus:
            component = Tickers(wanted=20)
            await bus.register_component(component, upbus.ticker("KRW-BTC", "KRW-ETH"))
            with anyio.fail_after(WAIT):
                await component.enough.wait()
            assert isinstance(bus._managers[Channel.PUBLIC]._transport, PicowsTransport)
            metrics = bus.get_connection_metrics()["public"]
    assert set(component.codes) <= {"KRW-BTC", "KRW-ETH"}
    assert metrics["messages_in"] >= 20
    assert metrics["connects"] == 1
