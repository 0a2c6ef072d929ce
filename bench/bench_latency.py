"""Latency from the wire to a component at a fixed 10,000 messages/s: p50, p99, max.

Run: ``.venv/bin/python bench/bench_latency.py`` (``--rate``, ``--seconds``,
``--runs``, ``--components``, ``--transports``; about 1.5 minutes).

The simulator cannot pace 10k msgs/s: it generates each paced message in Python
(about 2,000/s per connection at most), and its ``rate="max"`` flood repeats a ring
of frames without send times. So a dedicated sender runs in a child process: a blocking
socket on 127.0.0.1 that does the upgrade with wsproto, waits for the bus's
subscription request, then writes prebuilt binary frames (the simulator's DEFAULT
tickers and trades on 10 codes) paced at ``--rate``. Right before each write it puts
``time.monotonic_ns()`` into the frames' ``timestamp`` field; CLOCK_MONOTONIC is
one clock for every process on the machine.

The client is an ordinary :class:`~upbus.Bus` (decoder, router, delivery tasks) on
each transport named in ``--transports`` (the ``transport`` setting: ``picows``,
what ``auto`` picks when picows is installed, and ``httpx``, the default otherwise),
with ``--components`` components whose ``on_message`` records, per message:

* ``send → component``: ``monotonic_ns()`` in ``on_message`` minus the send stamp
  (loopback, the event loop's wakeup, the read, decode, route, the delivery task);
* ``read → component``: minus the moment the transport's ``receive_batch`` returned
  the frame (a thin wrapper around the transport records it): upbus's own part,
  from frame read to component.

A ``floor`` contender takes the same stream into a bare ``asyncio.Protocol`` that only
cuts frames and reads their stamp: what the event loop and the kernel cost here, for
the CPU per message and the send → receive latency.

Components use ``overflow="drop_oldest"`` with room for 10,000 so that every message
is delivered in order (checked: nothing dropped). The first half second of each run
is not counted. Runs alternate between the contenders; the table shows the
median over runs of each run's percentile, with min-max. Target: read → component
p99 ≤ 2 ms.

:func:`serve` also floods without pacing (``rate=0``); ``bench_memory.py`` uses that.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    Request,
)

import upbus
from upbus.core._bus import Bus
from upbus.core.hooks._hookspecs import hookimpl
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel, Spec, ticker, trade
from upbus.plugins.picows_transport import picows_installed
from upbus.sim.encode import encode_frame
from upbus.sim.market import Market
from upbus.sim.markets import POPULAR

CODES = POPULAR
DISTINCT = 1000
STAMP_KEY = b'"timestamp":'
TARGET_P99_MS = 2.0
MAX_BURST = 64  # frames written at once when the sender is behind schedule
FLOOR = "floor"


# -- the sender (child process) -----------------------------------------------------------


def templates(count: int = DISTINCT) -> list[tuple[bytes, bytes]]:
    """Frames split around the digits of ``"timestamp"``: (before, after)."""
    market = Market(seed=3, start_ms=1_790_000_000_000)
    parts: list[tuple[bytes, bytes]] = []
    for i in range(count):
        state = market.trade(CODES[(i // 2) % len(CODES)])
        now = market.now_ms()
        if i % 2:
            frame = encode_frame([("trade", state.trade_fields("REALTIME", now))], "DEFAULT")
        else:
            frame = encode_frame([("ticker", state.ticker_fields("REALTIME", now))], "DEFAULT")
        start = frame.index(STAMP_KEY) + len(STAMP_KEY)
        end = start
        while frame[end : end + 1].isdigit():
            end += 1
        parts.append((frame[:start], frame[end:]))
    return parts


def binary_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x82, size)) + payload
    if size < 65_536:
        return bytes((0x82, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x82, 127)) + size.to_bytes(8, "big") + payload


class _Peer:
    """One client connection: a reader thread (handshake, requests, pings, close)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.SERVER)
        self.lock = threading.Lock()
        self.target = ""
        self.subscribed = threading.Event()
        self.closed = threading.Event()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def read_loop(self) -> None:
        try:
            while not self.closed.is_set():
                data = self.sock.recv(65_536)
                if not data:
                    break
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, Request):
                        self.target = event.target
                        self.send(self.ws.send(AcceptConnection()))
                    elif isinstance(event, Message):
                        self.subscribed.set()  # the bus's subscription request
                    elif isinstance(event, Ping):
                        self.send(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        self.send(self.ws.send(event.response()))
                        self.closed.set()
        except OSError:
            pass
        finally:
            self.closed.set()
            self.subscribed.set()


def _stream(peer: _Peer, parts: list[tuple[bytes, bytes]]) -> None:
    query = parse_qs(urlsplit(peer.target).query)
    rate = float(query.get("rate", ["0"])[0])
    count = int(query.get("n", ["100000"])[0])
    sent = 0
    if rate <= 0:
        # Flood: prebuilt chunks, as fast as the socket takes them.
        stamp = str(time.monotonic_ns()).encode()
        frames = [binary_frame(a + stamp + b) for a, b in parts]
        chunk = b"".join(frames)
        while sent + len(frames) <= count and not peer.closed.is_set():
            peer.send(chunk)
            sent += len(frames)
        if sent < count and not peer.closed.is_set():
            peer.send(b"".join(frames[: count - sent]))
        return
    start = time.monotonic()
    total = len(parts)
    while sent < count and not peer.closed.is_set():
        now = time.monotonic()
        due = min(count, int((now - start) * rate) + 1)
        if due > sent:
            upto = min(due, sent + MAX_BURST)
            stamp = str(time.monotonic_ns()).encode()
            data = b"".join(
                binary_frame(parts[i % total][0] + stamp + parts[i % total][1])
                for i in range(sent, upto)
            )
            peer.send(data)
            sent = upto
        else:
            time.sleep(start + sent / rate - now)


def _handle(sock: socket.socket, parts: list[tuple[bytes, bytes]]) -> None:
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = _Peer(sock)
        reader = threading.Thread(target=peer.read_loop, daemon=True)
        reader.start()
        peer.subscribed.wait()
        with contextlib.suppress(OSError):
            _stream(peer, parts)
        peer.closed.wait()
        reader.join(timeout=1)


def serve(ready: multiprocessing.connection.Connection) -> None:
    """Accept clients forever; pace (``?rate=R&n=N``) or flood (``rate=0``) each one."""
    parts = templates()
    listener = socket.create_server(("127.0.0.1", 0))
    ready.send(listener.getsockname()[1])
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_handle, args=(sock, parts), daemon=True).start()


