"""Delivery: feeding callback components from their buffers, and saying what went wrong.

A component with ``on_message`` gets a task of its own that takes from its buffer
and calls it: one at a time for ``async def on_message`` (after an ``await`` it
sees the newest message of a conflated key), everything buffered at once for a
plain ``def``, which runs in a thread of the component's own
(:class:`~upbus.core.delivery._handler_thread.HandlerThread`), so that a handler that blocks
delays only its own component. The task starts with the first item that reaches an
idle buffer and ends after a sweep interval without work.

Events (:class:`~upbus.BusEvent`) go to ``on_event(event)`` if the component has
it, else connection events go to ``on_connection_state(event)``.

What goes wrong is reported without flooding the log: a handler's first few
failures with their tracebacks, then one line per interval with a count; a
component whose buffer drops messages or falls behind gets one WARNING per
interval; a component still busy when the shutdown drain limit runs out is named.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskGroup

from upbus.core.delivery._buffer import Item, Subscriber
from upbus.core.delivery._events import BusEvent, ConnectionEvent
from upbus.core.delivery._handler_thread import HandlerThread

__all__ = ("Delivery",)

log = logging.getLogger("upbus.bus")

# A failing handler's first failures are logged with a traceback; after that, one
# line per REPORT_INTERVAL counts the rest.
TRACEBACKS = 3
# At most one warning per component and kind of trouble in this many seconds.
REPORT_INTERVAL = 10.0

# An async handler that never awaits gives the loop a turn this often.
_YIELD_EVERY = 64

_Handler = Callable[[Any], object]


@dataclass(slots=True)
class _Batch:
    """Items a handler thread works through; ``stopped`` makes it stop between two."""

    items: list[Item]
    done: int = 0  # items started
    stopped: bool = False


@dataclass(slots=True)
class _Failures:
    """A component's handler failures not yet reported."""

    count: int = 0
    last: str = ""
    since: float = 0.0


@dataclass(slots=True)
class _Reported:
    """When the last warning of each kind went out for a component."""

    loss: float = -REPORT_INTERVAL
    backlog: float = -REPORT_INTERVAL
    overflowed: int = 0


