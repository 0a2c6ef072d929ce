"""What every recording plugin shares: settings, and a component with a writer thread.

The component declares ``upbus_overflow = "block"``, so the bus never drops a
message for it. Its ``on_message`` only puts ``(received_at, message)`` into a
bounded queue; one writer thread owns the sink (a database connection, a file) and
writes in batches of ``batch_size``, or after ``flush_interval``. When the writer
falls ``max_pending`` behind, ``on_message`` waits off the loop and the bus holds
back the channel (backpressure) instead of losing data. Closing stops accepting,
writes everything accepted and closes the sink.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Generic, Protocol, TypeVar

import anyio
import orjson
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from upbus.core.messages import Message
from upbus.core.router import Overflow
from upbus.core.specs import parse_specs

if TYPE_CHECKING:
    from upbus.core.bus import Bus

__all__ = (
    "BatchRecorder",
    "FileRecorderSettings",
    "Item",
    "RecorderPlugin",
    "RecorderSettings",
    "Sink",
    "SpecList",
)

log = logging.getLogger("upbus.plugins.recording")

# The writer wakes at least this often, to notice an interpreter exiting without aclose().
_EXIT_POLL = 1.0


# -- settings ----------------------------------------------------------------------------


def _json_text(value: Any) -> Any:
    # From the environment a list arrives as text, e.g. UPBUS_PLUGINS__SQLITE__SPECS='[...]'.
    return orjson.loads(value) if isinstance(value, str) else value


def _valid_specs(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
    parse_specs(value)  # SpecError is a ValueError: pydantic reports it against the field
    return value


SpecList = Annotated[
    list[dict[str, Any]], BeforeValidator(_json_text), AfterValidator(_valid_specs)
]
"""Exchange request objects (``{"type": "ticker", "codes": [...]}``), checked by
:func:`upbus.parse_specs`; JSON text is accepted too."""


def _default_specs() -> list[dict[str, Any]]:
    return [
        {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
        {"type": "trade", "codes": ["KRW-BTC"]},
    ]


class RecorderSettings(BaseModel):
    """What every recording plugin's section has."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(default=False, description="Record at all.")
    specs: SpecList = Field(
        default_factory=_default_specs,
        description="What to record, as the exchange's request objects.",
    )
    batch_size: int = Field(default=500, ge=1, description="Messages per write, at most.")
    flush_interval: float = Field(
        default=1.0, gt=0, description="Seconds the writer holds a partial batch before writing it."
    )
    max_pending: int = Field(
        default=10_000,
        ge=1,
        description="Accepted but unwritten messages before the bus is held back.",
    )


class FileRecorderSettings(RecorderSettings):
    """A recording plugin's section whose recorder writes one file."""

    path: Path


# -- the component and its writer thread -------------------------------------------------

Item = tuple[float, Message]
"""``(received_at, message)``: what a recorder queues for its writer."""


class Sink(Protocol):
    """Where a :class:`BatchRecorder`'s writer thread puts batches; used from that thread only."""

    def write(self, items: list[Item]) -> None: ...

    def close(self) -> None: ...


