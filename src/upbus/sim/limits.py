"""Rate limits (docs/protocol.md, Limits) over rolling windows, and connect bans that grow.

Windows are rolling: a limit of ``n`` per ``w`` seconds is broken by the ``n+1``-th
event whose time is less than ``w`` after the oldest of the last ``n+1`` events. A
client that throttles with calendar-second buckets can break it; that is deliberate,
since the exchange's window algorithm is unverified and the strict reading is safe.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ("ConnectDecision", "ConnectLimiter", "MessageLimiter", "RollingWindow")


class RollingWindow:
    """``limit`` events per ``window`` seconds; remembers only the last ``limit + 1``."""

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a rolling window needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque(maxlen=limit + 1)

    def hit(self, now: float) -> bool:
        """Record an event at ``now``; False when it breaks the limit."""
        self._times.append(now)
        return len(self._times) <= self.limit or now - self._times[0] >= self.window

    def clear(self) -> None:
        self._times.clear()


class MessageLimiter:
    """The per-connection request limits, e.g. 5 per 1 s and 100 per 60 s."""

    def __init__(self, limits: Sequence[tuple[int, float]]) -> None:
        self._windows = [RollingWindow(limit, window) for limit, window in limits]

    def hit(self, now: float) -> tuple[int, float] | None:
        """Record a request; the first ``(limit, window)`` it breaks, or None."""
        broken: tuple[int, float] | None = None
        for window in self._windows:
            if not window.hit(now) and broken is None:
                broken = (window.limit, window.window)
        return broken


@dataclass(frozen=True, slots=True)
class ConnectDecision:
    """The answer to an upgrade: HTTP ``status`` (101 = allowed) and a ban's rest."""

    status: int
    retry_after: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.status == 101


@dataclass(slots=True)
class _Scope:
    attempts: RollingWindow
    strikes: deque[float] = field(default_factory=deque)
    banned_until: float = float("-inf")
    bans: int = 0


class ConnectLimiter:
    """Connection attempts per scope (an IP or an access key), with growing bans.

    Excess attempts get 429. More than ``strikes_before_ban`` of them within
    ``strike_window`` seconds start a ban: every attempt gets 418 until it ends. Each
    ban lasts ``ban_factor`` times the previous one, from ``ban_base`` up to ``ban_max``.
    Attempts during a ban do not count toward the rate.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        strikes_before_ban: int,
        strike_window: float,
        ban_base: float,
        ban_factor: float,
        ban_max: float,
    ) -> None:
        self._limit = limit
        self._window = window
        self._strikes_before_ban = strikes_before_ban
        self._strike_window = strike_window
        self._ban_base = ban_base
        self._ban_factor = ban_factor
        self._ban_max = ban_max
        self._scopes: dict[str, _Scope] = {}

    def check(self, scope: str, now: float) -> ConnectDecision:
        """Record an attempt from ``scope`` at ``now`` and decide it."""
        state = self._scopes.get(scope)
        if state is None:
            state = self._scopes[scope] = _Scope(RollingWindow(self._limit, self._window))
        if now < state.banned_until:
            return ConnectDecision(418, state.banned_until - now)
        if state.attempts.hit(now):
            return ConnectDecision(101)
        strikes = state.strikes
        strikes.append(now)
        while strikes and now - strikes[0] >= self._strike_window:
            strikes.popleft()
        if len(strikes) <= self._strikes_before_ban:
            return ConnectDecision(429)
        strikes.clear()
        state.attempts.clear()
        duration = min(self._ban_base * self._ban_factor**state.bans, self._ban_max)
        state.bans += 1
        state.banned_until = now + duration
        return ConnectDecision(418, duration)
