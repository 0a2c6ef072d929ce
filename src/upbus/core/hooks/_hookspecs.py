"""The upbus hook specifications (pluggy project ``"upbus"``).

Plugin authors implement these with :data:`upbus.plugin.hookimpl` in a module (or
class) named by an entry point in the ``upbus`` group::

    [project.entry-points.upbus]
    my_plugin = "my_package.upbus_plugin"

Rules that hold for every hook:

- Hooks are called with keyword arguments. An implementation may accept a subset
  of the arguments; do not give its parameters default values.
- pluggy is synchronous. Hooks never return coroutines: long-lived async work
  lives in the objects a hook returns (a transport, a batcher, a component),
  which the bus runs in its own task group. Lifecycle hooks (startup, shutdown)
  may return an awaitable; the bus awaits it.
- ``firstresult`` hooks pick one provider: the first non-``None`` answer wins.
  The defaults in :mod:`upbus.plugins` are registered ``trylast``, so any
  installed plugin that answers is asked first.
- Per-message work is never a hook call: the bus's own code runs per message.

Each spec carries its kind (:data:`HookKind`) in its own marker, set by
:func:`_spec`; the plugin manager and the documentation test read it from there
(:data:`HOOKS`), so a hook's kind is written once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pluggy

from upbus.core.sending._ratelimit import RateLimiter

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from upbus.core._bus import Bus
    from upbus.core.sending._batcher import Batcher, RequestLimiter, RequestSink
    from upbus.core.subscriptions._manager import SubscriptionManager
    from upbus.core.subscriptions._merge import Merger
    from upbus.core.subscriptions._specs import Channel
    from upbus.core.subscriptions._state import MergedState
    from upbus.core.wire._messages import Message
    from upbus.core.wire._transport import Transport
    from upbus.settings import Settings

__all__ = (
    "HOOKS",
    "PROJECT",
    "ConnectionState",
    "FrameTap",
    "HookKind",
    "HookSpec",
    "LimiterKind",
    "RateLimiter",
    "UpbusHookSpecs",
    "hookimpl",
    "hookspec",
)

PROJECT = "upbus"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

LimiterKind = Literal["connect", "message"]
"""What a rate limiter counts: connection attempts of a scope, or requests of one connection."""

ConnectionState = Literal[
    "idle", "connecting", "connected", "gap", "backoff", "reconnected", "closed"
]
"""The states a connection reports through ``upbus_connection_state``."""

FrameTap = Callable[[Sequence["bytes | str"], list["Message"]], None]
"""``tap(frames, messages)``: what ``upbus_frame_tap`` returns (raw frames of one read)."""

HookKind = Literal["policy", "consumer", "lifecycle", "observation"]
"""How the bus calls a hook.

- ``policy``: ``firstresult``; the first non-``None`` answer wins, and an answer
  is required; errors propagate.
- ``consumer``: every implementation, each on its own (one that raises is logged
  and counted, the others still run); answers are collected.
- ``lifecycle``: like ``consumer``; an implementation may be ``async def`` or
  return an awaitable, which the bus awaits.
