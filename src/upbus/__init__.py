"""upbus: one merged, rate-limited set of Upbit WebSocket subscriptions for many components."""

from __future__ import annotations

__version__ = "0.1.0"
