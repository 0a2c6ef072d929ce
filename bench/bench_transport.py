"""Receive throughput and CPU per message: upbus's transports vs websockets vs httpx-ws.

Run: ``.venv/bin/python bench/bench_transport.py [--messages N] [--rounds R]``

A flood server runs in a separate process (so that ``time.process_time`` in this
process counts client CPU only): a plain blocking socket that answers the upgrade and
then writes N prebuilt ~300-byte binary ticker frames as fast as the socket takes
them. The clients, all on asyncio, each decoding every message with ``orjson.loads``:

* ``A upbus``: :class:`upbus.core.wire._httpx.HttpxWsTransport`, ``receive_batch`` loop;
* ``B websockets``: ``websockets.asyncio.client.connect``, ``async for``;
* ``C httpx-ws``: ``httpx_ws.aconnect_ws`` and ``receive()`` per message;
* ``D wsproto``: an httpx upgrade and every frame through ``wsproto.Connection`` in
  a plain loop (what upbus's transport does minus its fast path for data frames);
* ``E upbus-picows``: :class:`upbus.core.wire._picows.PicowsTransport` (the ``picows``
  plugin), ``receive_batch`` loop, as A;
* ``F picows-min``: the least a picows client can do: ``orjson.loads`` on a
  memoryview of each binary frame inside picows's ``on_ws_frame`` callback.

E and F need the optional ``picows`` package (``pip install 'upbus[fast]'``); without
it they are left out. One warm-up run each, then rounds of every client in turn so
that load on a shared machine hits them alike. Timing starts once the connection is
open and stops at the N-th message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import platform
import socket
import statistics
import struct
import time
from collections.abc import Callable, Coroutine
from importlib.metadata import version
from urllib.parse import parse_qs, urlsplit

import httpx
import httpx_ws
import orjson
import wsproto
import wsproto.connection
import wsproto.events
from websockets.asyncio.client import connect as websockets_connect

from upbus.core.wire._httpx import HttpxWsTransport

try:
    import picows
except ImportError:  # the optional fast transport: its clients are left out
    picows = None  # type: ignore[assignment]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DISTINCT_FRAMES = 1000


# -- the flood server (child process) ------------------------------------------------------


def ticker(i: int) -> bytes:
    price = 140_000_000 + (i * 7919) % 1_000_000
    return orjson.dumps(
        {
            "type": "ticker",
            "code": "KRW-BTC",
            "opening_price": 139_500_000.0,
            "high_price": 141_200_000.0,
            "trade_price": float(price),
            "prev_closing_price": 139_500_000.0,
            "change": "RISE",
            "signed_change_rate": round((price - 139_500_000) / 139_500_000, 10),
            "trade_volume": 0.00012345 + i * 1e-8,
            "trade_timestamp": 1_730_336_862_047 + i,
            "timestamp": 1_730_336_862_082 + i,
            "stream_type": "REALTIME",
        }
    )


def binary_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x82, size)) + payload
    if size < 65_536:
        return struct.pack("!BBH", 0x82, 126, size) + payload
    return struct.pack("!BBQ", 0x82, 127, size) + payload


def serve(ready: multiprocessing.connection.Connection) -> None:
    """Accept clients one at a time; flood each with ``?n=`` frames."""
    chunk = b"".join(binary_frame(ticker(i)) for i in range(DISTINCT_FRAMES))
    listener = socket.create_server(("127.0.0.1", 0))
    ready.send(listener.getsockname()[1])
    while True:
        sock, _ = listener.accept()
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = b""
            while b"\r\n\r\n" not in request:
                data = sock.recv(65_536)
                if not data:
                    break
                request += data
            head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            target = head[0].split(" ")[1]
            n = int(parse_qs(urlsplit(target).query).get("n", ["1000"])[0])
            fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
            key = next(v.strip() for k, v in fields.items() if k.lower() == "sec-websocket-key")
            accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
            sock.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            )
            whole, rest = divmod(n, DISTINCT_FRAMES)
            try:
                for _ in range(whole):
                    sock.sendall(chunk)
                if rest:
                    sock.sendall(b"".join(binary_frame(ticker(i)) for i in range(rest)))
                # The client's close frame (or EOF) ends the run; answer it so that
                # clients which wait for the server's close don't sit out a timeout.
                sock.settimeout(30)
                if sock.recv(65_536):
                    sock.sendall(b"\x88\x02\x03\xe8")
            except OSError:
                pass


# -- the clients ---------------------------------------------------------------------------

Result = tuple[float, float]  # (wall seconds, CPU seconds) for the streaming window


async def client_upbus(url: str, n: int) -> Result:
    async with HttpxWsTransport() as transport:
        conn = await transport.connect(url, {})
        loads = orjson.loads
        count = 0
        wall, cpu = time.perf_counter(), time.process_time()
        while count < n:
            for message in await conn.receive_batch():
                loads(message)
                count += 1
        result = time.perf_counter() - wall, time.process_time() - cpu
        await conn.aclose()
    return result


async def client_websockets(url: str, n: int) -> Result:
    async with websockets_connect(url, ping_interval=None, compression=None, max_size=None) as ws:
        loads = orjson.loads
        count = 0
        wall, cpu = time.perf_counter(), time.process_time()
        async for message in ws:
            loads(message)
            count += 1
            if count >= n:
                break
        return time.perf_counter() - wall, time.process_time() - cpu


async def client_httpx_ws(url: str, n: int) -> Result:
    connect = httpx_ws.aconnect_ws(
        url.replace("ws://", "http://", 1),
        keepalive_ping_interval_seconds=None,  # the flood server answers no pings
        session_class=httpx_ws.AsyncWebSocketSession,
    )
    async with connect as ws:
        loads = orjson.loads
        count = 0
        wall, cpu = time.perf_counter(), time.process_time()
        while count < n:
            loads((await ws.receive()).data)  # type: ignore[attr-defined]
            count += 1
        return time.perf_counter() - wall, time.process_time() - cpu


async def client_wsproto_loop(url: str, n: int) -> Result:
    """The design upbus started from: every frame through wsproto, no fast path."""
    key = base64.b64encode(os.urandom(16)).decode()
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key,
    }
    async with httpx.AsyncClient() as client:
        request = client.build_request("GET", url.replace("ws://", "http://", 1), headers=headers)
        response = await client.send(request, stream=True)
        assert response.status_code == 101
        stream = response.extensions["network_stream"]
        proto = wsproto.connection.Connection(wsproto.ConnectionType.CLIENT)
        loads = orjson.loads
        count = 0
        wall, cpu = time.perf_counter(), time.process_time()
        parts: list[bytes | bytearray] = []  # a frame cut by a read comes as several events
        while count < n:
            proto.receive_data(await stream.read(65_536))
            for event in proto.events():
                if isinstance(event, wsproto.events.BytesMessage):
                    if not event.message_finished:
                        parts.append(event.data)
                        continue
                    if parts:
                        parts.append(event.data)
                        loads(b"".join(parts))
                        parts.clear()
                    else:
                        loads(event.data)
                    count += 1
        result = time.perf_counter() - wall, time.process_time() - cpu
        await stream.write(proto.send(wsproto.events.CloseConnection(1000)))
        await response.aclose()
    return result


async def client_upbus_picows(url: str, n: int) -> Result:
    from upbus.core.wire._picows import PicowsTransport

    async with PicowsTransport(trust_env=False) as transport:
        conn = await transport.connect(url, {})
        loads = orjson.loads
        count = 0
        wall, cpu = time.perf_counter(), time.process_time()
        while count < n:
            for message in await conn.receive_batch():
                loads(message)
                count += 1
        result = time.perf_counter() - wall, time.process_time() - cpu
        await conn.aclose()
    return result


async def client_picows_minimal(url: str, n: int) -> Result:
    """orjson.loads straight on picows's buffer, inside the frame callback."""
    assert picows is not None
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    binary = picows.WSMsgType.BINARY
    loads = orjson.loads

    class Listener(picows.WSListener):
        count = 0

        def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
            if frame.msg_type is binary:
                loads(frame.get_payload_as_memoryview())
                self.count += 1
                if self.count == n:
                    done.set_result(None)

    transport, _listener = await picows.ws_connect(Listener, url)
    wall, cpu = time.perf_counter(), time.process_time()
    await done
    result = time.perf_counter() - wall, time.process_time() - cpu
    transport.send_close(picows.WSCloseCode.OK)
    transport.disconnect()
    await transport.wait_disconnected()
    return result


