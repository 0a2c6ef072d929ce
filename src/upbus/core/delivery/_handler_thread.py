"""HandlerThread: runs one component's plain ``def`` handlers off the event loop.

A plain handler may block (a ``time.sleep``, a synchronous HTTP call, a slow
disk). On the event loop that would stall every other component and the
connections' heartbeats; in a thread of its own it only delays its own component.

The thread is a daemon: a handler that never returns cannot keep the process
from exiting after the bus has stopped (the bus warns about it at shutdown).
anyio's worker threads are not daemons, which is why this is not
``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

import anyio
import anyio.from_thread
import anyio.lowlevel

__all__ = ("HandlerThread",)

_Job = tuple[Callable[[], None], anyio.Event, anyio.lowlevel.EventLoopToken]


class HandlerThread:
    """A daemon thread that runs submitted calls one at a time, in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def run(self, call: Callable[[], None]) -> None:
        """Run ``call`` in the thread and wait for it to return.

        ``call`` must not raise (the bus catches a handler's errors inside it).
        Cancelling the wait leaves ``call`` running to its end in the thread.
        """
        done = anyio.Event()
        self._jobs.put((call, done, anyio.lowlevel.current_token()))
        await done.wait()

    def stop(self) -> None:
        """Let the thread end after the calls already submitted."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            call, done, token = job
            try:
                call()
            finally:
                # RuntimeError: the event loop has ended; nobody waits any more.
                with contextlib.suppress(RuntimeError):
                    anyio.from_thread.run_sync(done.set, token=token)
