"""Fast transport (plugin ``picows``): WebSocket connections through picows.

picows parses frames in Cython and hands them to a callback, which spends a
fraction of the Python the default transport does per message (see
:mod:`upbus.core.wire._picows`). It needs the optional ``picows`` package
(``pip install 'upbus[fast]'``) and runs on asyncio only.

Which transport answers depends on the ``transport`` setting:

- ``"auto"`` (the default): this plugin, if picows is installed and the bus runs
  on asyncio; else nobody here, and the default (httpx) transport answers.
- ``"picows"``: this plugin, or a :class:`~upbus.core._errors.ConfigError` saying
  what is missing (the package, or the asyncio backend).
- anything else (``"httpx"``, another plugin's name): not this plugin.

The module imports picows only when asked for a transport, so the entry point
loads whether or not picows is installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging

from upbus import ConfigError, Settings
from upbus.plugin import Channel, Transport, hookimpl

__all__ = ("NAME", "current_async_library", "picows_installed", "upbus_make_transport")

NAME = "picows"

log = logging.getLogger("upbus.plugins.picows")


def picows_installed() -> bool:
    """Whether the picows package can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("picows") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["picows"] is None
        return False


def current_async_library() -> str | None:
    """``"asyncio"``, ``"trio"``, …: the async library running this code, or ``None``.

    sniffio (installed with trio, among others) tells asyncio from trio even where
    trio runs on top of an asyncio loop; without it, any running asyncio loop counts.
    """
    try:
        import sniffio
    except ImportError:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None
        return "asyncio"
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


@hookimpl
def upbus_make_transport(channel: Channel, settings: Settings) -> Transport | None:
    # Neither tryfirst nor trylast: "auto" must reach this plugin before the default
    # transport (trylast), and the replay plugin (tryfirst) must win while a recording
    # is configured, whatever order the entry points load in.
    choice = settings.transport
    if choice not in ("auto", NAME):
        return None
    installed = picows_installed()
    library = current_async_library()
    if choice == "auto":
        if not installed or library != "asyncio":
            return None
    elif not installed or library not in ("asyncio", None):
        # None: no event loop yet (a plugin manager driven by hand); connect checks again.
        missing = (
            "the picows package is not installed" if not installed else f"running on {library}"
        )
        raise ConfigError(
            f"transport {NAME!r} needs the picows package (pip install 'upbus[fast]') "
            f"and the asyncio backend ({missing}); set transport = 'auto' or 'httpx' "
            "to use the default transport"
        )
    try:
        from upbus.core.wire._picows import PicowsTransport
    except ImportError as exc:  # installed but broken (a wheel for another Python, say)
        if choice == "auto":
            log.warning("picows is installed but does not import (%s); using httpx", exc)
            return None
        raise ConfigError(f"transport {NAME!r} cannot import picows: {exc}") from exc
    return PicowsTransport(
        handshake_timeout=settings.heartbeat_timeout,
        close_timeout=settings.heartbeat_timeout,
    )
