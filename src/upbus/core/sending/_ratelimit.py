"""Rate limiting that is correct over *rolling* windows.

Upbit allows 5 connection attempts per second (per IP or pocket) and, on each
connection, 5 request messages per second *and* 100 per minute. How the server
counts is not documented, so upbus assumes the strictest reading: for every limit
of ``L`` grants per period ``P``, no time interval of length ``P`` -- at any
offset, ends included -- may hold more than ``L`` grants.

A token bucket does not guarantee that. A bucket of capacity 5 refilled at 5/s
starts full: it grants a burst of 5 at ``t=0``, then one more every 0.2 s as
tokens trickle back, so the closed second ``[0, 1]`` holds 10 grants (9 even in
the half-open ``[0, 1)``). A fixed-window counter has the same flaw at window
edges: 5 at ``t=0.99`` and 5 at ``t=1.01``.

:class:`RollingWindowLimiter` instead keeps the times of the most recent grants
and allows a new grant only when, for every window ``(L, P)``, the ``L``-th most
recent grant lies more than ``P`` in the past. That is exactly the condition under
which the new grant cannot complete a set of ``L + 1`` grants inside some interval
of length ``P``, so the limiter is both safe and as fast as the rule permits.

A ``margin`` is added to every period to absorb clock and network skew: our send
times and the server's receive times differ by a jitter that can squeeze two
messages closer together than we spaced them.

All timing goes through a :class:`~upbus.core._clock.Clock`, so the limiter runs on
virtual time in tests.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import anyio

from upbus.core._clock import AnyioClock, Clock
from upbus.core._errors import LimiterWaitExpired, OptionError, UsageError

__all__ = (
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_MARGIN",
    "DEFAULT_MAX_WAIT",
    "ConnectionBudget",
    "RateLimiter",
    "RollingWindowLimiter",
    "upbit_connect_limiter",
    "upbit_message_limiter",
)

DEFAULT_MARGIN = 0.1
"""Seconds added to each Upbit period by the convenience constructors (skew allowance)."""

DEFAULT_MAX_WAIT = 15.0
"""Default longest wait, in seconds, for one grant."""

DEFAULT_BACKOFF_INITIAL = 1.0
"""Default first block, in seconds, after a "Too Many Requests" answer."""

DEFAULT_BACKOFF_MAX = 10.0
"""Default longest block, in seconds: a few seconds past the exchange's one-second
window. A longer block is an outage of its own, and the rolling windows already
keep the client within the limits once the block is over."""

# When a grant must wait, delay() aims this far *past* the boundary instant, because
# the boundary instant itself is not allowed (see _window_delay) and float rounding
# of ``now + delay`` must not land the caller on or before it. One microsecond is far
# above the rounding error of any plausible monotonic clock reading (the ulp of 1e7 s
# is ~2e-9 s) and far below anything that matters for throughput.
_TICK = 1e-6


def _check_positive(argument: str, value: float, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float, or raise OptionError (a ValueError) naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionError(f"{argument} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise OptionError(f"{argument} must be a number, got NaN")
    if allow_zero:
        if value < 0.0:
            raise OptionError(f"{argument} must be >= 0, got {value!r}")
    elif value <= 0.0:
        raise OptionError(f"{argument} must be > 0, got {value!r}")
    return value


def _check_finite(argument: str, value: float) -> float:
    if math.isinf(value):
        raise OptionError(f"{argument} must be finite, got {value!r}")
    return value


class RateLimiter(Protocol):
    """What the bus and the batcher use of a rate limiter (``upbus_make_rate_limiter``).

    :class:`upbus.RollingWindowLimiter` is the default implementation.
    """

    async def wait(self, max_wait: float | None = None) -> float:
        """Wait until one grant is allowed, without taking it; return the seconds waited.

        Raises :class:`upbus.LimiterWaitExpired` when that takes longer than ``max_wait``.
        """
        ...

    def take(self, now: float | None = None) -> None:
        """Record one grant at ``now`` (default: the limiter's clock)."""
        ...

    async def acquire(self, max_wait: float | None = None) -> float:
        """:meth:`wait`, then :meth:`take`; return the seconds waited."""
        ...

    def back_off(self, now: float | None = None) -> float:
        """The exchange answered "Too Many Requests": block grants for a while; return how long."""
        ...

    def status(self, now: float | None = None) -> dict[str, object]:
        """A snapshot of usage and statistics, shown by ``Bus.get_rate_limiter_status()``."""
        ...


class RollingWindowLimiter:
    """Grants at most ``L`` events in any interval of ``P + margin`` seconds, per window.

    ``windows`` is a sequence of ``(L, P)`` pairs, e.g. ``[(5, 1.0), (100, 60.0)]``.
    Use :meth:`acquire` from async code (waits, FIFO among concurrent callers, then
    records the grant), or :meth:`delay` and :meth:`take` with explicit times from
    synchronous code. :meth:`back_off` reacts to a "Too Many Requests" answer by
    blocking all grants for a growing period, capped at ``backoff_max``;
    :meth:`reset_back_off` starts the growth over once traffic flows again.

    The limiter is meant for one event loop; it is not thread-safe.
    """

    def __init__(
        self,
        name: str,
        windows: Sequence[tuple[int, float]],
        *,
        clock: Clock | None = None,
        margin: float = 0.0,
        max_wait: float = DEFAULT_MAX_WAIT,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
    ) -> None:
        if not windows:
            raise OptionError("windows must hold at least one (limit, period) pair")
        checked: list[tuple[int, float]] = []
        for index, window in enumerate(windows):
            try:
                limit, period = window
            except (TypeError, ValueError):
                raise OptionError(
                    f"windows[{index}] must be a (limit, period) pair, got {window!r}"
                ) from None
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise OptionError(f"windows[{index}] limit must be an int >= 1, got {limit!r}")
            period = _check_finite(
                f"windows[{index}] period",
                _check_positive(f"windows[{index}] period", period),
            )
            checked.append((limit, period))
        self.name = name
        self.margin = _check_finite("margin", _check_positive("margin", margin, allow_zero=True))
        self.max_wait = _check_positive("max_wait", max_wait)
        self.backoff_initial = _check_finite(
            "backoff_initial", _check_positive("backoff_initial", backoff_initial)
        )
        self.backoff_max = _check_finite("backoff_max", _check_positive("backoff_max", backoff_max))
        if self.backoff_max < self.backoff_initial:
            raise OptionError(
                f"backoff_max ({self.backoff_max!r}) must be >= backoff_initial "
                f"({self.backoff_initial!r})"
            )
        self.windows: tuple[tuple[int, float], ...] = tuple(checked)
        # The effective periods. Float addition is monotonic, so P + margin (rounded)
        # is never below P: enforcing it enforces P.
        self._periods = tuple(period + self.margin for _, period in checked)
        self.clock: Clock = clock if clock is not None else AnyioClock()
        # Grant times, oldest first. Only the last max(L) grants can ever decide.
        self._grants: deque[float] = deque(maxlen=max(limit for limit, _ in checked))
        self._lock: anyio.Lock | None = None
        self._blocked_until = -math.inf
        self._last_backoff_at: float | None = None
        self._last_backoff_len = 0.0
        # Statistics.
        self._granted = 0
        self._waits = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._expired = 0
        self._back_offs = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, windows={list(self.windows)!r}, "
            f"margin={self.margin!r})"
        )

    # -- synchronous core ---------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self.clock.now() if now is None else float(now)

    def _window_delay(self, limit: int, period: float, now: float) -> float:
        """Seconds until window ``(limit, period)`` allows one more grant at ``now``."""
        if len(self._grants) < limit:
            return 0.0
        oldest = self._grants[-limit]  # the L-th most recent grant
        # A new grant g completes L + 1 grants inside a closed interval of length
        # `period` exactly when g - oldest <= period: the interval [oldest, g] holds
        # the L grants since `oldest` and g. So the grant is allowed only if
        # g - oldest > period, strictly; a grant exactly `period` after `oldest`
        # would put both ends of one closed window on grants.
        # The test is written as a float subtraction compared with `period` on
        # purpose: subtraction is correctly rounded and monotonic, so a computed
        # difference above the float `period` implies the real difference is above
        # it too -- the guarantee holds exactly, not just up to rounding.
        if now - oldest > period:
            return 0.0
        # Aim just past the boundary (which is itself forbidden, see above).
        tick = max(_TICK, 16 * math.ulp(max(abs(oldest), abs(now), period)))
        return (oldest + period + tick) - now

    def delay(self, now: float | None = None) -> float:
        """Seconds from ``now`` (default: the clock) until one grant is allowed.

        ``0.0`` means a grant is allowed now. The figure includes any
        :meth:`back_off` block. It does not account for other acquirers queued in
        :meth:`acquire`.
        """
        at = self._now(now)
        needed = max(0.0, self._blocked_until - at)
        for (limit, _), period in zip(self.windows, self._periods, strict=True):
            needed = max(needed, self._window_delay(limit, period, at))
        return needed

    def take(self, now: float | None = None) -> None:
        """Record one grant at ``now`` (default: the clock).

        Raises RuntimeError if :meth:`delay` at that time is not zero (a caller that
        skips the check has a bug), and ValueError if ``now`` is earlier than the
        previous grant (grants must be recorded in time order).
        """
        at = self._now(now)
        if self._grants and at < self._grants[-1]:
            raise OptionError(
                f"rate limiter {self.name!r}: grant at {at!r} is earlier than the "
                f"previous grant at {self._grants[-1]!r}"
            )
        needed = self.delay(at)
        if needed > 0.0:
            raise UsageError(
                f"rate limiter {self.name!r}: take() at {at!r} with no slot free "
                f"(one is free in {needed:.6f}s); wait for delay() to reach 0 first"
            )
        self._grants.append(at)
        self._granted += 1

    def back_off(self, now: float | None = None) -> float:
        """Block all grants after the exchange answered "Too Many Requests".

        The first block lasts ``backoff_initial`` seconds. A back-off while still
        blocked, or within ``backoff_max`` seconds of the previous back-off, doubles
        the previous length, up to ``backoff_max``. Returns the block length.
        """
        at = self._now(now)
        escalate = self._last_backoff_at is not None and (
            at < self._blocked_until or at - self._last_backoff_at <= self.backoff_max
        )
        if escalate:
            length = min(self._last_backoff_len * 2.0, self.backoff_max)
        else:
            length = self.backoff_initial
        self._last_backoff_at = at
        self._last_backoff_len = length
        self._blocked_until = max(self._blocked_until, at + length)
        self._back_offs += 1
        return length

    def reset_back_off(self) -> None:
        """Forget earlier back-offs: the next one lasts ``backoff_initial`` again.

        Call it when traffic flowed without a "Too Many Requests" answer (a
        connection carried data). A block in force stays in force.
        """
        self._last_backoff_at = None
        self._last_backoff_len = 0.0

    def status(self, now: float | None = None) -> dict[str, object]:
        """A snapshot of usage and statistics, for logs and metrics.

        ``windows`` lists, per window, its ``limit``, nominal ``period`` and
        ``used``: the grants inside the closed interval of ``period + margin``
        seconds ending at ``now``. ``last_back_off`` is the length of the latest
        back-off since the last :meth:`reset_back_off` (0.0: none). Pass ``now`` when
        calling from outside the event loop (the default clock reads the running
        loop's time).
        """
        at = self._now(now)
        windows: list[dict[str, object]] = []
        for (limit, nominal), period in zip(self.windows, self._periods, strict=True):
            used = sum(1 for granted_at in self._grants if at - granted_at <= period)
            windows.append({"limit": limit, "period": nominal, "used": used})
        return {
            "name": self.name,
            "margin": self.margin,
            "windows": windows,
            "granted": self._granted,
            "waits": self._waits,
            "wait_seconds_total": self._wait_total,
            "wait_seconds_max": self._wait_max,
            "expired": self._expired,
            "back_offs": self._back_offs,
            "last_back_off": self._last_backoff_len,
            "blocked_for": max(0.0, self._blocked_until - at),
        }

    # -- async API -----------------------------------------------------------------

    def _budget(self, max_wait: float | None) -> float:
        if max_wait is None:
            return self.max_wait
        return _check_positive("max_wait", max_wait)

    def _record_wait(self, waited: float) -> None:
        if waited > 0.0:
            self._waits += 1
            self._wait_total += waited
            self._wait_max = max(self._wait_max, waited)

    async def _wait_from(self, start: float, budget: float) -> tuple[float, bool]:
        """Sleep until a grant is allowed; the budget counts from ``start``.

        Returns the time the grant became allowed and whether we had to sleep.
        """
        slept = False
        while True:
            now = self.clock.now()
            needed = self.delay(now)
            if needed <= 0.0:
                return now, slept
            left = budget - (now - start)
            if needed > left:
                # Nothing can shorten the need (grants and back-offs only lengthen
                # it), so sleep out the budget, as promised, and give up.
                await self.clock.sleep(left)
                self._expired += 1
                raise LimiterWaitExpired(self.name, self.clock.now() - start, needed - left)
            await self.clock.sleep(needed)
            slept = True
            # Loop: another task may have taken the slot or backed off meanwhile.

    async def wait(self, max_wait: float | None = None) -> float:
        """Wait until a grant is allowed, without taking it; return the seconds waited.

        Returns ``0.0`` when a grant is allowed at once. If the grant would need more
        than ``max_wait`` seconds (default :attr:`max_wait`), sleeps ``max_wait`` and
        raises :class:`~upbus.core._errors.LimiterWaitExpired`; nothing is taken.
        Does not queue behind :meth:`acquire` callers.
        """
        budget = self._budget(max_wait)
        start = self.clock.now()
        allowed_at, slept = await self._wait_from(start, budget)
        waited = allowed_at - start if slept else 0.0
        self._record_wait(waited)
        return waited

    async def acquire(self, max_wait: float | None = None) -> float:
        """Wait for a grant and take it; return the seconds waited.

        Returns ``0.0`` when the grant was free at once (no queue, no limit hit).
        Concurrent callers are served first come, first served. ``max_wait``
        (default :attr:`max_wait`) covers the time queued behind them too; on
        expiry nothing is taken and :class:`~upbus.core._errors.LimiterWaitExpired`
        is raised. If it expires while still queued, the error's ``needed`` is this
        limiter's own :meth:`delay` at that moment, a lower bound. The queue wait is
        timed by the event loop's clock, so an injected clock must share the loop's
        time base (the default :class:`~upbus.core._clock.AnyioClock` does).
        """
        budget = self._budget(max_wait)
        start = self.clock.now()
        if self._lock is None:
            # Created here, inside the running loop, never at import or __init__ time.
            self._lock = anyio.Lock()
        lock = self._lock
        queued = lock.locked()
        acquired = False
        with anyio.move_on_after(budget):
            await lock.acquire()  # anyio.Lock hands over to waiters in FIFO order
            acquired = True
        if not acquired:
            now = self.clock.now()
            self._expired += 1
            raise LimiterWaitExpired(self.name, now - start, self.delay(now))
        try:
            granted_at, slept = await self._wait_from(start, budget)
            self.take(granted_at)
        finally:
            lock.release()
        waited = granted_at - start if queued or slept else 0.0
        self._record_wait(waited)
        return waited