CLIENTS: dict[str, Callable[[str, int], Coroutine[None, None, Result]]] = {
    "A upbus": client_upbus,
    "B websockets": client_websockets,
    "C httpx-ws": client_httpx_ws,
    "D wsproto": client_wsproto_loop,
}
if picows is not None:
    CLIENTS["E upbus-picows"] = client_upbus_picows
    CLIENTS["F picows-min"] = client_picows_minimal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="messages per run")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per client")
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    server = context.Process(target=serve, args=(child,), daemon=True)
    server.start()
    try:
        port = parent.recv()
        base = f"ws://127.0.0.1:{port}/bench?n="
        frame = binary_frame(ticker(0))
        print(
            f"python {platform.python_version()} on {platform.machine()}, "
            f"websockets {version('websockets')}, httpx {httpx.__version__}; "
            f"{args.messages} messages/run of ~{len(frame)} bytes per frame, "
            f"{args.rounds} rounds after one warm-up"
        )
        results: dict[str, list[Result]] = {name: [] for name in CLIENTS}
        for client in CLIENTS.values():  # warm-up
            asyncio.run(client(base + str(min(args.messages, 20_000)), min(args.messages, 20_000)))
        for round_no in range(args.rounds):
            for name, client in CLIENTS.items():
                wall, cpu = asyncio.run(client(base + str(args.messages), args.messages))
                results[name].append((wall, cpu))
                print(
                    f"  round {round_no + 1} {name:<15} {args.messages / wall:>9,.0f} msg/s "
                    f"{cpu / args.messages * 1e6:>7.1f} µs CPU/msg",
                    flush=True,
                )
    finally:
        server.terminate()
        server.join()

    print()
    print(f"{'client':<15} {'median msg/s':>13} {'min–max':>19} {'µs CPU/msg':>11} {'min–max':>13}")
    medians: dict[str, tuple[float, float]] = {}
    for name, runs in results.items():
        rates = [args.messages / wall for wall, _ in runs]
        costs = [cpu / args.messages * 1e6 for _, cpu in runs]
        medians[name] = statistics.median(rates), statistics.median(costs)
        print(
            f"{name:<15} {medians[name][0]:>13,.0f} "
            f"{min(rates):>9,.0f}–{max(rates):<9,.0f} {medians[name][1]:>11.1f} "
            f"{min(costs):>6.1f}–{max(costs):<6.1f}"
        )
    pairs = [("A upbus", other) for other in ("B websockets", "C httpx-ws", "D wsproto")]
    pairs += [("E upbus-picows", other) for other in ("F picows-min", "A upbus")]
    for mine, other in pairs:
        if mine not in medians or other not in medians:
            continue
        (rate, cost), (other_rate, other_cost) = medians[mine], medians[other]
        print(
            f"{mine.split()[0]}/{other.split()[0]}: throughput ×{rate / other_rate:.2f}, "
            f"CPU per message ×{cost / other_cost:.2f}"
        )


if __name__ == "__main__":
    main()
