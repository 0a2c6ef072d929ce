"""A recorder's books balance whatever cancels its delivery.

Every message the bus hands to a recorder is either accepted, and then written or
counted lost in a failed write, or refused and counted as refused. A delivery task
cancelled inside ``on_message`` (a signal, the bus's drain limit) must not leave a
message counted as accepted and never written, nor one taken and never counted.

The writer here waits at a gate the test opens (as behind another process's lock on
the database), so the moments of cancellation are chosen, not raced for.
"""

from __future__ import annotations

import queue
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.lowlevel
import pytest
from anyio.abc import TaskStatus
from clirun import UPBUS, clean_environment
from factories import make_ticker

from upbus import Message
from upbus.plugins.recording import BatchRecorder, Item
from upbus.plugins.sqlite_store import TABLES

GATE_TIMEOUT = 20.0  # a write waits at most this long for the test to open its gate


class GatedSink:
    """Keeps what it is given. While the gate is shut, a write waits at it."""

    def __init__(self, *failures: BaseException) -> None:
        self.items: list[Item] = []
        self.gate = threading.Event()
        self.stuck = threading.Event()  # a write is waiting at the shut gate
        self.closed = False
        self._failures = list(failures)  # what the next writes raise, one each

    def write(self, items: list[Item]) -> None:
        if not self.gate.is_set():
            self.stuck.set()
            if not self.gate.wait(GATE_TIMEOUT):
                raise TimeoutError("the test never opened the gate")
        if self._failures:
            raise self._failures.pop(0)
        self.items.extend(items)

    def close(self) -> None:
        self.closed = True


async def stuck_recorder(
    sink: GatedSink, delivered: list[Message], *, max_pending: int = 2
) -> BatchRecorder:
    """A recorder whose writer holds one message at the shut gate, its backlog empty."""
    recorder = BatchRecorder("test", lambda: sink, batch_size=1, max_pending=max_pending)
    await recorder.start()
    first = make_ticker(0.0)
    delivered.append(first)
    await recorder.on_message(first)
    await anyio.to_thread.run_sync(sink.stuck.wait, GATE_TIMEOUT)
    return recorder


def assert_balanced(recorder: BatchRecorder, sink: GatedSink, delivered: list[Message]) -> None:
    """After aclose: each delivered message was written or refused, in order, and counted."""
    stats = recorder.stats()
    assert stats["pending"] == 0
    assert stats["accepted"] + stats["refused"] == len(delivered)
    assert stats["accepted"] == stats["written"] + stats["lost"]
    assert [message for _at, message in sink.items] == delivered[: stats["written"]]


async def deliver(
    recorder: BatchRecorder,
    messages: list[Message],
    delivered: list[Message],
    *,
    task_status: TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Hand ``messages`` over as a delivery task does, until cancelled."""
    with anyio.CancelScope() as scope:
        task_status.started(scope)
        for message in messages:
            delivered.append(message)
            await recorder.on_message(message)


@pytest.mark.parametrize("steps", range(10))
def test_a_delivery_cancelled_at_any_await_of_on_message_loses_nothing(steps: int) -> None:
    # The backlog fills after two messages; the third waits for room that never comes
    # until the gate opens. The cancellation lands after `steps` turns of the event
    # loop: at each await of that wait in turn, then while it is parked.
    sink = GatedSink()
    delivered: list[Message] = []
    messages = [make_ticker(float(i)) for i in range(1, 10)]

    async def main() -> None:
        recorder = await stuck_recorder(sink, delivered)
        async with anyio.create_task_group() as tg:
            scope = await tg.start(deliver, recorder, messages, delivered)
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()
            scope.cancel()
        assert 3 <= len(delivered) < 1 + len(messages)  # stopped in the wait for room
        assert recorder.accepted == len(delivered)  # the one it was waiting with, too
        sink.gate.set()
        await recorder.aclose()
        assert_balanced(recorder, sink, delivered)
        assert recorder.refused == recorder.lost == 0

    anyio.run(main)


def test_a_delivery_cancelled_while_waiting_for_a_worker_thread_loses_nothing() -> None:
    # The wait for room runs in a worker thread; with every thread token taken, the
    # cancellation lands while on_message waits for one.
    sink = GatedSink()
    delivered: list[Message] = []
    messages = [make_ticker(float(i)) for i in range(1, 10)]

    async def main() -> None:
        recorder = await stuck_recorder(sink, delivered)
        limiter = anyio.to_thread.current_default_thread_limiter()
        borrowers = [object() for _ in range(int(limiter.total_tokens))]
        for borrower in borrowers:
            await limiter.acquire_on_behalf_of(borrower)
        try:
            async with anyio.create_task_group() as tg:
                scope = await tg.start(deliver, recorder, messages, delivered)
                await anyio.wait_all_tasks_blocked()
                assert limiter.statistics().tasks_waiting == 1
                scope.cancel()
        finally:
            for borrower in borrowers:
                limiter.release_on_behalf_of(borrower)
        assert recorder.accepted == len(delivered) == 3
        sink.gate.set()
        await recorder.aclose()
        assert_balanced(recorder, sink, delivered)

    anyio.run(main)


def test_cancelled_waiters_and_a_close_in_progress_lose_nothing() -> None:
    # Several deliveries wait for room; close begins; one is cancelled, one delivers
    # after closing began (refused, and counted). Then the writer goes on.
    sink = GatedSink()
    delivered: list[Message] = []

    async def main() -> None:
        recorder = await stuck_recorder(sink, delivered, max_pending=1)
        async with anyio.create_task_group() as tg:
            first = await tg.start(deliver, recorder, [make_ticker(1.0)], delivered)
            await tg.start(deliver, recorder, [make_ticker(2.0)], delivered)
            await anyio.wait_all_tasks_blocked()
            assert recorder.accepted == 3  # both wait, each with its message accepted
            tg.start_soon(recorder.aclose)
            await anyio.wait_all_tasks_blocked()
            first.cancel()
            late = [make_ticker(3.0)]
            await deliver(recorder, late, delivered)
            assert recorder.refused == 1
            sink.gate.set()  # the writer takes the second's message: it returns
        await recorder.aclose()  # a second close changes nothing
        assert sink.closed
        assert_balanced(recorder, sink, delivered)
        assert (recorder.accepted, recorder.written, recorder.refused) == (3, 3, 1)

    anyio.run(main)


class WriterDied(BaseException):
    """Not an Exception: it ends the writer thread instead of failing one batch."""


def test_a_writer_that_dies_releases_waiters_and_counts_the_rest_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = GatedSink(WriterDied())
    delivered: list[Message] = []
    messages = [make_ticker(float(i)) for i in range(1, 10)]

    async def main() -> None:
        recorder = await stuck_recorder(sink, delivered)
        async with anyio.create_task_group() as tg:
            await tg.start(deliver, recorder, messages, delivered)
            await anyio.wait_all_tasks_blocked()
            sink.gate.set()  # the write raises, the writer ends, the waiter returns
        await anyio.to_thread.run_sync(recorder.writer.join, GATE_TIMEOUT)
        assert not recorder.writer.is_alive()
        await recorder.aclose()
        assert_balanced(recorder, sink, delivered)
        # The three taken before it died are lost; the rest were refused, and counted.
        assert (recorder.accepted, recorder.written, recorder.lost) == (3, 0, 3)
        assert recorder.refused == len(messages) - 2

    anyio.run(main)
    assert "the writer thread failed" in caplog.text
    assert "3 accepted messages were never written" in caplog.text


def test_a_failed_write_is_counted_lost_and_the_writer_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = GatedSink(OSError("disk full"))
    sink.gate.set()
    delivered: list[Message] = []

    async def main() -> BatchRecorder:
        recorder = BatchRecorder("test", lambda: sink, batch_size=2, max_pending=2)
        await recorder.start()
        await deliver(recorder, [make_ticker(float(i)) for i in range(6)], delivered)
        await recorder.flush()
        await recorder.aclose()
        return recorder

    stats = anyio.run(main).stats()
    assert stats["accepted"] == len(delivered) == 6
    assert 1 <= stats["lost"] <= 2  # the first batch
    assert stats["accepted"] == stats["written"] + stats["lost"]
    assert stats["pending"] == stats["refused"] == 0
    assert [message for _at, message in sink.items] == delivered[stats["lost"] :]
    assert "they are lost" in caplog.text


def stored_rows(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db:
        present = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        return sum(
            db.execute(f'SELECT COUNT(*) FROM "{t.name}"').fetchone()[0]
            for t in TABLES
            if t.name in present
        )


# -- `upbus run`, stopped by SIGTERM mid-flood -----------------------------------------

RUNS, GROUPS = 20, 4  # GROUPS runs at a time, each group one after another
STEP_TIMEOUT = 30.0  # seconds any one wait for a subprocess may take
STORED = re.compile(r"stored (\d+) of (\d+) accepted messages")


class Lines:
    """A subprocess stream read to its end by a thread, so every wait on it is bounded."""

    def __init__(self, stream: IO[str]) -> None:
        self.all: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.all.append(line)
                self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, found: Callable[[str], bool], timeout: float = STEP_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if found(line):
                return line
        raise AssertionError(f"not seen within {timeout}s; the stream said: {self.all[-5:]}")

    def text(self) -> str:
        """Everything the stream said, once it has ended."""
        self._thread.join(STEP_TIMEOUT)
        return "".join(self.all)


@contextmanager
def running(args: list[str], **popen: Any) -> Iterator[tuple[subprocess.Popen[str], Lines, Lines]]:
    """The process, and its stdout and stderr; killed on the way out if still running."""
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = Lines(process.stdout), Lines(process.stderr)
    try:
        yield process, out, err
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(STEP_TIMEOUT)
        out.text()
        err.text()


def run_until_sigterm(url: str, folder: Path, after: int) -> tuple[int, int, int]:
    """``upbus run`` recording a flood, sent SIGTERM once ``after`` messages came in:
    (stored, accepted, rows in the file)."""
    db = folder / "upbus.db"
    args = [*UPBUS, "run", "--db", str(db), "--status-every", "0.05"]
    env = clean_environment(UPBUS_PUBLIC_URL=url)
    with running(args, cwd=folder, env=env) as (process, out, err):
        out.wait_for(lambda line: "recording into" in line)

        def came_in(line: str) -> bool:
            found = re.search(r"(\d+) messages", line)
            return found is not None and int(found.group(1)) >= after

        err.wait_for(came_in)
        process.send_signal(signal.SIGTERM)
        code = process.wait(STEP_TIMEOUT)
        printed = out.text()
        assert code == 0, (code, printed, err.text()[-2000:])
    stored = STORED.search(printed)
    assert stored is not None, printed
    return int(stored.group(1)), int(stored.group(2)), stored_rows(db)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_during_a_max_rate_flood_stores_every_accepted_message(tmp_path: Path) -> None:
    started = time.monotonic()
    with running([*UPBUS, "sim", "--rate", "max", "--port", "0"], env=clean_environment()) as (
        _sim,
        sim_out,
        _sim_err,
    ):
        url = sim_out.wait_for(lambda line: line.startswith("ws://")).strip()
        # Signals land at different depths of the flood, the store's backlog full or not.
        afters = [2_000 + 3_000 * (run % 10) for run in range(RUNS)]

        def group(first: int) -> list[tuple[int, int, int]]:
            results = []
            for run in range(first, RUNS, GROUPS):
                folder = tmp_path / f"run{run}"
                folder.mkdir()
                results.append(run_until_sigterm(url, folder, afters[run]))
            return results

        with ThreadPoolExecutor(GROUPS) as pool:
            results = [r for rs in pool.map(group, range(GROUPS)) for r in rs]
    took = time.monotonic() - started
    assert len(results) == RUNS
    good = [r for r in results if r[0] == r[1] == r[2] and r[1] > 0]
    assert len(good) == RUNS, (results, f"{took:.1f}s")