class _Flush:
    """A queue marker: write what came before me, then set ``done``."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class BatchRecorder:
    """A lossless component that hands every message to a writer thread, which writes batches.

    :param name: names the recorder in logs and its thread.
    :param open_sink: called in the writer thread to open the sink, so a sink may
        hold objects bound to that thread (an SQLite connection).

    Call :meth:`start` before registering it, :meth:`aclose` when done.
    """

    upbus_overflow: Overflow = "block"

    def __init__(
        self,
        name: str,
        open_sink: Callable[[], Sink],
        *,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        self.name = name
        self._open_sink = open_sink
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._queue: queue.Queue[object] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name=f"upbus {name} writer")
        self._opened: Future[None] = Future()
        # Orders slow puts before the stop marker, so nothing accepted lands behind it.
        self._put_lock = anyio.Lock()
        self._closing = False
        self._stopped = False
        self.accepted = 0
        self.written = 0
        self.batches = 0
        self.lost = 0
        self.refused = 0

    @property
    def writer(self) -> threading.Thread:
        """The thread that owns the sink and does every write."""
        return self._thread

    async def start(self) -> None:
        """Start the writer thread; raise what opening the sink raised."""
        self._thread.start()
        await anyio.to_thread.run_sync(self._opened.result)

    async def on_message(self, message: Message) -> None:
        if self._closing or self._stopped:
            self._refuse()
            return
        item = (time.time(), message)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            # The writer is behind: wait for room in a worker thread. Meanwhile the
            # bus keeps later messages in this component's lossless buffer.
            async with self._put_lock:
                if self._closing:  # aclose() went first: the stop marker is queued
                    self._refuse()
                    return
                # Counted first: a put that has started completes even if we are
                # cancelled meanwhile (the worker thread is not abandoned).
                self.accepted += 1
                if not await anyio.to_thread.run_sync(self._put_waiting, item):
                    self.accepted -= 1
                    self._refuse()
        else:
            self.accepted += 1

    async def flush(self) -> None:
        """Wait until everything accepted so far is written."""
        marker = _Flush()
        async with self._put_lock:
            if not await anyio.to_thread.run_sync(self._put_waiting, marker):
                return
        await anyio.to_thread.run_sync(self._wait_done, marker)

    async def aclose(self) -> None:
        """Stop accepting, write everything accepted, close the sink. Safe to call twice.

        Shielded from cancellation: a stop on SIGINT/SIGTERM must still write everything.
        """
        self._closing = True
        with anyio.CancelScope(shield=True):
            if self._thread.is_alive():
                async with self._put_lock:
                    await anyio.to_thread.run_sync(self._put_waiting, _STOP)
                await anyio.to_thread.run_sync(self._thread.join)
        log.info(
            "%s: closed; %d accepted, %d written in %d batches, %d lost",
            self.name,
            self.accepted,
            self.written,
            self.batches,
            self.lost,
        )

    def stats(self) -> dict[str, Any]:
        """Counters: ``accepted`` (queued for writing), ``written``, ``batches``, ``lost``
        (in failed writes), ``refused`` (delivered after closing), ``pending`` (queued now)."""
        return {
            "accepted": self.accepted,
            "written": self.written,
            "batches": self.batches,
            "lost": self.lost,
            "refused": self.refused,
            "pending": self._queue.qsize(),
        }

    def _refuse(self) -> None:
        if not self.refused:
            log.warning(
                "%s: %s; messages delivered from now on are not recorded",
                self.name,
                "closing" if self._closing else "the writer thread has stopped",
            )
        self.refused += 1

    def _put_waiting(self, item: object) -> bool:
        while not self._stopped:
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False

    def _wait_done(self, marker: _Flush) -> None:
        while not marker.done.wait(0.1) and not self._stopped:
            pass

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            sink = self._open_sink()
        except BaseException as exc:
            self._stopped = True
            self._opened.set_exception(exc)
            return
        self._opened.set_result(None)
        try:
            self._loop(sink)
        except BaseException:
            log.exception("%s: the writer thread failed", self.name)
        finally:
            self._stopped = True
            try:
                sink.close()
            except Exception:
                log.exception("%s: closing failed", self.name)

    def _loop(self, sink: Sink) -> None:
        batch: list[Item] = []
        due = math.inf  # when the oldest unwritten item must be written
        while True:
            try:
                item = self._queue.get(timeout=max(min(due - time.monotonic(), _EXIT_POLL), 0))
            except queue.Empty:
                item = None
            if item is _STOP or (item is None and not threading.main_thread().is_alive()):
                # Stop, or the interpreter is exiting without aclose(): write what remains.
                self._write(sink, batch + self._drain())
                return
            if isinstance(item, _Flush):
                self._write(sink, batch)
                batch, due = [], math.inf
                item.done.set()
                continue
            if isinstance(item, tuple):
                if not batch:
                    due = time.monotonic() + self._flush_interval
                batch.append(item)
            if len(batch) >= self._batch_size or (batch and time.monotonic() >= due):
                self._write(sink, batch)
                batch, due = [], math.inf

    def _drain(self) -> list[Item]:
        rest: list[Item] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rest
            if isinstance(item, tuple):
                rest.append(item)
            elif isinstance(item, _Flush):
                item.done.set()  # its items are in `rest`, written before the sink closes

    def _write(self, sink: Sink, batch: list[Item]) -> None:
        if not batch:
            return
        try:
            sink.write(batch)
        except Exception:
            self.lost += len(batch)
            log.exception("%s: writing %d messages failed; they are lost", self.name, len(batch))
        else:
            self.written += len(batch)
            self.batches += 1


R = TypeVar("R", bound=BatchRecorder)


class RecorderPlugin(Generic[R]):
    """The startup and shutdown hooks of a recording plugin, and its recorder per bus.

    The recorder is made and registered at startup, not through upbus_components:
    that hook is not told which bus it serves, and the shutdown hook must close the
    recorder of the bus that is stopping. ``make`` builds the recorder from the path
    and the batching settings of the plugin's section.
    """

    def __init__(
        self, name: str, settings: type[FileRecorderSettings], make: Callable[..., R]
    ) -> None:
        self._name = name
        self._settings = settings
        self._make = make
        self._running: weakref.WeakKeyDictionary[Bus, R] = weakref.WeakKeyDictionary()

    def recorder_for(self, bus: Bus) -> R | None:
        """The recorder this plugin runs for ``bus``, while it runs."""
        return self._running.get(bus)

    def startup(self, bus: Bus) -> Awaitable[None] | None:
        config = bus.settings.plugin_section(self._name, self._settings)
        if not config.enabled:
            return None
        recorder = self._make(
            config.path,
            batch_size=config.batch_size,
            flush_interval=config.flush_interval,
            max_pending=config.max_pending,
        )
        return self._start(bus, recorder, config.specs)

    def shutdown(self, bus: Bus) -> Awaitable[None] | None:
        recorder = self._running.pop(bus, None)
        return None if recorder is None else recorder.aclose()

    async def _start(self, bus: Bus, recorder: R, specs: SpecList) -> None:
        await recorder.start()
        try:
            await bus.register_component(recorder, specs)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await recorder.aclose()
            raise
        self._running[bus] = recorder