def start_sender() -> tuple[multiprocessing.process.BaseProcess, int]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=serve, args=(child,), daemon=True)
    process.start()
    port = parent.recv()
    return process, port


# -- the client ----------------------------------------------------------------------------


class ReadStamps:
    """Wraps a transport; records when each ``receive_batch`` returned, and how much."""

    def __init__(self, inner: Any, record: bool = True) -> None:
        self.inner = inner
        self.record = record
        self.reads: list[tuple[int, int]] = []  # (frames so far, monotonic_ns)
        self.frames = 0
        self.batches = 0
        self.largest = 0  # frames in the largest batch

    async def connect(self, url: str, headers: Mapping[str, str]) -> Any:
        return _StampedConnection(await self.inner.connect(url, headers), self)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _StampedConnection:
    def __init__(self, inner: Any, owner: ReadStamps) -> None:
        self.inner = inner
        self.owner = owner

    async def receive_batch(self) -> Sequence[bytes | str]:
        frames = await self.inner.receive_batch()
        now = time.monotonic_ns()
        owner = self.owner
        size = len(frames)
        owner.frames += size
        owner.batches += 1
        owner.largest = max(owner.largest, size)
        if owner.record:
            owner.reads.append((owner.frames, now))
        return frames  # type: ignore[no-any-return]

    async def send_text(self, text: str) -> None:
        await self.inner.send_text(text)

    async def ping(self, timeout: float) -> float:
        return await self.inner.ping(timeout)  # type: ignore[no-any-return]

    async def aclose(self, code: int = 1000) -> None:
        await self.inner.aclose(code)


class StampPlugin:
    """Answers ``upbus_make_transport`` with the transport the settings pick, wrapped."""

    def __init__(self, settings: upbus.Settings, record: bool = True) -> None:
        self.others = PluginManager.load(settings)
        self.record = record
        self.public: ReadStamps | None = None

    @hookimpl
    def upbus_make_transport(self, channel: Channel, settings: upbus.Settings) -> Any:
        transport = self.others.make_transport(channel, settings)
        if channel is not Channel.PUBLIC:
            return transport
        self.public = ReadStamps(transport, self.record)
        return self.public


