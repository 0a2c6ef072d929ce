"""Bus: the one object users start.

It loads settings and plugins, owns the task group, the registry of components
(shared by the SubscriptionManager and the delivery), a batcher and a
WebSocketManager per channel, the rate limiters and the router, and exposes the
debug entry points the original design names (``get_subscription_stats()`` and
the others). It runs as an async context manager::

    async with upbus.Bus() as bus:
        await bus.register_component(chart, [upbus.ticker("KRW-BTC")])
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import anyio
from anyio import AsyncContextManagerMixin
from anyio.abc import TaskGroup
from opentelemetry.trace import TracerProvider

from upbus.core._errors import BusNotRunning, ConfigError, OptionError, UpbusError
from upbus.core._registry import Entry, Registry
from upbus.core._telemetry import get_tracer
from upbus.core.connection._manager import WebSocketManager
from upbus.core.delivery._buffer import (
    DEFAULT_CAPACITY,
    DEFAULT_OVERFLOW,
    Overflow,
    Subscriber,
    check_overflow,
)
from upbus.core.delivery._events import ConnectionEvent, Rejected
from upbus.core.delivery._router import Router
from upbus.core.delivery._scheduler import Delivery
from upbus.core.delivery._stall_watch import StallWatch
from upbus.core.hooks._hookspecs import ConnectionState, FrameTap
from upbus.core.hooks._manager import PluginManager
from upbus.core.sending._batcher import Batcher
from upbus.core.sending._ratelimit import RateLimiter
from upbus.core.subscriptions._manager import SpecsArg, SubscriptionManager
from upbus.core.subscriptions._specs import (
    PRIVATE_TYPES,
    PUBLIC_TYPES,
    Channel,
    Spec,
    Wish,
    parse_specs,
)
from upbus.core.subscriptions._state import StateChange
from upbus.core.wire._auth import account_digest, bearer_headers
from upbus.core.wire._messages import Message
from upbus.core.wire._transport import Transport
from upbus.settings import Settings, load_settings
from upbus.settings.sources import mask_credentials

__all__ = ("Bus",)

log = logging.getLogger("upbus.bus")

_CHANNEL_TYPES = {Channel.PUBLIC: PUBLIC_TYPES, Channel.PRIVATE: PRIVATE_TYPES}
# Dead components are noticed at every operation; this sweep is the safety net
# for a bus nobody touches after a component goes away. It also ends idle
# delivery tasks and writes the rate-limited reports of trouble.
SWEEP_INTERVAL = 1.0


class Bus(AsyncContextManagerMixin):
    """Merges every component's subscriptions and delivers each message to those that asked.

    :param settings: the settings; by default loaded from env and TOML
        (:func:`upbus.load_settings`), with ``overrides`` applied on top.
    :param plugin_manager: a plugin manager; by default loaded from entry points.
    :param tracer_provider: where spans go; the global provider by default.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        plugin_manager: PluginManager | None = None,
        tracer_provider: TracerProvider | None = None,
        **overrides: Any,
    ) -> None:
        if settings is not None and overrides:
            raise OptionError("pass either settings or keyword overrides, not both")
        self.settings = settings if settings is not None else load_settings(**overrides)
        self.plugins = (
            plugin_manager if plugin_manager is not None else PluginManager.load(self.settings)
        )
        self._tracer = get_tracer(tracer_provider)
        # One registry for the subscriptions and the delivery: each entry holds a
        # component's wishes and its Subscriber.
        self._registry = Registry()
        self.subscriptions = SubscriptionManager(
            lambda channel: self.plugins.make_merger(channel, self.settings),
            tracer=self._tracer,
            registry=self._registry,
        )
        self._registry.add_listener(self._left)
        self.router = Router()
        self._delivery = Delivery(self.settings.shutdown_drain)
        self.stall_watch = StallWatch(self._registry.label_of)
        # "new", then "running", then "closed": a bus runs once.
        self._phase = "new"
        self._connect_limiters: dict[str, RateLimiter] = {}
        self._managers: dict[Channel, WebSocketManager] = {}
        self._batchers: dict[Channel, Batcher] = {}
        self._task_group: TaskGroup | None = None
        self._transports: dict[Channel, Transport] = {}
        self._plugin_components: list[object] = []

    # -- lifecycle -----------------------------------------------------------------------

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        if self._phase != "new":
            # Its listeners, batchers and buffers belong to the first run.
            raise BusNotRunning(f"this Bus has {self._phase}: a Bus runs once, make a new one")
        self._phase = "running"
        # Made before any task group, so a configuration error is a plain exception.
        transports = {ch: self.plugins.make_transport(ch, self.settings) for ch in Channel}
        self._transports = transports
        # An error in the body of `async with Bus()` reaches the caller as itself,
        # not wrapped in the exception groups of the bus's task groups.
        body_error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._sweep, name="upbus garbage sweep")
                self.stall_watch.start()
                try:
                    async with anyio.create_task_group() as delivery:
                        self._delivery.open(delivery)
                        try:
                            async with anyio.create_task_group() as connections:
                                for channel, transport in transports.items():
                                    self._start_channel(channel, transport, tg, connections)
                                await self._start_plugins()
                                try:
                                    yield self
                                except Exception as exc:
                                    body_error = exc
                                finally:
                                    # Shutdown, step 1: stop receiving.
                                    connections.cancel_scope.cancel()
                        finally:
                            # Step 2 (on every exit, cancellation included): let every
                            # component take what its buffer holds, lossless buffers
                            # included, bounded so a stuck component cannot hang exit.
                            self._phase = "closed"
                            self._delivery.stop(self._subscribers())
                finally:
                    # Step 3: plugins flush what they accepted (storage); then the rest stops.
                    with anyio.CancelScope(shield=True):
                        for awaitable in self.plugins.shutdown(self):
                            await awaitable
                    tg.cancel_scope.cancel()
        finally:
            self.stall_watch.stop()
            self._phase = "closed"
            self._task_group = None
            self._delivery.closed()
            for transport in transports.values():
                with anyio.move_on_after(5, shield=True):
                    await transport.aclose()
        if body_error is not None:
            raise body_error

    async def _start_plugins(self) -> None:
        for awaitable in self.plugins.startup(self):
            await awaitable
        for component, specs in self.plugins.components(self, self.settings):
            try:
                await self.register_component(component, specs)
            except UpbusError as exc:
                # One plugin's bad specs must not keep the bus from starting.
                log.error("a plugin's component %r was not registered: %s", component, exc)
                continue
            self._plugin_components.append(component)

    def _start_channel(
        self, channel: Channel, transport: Transport, tg: TaskGroup, connections: TaskGroup
    ) -> None:
        settings = self.settings
        if channel is Channel.PUBLIC:
            url, scope, headers = settings.public_url, "ip", _no_headers
        else:
            url, scope, headers = settings.private_url, self._account_scope(), self._private_headers
        if settings.upstream == "gateway" and settings.nats_url is not None:
            # A remote bus's connections go to the gateways: logs and metrics say so.
            url = f"the gateways on {mask_credentials(settings.nats_url)}"
        connect_limiter = self._connect_limiters.get(scope)
        if connect_limiter is None:
            connect_limiter = self.plugins.make_rate_limiter("connect", scope, settings)
            self._connect_limiters[scope] = connect_limiter
        manager = WebSocketManager(
            channel,
            url=url,
            transport=transport,
            subscriptions=self.subscriptions,
            connect_limiter=connect_limiter,
            make_message_limiter=lambda name: self.plugins.make_rate_limiter(
                "message", name, settings
            ),
            deliver=self.router.deliver,
            backpressure=self.router.backpressure,
            on_state=lambda state, detail: self._connection_state(channel, state, detail),
            on_sent=lambda state, size: self.plugins.request_sent(channel, state, size),
            on_rejected=lambda rejected, detail: self._rejected(channel, rejected, detail),
            headers=headers,
            fmt=settings.format,
            heartbeat_interval=settings.heartbeat_interval,
            heartbeat_timeout=settings.heartbeat_timeout,
            text_ping=settings.text_ping,
            verify_subscriptions=settings.verify_subscriptions,
            verify_delay=settings.verify_delay,
            reconnect_initial=settings.reconnect.initial,
            reconnect_max=settings.reconnect.maximum,
            reconnect_multiplier=settings.reconnect.multiplier,
            max_attempts=settings.reconnect.max_attempts,
            tap=_one_tap(self.plugins.frame_taps(channel, settings)),
        )
        # The batcher sends through the current connection and its message budget,
        # and hears from the sink when a connection needs the whole latest state.
        batcher = self.plugins.make_batcher(
            channel, settings, self.subscriptions, manager.sink, manager.budget, self._tracer
        )
        manager.sink.add_resync_listener(batcher.resend)

        def notify(change: StateChange) -> None:
            if change.channel is channel:
                batcher.notify(change)

        self.subscriptions.add_listener(notify)
        self._managers[channel] = manager
        self._batchers[channel] = batcher
        batcher.start(tg)
        connections.start_soon(manager.run, name=f"upbus {channel.value} connection")

    def _account_scope(self) -> str:
        key = self.settings.access_key
        if key is None:
            return "account:none"
        # The scope names the account in logs and status without revealing the key.
        return f"account:{account_digest(key)}"

    def _private_headers(self) -> Mapping[str, str]:
        access, secret = self.settings.access_key, self.settings.secret_key
        if access is None or secret is None:
            return {}
        return bearer_headers(access, secret, self.settings.jwt_algorithm)

    def _connection_state(self, channel: Channel, state: ConnectionState, detail: str) -> None:
        if state in ("connected", "gap", "reconnected"):
            self.router.broadcast(
                _CHANNEL_TYPES[channel], ConnectionEvent(channel.value, state, detail)
            )
        self.plugins.connection_state(channel, state, detail)

    def _rejected(
        self, channel: Channel, rejected: list[tuple[object, tuple[Wish, ...]]], detail: str
    ) -> None:
        # The manager has logged the decision; each owner hears it in its stream.
        for component, wishes in rejected:
            entry = self._registry.get(component)
            if entry is not None and entry.subscriber is not None:
                entry.subscriber.put(Rejected(channel.value, wishes, detail))

    async def _sweep(self) -> None:
        while True:
            await anyio.sleep(SWEEP_INTERVAL)
            # Only the components whose weakref callbacks fired: no scan of the live ones.
            self.subscriptions.collect_garbage()
            # Idle components then cost no task at all.
            self._delivery.dismiss_idle()
            self._delivery.report(self._subscribers())

    def _subscribers(self) -> Iterator[Subscriber]:
        for entry in self._registry:
            if entry.subscriber is not None:
                yield entry.subscriber

    # -- the API of the original design ---------------------------------------------------

    async def register_component(
        self,
        component: object,
        specs: SpecsArg,
        *,
        overflow: Overflow | None = None,
        capacity: int | None = None,
    ) -> Subscriber:
        """Subscribe ``component`` to ``specs`` (replacing what it had) and return its buffer.

        If the component has ``on_message(message)``, the bus calls it for every
        message: an ``async def`` one on the event loop, one message at a time; a
        plain ``def`` one in a thread of the component's own, with everything
        buffered at each wakeup, so that a handler that blocks delays only its own
        component. Events (:class:`BusEvent`) go to ``on_event(event)`` if defined,
        else connection events go to ``on_connection_state(event)``. Otherwise
        iterate the returned :class:`Subscriber`: ``async for item in subscriber``
        (events come in the same stream, in order with the data).

        ``overflow`` says what happens when the component falls behind, and
        ``capacity`` bounds its buffer (default 4096):

        - ``"auto"`` (the default) decides by type: ``ticker``, ``orderbook`` and
          ``candle.*`` conflate (the newest message per (type, code) wins);
          ``trade`` is never conflated: past ``capacity`` the oldest trades are
          dropped and a :class:`Dropped` event in the stream says how many of
          which keys; ``myOrder`` and ``myAsset`` are never dropped.
        - ``"conflate"``: the newest message per (type, code), for every type.
        - ``"drop_oldest"``: the newest ``capacity`` items, losses reported with
          :class:`Dropped` events.
        - ``"block"``: lossless, with backpressure on the channel (recorders).

        Every loss also gives one WARNING per component per 10 s. A component can
        declare its own defaults as attributes ``upbus_overflow`` and
        ``upbus_capacity``. Bad specs or options raise before anything changes.
        """
        policy: Overflow = (
            overflow
            if overflow is not None
            else getattr(component, "upbus_overflow", DEFAULT_OVERFLOW)
        )
        size: int = (
            capacity
            if capacity is not None
            else getattr(component, "upbus_capacity", DEFAULT_CAPACITY)
        )
        check_overflow(size, policy)
        parsed = tuple(parse_specs(specs))
        self._check_private(parsed)
        callback = callable(getattr(component, "on_message", None))
        if self._phase == "closed":
            raise BusNotRunning(
                f"the bus has stopped: {type(component).__name__} was not registered"
            )
        if callback and self._phase == "new":
            raise BusNotRunning(
                "the bus is not running: use it as `async with Bus() as bus:` "
                "before registering a component with on_message"
            )
        # Collects the dead first; raises ComponentError before anything changes.
        entry = self.subscriptions.register(component, parsed)
        subscriber = entry.subscriber
        if subscriber is None:
            subscriber = Subscriber(entry.label, size, policy)
            # A callback component's delivery task starts with its first message.
            entry.attach(subscriber, self._delivery.start if callback else None)
        elif overflow is not None or capacity is not None:
            subscriber.configure(size, policy)
        public, private = entry.wishes  # the manager's Wish objects, not a second set
        self.router.add(subscriber, public + private)
        return subscriber

    async def unregister_component(self, component: object) -> bool:
        """Remove ``component``'s subscriptions; return whether it was registered."""
        return self.subscriptions.unregister_component(component)

    def _left(self, entry: Entry, reason: str) -> None:
        # A registry listener: the component unregistered or was garbage-collected.
        subscriber = entry.detach()
        if subscriber is None:
            return
        self.router.remove(subscriber)
        self._delivery.forget(subscriber)
        subscriber.close()

    def _check_private(self, specs: tuple[Spec, ...]) -> None:
        private = [spec.type for spec in specs if spec.channel is Channel.PRIVATE]
        if private and self.settings.upstream == "gateway":
            # A remote bus reads its account's subjects; the gateway holds the keys.
            if self.settings.nats.account is None and self.settings.access_key is None:
                raise ConfigError(
                    f"{private[0]} through a gateway needs the account: set nats.account "
                    "(UPBUS_NATS__ACCOUNT) or the access key"
                )
            return
        if private and (self.settings.access_key is None or self.settings.secret_key is None):
            raise ConfigError(
                f"{private[0]} needs API keys: set access_key and secret_key "
                "(UPBUS_ACCESS_KEY and UPBUS_SECRET_KEY)"
            )

    # -- debug entry points ---------------------------------------------------------------

    def get_subscription_stats(self) -> dict[str, Any]:
        """Live components, merged entries and codes per channel, and per-subscriber buffers."""
        stats = self.subscriptions.get_subscription_stats()
        stats["subscribers"] = [subscriber.stats() for subscriber in self._subscribers()]
        # Delivery tasks run only for components with work lately (ended when idle).
        stats["delivery_tasks"] = self._delivery.tasks
        stats["router"] = self.router.stats()
        return stats

    def get_connection_metrics(self) -> dict[str, Any]:
        """Per channel: state, connects, frames and bytes, messages by type, errors, ping RTT.

        A transport that reports a status of its own (a remote bus's: which gateway
        leads, or that none does) adds it as ``upstream``.
        """
        metrics = {}
        for channel, manager in self._managers.items():
            metrics[channel.value] = found = manager.get_connection_metrics()
            status = getattr(self._transports.get(channel), "status", None)
            if callable(status):
                found["upstream"] = status()
        return metrics

    def get_rate_limiter_status(self) -> dict[str, Any]:
        """The connect limiter of each scope and each connection's message limiter."""
        return {
            "connect": {scope: lim.status() for scope, lim in self._connect_limiters.items()},
            "message": {
                ch.value: manager.budget.status() for ch, manager in self._managers.items()
            },
        }

    def get_pending_task_status(self) -> dict[str, Any]:
        """Per channel: whether a send task is pending, its phase, and its counters."""
        return {ch.value: batcher.status() for ch, batcher in self._batchers.items()}


def _no_headers() -> Mapping[str, str]:
    return {}


def _one_tap(taps: list[FrameTap]) -> FrameTap | None:
    # No tap, the common case, costs the receive loop one `is None` test per read.
    if not taps:
        return None
    if len(taps) == 1:
        return taps[0]

    def every(frames: Sequence[bytes | str], messages: list[Message]) -> None:
        for tap in taps:
            tap(frames, messages)

    return every
