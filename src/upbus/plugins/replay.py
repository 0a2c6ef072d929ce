"""Replay transport (plugin ``replay``): a recording played back as if it were the exchange.

It answers ``upbus_make_transport`` only when a recording is configured, and then
ahead of every other transport (it is ``tryfirst``); without one the default
transport connects as usual::

    [plugins.replay]
    path = "session.jsonl"   # a JSON Lines recording, or an SQLite store's database
    speed = 1.0              # 1.0: the recorded pace, 2.0: twice as fast, 0: at once

A connection behaves like the exchange's: it accepts (and records, in
:attr:`ReplayTransport.requests`) subscription requests, streams nothing before
the first one, answers a text ``PING`` with ``{"status":"UP"}`` (but not
``LIST_SUBSCRIPTIONS``: leave ``verify_subscriptions`` off), and sends every
recorded message of its channel's types as a DEFAULT frame, in recorded order.
Which of them reach a component is the bus's business: it routes by what each
component asked for. Paced replay schedules each frame by its ``received_at``
offset from the first one; fast replay (``speed = None``) sends batches of
frames as quickly as the consumers take them, so a component that must see
every message declares ``upbus_overflow = "block"``.

At the end the connection closes with ``ConnectionClosed(1000, "end of
recording")``; components see a ``gap`` event whose detail says so. The bus then
reconnects, as it would to the exchange; later connections resume where the
recording stopped, and once it is over they stay silent until closed.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Generator, Mapping, Sequence
from itertools import islice
from pathlib import Path

import anyio
import anyio.lowlevel
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from upbus import ConfigError, OptionError, Settings
from upbus.plugin import (
    PRIVATE_TYPES,
    PUBLIC_TYPES,
    Channel,
    ConnectionClosed,
    Transport,
    TransportError,
    hookimpl,
)
from upbus.plugins.sqlite_store import iter_frames

__all__ = (
    "END_OF_RECORDING",
    "ReplayConnection",
    "ReplaySettings",
    "ReplayTransport",
    "read_recording",
)

log = logging.getLogger("upbus.plugins.replay")

NAME = "replay"
END_OF_RECORDING = "end of recording"
BATCH = 256  # frames per receive_batch, at most
_CHUNK = 1024  # frames read from the file per worker-thread call
_SQLITE_MAGIC = b"SQLite format 3\x00"

Frame = tuple[float, bytes]
"""``(received_at, frame)``."""


class ReplaySettings(BaseModel):
    """The ``plugins.replay`` section."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: Path | None = Field(
        default=None, description="The recording to replay; unset, the plugin does nothing."
    )
    speed: float | None = Field(
        default=1.0,
        ge=0,
        description="Pace relative to the recording; 0 (or None): as fast as possible.",
    )

    @field_validator("speed")
    @classmethod
    def _zero_is_unpaced(cls, value: float | None) -> float | None:
        # TOML has no null, so 0 spells "as fast as possible" there.
        return None if value == 0 else value


def read_recording(
    path: str | Path, types: frozenset[str] | None = None
) -> Generator[Frame, None, None]:
    """``(received_at, frame)`` of each recorded message of ``types`` (default: all), in order.

    ``path`` is a JSON Lines recording or an SQLite store's database, told apart by
    the file's first bytes. Reading is lazy: the file is opened at the first item.
    """
    with Path(path).open("rb") as file:
        sqlite = file.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    return iter_frames(path, types) if sqlite else _jsonl_frames(Path(path), types)


def _jsonl_frames(path: Path, types: frozenset[str] | None) -> Generator[Frame, None, None]:
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                message = record["message"]
                received_at = float(record["received_at"])
                wanted = types is None or message["type"] in types
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                # Most likely the last line of a recorder that was killed mid-write.
                log.warning("%s:%d: not a recorded message; skipped", path, number)
                continue
            if wanted:
                yield received_at, orjson.dumps(message)


def _take(frames: Generator[Frame, None, None], count: int) -> list[Frame]:
    return list(islice(frames, count))


class ReplayTransport:
    """Plays the recording at ``path`` back through connections that look like the exchange's.

    :param speed: ``1.0`` for the recorded pace, ``k`` for k times faster, ``None``
        for as fast as the consumers take it.
    :param types: the message types to send (a channel's); default all.
    :raises ConfigError: there is no file at ``path``.
    """

    def __init__(
        self,
        path: str | Path,
        speed: float | None = 1.0,
        *,
        types: frozenset[str] | None = None,
    ) -> None:
        if speed is not None and not (math.isfinite(speed) and speed > 0):
            raise OptionError(f"speed must be a positive number or None, got {speed!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"plugins.replay.path: no recording at {self.path}")
        self.speed = speed
        self.types = types
        #: Every text frame the bus sent, across connections.
        self.requests: list[str] = []
        #: Whether the end of the recording was announced.
        self.ended = False
        self._frames: Generator[Frame, None, None] | None = None
        self._ahead: deque[Frame] = deque()
        self._exhausted = False

    async def connect(self, url: str, headers: Mapping[str, str]) -> ReplayConnection:
        return ReplayConnection(self)

    async def aclose(self) -> None:
        frames, self._frames = self._frames, None
        self._exhausted = True
        if frames is not None:
            await anyio.to_thread.run_sync(frames.close)

    async def _peek(self) -> Frame | None:
        """The next frame, reading a chunk off the loop when none is buffered."""
        if not self._ahead and not self._exhausted:
            if self._frames is None:
                self._frames = read_recording(self.path, self.types)
            try:
                chunk = await anyio.to_thread.run_sync(_take, self._frames, _CHUNK)
            except Exception as exc:
                self._exhausted = self.ended = True
                raise TransportError(f"replay: reading {self.path} failed: {exc}") from exc
            self._exhausted = not chunk
            self._ahead.extend(chunk)
        return self._ahead[0] if self._ahead else None

    def _pop(self) -> bytes:
        return self._ahead.popleft()[1]


class ReplayConnection:
    """One connection of a :class:`ReplayTransport`; the bus sees an exchange connection."""

    def __init__(self, transport: ReplayTransport) -> None:
        self._transport = transport
        self._speed = transport.speed
        # Set by the first subscription request, and by aclose() to wake a waiting reader.
        self._streaming = anyio.Event()
        self._closed = anyio.Event()
        self._close_code = 1000
        self._replies: list[bytes] = []
        self._anchor: tuple[float, float] | None = None  # (loop time, received_at) of frame 1

    async def send_text(self, text: str) -> None:
        self._check_open()
        self._transport.requests.append(text)
        if text == "PING":
            self._replies.append(b'{"status":"UP"}')
        elif text.lstrip().startswith("["):
            self._streaming.set()

    async def receive_batch(self) -> Sequence[bytes | str]:
        await self._streaming.wait()
        self._check_open()
        if self._replies:
            replies, self._replies = self._replies, []
            return replies
        transport = self._transport
        first = await transport._peek()
        if first is None:
            if not transport.ended:
                transport.ended = True
                raise ConnectionClosed(1000, END_OF_RECORDING)
            # The recording is over: stay silent, like an idle exchange, until closed.
            await self._closed.wait()
            raise self._closed_error()
        if self._speed is None:
            # Even at full speed, let the consumers run between batches.
            await anyio.lowlevel.checkpoint()
        else:
            delay = self._due(first[0]) - anyio.current_time()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._closed.wait()
        self._check_open()
        return await self._take()

    async def _take(self) -> list[bytes | str]:
        """The next frame and those after it that are due too, up to :data:`BATCH`."""
        transport = self._transport
        frames: list[bytes | str] = [transport._pop()]
        now = anyio.current_time()
        while len(frames) < BATCH:
            upcoming = await transport._peek()
            if upcoming is None or (self._speed is not None and self._due(upcoming[0]) > now):
                break
            frames.append(transport._pop())
        return frames

    def _due(self, received_at: float) -> float:
        """When, on the loop's clock, the frame received at ``received_at`` is sent."""
        assert self._speed is not None
        if self._anchor is None:
            self._anchor = (anyio.current_time(), received_at)
        started, first = self._anchor
        return started + (received_at - first) / self._speed

    async def ping(self, timeout: float) -> float:
        self._check_open()
        return 0.0

    async def aclose(self, code: int = 1000) -> None:
        if not self._closed.is_set():
            self._close_code = code
            self._closed.set()
            self._streaming.set()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise self._closed_error()

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(self._close_code, "closed by the client")


@hookimpl(tryfirst=True)
def upbus_make_transport(channel: Channel, settings: Settings) -> Transport | None:
    # tryfirst: a configured recording replaces every transport that connects to the
    # exchange (the default is trylast, the picows plugin in between).
    config = settings.plugin_section(NAME, ReplaySettings)
    if config.path is None:
        return None
    types = PUBLIC_TYPES if channel is Channel.PUBLIC else PRIVATE_TYPES
    return ReplayTransport(config.path, config.speed, types=types)
