"""Recorder to JSON Lines (plugin ``jsonl``).

Enabled by settings; with ``plugins.jsonl.enabled`` false it contributes nothing::

    [plugins.jsonl]
    enabled = true
    path = "upbus.jsonl"             # appended to
    specs = [{type = "trade", codes = ["KRW-BTC"]}]
    batch_size = 500
    flush_interval = 1.0
    max_pending = 10000

One line per message, in order of arrival::

    {"received_at": 1767225600.123, "channel": "public", "message": {"type": "trade", ...}}

``received_at`` is Unix seconds when the recorder got the message, ``channel`` is
``public`` or ``private``, and ``message`` is the message with the exchange's
DEFAULT field names (:func:`~upbus.core.wire._codec.to_default_dict`), so the line's
``message`` is a frame :mod:`upbus.plugins.replay` can send again. The write path
is the SQLite store's (:class:`~upbus.plugins.recording.BatchRecorder`): lossless,
encoded and written by a writer thread in batches, each batch flushed to the OS,
and the file synced and closed by the ``upbus_shutdown`` hook.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import orjson
from pydantic import Field

from upbus.core.wire._codec import to_default_dict
from upbus.plugin import PRIVATE_TYPES, hookimpl
from upbus.plugins.recording import BatchRecorder, FileRecorderSettings, Item, RecorderPlugin

if TYPE_CHECKING:
    from upbus import Bus

__all__ = ("JsonlRecorder", "JsonlSettings", "recorder_for")

NAME = "jsonl"


class JsonlSettings(FileRecorderSettings):
    """The ``plugins.jsonl`` section."""

    path: Path = Field(default=Path("upbus.jsonl"), description="The file to append to.")


class _JsonlSink:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = path.open("ab")

    def write(self, items: list[Item]) -> None:
        lines = [
            orjson.dumps(
                {
                    "received_at": received_at,
                    "channel": "private" if message.type in PRIVATE_TYPES else "public",
                    "message": to_default_dict(message),
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
            for received_at, message in items
        ]
        self._file.write(b"".join(lines))
        self._file.flush()  # in the OS's hands: a killed process loses nothing written

    def close(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


class JsonlRecorder(BatchRecorder):
    """Appends every message it receives to the JSON Lines file at ``path``."""

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        self.path = Path(path)
        super().__init__(
            f"jsonl {self.path}",
            lambda: _JsonlSink(self.path),
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_pending=max_pending,
        )


_plugin = RecorderPlugin(NAME, JsonlSettings, JsonlRecorder)


def recorder_for(bus: Bus) -> JsonlRecorder | None:
    """The recorder this plugin runs for ``bus``, while it runs."""
    return _plugin.recorder_for(bus)


@hookimpl
def upbus_startup(bus: Bus) -> Awaitable[None] | None:
    return _plugin.startup(bus)


@hookimpl
def upbus_shutdown(bus: Bus) -> Awaitable[None] | None:
    return _plugin.shutdown(bus)