- ``observation``: like ``consumer``; answers are ignored, keep it quick.
"""


@dataclass(frozen=True, slots=True)
class HookSpec:
    """What the bus knows of one hook, read from its spec.

    :ivar name: the hook's name.
    :ivar kind: how it is called (:data:`HookKind`).
    :ivar default: the bundled plugin (entry-point name) that answers a policy hook
        by default, so "nobody answered" can say why; ``None`` for other hooks.
    """

    name: str
    kind: HookKind
    default: str | None = None

    @property
    def firstresult(self) -> bool:
        """Whether the first non-``None`` answer ends the call (policy hooks)."""
        return self.kind == "policy"

    @property
    def may_be_async(self) -> bool:
        """Whether an implementation may be ``async def`` or return an awaitable."""
        return self.kind == "lifecycle"


_F = TypeVar("_F", bound=Callable[..., object])
# The attribute _spec sets on a spec function; pluggy's own marker sets "upbus_spec".
_KIND_ATTRIBUTE = "upbus_kind"


def _spec(kind: HookKind, *, default: str | None = None) -> Callable[[_F], _F]:
    """Mark a hook spec for pluggy (``firstresult`` for policy hooks) and record its kind."""

    def mark(function: _F) -> _F:
        setattr(function, _KIND_ATTRIBUTE, HookSpec(function.__name__, kind, default))
        return hookspec(firstresult=kind == "policy")(function)

    return mark


class UpbusHookSpecs:
    """Every hook upbus calls. Policy hooks first, then consumers, then lifecycle."""

    # -- policy: one provider each -------------------------------------------------------

    @_spec("policy", default="merge")
    def upbus_make_merger(self, channel: Channel, settings: Settings) -> Merger | None:
        """Make the object that merges wishes into wire entries for ``channel``.

        Called once per channel when the ``Bus`` is constructed.

        :param channel: ``Channel.PUBLIC`` or ``Channel.PRIVATE``.
        :param settings: the effective settings.
        :returns: a :class:`~upbus.plugin.Merger`, or ``None`` to let another plugin
            answer. Default: reference counts per (type, code, level)
            (``RefCountMerger``).
        """

    @_spec("policy", default="batching")
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

        Called once per channel when the bus starts.

        :param channel: ``Channel.PUBLIC`` or ``Channel.PRIVATE``.
        :param settings: the effective settings (``debounce``, ``rate_limit.max_wait``).
        :param manager: the subscription manager whose state is sent
            (``manager.state(channel)``, ``manager.version(channel)``).
        :param sink: where the requests go (``await sink.send_state(state)``).
        :param limiter: the request budget (``await limiter.wait(max_wait)``, then
            ``limiter.take()``).
        :param tracer: the bus's OpenTelemetry tracer, for the send spans.
        :returns: a :class:`~upbus.plugin.Batcher`, or ``None``. Default: one pending
            task per connection (:class:`upbus.PendingTaskBatcher`).
        """

    @_spec("policy", default="ratelimit")
    def upbus_make_rate_limiter(
        self, kind: LimiterKind, scope: str, settings: Settings
    ) -> RateLimiter | None:
        """Make a rate limiter.

        Connect limiters are asked for once per scope when the bus starts; message
        limiters at every connect, since the exchange counts messages per connection.

        :param kind: ``"connect"`` (connection attempts of one scope, shared by every
            connection of the bus) or ``"message"`` (request messages of one connection).
        :param scope: what the limit counts: ``"ip"`` or ``"account:<hash>"`` for
            connects, the connection's name (``"public#3"``) for messages.
        :param settings: the effective settings (``rate_limit``).
        :returns: a :class:`~upbus.plugin.RateLimiter`, or ``None``. Default: rolling
            windows per the exchange's documented limits (:class:`upbus.RollingWindowLimiter`).
        """

    @_spec("policy", default="transport")
    def upbus_make_transport(self, channel: Channel, settings: Settings) -> Transport | None:
        """Make the transport that opens ``channel``'s WebSocket connections.

        Called once per channel when the bus starts; its ``aclose()`` when it stops.

        :param channel: ``Channel.PUBLIC`` or ``Channel.PRIVATE``.
        :param settings: the effective settings (``transport``, ``heartbeat_timeout``,
            plugin sections).
        :returns: a :class:`~upbus.plugin.Transport`, or ``None``. Default: an httpx
            upgrade, then upbus's own wsproto read loop (``HttpxWsTransport``).
        """

    # -- consumers -----------------------------------------------------------------------

    @_spec("consumer")
    def upbus_components(self, bus: Bus, settings: Settings) -> Sequence[tuple[object, Any]] | None:
        """Contribute components: ``(component, specs)`` pairs the bus registers at start.

        Called when the bus starts, after the ``upbus_startup`` awaitables. The bus
        keeps each contributed component alive while it runs, so a plugin needs no
        state of its own to hold them.

        :param bus: the bus that starts; a plugin that contributes to several buses
            tells them apart by it.
        :param settings: the bus's settings; the plugin's own section is
            ``settings.plugin_section(<entry-point name>, Model)``.
        :returns: a sequence of ``(component, specs)`` pairs, or ``None``. ``specs``
            is anything ``Bus.register_component`` accepts.
        """

    # -- lifecycle and observation -------------------------------------------------------

    @_spec("lifecycle")
    def upbus_startup(self, bus: Bus) -> Awaitable[None] | None:
        """The bus has started its connections and batchers.

        :param bus: the bus that started.
        :returns: ``None`` or an awaitable (or be ``async def``), which the bus awaits.
        """

    @_spec("lifecycle")
    def upbus_shutdown(self, bus: Bus) -> Awaitable[None] | None:
        """The bus is stopping: receiving has stopped and components have drained.

        Called on every exit from ``async with bus``, shielded from cancellation,
        before the bus's tasks are cancelled and the transports closed.

        :param bus: the bus that stops.
        :returns: ``None`` or an awaitable (or be ``async def``), which the bus awaits.
        """

    @_spec("observation")
    def upbus_connection_state(self, channel: Channel, state: ConnectionState, detail: str) -> None:
        """A connection changed state. Called on the event loop; keep it quick.

        :param channel: the connection's channel.
        :param state: ``idle``, ``connecting``, ``connected``, ``gap``, ``backoff``,
            ``reconnected`` or ``closed``.
        :param detail: a URL or a reason.
        """

    @_spec("observation")
    def upbus_request_sent(self, channel: Channel, state: MergedState, size: int) -> None:
        """A subscription request went out. Called on the event loop; keep it quick.

        Not called for the text ``PING``, ``LIST_SUBSCRIPTIONS`` or an empty state.

        :param channel: the connection's channel.
        :param state: the merged state the request installs.
        :param size: the frame's size in bytes.
        """

    @_spec("observation")
    def upbus_frame_tap(self, channel: Channel, settings: Settings) -> FrameTap | None:
        """Ask to see ``channel``'s frames as received: return a callable, or ``None``.

        Called once per channel when the bus starts. The callable gets
        ``(frames, messages)`` for every socket read: the frames exactly as they
        arrived (``bytes`` or ``str``) and the data messages decoded from them (in
        order; status, error and list frames are in ``frames`` only). It runs on the
        event loop, before delivery, so it must be quick and must not raise; a
        gateway uses it to republish frames without encoding them again.

        :param channel: the channel whose frames the tap will see.
        :param settings: the effective settings.
        """


def _read_kinds() -> Mapping[str, HookSpec]:
    found = (getattr(value, _KIND_ATTRIBUTE, None) for value in vars(UpbusHookSpecs).values())
    return MappingProxyType({info.name: info for info in found if isinstance(info, HookSpec)})


HOOKS: Mapping[str, HookSpec] = _read_kinds()
"""Every hook, by name, with the kind its spec declares."""