class ConnectionBudget:
    """The request-message budget of whichever connection of a channel is current.

    The exchange counts messages per connection, so every connection gets a
    fresh :class:`RollingWindowLimiter`; this object stands for "the current
    one", so that the batcher can hold one limiter for the channel's lifetime.
    Every frame sent on a connection is charged here: the batcher's requests
    (:meth:`wait`, then :meth:`take` right before the send) and every other
    frame, keepalive and verification alike (:meth:`acquire`, through the
    connection's ``send_extra``). Between connections there is no budget:
    waits return at once, and the send that follows finds no connection.
    """

    def __init__(self) -> None:
        self._limiter: RateLimiter | None = None

    @property
    def current(self) -> RateLimiter | None:
        """The current connection's limiter, or ``None`` between connections."""
        return self._limiter

    def use(self, limiter: RateLimiter | None) -> None:
        """Charge everything from now on to ``limiter`` (``None``: no connection)."""
        self._limiter = limiter

    async def wait(self, max_wait: float | None = None) -> float:
        """Wait until one request may go, without taking it; ``0.0`` between connections."""
        limiter = self._limiter
        return 0.0 if limiter is None else await limiter.wait(max_wait)

    def take(self, now: float | None = None) -> None:
        """Record one request as sent now."""
        if self._limiter is not None:
            self._limiter.take(now)

    async def acquire(self, max_wait: float | None = None) -> bool:
        """Wait for a grant and take it; return ``False`` when there is no connection."""
        limiter = self._limiter
        if limiter is None:
            return False
        await limiter.acquire(max_wait)
        return True

    def back_off(self) -> None:
        """The exchange said "too many": the current connection's budget backs off."""
        if self._limiter is not None:
            self._limiter.back_off()

    def status(self) -> dict[str, object] | None:
        """The current limiter's :meth:`~RollingWindowLimiter.status`, or ``None``."""
        limiter = self._limiter
        return None if limiter is None else limiter.status()