class Delivery:
    """Runs the delivery task of every callback component in a task group.

    :param drain: seconds that components get at shutdown to take what their
        buffers hold, before their tasks are cancelled.
    """

    def __init__(self, drain: float = 10.0) -> None:
        self.drain = drain
        self._group: TaskGroup | None = None
        self._stopping = False
        # Subscribers whose delivery task runs -> their delivered count at the last sweep
        self._driven: dict[Subscriber, int] = {}
        self._failures: dict[Subscriber, _Failures] = {}
        self._reported: dict[Subscriber, _Reported] = {}

    @property
    def tasks(self) -> int:
        """How many delivery tasks run now."""
        return len(self._driven)

    def open(self, group: TaskGroup) -> None:
        """Start delivering in ``group`` (the bus's delivery task group)."""
        self._group = group
        self._stopping = False

    def stop(self, subscribers: Iterable[Subscriber]) -> None:
        """Shutdown: close every buffer and give the tasks ``drain`` seconds to empty them."""
        self._stopping = True
        for subscriber in subscribers:
            subscriber.close()
        if self._group is not None:
            self._group.cancel_scope.deadline = anyio.current_time() + self.drain
            self._group.cancel_scope.shield = True

    def closed(self) -> None:
        """The task group has ended: nothing more is delivered."""
        self._group = None

    def start(self, subscriber: Subscriber) -> None:
        """Start ``subscriber``'s delivery task (its ``starter`` while it has none)."""
        if self._group is None:
            return  # stopped: nothing more is delivered
        self._driven[subscriber] = subscriber.delivered
        self._group.start_soon(self._drive, subscriber, name=f"upbus deliver {subscriber.label}")

    def forget(self, subscriber: Subscriber) -> None:
        """``subscriber`` is gone: drop what was kept for its reports."""
        self._failures.pop(subscriber, None)
        self._reported.pop(subscriber, None)

    # -- the delivery task -----------------------------------------------------------

    async def _drive(self, subscriber: Subscriber) -> None:
        """Call the component's handlers for what its buffer holds, until it goes idle."""
        thread: HandlerThread | None = None
        batch: _Batch | None = None  # what the handler thread works through now
        try:
            while True:
                component = _owner(subscriber)
                if component is None:
                    return
                on_message = component.on_message
                on_event = _event_handler(component)
                del component  # held only while there is work, not while parked
                if inspect.iscoroutinefunction(on_message):
                    taken = 0
                    while (item := subscriber.take()) is not None:
                        await self._call(subscriber, item, on_message, on_event)
                        taken += 1
                        if not taken % _YIELD_EVERY:
                            # A handler that never awaits must still let others run.
                            await anyio.lowlevel.checkpoint()
                else:
                    if thread is None:
                        thread = HandlerThread(f"upbus handler {subscriber.label}")
                    token = anyio.lowlevel.current_token()
                    while items := subscriber.take_all():
                        batch = _Batch(items)
                        await thread.run(
                            partial(
                                self._call_plain, subscriber, batch, on_message, on_event, token
                            )
                        )
                        batch = None
                del on_message, on_event
                if subscriber.closed:
                    return
                await subscriber.wait()
                if subscriber not in self._driven:
                    # Dismissed by the sweep while idle; end unless work came meanwhile.
                    if not len(subscriber):
                        return
                    self._driven[subscriber] = subscriber.delivered
        except anyio.get_cancelled_exc_class():
            left = len(subscriber)
            if batch is not None:
                # The thread finishes the call it is in, and takes no further item.
                batch.stopped = True
                left += len(batch.items) - batch.done
            if self._stopping:
                log.warning(
                    "component %s was still handling messages when the shutdown drain "
                    "limit (%gs) ran out; %d item(s) were not handled",
                    subscriber.label,
                    self.drain,
                    left,
                )
            raise
        finally:
            if thread is not None:
                thread.stop()
            self._driven.pop(subscriber, None)
            if not subscriber.closed:
                subscriber.starter = self.start

    async def _call(
        self,
        subscriber: Subscriber,
        item: Item,
        on_message: Callable[[Any], Awaitable[object]],
        on_event: Callable[[BusEvent], object] | None,
    ) -> None:
        try:
            if isinstance(item, BusEvent):
                if on_event is not None and _wants(on_event, item):
                    result = on_event(item)
                    if inspect.isawaitable(result):
                        await result
            else:
                await on_message(item)
        except Exception:
            self._failed(subscriber, item)

    def _call_plain(
        self,
        subscriber: Subscriber,
        batch: _Batch,
        on_message: _Handler,
        on_event: Callable[[BusEvent], object] | None,
        token: anyio.lowlevel.EventLoopToken,
    ) -> None:
        # In the component's own thread.
        for item in batch.items:
            if batch.stopped:
                return
            batch.done += 1
            try:
                if isinstance(item, BusEvent):
                    if on_event is None or not _wants(on_event, item):
                        continue
                    result = on_event(item)
                else:
                    result = on_message(item)
                if result is not None and inspect.isawaitable(result):
                    # A plain function that returned an awaitable: run it on the loop.
                    anyio.from_thread.run(_await, result, token=token)
            except Exception:
                self._failed(subscriber, item)

    def _failed(self, subscriber: Subscriber, item: Item) -> None:
        # Called inside an except block, on the loop or in the component's thread.
        subscriber.failures += 1
        if subscriber.failures <= TRACEBACKS:
            log.exception(
                "component %s failed handling %s%s",
                subscriber.label,
                getattr(item, "type", "an item"),
                "; further failures are counted and reported every "
                f"{REPORT_INTERVAL:g}s without tracebacks"
                if subscriber.failures == TRACEBACKS
                else "",
            )
            return
        failures = self._failures.get(subscriber)
        if failures is None:
            failures = self._failures[subscriber] = _Failures(since=time.monotonic())
        failures.count += 1
        error = sys.exc_info()[1]
        failures.last = f"{type(error).__name__}: {error}"

    # -- the sweep -------------------------------------------------------------------

    def dismiss_idle(self) -> None:
        """End the tasks that delivered nothing since the last sweep; the next item restarts."""
        driven = self._driven
        for subscriber, seen in list(driven.items()):
            if subscriber.delivered == seen and subscriber.waiting:
                del driven[subscriber]
                subscriber.wake()
            else:
                driven[subscriber] = subscriber.delivered

    def report(self, subscribers: Iterable[Subscriber], now: float | None = None) -> None:
        """Log, at most once per interval and component, failures, drops and backlogs."""
        now = time.monotonic() if now is None else now
        for subscriber, failures in list(self._failures.items()):
            if failures.count and now - failures.since >= REPORT_INTERVAL:
                del self._failures[subscriber]
                log.warning(
                    "component %s failed %d more time(s) in the last %.0fs; last error: %s",
                    subscriber.label,
                    failures.count,
                    now - failures.since,
                    failures.last,
                )
        for subscriber in subscribers:
            if subscriber.dropped or subscriber.overflowed:
                self._report_buffer(subscriber, now)

    def _report_buffer(self, subscriber: Subscriber, now: float) -> None:
        reported = self._reported.get(subscriber)
        if reported is None:
            reported = self._reported[subscriber] = _Reported()
        if now - reported.loss >= REPORT_INTERVAL:
            lost = subscriber.take_unreported()
            if lost:
                reported.loss = now
                keys = ", ".join(
                    f"{kind} {code or '*'}: {count}"
                    for (kind, code), count in sorted(lost.items(), key=_by_count)[:5]
                )
                log.warning(
                    "component %s fell behind and its %s buffer (capacity %d) dropped "
                    "%d message(s) (%s%s); it is told so by a Dropped event in its stream",
                    subscriber.label,
                    subscriber.policy,
                    subscriber.capacity,
                    sum(lost.values()),
                    keys,
                    ", ..." if len(lost) > 5 else "",
                )
        if (
            subscriber.overflowed != reported.overflowed
            and now - reported.backlog >= REPORT_INTERVAL
        ):
            reported.backlog = now
            reported.overflowed = subscriber.overflowed
            log.warning(
                "component %s falls behind: %d item(s) buffered, above its capacity of "
                "%d; nothing is dropped (%s policy), but its backlog grows",
                subscriber.label,
                len(subscriber),
                subscriber.capacity,
                subscriber.policy,
            )


def _event_handler(component: object) -> Callable[[BusEvent], object] | None:
    on_event = getattr(component, "on_event", None)
    if callable(on_event):
        return on_event  # type: ignore[no-any-return]
    on_state = getattr(component, "on_connection_state", None)
    if callable(on_state):
        return _ConnectionOnly(on_state)
    return None


class _ConnectionOnly:
    """``on_connection_state``: takes connection events only."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[ConnectionEvent], object]) -> None:
        self.handler = handler

    def __call__(self, event: BusEvent) -> object:
        return self.handler(event)  # type: ignore[arg-type]


def _wants(on_event: Callable[[BusEvent], object], event: BusEvent) -> bool:
    return type(event) is ConnectionEvent or not isinstance(on_event, _ConnectionOnly)


def _owner(subscriber: Subscriber) -> Any:
    owner = subscriber.owner
    return None if owner is None else owner()


def _by_count(entry: tuple[tuple[str, str | None], int]) -> int:
    return -entry[1]


async def _await(awaitable: Awaitable[object]) -> None:
    await awaitable
