"""The upbus hook specifications (pluggy project ``"upbus"``).

Plugin authors implement these with :data:`upbus.hookimpl` in a module (or class)
named by an entry point in the ``upbus`` group::

    [project.entry-points.upbus]
    my_plugin = "my_package.upbus_plugin"

Rules that hold for every hook:

- Hooks are called with keyword arguments. An implementation may accept a subset
  of the arguments; do not give its parameters default values.
- pluggy is synchronous. Hooks never return coroutines: long-lived async work
  lives in the objects a hook returns (a transport, a batcher, a component),
  which the bus runs in its own task group. Notification hooks (startup,
  shutdown) may return an awaitable; the bus awaits it.
- ``firstresult`` hooks pick one provider: the first non-``None`` answer wins.
  The defaults in :mod:`upbus.plugins` are registered ``trylast``, so any
  installed plugin that answers is asked first.
- Per-message work is never a hook call: the bus's own code runs per message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from upbus.core.sending._batcher import Batcher, RequestLimiter, RequestSink
    from upbus.core.sending._ratelimit import RollingWindowLimiter
    from upbus.core.subscriptions._manager import SubscriptionManager
    from upbus.core.subscriptions._merge import Merger
    from upbus.core.subscriptions._specs import Channel
    from upbus.core.subscriptions._state import MergedState
    from upbus.core.wire._transport import Transport
    from upbus.settings import Settings

__all__ = ("PROJECT", "UpbusHookSpecs", "hookimpl", "hookspec")

PROJECT = "upbus"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class UpbusHookSpecs:
    """Every hook upbus calls. Policy hooks first, then consumers, then lifecycle."""

    # -- policy: one provider each -------------------------------------------------------

    @hookspec(firstresult=True)
    def upbus_make_merger(self, channel: Channel, settings: Settings) -> Merger | None:
        """Make the object that merges wishes into wire entries for ``channel``.

        :param channel: public or private.
        :param settings: the effective settings.
        :returns: a :class:`~upbus.core.subscriptions._merge.Merger`, or ``None`` to let another
            plugin answer. Default: reference counting
            (:class:`~upbus.core.subscriptions._merge.RefCountMerger`).
        """

    @hookspec(firstresult=True)
    def upbus_make_batcher(
        self,
        channel: Channel,
        settings: Settings,
        manager: SubscriptionManager,
        sink: RequestSink,
        limiter: RequestLimiter,
        tracer: Tracer,
    ) -> Batcher | None:
        """Make the batcher that sends ``channel``'s merged state through ``sink``.

        :param channel: public or private.
        :param settings: the effective settings (``debounce``, ``rate_limit.max_wait``).
        :param manager: the subscription manager whose state is sent.
        :param sink: the connection the requests go to.
        :param limiter: the connection's request limiter.
        :param tracer: where its send spans go (the bus's tracer).
        :returns: a :class:`~upbus.core.sending._batcher.Batcher`, or ``None``. Default: one
            pending task per connection
            (:class:`~upbus.core.sending._batcher.PendingTaskBatcher`).
        """

    @hookspec(firstresult=True)
    def upbus_make_rate_limiter(
        self, kind: str, scope: str, settings: Settings
    ) -> RollingWindowLimiter | None:
        """Make a rate limiter.

        :param kind: ``"connect"`` (connection attempts of one scope, shared by
            every connection of the bus) or ``"message"`` (request messages of one connection).
        :param scope: what the limit counts: ``"ip"`` or ``"account:<id>"`` for
            connects, the connection's name for messages.
        :param settings: the effective settings (``rate_limit``).
        :returns: a limiter with ``wait``/``take``/``acquire``/``back_off``/``status``,
            or ``None``. Default: rolling windows per the exchange's documented limits.
        """

    @hookspec(firstresult=True)
    def upbus_make_transport(self, channel: Channel, settings: Settings) -> Transport | None:
        """Make the transport that opens ``channel``'s WebSocket connections.

        :returns: a :class:`~upbus.core.wire._transport.Transport`, or ``None``.
            Default: httpx + httpx-ws.
        """

    # -- consumers -----------------------------------------------------------------------

    @hookspec
    def upbus_components(self, settings: Settings) -> Sequence[tuple[object, Any]] | None:
        """Contribute components: ``(component, specs)`` pairs the bus registers at start.

        The plugin's own settings section is ``settings.plugins[<entry-point name>]``.
        A component is any weak-referenceable object; the bus keeps the components
        contributed here alive while it runs.
        """

    # -- lifecycle and observation -------------------------------------------------------

    @hookspec
    def upbus_startup(self, bus: Any) -> Awaitable[None] | None:
        """The bus has started; may return an awaitable, which the bus awaits."""

    @hookspec
    def upbus_shutdown(self, bus: Any) -> Awaitable[None] | None:
        """The bus is stopping; may return an awaitable, awaited before connections close."""

    @hookspec
    def upbus_connection_state(self, channel: Channel, state: str, detail: str) -> None:
        """A connection changed state: ``idle``, ``connecting``, ``connected``, ``gap``,
        ``backoff``, ``reconnected`` or ``closed``. Called on the event loop; keep it quick."""

    @hookspec
    def upbus_request_sent(self, channel: Channel, state: MergedState, size: int) -> None:
        """A request frame installing ``state`` went out (``size`` bytes)."""
