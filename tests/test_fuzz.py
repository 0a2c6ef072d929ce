"""Fuzzing the decoder, where bytes from the network are trusted least.

100,000 mutated frames, seeded, built from the real Upbit samples and from the
simulator's encoder in every wire format, go through :meth:`FrameDecoder.decode` and
:meth:`FrameDecoder.decode_batch`. The only exception allowed is
:class:`FrameDecodeError` (in ``decode_batch``: its errors list), a frame that decodes
gives public message classes only, and the batch path agrees with ``decode`` frame by
frame, in order. How the transports fail on malformed frames is in ``test_transport``.
"""

from __future__ import annotations

import random

from test_codec import ALL, UNREPRESENTABLE, dump_raw
from upbit_samples import needs_samples

from upbus.core._errors import FrameDecodeError
from upbus.core.wire._codec import FORMATS, FrameDecoder
from upbus.core.wire._messages import (
    MESSAGE_CLASSES,
    ErrorMessage,
    Status,
    SubscriptionList,
)
from upbus.sim.encode import encode_error, encode_frame, encode_status
from upbus.sim.feed import Feed
from upbus.sim.market import Market
from upbus.sim.protocol import PUBLIC_TYPES, Entry

SEED = 6455
FRAMES = 100_000
BATCH = 40  # frames per decode_batch call

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
