"""BlockingBus: the bus for code outside the event loop (a GUI, a notebook, a thread).

The bus runs in an event loop thread of its own (anyio's blocking portal); these
methods are safe to call from any other thread::

    with upbus.BlockingBus() as bus:
        subscriber = bus.register_component(window, [upbus.ticker("KRW-BTC")])
        for message in bus.iterate(subscriber, limit=10):
            window.show(message)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from types import TracebackType
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from upbus.core._bus import Bus
from upbus.core._errors import BusNotRunning
from upbus.core.delivery._buffer import Item, Overflow, Subscriber
from upbus.core.subscriptions._manager import SpecsArg

__all__ = ("BlockingBus",)

T = TypeVar("T")


class BlockingBus(AbstractContextManager["BlockingBus"]):
    """A :class:`Bus` running in a background event loop, driven from synchronous code.

    Arguments are those of :class:`Bus`. Components registered here are called as
    on a :class:`Bus`: an ``async def on_message`` in the bus's loop thread, a plain
    ``def on_message`` in a thread of the component's own. To receive in your own
    thread, iterate the returned :class:`Subscriber` with :meth:`iterate`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs
        self._stack = ExitStack()
        self._portal: BlockingPortal | None = None
        self._bus: Bus | None = None

    def __enter__(self) -> BlockingBus:
        portal = self._stack.enter_context(start_blocking_portal())
        try:
            bus = portal.call(lambda: Bus(*self._args, **self._kwargs))
            self._bus = self._stack.enter_context(portal.wrap_async_context_manager(bus))
        except BaseException:
            self._stack.close()
            raise
        self._portal = portal
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._portal = None
        self._bus = None
        self._stack.close()

    @property
    def bus(self) -> Bus:
        """The underlying bus; call its methods through :meth:`call`, not directly."""
        if self._bus is None:
            raise BusNotRunning("the bus is not running: use `with BlockingBus() as bus:`")
        return self._bus

    def _call_portal(self) -> BlockingPortal:
        if self._portal is None:
            raise BusNotRunning("the bus is not running: use `with BlockingBus() as bus:`")
        return self._portal

    def call(self, func: Callable[..., T], *args: Any) -> T:
        """Run a synchronous ``func(*args)`` in the bus's loop thread and return its result."""
        return self._call_portal().call(func, *args)

    def get_subscription_stats(self) -> dict[str, Any]:
        """:meth:`Bus.get_subscription_stats`, from any thread."""
        return self.call(self.bus.get_subscription_stats)

    def get_connection_metrics(self) -> dict[str, Any]:
        """:meth:`Bus.get_connection_metrics`, from any thread."""
        return self.call(self.bus.get_connection_metrics)

    def get_rate_limiter_status(self) -> dict[str, Any]:
        """:meth:`Bus.get_rate_limiter_status`, from any thread."""
        return self.call(self.bus.get_rate_limiter_status)

    def get_pending_task_status(self) -> dict[str, Any]:
        """:meth:`Bus.get_pending_task_status`, from any thread."""
        return self.call(self.bus.get_pending_task_status)

    def register_component(
        self,
        component: object,
        specs: SpecsArg,
        *,
        overflow: Overflow | None = None,
        capacity: int | None = None,
    ) -> Subscriber:
        """:meth:`Bus.register_component`, from any thread."""
        bus = self.bus

        async def register() -> Subscriber:
            return await bus.register_component(
                component, specs, overflow=overflow, capacity=capacity
            )

        return self._call_portal().call(register)

    def unregister_component(self, component: object) -> bool:
        """:meth:`Bus.unregister_component`, from any thread."""
        return self._call_portal().call(self.bus.unregister_component, component)

    def iterate(
        self, subscriber: Subscriber, *, limit: int | None = None, timeout: float | None = None
    ) -> Iterator[Item]:
        """Yield the subscriber's messages in this thread, ``limit`` at most.

        ``timeout`` bounds each wait (``TimeoutError`` when it passes).
        """
        portal = self._call_portal()

        async def next_item() -> Item:
            with anyio.fail_after(timeout):
                return await subscriber.get()

        count = 0
        while limit is None or count < limit:
            try:
                yield portal.call(next_item)
            except anyio.EndOfStream:
                return
            count += 1
