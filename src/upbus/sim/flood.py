"""The ``rate="max"`` flood: pre-encoded frames written in large batches.

Generating a message costs the simulator about half a millisecond (a trade moves the
book, then the exchange's number spellings are written by hand), so the per-message
flood (``rate=None``) tops out near 2,000 messages/s, far below what a client can
take. In ``"max"`` mode a connection instead gets a :class:`Ring`:

* At subscribe time the first ``SimConfig.flood_ring`` realtime frames of the
  subscription are generated once, by a fresh :class:`~upbus.sim.market.Market` with
  the simulator's seed: the very frames the per-message flood would send first
  (with ``start_ms`` set, byte for byte), in the connection's format, interleaved
  across codes and types as the market trades.
* Those frames, WebSocket headers included, are cut into chunks of whole frames of
  about ``SimConfig.flood_write_bytes`` each, and the connection writes chunk after
  chunk, round and round, one socket write each: no Python work per message.
* Rings are cached per simulator (the last :data:`RING_CACHE_SIZE` subscriptions and
  formats), so reconnecting clients and benchmark runs pay the generation once.

What this gives up, by design: the ring repeats. Timestamps and sequential ids
increase within one lap and start over at the next one, and candles repeat once per
lap whatever the clock says. The connection's own market does not move, so the
snapshots of a later subscription show the state the ring starts from. Frames are
written as uncompressed binary frames even when permessage-deflate was negotiated
(RFC 7692 allows uncompressed messages). A subscription that yields no realtime
frame within a bounded number of trades (candles alone, on the wall clock) falls
back to generating its messages as with ``rate=None``.

Generating a ring of 4,096 frames takes about 2 s of one core (DEFAULT tickers);
the simulator keeps serving its other connections and this one's control frames
meanwhile, as generation yields to the event loop every few trades.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from upbus.sim.config import SimConfig
from upbus.sim.encode import encode_frame, is_list_format
from upbus.sim.feed import Feed
from upbus.sim.market import Market
from upbus.sim.markets import markets_for
from upbus.sim.protocol import Entry

__all__ = ("RING_CACHE_SIZE", "Ring", "RingCache", "binary_frame", "build_ring")

RING_CACHE_SIZE = 4
_STEPS_PER_FRAME = 4  # generation gives up after this many trades per wanted frame
_STEPS_PER_CHECKPOINT = 16  # generation yields to the event loop this often

_RingKey = tuple[tuple[Entry, ...], str]


def binary_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented, uncompressed binary frame (a server's)."""
    size = len(payload)
    if size < 126:
        return bytes((0x82, size)) + payload
    if size < 65_536:
        return struct.pack("!BBH", 0x82, 126, size) + payload
    return struct.pack("!BBQ", 0x82, 127, size) + payload


@dataclass(frozen=True, slots=True)
class Ring:
    """A subscription's realtime frames, cut into socket writes of whole frames."""

    chunks: tuple[bytes, ...]
    counts: tuple[int, ...]  # frames in each chunk

    @property
    def frames(self) -> int:
        return sum(self.counts)

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


def _cut(frames: Sequence[bytes], write_bytes: int) -> Ring:
    chunks: list[bytes] = []
    counts: list[int] = []
    start = size = 0
    for index, frame in enumerate(frames):
        if size and size + len(frame) > write_bytes:
            chunks.append(b"".join(frames[start:index]))
            counts.append(index - start)
            start, size = index, 0
        size += len(frame)
    if start < len(frames):
        chunks.append(b"".join(frames[start:]))
        counts.append(len(frames) - start)
    return Ring(tuple(chunks), tuple(counts))


async def build_ring(entries: tuple[Entry, ...], fmt: str, config: SimConfig) -> Ring:
    """The first ``config.flood_ring`` realtime frames of ``entries`` in ``fmt``.

    Yields to the event loop every few trades. Subscriptions that rarely produce a
    frame (candles only) stop after a bounded number of trades with a shorter ring,
    possibly an empty one.
    """
    feed = Feed(Market(config.seed, config.start_ms, markets_for(config.region)))
    feed.install(entries)
    # The per-message flood sends the snapshots first, and a candle snapshot decides
    # when the next realtime candle is due: do the same so the frames match.
    while feed.next_snapshot() is not None:
        pass
    wanted = config.flood_ring
    per_frame = config.list_batch if is_list_format(fmt) else 1
    frames: list[bytes] = []
    for step in range(1, wanted * _STEPS_PER_FRAME + 1):
        if len(frames) >= wanted or not feed.has_realtime:
            break
        messages = feed.step()
        for start in range(0, len(messages), per_frame):
            frames.append(binary_frame(encode_frame(messages[start : start + per_frame], fmt)))
        if step % _STEPS_PER_CHECKPOINT == 0:
            await anyio.lowlevel.checkpoint()
    return _cut(frames[:wanted], config.flood_write_bytes)


class RingCache:
    """Rings by (entries, format), built once even when connections ask at once."""

    def __init__(self, config: SimConfig, size: int = RING_CACHE_SIZE) -> None:
        self._config = config
        self._size = size
        self._rings: OrderedDict[_RingKey, Ring] = OrderedDict()
        self._building: dict[_RingKey, anyio.Event] = {}
        self.builds = 0

    async def get(self, entries: tuple[Entry, ...], fmt: str) -> Ring:
        """The ring of ``entries`` in ``fmt``, built now or by another connection."""
        key = (entries, fmt)
        while True:  # at most twice: a builder that was cancelled leaves the work to us
            ring = self._rings.get(key)
            if ring is not None:
                self._rings.move_to_end(key)
                return ring
            building = self._building.get(key)
            if building is None:
                break
            await building.wait()
        done = self._building[key] = anyio.Event()
        try:
            ring = await build_ring(entries, fmt, self._config)
        finally:
            del self._building[key]
            done.set()
        self.builds += 1
        self._rings[key] = ring
        while len(self._rings) > self._size:
            self._rings.popitem(last=False)
        return ring
