"""What every recording plugin shares: settings, and a component with a writer thread.

The component declares ``upbus_overflow = "block"``, so the bus never drops a
message for it. One writer thread owns the sink (a database connection, a file)
and writes in batches of ``batch_size``, or after ``flush_interval``. Closing
stops accepting, writes everything accepted and closes the sink.

Accepting cannot be interrupted. ``on_message`` appends ``(received_at, message)``
to a backlog and counts it as accepted in one step under a lock, before it awaits
anything; the writer takes from that backlog under the same lock. A delivery task
cancelled in ``on_message`` (on SIGINT/SIGTERM, or after the bus's drain limit)
is cancelled after the message was accepted, never between taking it and handing
it over, so every message the bus delivers is either accepted, and then written
or counted as lost in a failed write, or refused (delivered while closing, or
after the writer stopped) and counted as refused. ``accepted == written + lost``
once :meth:`BatchRecorder.aclose` has returned.

Backpressure is a wait after accepting, never a condition of it: when the backlog
holds ``max_pending`` messages, ``on_message`` waits off the loop until the writer
takes some, and meanwhile the bus holds back the channel instead of losing data.
Cancelling that wait loses nothing; each cancelled wait lets the backlog run one
message past ``max_pending``.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Generic, NamedTuple, Protocol, TypeVar

import anyio
import orjson
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from upbus import parse_specs
from upbus.core.wire._messages import CANDLE_TYPES
from upbus.plugin import Candle, Message, MyAsset, MyOrder, Orderbook, Overflow, Ticker, Trade

if TYPE_CHECKING:
    from upbus import Bus

__all__ = (
    "TABLE_LAYOUT",
    "BatchRecorder",
    "FileRecorderSettings",
    "Item",
    "RecorderPlugin",
    "RecorderSettings",
    "Sink",
    "SpecList",
    "TableLayout",
)

log = logging.getLogger("upbus.plugins.recording")

# The writer and the waits for it wake at least this often, to notice an interpreter
# exiting without aclose().
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


# -- what the database stores share ------------------------------------------------------


class TableLayout(NamedTuple):
    """One table of a database store: its message class, the types it holds, its indexes."""

    name: str
    cls: type[Message]
    types: tuple[str, ...]
    omit: frozenset[str] = frozenset({"type"})
    indexes: tuple[tuple[str, ...], ...] = (("code", "timestamp"),)


TABLE_LAYOUT: tuple[TableLayout, ...] = (
    TableLayout("tickers", Ticker, ("ticker",)),
    TableLayout("trades", Trade, ("trade",)),
    TableLayout("orderbooks", Orderbook, ("orderbook",)),
    # The type names a candle's interval, so it is kept.
    TableLayout(
        "candles", Candle, CANDLE_TYPES, omit=frozenset(), indexes=(("code", "type", "timestamp"),)
    ),
    TableLayout("my_orders", MyOrder, ("myOrder",), indexes=(("code", "timestamp"), ("uuid",))),
    # The wire form of myAsset has no code.
    TableLayout(
        "my_assets",
        MyAsset,
        ("myAsset",),
        omit=frozenset({"type", "code"}),
        indexes=(("timestamp",),),
    ),
)
"""The tables every database store (SQLite, PostgreSQL) keeps, one per message kind."""


# -- the component and its writer thread -------------------------------------------------

Item = tuple[float, Message]
"""``(received_at, message)``: what a recorder queues for its writer."""

# The writer wants no wake-up while it is busy: the backlog never gets this long.
_NEVER = sys.maxsize


class Sink(Protocol):
    """Where a :class:`BatchRecorder`'s writer thread puts batches; used from that thread only."""

    def write(self, items: list[Item]) -> None: ...

    def close(self) -> None: ...


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
        self._max_pending = max_pending
        self._thread = threading.Thread(target=self._run, name=f"upbus {name} writer")
        self._opened: Future[None] = Future()
        # One lock guards the backlog, the flags and the counters. No I/O is done under it.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits here
        self._progress = threading.Condition(self._lock)  # taken, written, or stopped
        self._backlog: list[Item] = []  # accepted, not yet taken by the writer
        self._wake_at = 1  # the backlog length at which the waiting writer wants a notify
        self._flush_to = 0  # the writer writes at once until this many are written or lost
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
        item = (time.time(), message)
        # Accepting is one step under the lock, before any await: a cancellation
        # can come only after it, and then the message is in the backlog already.
        with self._lock:
            refused = self._closing or self._stopped
            if refused:
                self.refused += 1
                first_refusal = self.refused == 1
            else:
                backlog = self._backlog
                backlog.append(item)
                self.accepted += 1
                if len(backlog) >= self._wake_at:
                    self._wake_at = _NEVER
                    self._work.notify()
                full = len(backlog) >= self._max_pending
        if refused:
            if first_refusal:
                log.warning(
                    "%s: %s; messages delivered from now on are not recorded",
                    self.name,
                    "closing" if self._closing else "the writer thread has stopped",
                )
        elif full:
            # Backpressure: the bus keeps later messages in this component's lossless
            # buffer until the writer takes some. Only waiting is cancelled here.
            await anyio.to_thread.run_sync(self._wait_for_room, abandon_on_cancel=True)

    async def flush(self) -> None:
        """Wait until everything accepted so far is written (or lost in a failed write)."""
        with self._lock:
            target = self.accepted
            self._flush_to = max(self._flush_to, target)
            self._work.notify()
        await anyio.to_thread.run_sync(self._wait_finished, target, abandon_on_cancel=True)

    async def aclose(self) -> None:
        """Stop accepting, write everything accepted, close the sink. Safe to call twice.

        Shielded from cancellation: a stop on SIGINT/SIGTERM must still write everything.
        """
        with self._lock:
            self._closing = True
            self._work.notify()
        with anyio.CancelScope(shield=True):
            if self._thread.is_alive():
                await anyio.to_thread.run_sync(self._thread.join)
        self._settle()  # the writer has ended, or never started
        log.info(
            "%s: closed; %d accepted, %d written in %d batches, %d lost, %d refused",
            self.name,
            self.accepted,
            self.written,
            self.batches,
            self.lost,
            self.refused,
        )

    def stats(self) -> dict[str, Any]:
        """Counters: ``accepted`` (to be written), ``written``, ``batches``, ``lost``
        (in failed writes), ``refused`` (delivered while closing or after the writer
        stopped, never accepted), ``pending`` (accepted, not yet written or lost).

        ``accepted == written + lost + pending`` at every moment, and ``pending`` is
        0 once :meth:`aclose` has returned.
        """
        with self._lock:
            return {
                "accepted": self.accepted,
                "written": self.written,
                "batches": self.batches,
                "lost": self.lost,
                "refused": self.refused,
                "pending": self.accepted - self.written - self.lost,
            }

    # The two waits run in worker threads, which the interpreter waits for at exit:
    # they end when the writer stops, and on their own once the main thread has ended.

    def _wait_for_room(self) -> None:
        with self._lock:
            while len(self._backlog) >= self._max_pending and self._worth_waiting():
                self._progress.wait(_EXIT_POLL)

    def _wait_finished(self, target: int) -> None:
        with self._lock:
            while self.written + self.lost < target and self._worth_waiting():
                self._progress.wait(_EXIT_POLL)

    def _worth_waiting(self) -> bool:
        return not self._stopped and threading.main_thread().is_alive()

    def _settle(self) -> None:
        """Once no writer runs: count as lost what was accepted and never written."""
        with self._lock:
            self._stopped = True
            missing = self.accepted - self.written - self.lost
            self.lost += missing
            self._backlog.clear()
            self._progress.notify_all()
        if missing:
            log.error(
                "%s: %d accepted messages were never written; they are lost", self.name, missing
            )

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            sink = self._open_sink()
        except BaseException as exc:
            self._settle()
            self._opened.set_exception(exc)
            return
        self._opened.set_result(None)
        try:
            self._loop(sink)
        except BaseException:
            log.exception("%s: the writer thread failed", self.name)
        finally:
            self._settle()
            try:
                sink.close()
            except Exception:
                log.exception("%s: closing failed", self.name)

    def _loop(self, sink: Sink) -> None:
        while batch := self._next_batch():
            try:
                sink.write(batch)
            except Exception:
                log.exception(
                    "%s: writing %d messages failed; they are lost", self.name, len(batch)
                )
                failed = True
            else:
                failed = False
            with self._lock:
                if failed:
                    self.lost += len(batch)
                else:
                    self.written += len(batch)
                    self.batches += 1
                self._progress.notify_all()

    def _next_batch(self) -> list[Item]:
        """Wait for the next batch to write: ``batch_size`` messages, or fewer once the
        oldest has waited ``flush_interval``, or at once for a flush or when closing.
        Empty when closing and everything is taken."""
        batch: list[Item] = []
        due = math.inf  # when the oldest message in `batch` must be written
        size = self._batch_size
        with self._lock:
            while True:
                backlog = self._backlog
                if backlog and len(batch) < size:
                    if not batch:
                        due = time.monotonic() + self._flush_interval
                    room = size - len(batch)
                    batch += backlog[:room]
                    del backlog[:room]
                    self._progress.notify_all()  # room for a held-back on_message
                if len(batch) >= size:
                    return batch
                if self._closing or self._flush_to > self.written + self.lost:
                    return batch  # backlog empty: all there is
                now = time.monotonic()
                if batch and now >= due:
                    return batch
                # Wake on the first message, or when the batch could fill, or the
                # backlog holds back the bus; else at `due`, or to check for an exit.
                self._wake_at = 1 if not batch else min(size - len(batch), self._max_pending)
                notified = self._work.wait(min(due - now, _EXIT_POLL))
                self._wake_at = _NEVER
                if not notified and not threading.main_thread().is_alive():
                    # The interpreter is exiting without aclose(): write what remains.
                    self._closing = True


R = TypeVar("R", bound=BatchRecorder)


class RecorderPlugin(Generic[R]):
    """The startup and shutdown hooks of a recording plugin, and its recorder per bus.

    The recorder is made at startup rather than contributed through
    ``upbus_components``: its writer thread must be running, and its sink open,
    before it is registered (an unwritable path stops it there, and it is never
    registered), which is async work, and the shutdown hook must close the
    recorder of the bus that is stopping, so the recorder is kept by bus until
    then. ``make`` builds the recorder from the path and the batching settings of
    the plugin's section.
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