class Progress:
    """Wakes the run when the first message arrives and when every component has all."""

    def __init__(self, components: int) -> None:
        self.first = anyio.Event()
        self.done = anyio.Event()
        self.remaining = components


class Component:
    def __init__(self, expected: int, progress: Progress) -> None:
        self.sent: list[int] = []  # send stamps
        self.received: list[int] = []
        self.subscriber: Any = None
        self.wakeups = 0
        self.expected = expected
        self.progress = progress

    async def on_message(self, message: Any) -> None:
        received = self.received
        received.append(time.monotonic_ns())
        self.sent.append(message.timestamp)
        if not len(self.subscriber):
            self.wakeups += 1
        if len(received) == 1:
            self.progress.first.set()
        elif len(received) == self.expected:
            self.progress.remaining -= 1
            if not self.progress.remaining:
                self.progress.done.set()


def specs() -> list[Spec]:
    return [ticker(*CODES), trade(*CODES)]


def percentiles(values: list[int]) -> tuple[float, float, float]:
    """p50, p99, max in ms."""
    ordered = sorted(values)
    n = len(ordered)
    return (
        ordered[n // 2] / 1e6,
        ordered[min(n - 1, int(n * 0.99))] / 1e6,
        ordered[-1] / 1e6,
    )


async def one_run(
    port: int, rate: float, seconds: float, components: int, transport: str
) -> dict[str, Any]:
    count = int(rate * seconds)
    url = f"ws://127.0.0.1:{port}/websocket/v1?rate={rate:g}&n={count}"
    settings = upbus.Settings(
        public_url=url, debounce=0.0, autoload_plugins=False, transport=transport
    )
    plugins = PluginManager.load(settings)
    stamps = StampPlugin(settings)
    plugins.register(stamps, "bench-stamps")
    progress = Progress(components)
    members = [Component(count, progress) for _ in range(components)]
    async with Bus(settings, plugin_manager=plugins) as bus:
        for member in members:
            member.subscriber = await bus.register_component(
                member, specs(), overflow="drop_oldest", capacity=10_000
            )
        with anyio.fail_after(seconds * 3 + 10):
            await progress.first.wait()
            cpu, wall = time.process_time(), time.perf_counter()
            await progress.done.wait()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        lost = sum(m.subscriber.dropped + m.subscriber.overflowed for m in members)
    # Map each message to the read that carried it: the k-th message came in the
    # first read whose running frame count exceeds k.
    read_time: list[int] = []
    assert stamps.public is not None
    reads = stamps.public.reads
    kind = type(stamps.public.inner).__name__
    for total, stamp in reads:
        read_time.extend([stamp] * (total - len(read_time)))
    skip = int(rate * 0.5)
    send_lat: list[int] = []
    read_lat: list[int] = []
    for member in members:
        for k in range(skip, count):
            send_lat.append(member.received[k] - member.sent[k])
            read_lat.append(member.received[k] - read_time[k])
    messages = sum(len(m.received) for m in members)
    wakeups = sum(m.wakeups for m in members)
    return {
        "send": percentiles(send_lat),
        "read": percentiles(read_lat),
        "cpu": cpu / wall,
        "per_read": count / max(1, len(reads)),
        "transport": kind,
        "per_wakeup": messages / max(1, wakeups),
        "lost": lost,
        "achieved": count / wall,
    }


class _FloorProtocol(asyncio.Protocol):
    """The floor: a bare asyncio protocol that only cuts frames and reads their stamp."""

    def __init__(self, count: int, done: asyncio.Future[None], query: str) -> None:
        self.count = count
        self.done = done
        self.query = query
        self.buffer = b""
        self.upgraded = False
        self.latencies: list[int] = []
        self.reads = 0
        self.cpu = self.wall = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET /websocket/v1?{self.query} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.upgraded = True  # the 101; the sender starts on any message
            assert self.transport is not None
            self.transport.write(bytes((0x81, 0x81, 0, 0, 0, 0)) + b"x")
            return
        now = time.monotonic_ns()
        self.reads += 1
        if not self.latencies:
            self.cpu, self.wall = time.process_time(), time.perf_counter()
        buffer = self.buffer + data
        pos = 0
        while len(buffer) - pos >= 4:
            size = buffer[pos + 1] & 0x7F
            start = pos + 2
            if size == 126:
                size = int.from_bytes(buffer[pos + 2 : pos + 4])
                start = pos + 4
            if start + size > len(buffer):
                break
            at = buffer.index(STAMP_KEY, start) + len(STAMP_KEY)
            self.latencies.append(now - int(buffer[at : buffer.index(b",", at)]))
            pos = start + size
        self.buffer = buffer[pos:]
        if len(self.latencies) >= self.count and not self.done.done():
            self.cpu = time.process_time() - self.cpu
            self.wall = time.perf_counter() - self.wall
            self.done.set_result(None)


async def floor_run(port: int, rate: float, seconds: float) -> dict[str, Any]:
    """The same stream into :class:`_FloorProtocol`: what the loop and kernel cost."""
    count = int(rate * seconds)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    query = f"rate={rate:g}&n={count}"
    transport, protocol = await loop.create_connection(
        lambda: _FloorProtocol(count, done, query), "127.0.0.1", port
    )
    try:
        await asyncio.wait_for(done, seconds * 3 + 10)
    finally:
        transport.close()
    skip = int(rate * 0.5)
    return {
        "send": percentiles(protocol.latencies[skip:count]),
        "read": None,
        "cpu": protocol.cpu / protocol.wall,
        "per_read": count / max(1, protocol.reads),
        "per_wakeup": None,
        "lost": 0,
        "achieved": count / protocol.wall,
        "transport": "asyncio.Protocol",
    }


def fmt(samples: list[float]) -> str:
    return f"{statistics.median(samples):6.3f} ({min(samples):.3f}–{max(samples):.3f})"


def run_contender(port: int, args: argparse.Namespace, seconds: float, contender: Any) -> Any:
    transport, count = contender
    if transport == FLOOR:
        return asyncio.run(floor_run(port, args.rate, seconds))
    return anyio.run(one_run, port, args.rate, seconds, count, transport)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10_000.0, help="messages/s")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--components", type=int, nargs="+", default=[1, 10])
    parser.add_argument(
        "--transports", nargs="+", default=["picows", "httpx"], help="transport setting values"
    )
    args = parser.parse_args()
    transports = [t for t in args.transports if t != "picows" or picows_installed()]

    contenders = [(FLOOR, 0)] + [(t, count) for t in transports for count in args.components]
    process, port = start_sender()
    try:
        for contender in contenders:  # warm-up
            run_contender(port, args, 1.0, contender)
        results: dict[tuple[str, int], list[dict[str, Any]]] = {c: [] for c in contenders}
        for _run in range(args.runs):
            for contender in contenders:
                gc.collect()
                results[contender].append(run_contender(port, args, args.seconds, contender))
    finally:
        process.terminate()

    print(
        f"Python {platform.python_version()}; {args.rate:,.0f} msgs/s for {args.seconds:g} s "
        f"per run, {args.runs} runs; ms, median over runs (min–max)"
    )
    for (transport, count), runs in results.items():
        if transport == FLOOR:
            print("floor: a bare asyncio.Protocol that only cuts frames and reads the stamp:")
        else:
            print(
                f"transport={transport} ({runs[0]['transport']}), {count} component(s), "
                f"achieved {fmt([r['achieved'] for r in runs])} msgs/s:"
            )
        for key, label in (("read", "read → component"), ("send", "send → component")):
            if runs[0][key] is None:
                continue
            p50 = [r[key][0] for r in runs]
            p99 = [r[key][1] for r in runs]
            top = [r[key][2] for r in runs]
            print(f"  {label:18s} p50 {fmt(p50)}  p99 {fmt(p99)}  max {fmt(top)}")
        cpu = statistics.median(r["cpu"] for r in runs)
        line = (
            f"  client CPU {cpu:.0%} of one core ({cpu / args.rate * 1e6:.0f} µs/msg); "
            f"{statistics.median(r['per_read'] for r in runs):.2f} msgs per read"
        )
        if transport != FLOOR:
            p99 = statistics.median(r["read"][1] for r in runs)
            line += (
                f", {statistics.median(r['per_wakeup'] for r in runs):.2f} msgs per wakeup; "
                f"lost {sum(r['lost'] for r in runs)}; target read→component p99 ≤ "
                f"{TARGET_P99_MS} ms: {'PASS' if p99 <= TARGET_P99_MS else 'FAIL'}"
            )
        print(line)


if __name__ == "__main__":
    main()
