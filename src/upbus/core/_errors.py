"""The exceptions upbus raises.

Every error a user can cause derives from :class:`UpbusError`; each class says
when it is raised. Messages name what was wrong, never a secret.
"""

from __future__ import annotations

__all__ = (
    "BusNotRunning",
    "ComponentError",
    "ConfigError",
    "FrameDecodeError",
    "LimiterWaitExpired",
    "OptionError",
    "PluginError",
    "PluginLoadError",
    "SpecError",
    "UpbusError",
    "UsageError",
)


class UpbusError(Exception):
    """Base class of every error upbus raises on purpose."""


class SpecError(UpbusError, ValueError):
    """A subscription spec is invalid; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ComponentError(UpbusError, TypeError):
    """An object cannot be used as a component (it is not weak-referenceable)."""


class BusNotRunning(UpbusError, RuntimeError):
    """The bus is not running: not started yet (``async with Bus() as bus:``), or stopped."""


class ConfigError(UpbusError, ValueError):
    """A setting is invalid; the message names the setting and where it came from."""


class OptionError(UpbusError, ValueError):
    """An argument is out of range or not one of the values allowed.

    For example a buffer's ``overflow`` policy or ``capacity``, a rate limiter's
    windows, a replay ``speed``. The message names the argument and the value.
    """


class UsageError(UpbusError, RuntimeError):
    """An object was used in a way its contract forbids at that moment.

    For example :meth:`upbus.RollingWindowLimiter.take` when no slot is free.
    """


class PluginError(UpbusError):
    """No plugin answered a hook that needs an answer, or a plugin broke a contract."""


class PluginLoadError(PluginError):
    """A plugin's entry point failed to import or register."""

    def __init__(self, name: str, distribution: str | None, cause: BaseException) -> None:
        self.name = name
        self.distribution = distribution
        self.cause = cause
        where = f" from distribution {distribution!r}" if distribution else ""
        super().__init__(f"plugin {name!r}{where} failed to load: {type(cause).__name__}: {cause}")


class FrameDecodeError(UpbusError, ValueError):
    """A server frame is not a message upbus understands.

    Raised for text that is not JSON, JSON of the wrong shape or field types, an unknown
    message type, or a truncated frame. ``sample`` holds the frame's first 200 bytes
    (or characters, for a text frame) and ``reason`` says what was wrong.
    """

    def __init__(self, sample: bytes | str, reason: str) -> None:
        self.sample = sample[:200]
        self.reason = reason
        super().__init__(f"undecodable frame ({reason}): {self.sample!r}")


class LimiterWaitExpired(UpbusError, TimeoutError):
    """A rate-limiter wait exceeded its ``max_wait``; nothing was taken from the budget."""

    def __init__(self, limiter: str, waited: float, needed: float) -> None:
        self.limiter = limiter
        self.waited = waited
        self.needed = needed
        super().__init__(
            f"rate limiter {limiter!r}: waited {waited:.3f}s, a slot needs {needed:.3f}s more"
        )
