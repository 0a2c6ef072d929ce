"""Loading plugins from the ``upbus`` entry-point group, and typed hook calls.

:class:`PluginManager` wraps a ``pluggy.PluginManager("upbus")`` that has the
specs of :class:`~upbus.core.hooks._hookspecs.UpbusHookSpecs`. Build one with
:meth:`PluginManager.load`; it loads upbus's own default plugins and every
installed plugin through the same entry-point group, one at a time, so a
broken plugin is reported (:meth:`PluginManager.report`, a warning on the
``upbus.plugins`` logger) and the rest still load.

The bus calls hooks only through the typed methods here:

- policy hooks (``make_merger``, ``make_batcher``, ``make_rate_limiter``,
  ``make_transport``) must be answered; their errors propagate, and a missing
  answer raises :class:`~upbus.core._errors.PluginError` that says why;
- the other hooks (``components``, ``startup``, ``shutdown``,
  ``connection_state``, ``request_sent``) run every implementation; one that
  raises is logged under its plugin's name and counted in
  :attr:`PluginManager.failures`, and the others still run.

Which hook is which, and which default answers a policy hook, is read from the
specs' own markers (:data:`~upbus.core.hooks._hookspecs.HOOKS`).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
import types
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import pluggy
from opentelemetry.trace import Tracer

from upbus.core._errors import PluginError, PluginLoadError
from upbus.core._telemetry import get_tracer
from upbus.core.hooks._hookspecs import (
    HOOKS,
    PROJECT,
    ConnectionState,
    FrameTap,
    LimiterKind,
    UpbusHookSpecs,
)

if TYPE_CHECKING:
    from upbus.core._bus import Bus
    from upbus.core.sending._batcher import Batcher, RequestLimiter, RequestSink
    from upbus.core.sending._ratelimit import RateLimiter
    from upbus.core.subscriptions._manager import SubscriptionManager
    from upbus.core.subscriptions._merge import Merger
    from upbus.core.subscriptions._specs import Channel
    from upbus.core.subscriptions._state import MergedState
    from upbus.core.wire._transport import Transport
    from upbus.settings import Settings

__all__ = ("PluginInfo", "PluginManager", "PluginState")

_log = logging.getLogger("upbus.plugins")

#: The distribution whose entry points are the defaults (PEP 503-normalised).
_OWN_DISTRIBUTION = "upbus"

PluginState = Literal["loaded", "disabled", "failed"]


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """One line of :meth:`PluginManager.report`.

    :ivar name: the entry-point name (or the name given to :meth:`~PluginManager.register`).
    :ivar distribution: the distribution that declares the entry point, if known.
    :ivar version: that distribution's version, if known.
    :ivar module: the entry-point value, e.g. ``"upbus.plugins.merge"``.
    :ivar hooks: sorted names of the hooks the plugin implements (empty unless loaded).
    :ivar state: ``"loaded"``, ``"disabled"`` (by ``disabled_plugins`` or
        ``autoload_plugins = false``) or ``"failed"``.
    :ivar error: why it failed, or ``None``.
    """

    name: str
    distribution: str | None
    version: str | None
    module: str
    hooks: tuple[str, ...]
    state: PluginState
    error: str | None


@dataclass(slots=True)
class _Record:
    """Mutable bookkeeping behind a :class:`PluginInfo`."""

    name: str
    distribution: str | None
    version: str | None
    module: str
    state: PluginState
    error: PluginLoadError | None = None
    plugin: object | None = None


class PluginManager:
    """A typed facade over ``pluggy.PluginManager("upbus")``.

    ``PluginManager()`` has the hookspecs but no plugins; :meth:`load` is the
    usual constructor. The raw pluggy manager is :attr:`pluggy`.
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(UpbusHookSpecs)
        self._records: list[_Record] = []
        #: Exceptions raised by implementations of the non-policy hooks, by plugin name.
        self.failures: Counter[str] = Counter()

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        settings: Settings,
        *,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
    ) -> PluginManager:
        """Build a manager and load the plugins named by entry points.

        :param settings: ``disabled_plugins`` lists entry-point names not to load
            (they are blocked, so nothing can register under them later either);
            with ``autoload_plugins = False`` only upbus's own entry points (the
            default plugins) load and every other distribution's is reported as
            ``disabled``.
        :param entry_points: the entry points to consider; default: every
            ``importlib.metadata`` entry point in the ``upbus`` group. Entry
            points without a distribution (built by hand) count as third-party.
        :returns: the manager. Loading never raises for a plugin's fault: an
            import error, a hookimpl whose signature does not match its spec,
            an implementation of an unknown hook, an ``async def`` for a hook
            that must be synchronous, or a second entry point with a name
            already seen (upbus's own are considered first, so a third party
            cannot take a default's name) is recorded as ``failed`` with a
            :class:`~upbus.core._errors.PluginLoadError`, logged as a warning on
            ``upbus.plugins``, and loading goes on.
        """
        manager = cls()
        disabled = set(settings.disabled_plugins)
        for name in sorted(disabled):
            manager._pm.set_blocked(name)

        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=PROJECT)
        # sorted() is stable: upbus's defaults first, then the rest in discovery order.
        ordered = sorted(entry_points, key=lambda ep: not _is_own(ep))

        seen: dict[str, _Record] = {}
        for ep in ordered:
            dist_name, version = _distribution_of(ep)
            record = _Record(ep.name, dist_name, version, ep.value, "disabled")
            manager._records.append(record)
            first = seen.setdefault(ep.name, record)
            if first is not record:
                by = f" from distribution {first.distribution!r}" if first.distribution else ""
                clash = ValueError(
                    f"entry point name {ep.name!r} is already taken by {first.module!r}{by}"
                )
                manager._fail(record, clash)
            elif ep.name in disabled or (not settings.autoload_plugins and not _is_own(ep)):
                pass  # stays "disabled"
            else:
                try:
                    plugin = ep.load()
                    manager._register_checked(plugin, ep.name)
                except Exception as exc:
                    # Anything a plugin's import or registration raises is that plugin's
                    # failure alone; KeyboardInterrupt and SystemExit still propagate.
                    manager._fail(record, exc)
                else:
                    record.state = "loaded"
                    record.plugin = plugin
        return manager

    def register(self, plugin: object, name: str) -> None:
        """Register ``plugin`` (a module, class or instance with hookimpls) as ``name``.

        For tests and embedding. The plugin is checked like an entry-point plugin
        and appears in :meth:`report` without a distribution.

        :raises PluginLoadError: the name is disabled or taken, or the plugin fails
            validation; the manager is left unchanged.
        """
        record = _Record(name, None, None, _describe(plugin), "loaded", plugin=plugin)
        try:
            self._register_checked(plugin, name)
        except Exception as exc:
            raise PluginLoadError(name, None, exc) from exc
        self._records.append(record)

    def unregister(self, name: str) -> object | None:
        """Unregister the plugin called ``name``; return it, or ``None`` if absent."""
        plugin = self._pm.unregister(name=name)
        if plugin is not None:
            self._records = [
                r for r in self._records if not (r.name == name and r.state == "loaded")
            ]
        return plugin

    def is_registered(self, name: str) -> bool:
        """Whether a plugin is registered as ``name`` (a disabled name is not)."""
        return self._pm.has_plugin(name)

    @property
    def pluggy(self) -> pluggy.PluginManager:
        """The underlying pluggy manager. Plugins registered on it directly skip
        upbus's checks and do not appear in :meth:`report`."""
        return self._pm

    def report(self) -> list[PluginInfo]:
        """Every plugin considered, in load order, then those registered in code."""
        return [
            PluginInfo(
                name=r.name,
                distribution=r.distribution,
                version=r.version,
                module=r.module,
                hooks=self._hook_names(r.plugin) if r.state == "loaded" else (),
                state=r.state,
                error=None if r.error is None else str(r.error),
            )
            for r in self._records
        ]

    @property
    def errors(self) -> list[PluginLoadError]:
        """The load errors behind the ``failed`` lines of :meth:`report`."""
        return [r.error for r in self._records if r.error is not None]

    def _register_checked(self, plugin: object, name: str) -> None:
        if self._pm.is_blocked(name):
            raise PluginError(f"plugin {name!r} is disabled")
        if self._pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        try:
            # pluggy checks signatures against the specs here (PluginValidationError).
            self._pm.register(plugin, name=name)
            self._check_contract(plugin, name)
        except BaseException:
            if self._pm.has_plugin(name):
                self._pm.unregister(name=name)
            raise

    def _check_contract(self, plugin: object, name: str) -> None:
        """What ``register`` does not check: unknown hooks (pluggy leaves those to
        ``check_pending()``, which raises for the first offender of all plugins),
        async implementations where a value is needed, and wrappers on hooks whose
        implementations are called one by one."""
        for caller in self._pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                problem = None
                if caller.spec is None:
                    if not impl.optionalhook:
                        problem = f"implements unknown hook {caller.name!r}"
                elif _is_async(impl.function) and not HOOKS[caller.name].may_be_async:
                    problem = (
                        f"implements {caller.name!r} with 'async def'; this hook must be "
                        "synchronous (return an object whose methods are async instead)"
                    )
                elif not HOOKS[caller.name].firstresult and (impl.wrapper or impl.hookwrapper):
                    problem = f"wraps {caller.name!r}; wrappers are not supported for it"
                if problem is not None:
                    raise pluggy.PluginValidationError(plugin, f"plugin {name!r} {problem}")

    def _fail(self, record: _Record, cause: BaseException) -> None:
        error = PluginLoadError(record.name, record.distribution, cause)
        error.__cause__ = cause
        record.state = "failed"
        record.error = error
        where = "unknown distribution"
        if record.distribution is not None:
            where = f"distribution {record.distribution} {record.version or '(no version)'}"
        _log.warning(
            "plugin %r (%s, %s) failed to load: %s: %s",
            record.name,
            record.module,
            where,
            type(cause).__name__,
            cause,
            exc_info=cause,
        )

    def _hook_names(self, plugin: object) -> tuple[str, ...]:
        return tuple(sorted(c.name for c in self._pm.get_hookcallers(plugin) or ()))

    # -- policy hooks: one answer each ---------------------------------------------------

    def make_merger(self, channel: Channel, settings: Settings) -> Merger:
        """The merger for ``channel`` (hook ``upbus_make_merger``)."""
        result = self._provide("upbus_make_merger", channel=channel, settings=settings)
        return cast("Merger", result)

    def make_batcher(
        self,
        channel: Channel,
        settings: Settings,
        manager: SubscriptionManager,
        sink: RequestSink,
        limiter: RequestLimiter,
        tracer: Tracer | None = None,
    ) -> Batcher:
        """The batcher for ``channel``'s connection (hook ``upbus_make_batcher``)."""
        result = self._provide(
            "upbus_make_batcher",
            channel=channel,
            settings=settings,
            manager=manager,
            sink=sink,
            limiter=limiter,
            tracer=tracer if tracer is not None else get_tracer(),
        )
        return cast("Batcher", result)

    def make_rate_limiter(self, kind: LimiterKind, scope: str, settings: Settings) -> RateLimiter:
        """A ``"connect"`` or ``"message"`` limiter for ``scope``.

        Hook ``upbus_make_rate_limiter``.
        """
        result = self._provide("upbus_make_rate_limiter", kind=kind, scope=scope, settings=settings)
        return cast("RateLimiter", result)

    def make_transport(self, channel: Channel, settings: Settings) -> Transport:
        """The transport for ``channel`` (hook ``upbus_make_transport``)."""
        result = self._provide("upbus_make_transport", channel=channel, settings=settings)
        return cast("Transport", result)

    def _provide(self, hook_name: str, **kwargs: object) -> object:
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook_name)
        result: object = caller(**kwargs)
        if result is None:
            raise PluginError(f"no plugin provides {hook_name} ({self._why_none(hook_name)})")
        if inspect.isawaitable(result):
            # A coroutine is never None, so it "won" the firstresult call unawaited.
            culprit = _producer(caller, result)
            if inspect.iscoroutine(result):
                result.close()  # no "never awaited" warning on top of our error
            raise PluginError(
                f"{culprit} returned an awaitable from {hook_name}; "
                "hooks must be synchronous (use a plain 'def' that returns the object)"
            )
        return result

    def _why_none(self, hook_name: str) -> str:
        default = HOOKS[hook_name].default
        if default is None:
            return "no implementation returned a value"
        record = next((r for r in self._records if r.name == default), None)
        if self._pm.is_blocked(default) or (record is not None and record.state == "disabled"):
            return f"the default plugin {default!r} is disabled"
        if record is not None and record.error is not None:
            return f"the default plugin {default!r} failed to load: {record.error.cause}"
        if not self._pm.has_plugin(default):
            return f"the default plugin {default!r} is not installed"
        return "every implementation returned None"

    # -- the other hooks: every implementation, failures isolated ------------------------

    def components(self, bus: Bus, settings: Settings) -> list[tuple[object, Any]]:
        """Every ``(component, specs)`` pair the plugins contribute to ``bus``, in call order.

        A plugin whose answer is not a sequence of pairs contributes nothing and
        counts as a failure.
        """
        pairs: list[tuple[object, Any]] = []
        for name, result in self._notify("upbus_components", bus=bus, settings=settings):
            if inspect.isawaitable(result):
                self._bad_result(name, "upbus_components", result)
                continue
            try:
                # Unpacking checks the shape; a bad answer raises TypeError/ValueError.
                answer = cast("Iterable[tuple[object, Any]]", result)
                contributed = [(component, specs) for component, specs in answer]
            except (TypeError, ValueError):
                self._hook_failed(name, "upbus_components")
                continue
            pairs.extend(contributed)
        return pairs

    def startup(self, bus: Bus) -> list[Awaitable[None]]:
        """Call ``upbus_startup``; return the awaitables for the bus to await.

        Each awaitable is wrapped so that an exception while awaiting it is
        logged and counted against its plugin instead of propagating.
        """
        return self._awaitables("upbus_startup", bus)

    def shutdown(self, bus: Bus) -> list[Awaitable[None]]:
        """Call ``upbus_shutdown``; return the awaitables to await, as :meth:`startup` does."""
        return self._awaitables("upbus_shutdown", bus)

    def connection_state(self, channel: Channel, state: ConnectionState, detail: str) -> None:
        """Tell plugins a connection changed state (hook ``upbus_connection_state``)."""
        for name, result in self._notify(
            "upbus_connection_state", channel=channel, state=state, detail=detail
        ):
            if inspect.isawaitable(result):
                self._bad_result(name, "upbus_connection_state", result)

    def frame_taps(self, channel: Channel, settings: Settings) -> list[FrameTap]:
        """The taps plugins want on ``channel``'s raw frames (hook ``upbus_frame_tap``)."""
        taps: list[FrameTap] = []
        for name, result in self._notify("upbus_frame_tap", channel=channel, settings=settings):
            if callable(result):
                taps.append(cast("FrameTap", result))
            else:
                self._bad_result(name, "upbus_frame_tap", result)
        return taps

    def request_sent(self, channel: Channel, state: MergedState, size: int) -> None:
        """Tell plugins a request frame went out (hook ``upbus_request_sent``)."""
        for name, result in self._notify(
            "upbus_request_sent", channel=channel, state=state, size=size
        ):
            if inspect.isawaitable(result):
                self._bad_result(name, "upbus_request_sent", result)

    def _awaitables(self, hook_name: str, bus: Bus) -> list[Awaitable[None]]:
        pending: list[Awaitable[None]] = []
        for name, result in self._notify(hook_name, bus=bus):
            if inspect.isawaitable(result):
                pending.append(self._guard(name, hook_name, result))
            else:
                self._bad_result(name, hook_name, result)
        return pending

    async def _guard(self, name: str, hook_name: str, awaitable: Awaitable[object]) -> None:
        try:
            await awaitable
        except Exception:
            # Cancellation is a BaseException and passes through untouched.
            self._hook_failed(name, hook_name)

    def _notify(self, hook_name: str, **kwargs: object) -> list[tuple[str, object]]:
        """Call each implementation ourselves, in pluggy's order, so one raising
        does not stop the rest (pluggy's own loop stops at the first exception).
        Bypassing pluggy's call also bypasses its tracing and call monitoring."""
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook_name)
        results: list[tuple[str, object]] = []
        # pluggy keeps implementations last-to-call first.
        for impl in reversed(caller.get_hookimpls()):
            if impl.wrapper or impl.hookwrapper:
                # Only reachable via .pluggy.register(); calling it would just make a generator.
                _log.debug("skipping wrapper %r for %s", impl.plugin_name, hook_name)
                continue
            args = [kwargs[arg] for arg in impl.argnames]
            # pluggy >= 1.7 passes caller values to parameters with defaults too.
            extra = {arg: kwargs[arg] for arg in impl.kwargnames if arg in kwargs}
            try:
                result = impl.function(*args, **extra)
            except Exception:
                self._hook_failed(impl.plugin_name, hook_name)
                continue
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    def _hook_failed(self, name: str, hook_name: str) -> None:
        self.failures[name] += 1
        _log.exception("plugin %r failed in %s", name, hook_name)

    def _bad_result(self, name: str, hook_name: str, result: object) -> None:
        if inspect.iscoroutine(result):
            result.close()
        self.failures[name] += 1
        expected = "an awaitable or None" if HOOKS[hook_name].may_be_async else "no awaitable"
        _log.error(
            "plugin %r returned %s from %s; expected %s",
            name,
            type(result).__name__,
            hook_name,
            expected,
        )


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    # EntryPoint.dist is None for entry points built by hand.
    dist = ep.dist
    if dist is None:
        return None, None
    return dist.name, dist.version


def _is_own(ep: importlib.metadata.EntryPoint) -> bool:
    name, _ = _distribution_of(ep)
    return name is not None and _normalise(name) == _OWN_DISTRIBUTION


def _is_async(function: object) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)


def _describe(plugin: object) -> str:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    kind = plugin if isinstance(plugin, type) else type(plugin)
    return f"{kind.__module__}:{kind.__qualname__}"


def _producer(caller: pluggy.HookCaller, result: object) -> str:
    """Name the plugin whose implementation made the coroutine ``result``, if we can."""
    code = getattr(result, "cr_code", None)
    impls = caller.get_hookimpls()
    for impl in impls:
        if code is not None and getattr(inspect.unwrap(impl.function), "__code__", None) is code:
            return f"plugin {impl.plugin_name!r}"
    # A plain function returned someone else's coroutine: narrow it down as far as we can.
    names = ", ".join(repr(impl.plugin_name) for impl in reversed(impls))
    return f"one of the plugins {names}"
