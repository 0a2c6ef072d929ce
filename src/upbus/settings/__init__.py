"""upbus settings: one validated model read from pyproject.toml, upbus.toml, env and arguments."""

from __future__ import annotations

from upbus.settings.model import (
    NatsSettings,
    RateLimitSettings,
    ReconnectSettings,
    Settings,
    explain_settings,
    load_settings,
)

__all__ = (
    "NatsSettings",
    "RateLimitSettings",
    "ReconnectSettings",
    "Settings",
    "explain_settings",
    "load_settings",
)
