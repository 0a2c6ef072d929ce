"""Scripted loopback WebSocket servers, and both transports made alike, for transport tests.

A server is a real TCP listener on 127.0.0.1 whose handler drives a
``wsproto.WSConnection(SERVER)`` step by step, so every frame sequence (batched writes,
fragments, pings between fragments, bad handshakes, abrupt drops) is exact. Every
wait that should succeed is bounded by ``WAIT``.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSListener
from required import skip_unless_required
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Ping, Request

from upbus.core.wire._frames import accept_token
from upbus.core.wire._httpx import HttpxWsTransport
from upbus.core.wire._picows import PicowsTransport
from upbus.core.wire._transport import Connection, ConnectionClosed, Transport

WAIT = 5.0  # bound on every wait that should succeed

Kind = Literal["httpx", "picows"]


def each_transport(*, trio: bool = False) -> pytest.MarkDecorator:
    """Run a test once per transport (``kind``); with ``trio``, httpx on trio too.

    picows runs on asyncio only, so the backend is chosen with the transport rather
    than crossed with it.
    """
    cases = [("httpx", "asyncio"), ("picows", "asyncio")]
    if trio:
        cases.insert(1, ("httpx", "trio"))
    return pytest.mark.parametrize(
        ("kind", "anyio_backend"), cases, ids=[f"{k}-{b}" for k, b in cases]
    )


def make_transport(kind: Kind, **options: Any) -> Transport:
    """A transport of ``kind`` with ``options`` (the keyword arguments both accept).

    picows ignores proxy variables here, as the tests' servers are local; the return
    type makes mypy check that both classes implement :class:`Transport`.
    """
    if kind == "httpx":
        return HttpxWsTransport(**options)
    return PicowsTransport(trust_env=False, **options)


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

    async def close_code(self) -> object:
        """The client's close frame code (or whatever came instead)."""
        event = await self.next_event()
        return event.code if isinstance(event, CloseConnection) else event

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
async def connected(handler: Handler, transport: Transport) -> AsyncIterator[Connection]:
    """A connection through ``transport`` to a server running ``handler``; all closed on exit."""
    async with serve(handler) as url:
        try:
            with anyio.fail_after(WAIT):
                conn = await transport.connect(url, {})
            try:
                yield conn
            finally:
                await conn.aclose()
        finally:
            await transport.aclose()


async def receive(conn: Connection) -> Sequence[bytes | str]:
    with anyio.fail_after(WAIT):
        return await conn.receive_batch()


async def read_forever(
    conn: Connection,
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


def make_certificate(where: Path) -> Path:
    """A self-signed certificate (and key) for 127.0.0.1 in ``where``, made with openssl."""
    if shutil.which("openssl") is None:
        # A system tool, present where CI runs (there its absence fails the test);
        # elsewhere the TLS tests may be skipped without hiding anything else.
        skip_unless_required("needs the openssl command")
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


# -- a raw server, for frames wsproto would refuse to write -------------------------------


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
