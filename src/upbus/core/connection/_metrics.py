"""The counters of one channel's connections, behind ``get_connection_metrics()``."""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ("ConnectionMetrics",)


class ConnectionMetrics:
    """Counts that outlive each connection; every job of the manager writes its own.

    ``counts`` is a plain dict so the receive loop can bump it without a call.
    """

    def __init__(self) -> None:
        self.state = "idle"
        self.connected_since: float | None = None
        self.last_error: str | None = None
        self.ping_rtt: float | None = None
        self.last_message_time: float | None = None
        self.by_type: Counter[str] = Counter()
        self.counts = {
            "connects": 0,
            "reconnects": 0,
            "connect_failures": 0,
            "frames_in": 0,
            "bytes_in": 0,
            "frames_out": 0,
            "bytes_out": 0,
            "messages_in": 0,
            "decode_errors": 0,
            "error_frames": 0,
            "heartbeat_timeouts": 0,
            "verifications": 0,
            "verified": 0,
            "drift_detected": 0,
            "requests_refused": 0,
            "quarantine_decisions": 0,
        }

    def count_out(self, size: int) -> None:
        """One frame of ``size`` bytes went out."""
        self.counts["frames_out"] += 1
        self.counts["bytes_out"] += size

    def snapshot(
        self, channel: str, url: str, message_limiter: dict[str, object] | None
    ) -> dict[str, Any]:
        """The dict ``get_connection_metrics()`` returns."""
        return {
            "channel": channel,
            "url": url,
            "state": self.state,
            "connected_since": self.connected_since,
            **self.counts,
            "messages_by_type": dict(self.by_type),
            "last_message_time": self.last_message_time,
            "ping_rtt": self.ping_rtt,
            "last_error": self.last_error,
            "message_limiter": message_limiter,
        }
