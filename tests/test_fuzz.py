"""Malformed WebSocket frames against both transports.

A tiny raw TCP server on 127.0.0.1 completes the upgrade, sends a valid message and
then one malformed frame. Each transport must deliver the valid message, then fail
the connection the same way (``ConnectionClosed`` with the RFC 6455 code, a close
frame with that code to the server, the socket closed), never crash and never hang.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import pytest

from upbus.core.picows_conn import PicowsTransport
from upbus.core.transport import Connection, ConnectionClosed
from upbus.core.wsconn import HttpxWsTransport, accept_token

WAIT = 5.0


# -- the transports ------------------------------------------------------------------------


def frame(first: int, payload: bytes, *, length: bytes | None = None) -> bytes:
    """A server frame: first header byte, then the length (given, or the shortest form)."""
    if length is None:
        if len(payload) < 126:
            length = bytes([len(payload)])
        elif len(payload) < 65_536:
            length = b"\x7e" + len(payload).to_bytes(2, "big")
        else:
            length = b"\x7f" + len(payload).to_bytes(8, "big")
    return bytes([first]) + length + payload


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
]  # fmt: skip


@dataclass
class Seen:
    """What the raw server saw from the client."""

    frames: list[tuple[int, bytes]] = field(default_factory=list)  # (opcode, payload)
    done: anyio.Event = field(default_factory=anyio.Event)  # the client closed the socket

    @property
    def close_codes(self) -> list[int]:
        return [int.from_bytes(p[:2], "big") for op, p in self.frames if op == 0x8 and p]


def client_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The client's (masked) frames in ``data``, and the bytes of an unfinished one."""
    frames = []
    while len(data) >= 2:
        length, at = data[1] & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, at = int.from_bytes(data[2:10], "big"), 10
        assert data[1] & 0x80, "a client frame must be masked"
        if len(data) < at + 4 + length:
            break
        mask = data[at : at + 4]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[at + 4 : at + 4 + length]))
        frames.append((data[0] & 0x0F, payload))
        data = data[at + 4 + length :]
    return frames, data


@asynccontextmanager
async def raw_server(then: bytes) -> AsyncIterator[tuple[str, Seen]]:
    """A server that answers the upgrade and writes ``then`` in the same TCP write."""
    seen = Seen()

    async def on_connect(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive()
            head, _, data = data.partition(b"\r\n\r\n")
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            await stream.send(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_token(key.decode()).encode()
                + b"\r\n\r\n"
                + then
            )
            while True:
                frames, data = client_frames(data)
                seen.frames += frames
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
            seen.done.set()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_connect)
        yield f"ws://127.0.0.1:{port}/websocket/v1", seen
        tg.cancel_scope.cancel()


OPENERS: dict[str, Callable[[], HttpxWsTransport | PicowsTransport]] = {
    "httpx": HttpxWsTransport,
    "picows": lambda: PicowsTransport(trust_env=False),
}


async def read_until_closed(conn: Connection, into: list[bytes | str]) -> None:
    while True:
        into += await conn.receive_batch()


@pytest.mark.parametrize("transport", ["httpx", "picows"])
@pytest.mark.parametrize(("fault", "code"), FAULTS)
@pytest.mark.anyio
async def test_a_malformed_frame_fails_the_connection_cleanly(
    transport: str, fault: bytes, code: int
) -> None:
    async with raw_server(frame(0x81, b"ok") + fault) as (url, seen), OPENERS[transport]() as tr:
        with anyio.fail_after(WAIT):
            conn = await tr.connect(url, {})
            received: list[bytes | str] = []
            with pytest.raises(ConnectionClosed) as caught:
                await read_until_closed(conn, received)
            assert conn.closed
            await conn.aclose()
            await seen.done.wait()  # the client closed its socket
    assert received == ["ok"]
    assert caught.value.code == code
    assert caught.value.reason.startswith("protocol error: ")
    assert seen.close_codes == [code]  # the server was told why
