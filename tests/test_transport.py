"""The transport contract, run against both transports over scripted loopback servers.

Every case runs once per transport (``kind``: the default httpx one and picows);
some also run httpx on trio. What only one transport does (the httpx upgrade through
an ``httpx.AsyncClient``, picows's receive buffer and proxy tunnel, how each answers
a server's ping) is in ``test_httpx_transport`` and ``test_picows_transport``.
"""

from __future__ import annotations

import inspect
import socket
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest
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
from wsservers import (
    WAIT,
    Kind,
    Peer,
    connected,
    each_transport,
    frame,
    make_transport,
    raw_server,
    read_forever,
    receive,
    serve,
    server_tls,
)

from upbus.core.wire._frames import accept_token, safe_url
from upbus.core.wire._transport import (
    Connection,
    ConnectionClosed,
    HandshakeRejected,
    Transport,
    TransportError,
)

# -- connecting --------------------------------------------------------------------------


@each_transport(trio=True)
@pytest.mark.anyio
async def test_connect_sends_headers_and_text_reaches_server(kind: Kind) -> None:
    seen: dict[str, object] = {}
    done = anyio.Event()

    async def handler(peer: Peer) -> None:
        await peer.accept()
        seen["authorization"] = peer.header(b"authorization")
        seen["target"] = peer.request.target if peer.request else None
        seen["text"] = (await peer.expect(TextMessage)).data  # type: ignore[attr-defined]
        seen["close"] = (await peer.expect(CloseConnection)).code  # type: ignore[attr-defined]
        done.set()

    transport = make_transport(kind)
    async with serve(handler) as url:
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {"Authorization": "Bearer abc.def"})
            await conn.send_text('[{"ticket":"t1"},{"type":"ticker","codes":["KRW-BTC"]}]')
            await conn.aclose()
            await done.wait()
        await transport.aclose()
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
@each_transport()
@pytest.mark.anyio
async def test_refused_upgrade_raises_handshake_rejected(
    kind: Kind, status: int, body: bytes
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        headers = [(b"content-length", str(len(body)).encode())]
        await peer.send(
            RejectConnection(status_code=status, headers=headers, has_body=True),
            RejectData(data=body),
        )

    transport = make_transport(kind)
    async with serve(handler) as url:
        with anyio.fail_after(WAIT), pytest.raises(HandshakeRejected) as caught:
            await transport.connect(url, {"Authorization": "Bearer header-secret"})
        await transport.aclose()
    assert caught.value.status_code == status
    assert caught.value.body == body.decode()
    assert "secret" not in str(caught.value)


@each_transport()
@pytest.mark.anyio
async def test_refused_port_raises_transport_error_naming_url_without_secrets(
    kind: Kind,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/websocket/v1?token=query-secret"
    transport = make_transport(kind)
    with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
        await transport.connect(url, {"Authorization": "Bearer header-secret"})
    await transport.aclose()
    message = str(caught.value)
    assert f"ws://127.0.0.1:{port}/websocket/v1" in message
    # The cause is named, in each transport's own words.
    assert {"httpx": "ConnectError", "picows": "ConnectionRefusedError"}[kind] in message
    assert "secret" not in message
    assert not isinstance(caught.value, HandshakeRejected)


@each_transport()
@pytest.mark.anyio
async def test_wrong_sec_websocket_accept_is_rejected(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.stream.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"
        )
        await peer.next_event()

    transport = make_transport(kind)
    async with serve(handler) as url:
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {})
        await transport.aclose()
    assert "sec-websocket-accept" in str(caught.value).lower()
    assert url in str(caught.value)


@each_transport()
@pytest.mark.anyio
async def test_silent_server_times_the_handshake_out_and_cancel_leaves_no_socket(
    kind: Kind,
) -> None:
    accepted, ended = anyio.Event(), anyio.Event()

    async def handler(peer: Peer) -> None:
        accepted.set()
        while await peer.next_event() is not None:  # reads the request, never answers
            pass
        ended.set()

    transport = make_transport(kind, handshake_timeout=0.2)
    async with serve(handler) as url:
        with anyio.fail_after(WAIT), pytest.raises(TransportError, match="timed out") as caught:
            await transport.connect(url, {})
        assert url in str(caught.value)
        with anyio.fail_after(WAIT):
            await ended.wait()  # the socket of the abandoned attempt was closed

        accepted, ended = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(transport.connect, url, {})
            with anyio.fail_after(WAIT):
                await accepted.wait()
            tg.cancel_scope.cancel()  # a caller that gives up (bus shutdown, say)
        with anyio.fail_after(WAIT):
            await ended.wait()
        await transport.aclose()


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 101 Switching"], ids=["nothing", "half"])
@each_transport()
@pytest.mark.anyio
async def test_a_server_that_hangs_up_during_the_upgrade_is_a_transport_error(
    kind: Kind, answer: bytes
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if answer:
            await peer.stream.send(answer)
        # Returning closes the socket before the upgrade is answered.

    transport = make_transport(kind)
    async with serve(handler) as url:
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {})
        await transport.aclose()
    assert type(caught.value) is TransportError
    assert url in str(caught.value)


@each_transport()
@pytest.mark.anyio
async def test_an_upgrade_completed_after_the_caller_gave_up_is_closed(kind: Kind) -> None:
    requested = anyio.Event()
    gave_up = anyio.Event()
    ended = anyio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        requested.set()
        await gave_up.wait()
        await peer.send(AcceptConnection())  # the 101 comes too late
        assert await peer.next_event() is None  # EOF: the client hung up at once
        ended.set()

    transport = make_transport(kind)
    async with serve(handler) as url:
        async with anyio.create_task_group() as tg:
            tg.start_soon(transport.connect, url, {})
            with anyio.fail_after(WAIT):
                await requested.wait()
            tg.cancel_scope.cancel()  # the caller gives up in the middle of the upgrade
        gave_up.set()
        with anyio.fail_after(WAIT):
            await ended.wait()
        await transport.aclose()


@each_transport()
@pytest.mark.anyio
async def test_untrusted_certificate_is_a_transport_error(kind: Kind, certificate: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()

    transport = make_transport(kind)
    async with serve(handler, server_tls(certificate)) as url:
        with anyio.fail_after(WAIT), pytest.raises(TransportError) as caught:
            await transport.connect(url, {"Authorization": "Bearer header-secret"})
        await transport.aclose()
    assert url in str(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ws://127.0.0.1:99999/", "does not parse"),
        ("ftp://127.0.0.1/", "expected a ws:// or wss:// URL"),
        ("https://127.0.0.1/", "expected a ws:// or wss:// URL"),
    ],
)
@each_transport()
@pytest.mark.anyio
async def test_unusable_urls_are_transport_errors(kind: Kind, url: str, message: str) -> None:
    transport = make_transport(kind)
    with pytest.raises(TransportError, match=message):
        await transport.connect(url, {})
    await transport.aclose()


@each_transport()
@pytest.mark.anyio
async def test_closed_transport_refuses_to_connect(kind: Kind) -> None:
    transport = make_transport(kind)
    await transport.aclose()
    await transport.aclose()
    with pytest.raises(TransportError, match="closed"):
        await transport.connect("wss://example.invalid/", {})


# -- receiving ---------------------------------------------------------------------------


@each_transport()
@pytest.mark.anyio
async def test_frames_written_with_the_101_are_delivered(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(BytesMessage(b'{"type":"ticker"}'))
        await peer.next_event()

    async with connected(handler, make_transport(kind)) as conn:
        assert await receive(conn) == [b'{"type":"ticker"}']


@each_transport(trio=True)
@pytest.mark.anyio
async def test_binary_and_text_messages_arrive_as_bytes_and_str_in_one_batch(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(BytesMessage(b'{"a":1}'), TextMessage('{"b":"한글"}'), BytesMessage(b""))
        await peer.next_event()

    async with connected(handler, make_transport(kind)) as conn:
        batch = await receive(conn)
    assert batch == [b'{"a":1}', '{"b":"한글"}', b""]
    assert [type(m) for m in batch] == [bytes, str, bytes]


@each_transport()
@pytest.mark.anyio
async def test_many_small_frames_in_one_write_come_back_in_one_batch(kind: Kind) -> None:
    frames = [BytesMessage(b'{"seq":%d,"pad":"%s"}' % (i, b"x" * 80)) for i in range(100)]

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(*frames)  # ~10 KB: one loopback segment, one client read
        await peer.next_event()

    async with connected(handler, make_transport(kind)) as conn:
        assert await receive(conn) == [f.data for f in frames]


@each_transport()
@pytest.mark.anyio
async def test_frames_split_across_reads_are_delivered_in_order(kind: Kind) -> None:
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
    async with connected(handler, make_transport(kind)) as conn:
        while len(received) < len(small) + 1:
            received += await receive(conn)
            batches += 1
    assert received == [*small[:1500], big, *small[1500:]]
    # httpx reads 64 KiB at a time; picows hands over what each of its reads held.
    assert batches < {"httpx": 100, "picows": 200}[kind]


@each_transport(trio=True)
@pytest.mark.anyio
async def test_fragmented_messages_are_reassembled_around_a_ping(kind: Kind) -> None:
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

    async with connected(handler, make_transport(kind)) as conn:
        assert await receive(conn) == ['[{"a":1}]', b"\x00\x01\x02"]
        with anyio.fail_after(WAIT):
            await ponged.wait()
    assert pongs == [b"between"]


@each_transport()
@pytest.mark.anyio
async def test_a_character_split_between_fragments_is_decoded_whole(kind: Kind) -> None:
    encoded = "시세".encode()  # 6 bytes; cut inside the first character

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.stream.send(b"\x01\x02" + encoded[:2] + b"\x80\x04" + encoded[2:])
        await peer.next_event()

    async with connected(handler, make_transport(kind)) as conn:
        assert await receive(conn) == ["시세"]


@each_transport()
@pytest.mark.anyio
async def test_unsolicited_pong_is_ignored(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(Pong(b"nobody asked"), TextMessage("still here"))
        await peer.next_event()

    async with connected(handler, make_transport(kind)) as conn:
        assert await receive(conn) == ["still here"]


# -- ping --------------------------------------------------------------------------------


@each_transport(trio=True)
@pytest.mark.anyio
async def test_client_ping_returns_round_trip_time_with_or_without_a_reader(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.expect(CloseConnection)  # answers pings on the way

    async with connected(handler, make_transport(kind)) as conn:
        alone = [await conn.ping(WAIT) for _ in range(2)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_forever, conn, [])
            reading = [await conn.ping(WAIT) for _ in range(2)]
            await conn.aclose()
    assert all(0 < rtt < WAIT for rtt in alone + reading)


@pytest.mark.parametrize("reader", [True, False], ids=["reading", "alone"])
@each_transport()
@pytest.mark.anyio
async def test_ping_times_out_when_server_stalls_and_late_pong_is_ignored(
    kind: Kind, reader: bool
) -> None:
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
    async with connected(handler, make_transport(kind)) as conn:
        async with anyio.create_task_group() as tg:
            if reader:
                tg.start_soon(read_forever, conn, received, arrived)
            with anyio.fail_after(WAIT), pytest.raises(TimeoutError):
                await conn.ping(0.2)
            assert got_ping.is_set()
            assert conn._pings == {}  # type: ignore[attr-defined]  # the timed-out ping is forgotten
            release.set()
            if reader:
                with anyio.fail_after(WAIT):
                    await arrived.wait()
                await conn.aclose()
            else:
                received += await receive(conn)
        assert received == ["late pong was harmless"]


@pytest.mark.parametrize("reader", [True, False], ids=["reading", "alone"])
@each_transport()
@pytest.mark.anyio
async def test_pending_ping_fails_fast_when_connection_drops(kind: Kind, reader: bool) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        assert isinstance(await peer.next_event(), Ping)
        # Leaving the handler closes the socket without a close frame.

    async with connected(handler, make_transport(kind)) as conn, anyio.create_task_group() as tg:
        if reader:
            tg.start_soon(read_forever, conn, [])
        with anyio.fail_after(WAIT), pytest.raises(ConnectionClosed) as caught:
            await conn.ping(60)
    assert caught.value.code is None


# -- closing -----------------------------------------------------------------------------


@each_transport(trio=True)
@pytest.mark.anyio
async def test_server_close_delivers_earlier_messages_then_raises(kind: Kind) -> None:
    answer: list[object] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        last = peer.ws.send(TextMessage("last words")) + peer.ws.send(CloseConnection(4000, "bye"))
        await peer.stream.send(last + b"\x81\x05ghost")  # nothing after a close counts
        answer.append(await peer.close_code())

    async with connected(handler, make_transport(kind)) as conn:
        assert await receive(conn) == ["last words"]
        with pytest.raises(ConnectionClosed) as caught:
            await receive(conn)
        assert (caught.value.code, caught.value.reason) == (4000, "bye")
        with pytest.raises(ConnectionClosed):
            await conn.send_text("too late")
        with pytest.raises(ConnectionClosed):
            await conn.ping(1)
        assert conn.closed  # type: ignore[attr-defined]
    assert answer == [4000]  # the close frame was answered


@each_transport(trio=True)
@pytest.mark.anyio
async def test_abrupt_tcp_drop_raises_connection_closed(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(TextMessage("before the drop"))
        # Returning closes the socket: no close frame.

    async with connected(handler, make_transport(kind)) as conn:
        assert await receive(conn) == ["before the drop"]
        with pytest.raises(TransportError) as caught:
            await receive(conn)
    assert isinstance(caught.value, ConnectionClosed)
    assert caught.value.code is None
    assert "ws://127.0.0.1:" in caught.value.reason


FAULTS = [
    pytest.param(frame(0x83, b""), 1002, id="reserved-data-opcode"),
    pytest.param(frame(0x8B, b""), 1002, id="reserved-control-opcode"),
    pytest.param(frame(0xC2, b"hi"), 1002, id="rsv1-binary"),
    pytest.param(frame(0xC1, b"hi"), 1002, id="rsv1-text"),
    pytest.param(frame(0xA2, b"hi"), 1002, id="rsv2"),
    pytest.param(frame(0x92, b"hi"), 1002, id="rsv3"),
    pytest.param(frame(0xC9, b"hb"), 1002, id="rsv1-ping"),
    pytest.param(frame(0x42, b"hi") + frame(0x80, b"!"), 1002, id="rsv1-first-fragment"),
    pytest.param(b"\x82\x85abcd" + b"12345", 1002, id="masked-server-frame"),
    pytest.param(b"\x89\x82abcd" + b"hb", 1002, id="masked-ping"),
    pytest.param(frame(0x82, b"", length=b"\x7f" + (1 << 63).to_bytes(8, "big")), 1002,
                 id="64-bit-length-msb-set"),
    pytest.param(frame(0x82, b"", length=b"\x7f" + (1 << 40).to_bytes(8, "big")), 1009,
                 id="oversized-64-bit-length"),
    pytest.param(frame(0x82, b"hello", length=b"\x7e\x00\x05"), 1002, id="non-minimal-16-bit"),
    pytest.param(frame(0x82, b"x" * 200, length=b"\x7f" + (200).to_bytes(8, "big")), 1002,
                 id="non-minimal-64-bit"),
    pytest.param(frame(0x09, b"hb"), 1002, id="fragmented-ping"),
    pytest.param(frame(0x08, b"\x03\xe8"), 1002, id="fragmented-close"),
    pytest.param(frame(0x89, b"x" * 126), 1002, id="ping-over-125-bytes"),
    pytest.param(frame(0x8A, b"x" * 300), 1002, id="pong-over-125-bytes"),
    pytest.param(frame(0x88, b"\x03\xe8" + b"x" * 200), 1002, id="close-over-125-bytes"),
    pytest.param(frame(0x80, b"hi"), 1002, id="continuation-without-start"),
    pytest.param(frame(0x01, b"hi") + frame(0x81, b"hi"), 1002, id="new-message-in-fragmented"),
    pytest.param(frame(0x81, b"\xff\xfe"), 1007, id="invalid-utf8-text"),
    pytest.param(frame(0x81, b"\xed\xa0\x80"), 1007, id="utf8-surrogate-text"),
    pytest.param(frame(0x01, b"\xe2\x82") + frame(0x80, b"!"), 1007,
                 id="invalid-utf8-across-fragments"),
    pytest.param(frame(0x88, b"\x03"), 1002, id="close-one-byte-payload"),
    pytest.param(frame(0x88, b"\x03\xed"), 1002, id="close-code-1005"),
    pytest.param(frame(0x88, b"\x03\xe7"), 1002, id="close-code-999"),
    pytest.param(frame(0x88, b"\x03\xe8\xff\xfe"), 1007, id="close-reason-invalid-utf8"),
    # Cases of their own: an opcode from the top of the range, a first fragment that is
    # not UTF-8 by itself, a message over max_message_size only with its last fragment,
    # and a ping whose header claims a payload that is never sent.
    pytest.param(frame(0x8F, b""), 1002, id="unknown-opcode"),
    pytest.param(frame(0x01, b"\xff") + frame(0x80, b"\xfe"), 1007,
                 id="invalid-utf8-first-fragment"),
    pytest.param(frame(0x02, b"x" * 768) + frame(0x80, b"x" * 256), 1009,
                 id="huge-fragmented-message"),
    pytest.param(b"\x89\x7e\x01\x00", 1002, id="ping-over-125-bytes-not-waited-for"),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "code"), FAULTS)
@each_transport()
@pytest.mark.anyio
async def test_protocol_violations_close_with_the_right_code(
    kind: Kind, fault: bytes, code: int
) -> None:
    """A valid message, then one malformed frame in the same write.

    The transport delivers the message, then fails the connection: ``ConnectionClosed``
    with the RFC 6455 code, a close frame with that code to the server, the socket
    closed; it never crashes and never hangs.
    """
    async with (
        raw_server(frame(0x81, b"ok") + fault) as (url, seen),
        aclosing(make_transport(kind, max_message_size=1000)) as transport,
    ):
        with anyio.fail_after(WAIT):
            async with aclosing(await transport.connect(url, {})) as conn:
                received: list[bytes | str] = []
                with pytest.raises(ConnectionClosed) as caught:
                    await read_forever(conn, received, reraise=True)
                assert conn.closed  # type: ignore[attr-defined]
            await seen.done.wait()  # the client closed its socket
    assert received == ["ok"]
    assert caught.value.code == code
    assert caught.value.reason.startswith("protocol error: ")
    assert seen.close_codes == [code]  # the server was told why


@each_transport()
@pytest.mark.anyio
async def test_fragmented_message_over_the_size_limit_closes_with_1009(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        for _ in range(5):
            await peer.send(BytesMessage(b"x" * 400, message_finished=False))
        await peer.next_event()

    async with connected(handler, make_transport(kind, max_message_size=1000)) as conn:
        with anyio.fail_after(WAIT), pytest.raises(ConnectionClosed) as caught:
            await read_forever(conn, [], reraise=True)
    assert caught.value.code == 1009


@each_transport(trio=True)
@pytest.mark.anyio
async def test_aclose_is_idempotent_and_ends_a_running_receive_loop(kind: Kind) -> None:
    closes: list[object] = []
    loop_error: list[ConnectionClosed] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        closes.append(await peer.close_code())

    async def loop(conn: Connection) -> None:
        try:
            await conn.receive_batch()
        except ConnectionClosed as exc:
            loop_error.append(exc)

    async with connected(handler, make_transport(kind)) as conn:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(loop, conn)
                await anyio.wait_all_tasks_blocked()  # the loop waits for data
                await conn.aclose(4001)
                await conn.aclose()
        await conn.aclose()
    assert [e.code for e in loop_error] == [4001]
    assert closes == [4001]


@each_transport()
@pytest.mark.anyio
async def test_a_cancelled_reader_leaves_the_connection_usable(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.expect(TextMessage)
        await peer.send(TextMessage("after the cancel"))
        await peer.next_event()

    async with connected(handler, make_transport(kind)) as conn:
        with anyio.move_on_after(0.05):
            await conn.receive_batch()
        await conn.send_text("go on")
        assert await receive(conn) == ["after the cancel"]


@each_transport()
@pytest.mark.anyio
async def test_transport_aclose_closes_its_connections(kind: Kind) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.next_event()

    async with serve(handler) as url:
        transport = make_transport(kind)
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            await transport.aclose()
            with pytest.raises(ConnectionClosed):
                await conn.receive_batch()
            await conn.aclose()


@each_transport()
@pytest.mark.anyio
async def test_classes_implement_the_interfaces(kind: Kind) -> None:
    """Every member of the protocols is there, with the same parameters.

    (mypy checks the same through ``make_transport``'s return type where tests are typed.)
    """

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.next_event()

    def members(protocol: type) -> dict[str, inspect.Signature]:
        found = {
            name: inspect.signature(value)
            for name, value in vars(protocol).items()
            if not name.startswith("_") and callable(value)
        }
        assert found  # the protocol's methods, not its machinery
        return found

    transport = make_transport(kind)
    async with connected(handler, transport) as conn:
        for protocol, made in ((Transport, transport), (Connection, conn)):
            for name, signature in members(protocol).items():
                assert name in dir(made), f"{type(made).__name__} lacks {name}"
                actual = inspect.signature(getattr(type(made), name))
                assert list(actual.parameters) == list(signature.parameters), name


# -- helpers both transports share ---------------------------------------------------------


def test_accept_token_matches_rfc_example() -> None:
    assert accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_safe_url_drops_credentials_and_query() -> None:
    assert safe_url("wss://user:pw@api.upbit.com:443/ws?jwt=x#f") == "wss://api.upbit.com:443/ws"
