"""StallWatch: notices an event loop that stopped turning, and says where it is stuck.

Plain ``def`` handlers run in threads of their own, but an ``async def`` handler (or
any code on the loop) that blocks without awaiting still stalls every component and
the connections' heartbeats. A daemon thread posts a callback to the loop every
``interval``; when one has waited ``threshold`` seconds to run, it logs one WARNING
with the code the loop is running (read from the loop thread's stack) and, if that
code is a component's method, which component. Nothing runs on the loop but those
callbacks: no task (which would keep ``wait_all_tasks_blocked`` from ever seeing
every task blocked) and nothing on the per-message path.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType

import anyio.lowlevel

__all__ = ("StallWatch",)

log = logging.getLogger("upbus.bus")


class StallWatch:
    """Watches the event loop this is started on.

    :param label_of: the label of a registered component, or ``None`` for any
        other object; used to name the component whose code blocks the loop.
    """

    def __init__(
        self,
        label_of: Callable[[object], str | None],
        *,
        threshold: float = 1.0,
        interval: float = 0.1,
    ) -> None:
        self.threshold = threshold
        self.interval = interval
        self.stalls = 0
        self._label_of = label_of
        self._loop_thread = threading.get_ident()
        self._answered = threading.Event()
        self._stopped = threading.Event()

    def start(self) -> None:
        """Watch the event loop this is called on, from a daemon thread, until :meth:`stop`."""
        self._loop_thread = threading.get_ident()
        self._stopped.clear()
        post = _poster(anyio.lowlevel.current_token())
        threading.Thread(
            target=self._watch, args=(post,), name="upbus stall watch", daemon=True
        ).start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self, post: Callable[[Callable[[], None]], object]) -> None:
        answered = self._answered
        while not self._stopped.is_set():
            answered.clear()
            sent = time.monotonic()
            try:
                post(answered.set)
            except RuntimeError:
                return  # the loop has closed
            if answered.wait(self.threshold) or self._stopped.is_set():
                self._stopped.wait(self.interval)
                continue
            self.stalls += 1
            self._report(time.monotonic() - sent)
            # One warning per stall: wait for the loop to turn (or the watch to end).
            while not answered.wait(self.interval) and not self._stopped.is_set():
                pass

    def _report(self, lag: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        where, component = self._where(frame)
        log.warning(
            "the event loop has not turned for %.1fs: it is running %s%s; every component "
            "and the heartbeats wait meanwhile (blocking code belongs in a plain "
            "`def on_message`, which runs in a thread of its own)",
            lag,
            where,
            f" in component {component}" if component else "",
        )

    def _where(self, frame: FrameType | None) -> tuple[str, str | None]:
        if frame is None:
            return "unknown code", None
        innermost = traceback.extract_stack(frame, limit=1)[-1]
        where = f"{innermost.name} ({innermost.filename}:{innermost.lineno})"
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is not None:
                label = self._label_of(owner)
                if label is not None:
                    return where, label
            frame = frame.f_back
        return where, None


def _poster(token: anyio.lowlevel.EventLoopToken) -> Callable[[Callable[[], None]], object]:
    # How a foreign thread schedules a plain callback on the loop, without waiting.
    native = token.native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        return native.call_soon_threadsafe
    return native.run_sync_soon  # type: ignore[attr-defined,no-any-return]  # trio
