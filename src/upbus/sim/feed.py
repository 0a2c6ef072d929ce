"""What a connection's public subscription sends next: snapshots first, then realtime.

Decisions where docs/protocol.md (Requests) calls the exchange's behaviour unverified:

* Every subscription frame gets fresh snapshots, also for codes the old set had.
* Both ``is_only_snapshot`` and ``is_only_realtime`` true: snapshot only.
* The same code in two entries of one type is served twice, once per entry, each
  with its own depth and level.
* A ``.n`` suffix only means something on orderbook codes; elsewhere the code is
  treated as unknown (no data, no error), as lower-case and unknown codes are.
* ``level`` on a non-KRW market, or a level the market does not support, gives no data.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from upbus.sim.market import CANDLE_UNITS, CodeState, Market
from upbus.sim.markets import MARKETS, MarketInfo, supported_levels
from upbus.sim.protocol import PUBLIC_TYPES, Entry

__all__ = ("DEPTHS", "Feed", "Message", "Stream", "build_streams", "split_code")

DEPTHS = (1, 5, 15, 30)
_FULL_DEPTH = 30
_CANDLE_GAP_MS = 1000  # at most one realtime frame per second per candle (§8.4)

Message = tuple[str, dict[str, Any]]  # (schema kind, fields by DEFAULT name)


@dataclass(slots=True)
class Stream:
    """One (type, code) of one entry, with that entry's options."""

    type: str
    code: str
    snapshot: bool
    realtime: bool
    depth: int = _FULL_DEPTH
    level: Decimal = Decimal(0)
    unit: int = 0  # candle period in seconds; 0 for other types
    sent_candle: tuple[int, int] | None = None  # (start_ms, version) last sent
    sent_ms: int | None = None


def split_code(
    raw: str, *, orderbook: bool, markets: Mapping[str, MarketInfo] = MARKETS
) -> tuple[MarketInfo, int] | None:
    """The market and depth for a requested code, or None when it gets no data.

    ``markets`` is what the venue lists; a code of another venue (``KRW-BTC`` on the
    Singapore one, say) is unknown there.
    """
    code, dot, suffix = raw.partition(".")
    depth = _FULL_DEPTH
    if dot:
        if not orderbook or not (suffix.isascii() and suffix.isdigit()):
            return None
        number = int(suffix)
        # An unsupported depth silently gives the full book (docs/protocol.md, Requests).
        depth = number if number in DEPTHS else _FULL_DEPTH
    info = markets.get(code)  # lower-case codes are not keys, so they are ignored too
    return None if info is None else (info, depth)


def build_streams(
    entries: Iterable[Entry], markets: Mapping[str, MarketInfo] = MARKETS
) -> list[Stream]:
    """The public streams an entry list asks for, in request order."""
    streams: list[Stream] = []
    for entry in entries:
        if entry.type not in PUBLIC_TYPES:
            continue
        snapshot = entry.is_only_snapshot or not entry.is_only_realtime
        realtime = not entry.is_only_snapshot
        unit = CANDLE_UNITS[entry.type.removeprefix("candle.")] if "." in entry.type else 0
        for raw in entry.codes or ():
            found = split_code(raw, orderbook=entry.type == "orderbook", markets=markets)
            if found is None:
                continue
            info, depth = found
            level = Decimal(0)
            if entry.type == "orderbook" and entry.level:
                if entry.level not in supported_levels(info):
                    continue
                level = entry.level
            streams.append(Stream(entry.type, info.code, snapshot, realtime, depth, level, unit))
    return streams


class Feed:
    """Snapshot queue and round-robin realtime generator over one :class:`Market`."""

    def __init__(self, market: Market) -> None:
        self._market = market
        self._snapshots: deque[Stream] = deque()
        self._by_code: dict[str, list[Stream]] = {}
        self._codes: list[str] = []
        self._next = 0

    def install(self, entries: Iterable[Entry]) -> None:
        """Replace every stream with those of ``entries`` (docs/protocol.md, Requests)."""
        streams = build_streams(entries, self._market.markets)
        self._snapshots = deque(stream for stream in streams if stream.snapshot)
        self._by_code = {}
        for stream in streams:
            if stream.realtime:
                self._by_code.setdefault(stream.code, []).append(stream)
        self._codes = list(self._by_code)
        self._next = 0

    @property
    def has_snapshots(self) -> bool:
        return bool(self._snapshots)

    @property
    def has_realtime(self) -> bool:
        return bool(self._codes)

    def next_snapshot(self) -> Message | None:
        """The next pending snapshot, rendered from the current state."""
        if not self._snapshots:
            return None
        stream = self._snapshots.popleft()
        state = self._market.state(stream.code)
        if stream.unit:
            self._mark_candle(stream, state)
        return self._render(stream, state, "SNAPSHOT")

    def step(self) -> list[Message]:
        """One trade on the next realtime code and the messages it causes."""
        if not self._codes:
            return []
        code = self._codes[self._next % len(self._codes)]
        self._next = (self._next + 1) % len(self._codes)
        state = self._market.trade(code)
        messages: list[Message] = []
        for stream in self._by_code[code]:
            if stream.unit and not self._candle_due(stream, state):
                continue
            if stream.unit:
                self._mark_candle(stream, state)
            messages.append(self._render(stream, state, "REALTIME"))
        return messages

    def _candle_due(self, stream: Stream, state: CodeState) -> bool:
        candle = state.candle(stream.unit)
        if (candle.start_ms, candle.version) == stream.sent_candle:
            return False  # unchanged candles are not resent
        last = stream.sent_ms
        return last is None or self._market.now_ms() - last >= _CANDLE_GAP_MS

    def _mark_candle(self, stream: Stream, state: CodeState) -> None:
        candle = state.candle(stream.unit)
        stream.sent_candle = (candle.start_ms, candle.version)
        stream.sent_ms = self._market.now_ms()

    def _render(self, stream: Stream, state: CodeState, stream_type: str) -> Message:
        now = self._market.now_ms()
        if stream.unit:
            return "candle", state.candle_fields(stream.type, stream.unit, stream_type, now)
        if stream.type == "ticker":
            return "ticker", state.ticker_fields(stream_type, now)
        if stream.type == "trade":
            return "trade", state.trade_fields(stream_type, now)
        return "orderbook", state.orderbook_fields(stream_type, stream.depth, stream.level)