def upbit_message_limiter(
    name: str,
    *,
    per_second: int = 5,
    per_minute: int = 100,
    margin: float = DEFAULT_MARGIN,
    max_wait: float = DEFAULT_MAX_WAIT,
    clock: Clock | None = None,
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
    backoff_max: float = DEFAULT_BACKOFF_MAX,
) -> RollingWindowLimiter:
    """A limiter for request messages on one Upbit WebSocket connection.

    Upbit's ``websocket-message`` group: ``per_second`` per second and
    ``per_minute`` per minute, counted per connection, so use one limiter per
    connection.
    """
    return RollingWindowLimiter(
        name,
        [(per_second, 1.0), (per_minute, 60.0)],
        clock=clock,
        margin=margin,
        max_wait=max_wait,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )


def upbit_connect_limiter(
    name: str,
    *,
    per_second: int = 5,
    margin: float = DEFAULT_MARGIN,
    max_wait: float = DEFAULT_MAX_WAIT,
    clock: Clock | None = None,
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
    backoff_max: float = DEFAULT_BACKOFF_MAX,
) -> RollingWindowLimiter:
    """A limiter for WebSocket connection attempts to Upbit.

    Upbit's ``websocket-connect`` group: ``per_second`` upgrade requests per second,
    counted per IP (anonymous) or per pocket (authenticated), so share one limiter
    among all connections of that scope.
    """
    return RollingWindowLimiter(
        name,
        [(per_second, 1.0)],
        clock=clock,
        margin=margin,
        max_wait=max_wait,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )
