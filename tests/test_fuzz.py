"""Fuzzing the two places where bytes from the network are trusted least.

* The decoder: 100,000 mutated frames, seeded, built from the real Upbit samples and
  from the simulator's encoder in every wire format, go through
  :meth:`FrameDecoder.decode` and :meth:`FrameDecoder.decode_batch`. The only
  exception allowed is :class:`FrameDecodeError` (in ``decode_batch``: its errors
  list), a frame that decodes gives public message classes only, and the batch path
  agrees with ``decode`` frame by frame, in order.
* The transports: a tiny raw TCP server on 127.0.0.1 completes the upgrade, sends
  a valid message and then one malformed frame. Each transport must deliver the
  valid message, then fail the connection the same way (``ConnectionClosed`` with
  the RFC 6455 code, a close frame with that code to the server, the socket closed),
  never crash and never hang.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import pytest
from test_codec import ALL, UNREPRESENTABLE, dump_raw
from upbit_samples import needs_samples

from upbus.core._errors import FrameDecodeError
from upbus.core.wire._codec import FORMATS, FrameDecoder
from upbus.core.wire._httpx import HttpxWsTransport, accept_token
from upbus.core.wire._messages import (
    MESSAGE_CLASSES,
    ErrorMessage,
    Status,
    SubscriptionList,
)
from upbus.core.wire._picows import PicowsTransport
from upbus.core.wire._transport import Connection, ConnectionClosed
from upbus.sim.encode import encode_error, encode_frame, encode_status
from upbus.sim.feed import Feed
from upbus.sim.market import Market
from upbus.sim.protocol import PUBLIC_TYPES, Entry

SEED = 6455
FRAMES = 100_000
BATCH = 40  # frames per decode_batch call
WAIT = 5.0

decoder = FrameDecoder()
PUBLIC_CLASSES = {*MESSAGE_CLASSES.values(), Status, ErrorMessage, SubscriptionList}
CONTROL = (Status, ErrorMessage, SubscriptionList)


# -- the decoder ---------------------------------------------------------------------------


def simulator_frames() -> list[bytes]:
    """Frames of every public type and wire format, as the simulator encodes them."""
    feed = Feed(Market(SEED, start_ms=1_700_000_000_000))
    codes = ("KRW-BTC", "BTC-ETH", "USDT-XRP")
    entries = [Entry(kind, codes) for kind in sorted(PUBLIC_TYPES)]
    feed.install([*entries, Entry("orderbook", ("KRW-BTC.5",))])
    messages = []
    while (snapshot := feed.next_snapshot()) is not None:
        messages.append(snapshot)
    for _ in range(40):
        messages += feed.step()
    frames = []
    for fmt in FORMATS:
        if "LIST" in fmt:
            frames += [encode_frame(messages[i : i + 3], fmt) for i in range(0, len(messages), 3)]
        else:
            frames += [encode_frame([message], fmt) for message in messages]
    frames += [encode_status(), encode_error("INVALID_PARAM", "잘못된 요청입니다.")]
    return frames


def sample_frames() -> tuple[list[bytes], list[bytes]]:
    """The real messages, as sampled and in the other format where there is one:
    (those that decode, the 2018 shapes that no current server sends)."""
    frames: tuple[list[bytes], list[bytes]] = ([], [])
    for sample in ALL:
        into = frames[sample.id in UNREPRESENTABLE]
        into.append(sample.text.encode())
        into.append(dump_raw(sample.default).encode())
        if sample.simple:
            into.append(dump_raw(sample.simple).encode())
    return frames


TOKENS = [
    b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\\u0000", b"\\ud800", b"\\uDFFF",
    b"null", b"true", b"false", b"0", b"-0", b"1e999", b"-1e-999", b"NaN", b"Infinity",
    b"18446744073709551616", b"-9223372036854775809", b"0.1e", b"01", b"1" * 400,
    b'"type"', b'"ty"', b'"code"', b'"cd"', b'"status"', b'"error"', b'"method"',
    b'"mthd"', b'"ticker"', b'"trade"', b'"orderbook"', b'"candle.1s"', b'"myOrder"',
    b'"myAsset"', b'"tic"', b'"orderbook_units"', b'"obu"', b'"assets"', b'"ast"',
    b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\xc3", b"\x00", b" \t\r\n",
]  # fmt: skip


def mutate(rng: random.Random, frame: bytes, corpus: list[bytes]) -> bytes:
    """``frame`` with one structural or byte-level change."""
    size = len(frame)
    at = rng.randrange(size + 1)
    op = rng.randrange(11)
    if op == 0:  # flip a bit
        if not size:
            return frame
        at = rng.randrange(size)
        return frame[:at] + bytes([frame[at] ^ (1 << rng.randrange(8))]) + frame[at + 1 :]
    if op == 1:  # one byte anything
        return frame[:at] + bytes([rng.randrange(256)]) + frame[at + 1 :]
    if op == 2:  # a JSON token or awkward bytes, replacing a few bytes or inserted
        cut = at + rng.choice((0, 0, 1, 2, 5))
        return frame[:at] + rng.choice(TOKENS) + frame[cut:]
    if op == 3:  # delete a span
        return frame[:at] + frame[at + rng.randrange(1, 40) :]
    if op == 4:  # duplicate a span
        end = min(size, at + rng.randrange(1, 60))
        return frame[:end] + frame[at:end] + frame[end:]
    if op == 5:  # truncate
        return frame[:at]
    if op == 6:  # splice with another frame
        other = rng.choice(corpus)
        return frame[:at] + other[rng.randrange(len(other) + 1) :]
    if op == 7:  # a list frame of mixed kinds, maybe with a bad item
        items = [frame, rng.choice(corpus), rng.choice(corpus)][: rng.randrange(1, 4)]
        return b"[" + b",".join(items) + b"]"
    if op == 8:  # nested deep
        depth = rng.choice((2, 64, 1_000, 20_000))
        return b"[" * depth + frame + b"]" * rng.choice((depth, depth - 1))
    if op == 9:  # swap one string value for another kind of value
        start = frame.find(b':"', at)
        end = frame.find(b'"', start + 2) if start >= 0 else -1
        if end < 0:
            return frame
        value = rng.choice((b"null", b"1", b"{}", b"[]", b'""', b'"\\ud800"', b"1.5e3"))
        return frame[: start + 1] + value + frame[end + 1 :]
    # one number token changed
    start = next((i for i in range(at, size) if frame[i] in b"-0123456789"), -1)
    if start < 0:
        return frame
    end = start + 1
    while end < size and frame[end] in b"0123456789.eE+-":
        end += 1
    return frame[:start] + rng.choice(TOKENS[13:25]) + frame[end:]


def fuzz_frames(corpus: list[bytes], count: int, seed: int) -> list[bytes | str]:
    rng = random.Random(seed)
    frames: list[bytes | str] = []
    for _ in range(count):
        frame = rng.choice(corpus)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            frame = mutate(rng, frame, corpus)
        kind = rng.randrange(20)
        if kind == 0:  # a text frame; lone surrogates where the bytes were not UTF-8
            frames.append(frame.decode("utf-8", "surrogateescape"))
        elif kind == 1:
            frames.append(frame.decode("utf-8", "replace"))
        else:
            frames.append(frame)
    return frames


def decode_alone(frame: bytes | bytearray | memoryview | str) -> list[object] | FrameDecodeError:
    try:
        messages = decoder.decode(frame)
    except FrameDecodeError as exc:
        return exc
    assert messages, frame
    assert all(type(m) in PUBLIC_CLASSES for m in messages), (frame, messages)
    return list(messages)


@needs_samples
def test_a_hundred_thousand_mutated_frames_only_raise_frame_decode_error() -> None:
    samples, legacy = sample_frames()
    clean = samples + simulator_frames()
    assert all(isinstance(decode_alone(frame), list) for frame in clean)  # unmutated first
    corpus = clean + legacy
    frames = fuzz_frames(corpus, FRAMES, SEED)
    outcomes = {"decoded": 0, "rejected": 0}
    for start in range(0, FRAMES, BATCH):
        chunk = frames[start : start + BATCH]
        data, control, errors = decoder.decode_batch(chunk)
        want_data: list[object] = []
        want_control: list[object] = []
        want_errors: list[bytes | str] = []
        for index, frame in enumerate(chunk):
            result = decode_alone(frame)
            if index == 0 and isinstance(frame, bytes):
                # The other binary payload types decode alike.
                for view in (bytearray(frame), memoryview(frame)):
                    again = decode_alone(view)
                    if isinstance(result, FrameDecodeError):
                        assert isinstance(again, FrameDecodeError), frame
                    else:
                        assert again == result, frame
            if isinstance(result, FrameDecodeError):
                assert result.reason, frame
                outcomes["rejected"] += 1
                want_errors.append(result.sample)
                continue
            outcomes["decoded"] += 1
            for message in result:
                (want_control if isinstance(message, CONTROL) else want_data).append(message)
        assert data == want_data, chunk
        assert control == want_control, chunk
        assert [error.sample for error in errors] == want_errors, chunk
        assert all(isinstance(error, FrameDecodeError) for error in errors)
    # Both outcomes are exercised a lot: the mutations are neither all fatal nor all harmless.
    assert min(outcomes.values()) > FRAMES // 20, outcomes


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
