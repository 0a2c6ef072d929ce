"""One connect budget per host, shared through a JetStream KV key.

The exchange counts connects per IP (docs/protocol.md, Limits), so every process on
a host that connects must draw from one budget, or two gateways starting together
make twice the allowed connects. The budget is one key of the bucket
``<prefix>_limits``: the wall-clock times of the host's most recent grants and a
"blocked until" time. A grant is a compare-and-set: read the key, decide with the
same rolling-window rule as :class:`~upbus.RollingWindowLimiter`, write the new
list with ``update(..., last=revision)``; whoever loses the race reads again. NATS
itself is the only arbiter, so there is no election and nothing to fail over.

Times are wall-clock because the processes sharing a key share nothing else; on one
host they read the same clock, and the limiter's ``margin`` absorbs the rest.

Without NATS (down, unreachable, or a bus not on asyncio) the limiter grants from
the process's own :class:`~upbus.RollingWindowLimiter`, with one WARNING per
outage: a process must still be able to connect.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from upbus.core._errors import ConfigError, LimiterWaitExpired, OptionError
from upbus.core.sending._ratelimit import RollingWindowLimiter
from upbus.plugins.nats._client import NatsUnavailable, bucket, connect, host_name

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from upbus.settings import Settings

__all__ = (
    "SharedBudget",
    "SharedConnectLimiter",
    "budget_delay",
    "budget_key",
    "grant",
)

log = logging.getLogger("upbus.nats")

# Past the boundary instant, which the rule forbids (same reasoning as in
# RollingWindowLimiter._window_delay).
_TICK = 1e-6

# How long a failed NATS attempt sends acquires straight to the local limiter: an
# unreachable (not refusing) server costs nats.connect_timeout per attempt, which a
# reconnect storm must not pay on every connect.
DEFAULT_RETRY_INTERVAL = 5.0


@dataclass(slots=True)
class SharedBudget:
    """The value of one budget key: grant times (sorted) and the end of a back-off."""

    grants: list[float] = field(default_factory=list)
    blocked_until: float = -math.inf

    def encode(self) -> bytes:
        blocked = self.blocked_until if math.isfinite(self.blocked_until) else None
        return json.dumps({"grants": self.grants, "blocked_until": blocked}).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> SharedBudget:
        """The budget in ``data``; an empty one for a missing or unreadable value."""
        if not data:
            return cls()
        try:
            raw = json.loads(data)
            grants = sorted(float(t) for t in raw["grants"] if math.isfinite(float(t)))
            blocked = raw.get("blocked_until")
            until = float(blocked) if blocked is not None else -math.inf
        except (ValueError, TypeError, KeyError, AttributeError):
            # Whatever wrote it, it cannot be honoured; the next write replaces it.
            log.warning("connect budget: unreadable value %.80r, starting afresh", data)
            return cls()
        return cls(grants, until if not math.isnan(until) else -math.inf)


def _window_delay(grants: Sequence[float], limit: int, period: float, now: float) -> float:
    if len(grants) < limit:
        return 0.0
    oldest = grants[-limit]
    # Strictly more than `period` after the limit-th most recent grant, so no closed
    # interval of length `period` can hold limit + 1 grants.
    if now - oldest > period:
        return 0.0
    tick = max(_TICK, 16 * math.ulp(max(abs(oldest), abs(now), period)))
    return (oldest + period + tick) - now


def _current(grants: Sequence[float], now: float, horizon: float) -> list[float]:
    # A grant more than `horizon` ahead of now is from before the clock was stepped
    # back; honouring it would block the host for as long as the step.
    return sorted(t for t in grants if t <= now + horizon)


def budget_delay(
    budget: SharedBudget,
    windows: Sequence[tuple[int, float]],
    now: float,
    *,
    max_block: float = math.inf,
) -> float:
    """Seconds from ``now`` until ``budget`` allows one more grant (0.0: now).

    ``windows`` holds effective ``(limit, period)`` pairs, margin included. A
    ``blocked_until`` more than ``max_block`` ahead is capped there (a stepped clock).
    """
    horizon = max(period for _, period in windows)
    grants = _current(budget.grants, now, horizon)
    needed = max(0.0, min(budget.blocked_until - now, max_block))
    for limit, period in windows:
        needed = max(needed, _window_delay(grants, limit, period, now))
    return needed


def grant(budget: SharedBudget, windows: Sequence[tuple[int, float]], now: float) -> SharedBudget:
    """``budget`` with a grant at ``now`` added and what can no longer decide removed.

    The caller has checked :func:`budget_delay` is zero. Only grants within the
    longest period of ``now``, and at most the largest limit of them, can decide a
    later grant, so the value stays a few dozen bytes.
    """
    horizon = max(period for _, period in windows)
    keep = max(limit for limit, _ in windows)
    grants = [t for t in _current(budget.grants, now, horizon) if now - t <= horizon]
    grants.append(now)
    grants.sort()
    blocked = budget.blocked_until if budget.blocked_until > now else -math.inf
    return SharedBudget(grants[-keep:], blocked)


def budget_key(host: str, scope: str) -> str:
    """The KV key of ``scope``'s budget (KV keys allow few characters).

    The exchange counts public connects per IP, so the ``ip`` budget is per host;
    it counts authenticated connects per account, wherever they come from, so an
    ``account:…`` budget is one for every host on the NATS server.
    """
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in scope)
    if scope.startswith("account:"):
        return f"connect.all.{safe}"
    return f"connect.{host}.{safe}"


class _Unavailable(Exception):
    """NATS cannot serve the budget now; the text says why."""


class _Store:
    """One NATS connection's view of the budget key, errors turned into _Unavailable."""

    def __init__(self, kv: KeyValue, key: str, timeout: float) -> None:
        self._kv = kv
        self._key = key
        self._timeout = timeout

    async def read(self) -> tuple[SharedBudget, int]:
        """The budget and its revision (0: no such key)."""
        from nats.js.errors import KeyDeletedError, KeyNotFoundError

        try:
            with anyio.fail_after(self._timeout):
                entry = await self._kv.get(self._key)
        except KeyDeletedError as exc:
            # Someone deleted it: an update at the tombstone's revision recreates it.
            return SharedBudget(), exc.entry.revision if exc.entry is not None else 0
        except KeyNotFoundError:
            return SharedBudget(), 0
        except Exception as exc:
            raise _unavailable(exc) from None
        return SharedBudget.decode(entry.value), entry.revision or 0

    async def write(self, budget: SharedBudget, revision: int) -> bool:
        """Compare-and-set: False when someone wrote since ``revision`` was read."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            with anyio.fail_after(self._timeout):
                if revision == 0:
                    await self._kv.create(self._key, budget.encode())
                else:
                    await self._kv.update(self._key, budget.encode(), last=revision)
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:
            raise _unavailable(exc) from None
        return True


def _unavailable(exc: BaseException) -> _Unavailable:
    if isinstance(exc, NatsUnavailable | ConfigError):
        return _Unavailable(str(exc))
    text = str(exc)
    return _Unavailable(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


class SharedConnectLimiter:
    """A connect limiter whose budget every process of the host shares through NATS.

    ``local`` is this process's limiter for the same scope: its windows and margin
    are the rule, its :meth:`back_off` blocks are honoured here and published to the
    other processes at the next :meth:`acquire`, and it grants alone while NATS is
    unreachable. Each :meth:`acquire` opens its own NATS connection and closes it
    before returning (connects are rare; about 2.5 ms on loopback), so nothing
    outlives the call or the event loop.
    """

    def __init__(
        self,
        settings: Settings,
        scope: str,
        local: RollingWindowLimiter,
        *,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.scope = scope
        self.local = local
        self.name = local.name
        self.bucket = f"{settings.nats.prefix}_limits"
        self.key = budget_key(host_name(settings), scope)
        self.windows = tuple((limit, period + local.margin) for limit, period in local.windows)
        self.retry_interval = retry_interval
        self._wall = wall_clock
        self._lock: anyio.Lock | None = None
        # Published at the next acquire: a sync back_off() or take() cannot reach NATS.
        self._unpublished_block = -math.inf
        self._unpublished_grants: list[float] = []
        self._outage: str | None = None
        self._retry_at = -math.inf
        self._host_used = 0
        self._blocked_seen = -math.inf
        # Statistics.
        self._granted_shared = 0
        self._granted_local = 0
        self._conflicts = 0
        self._fallbacks = 0
        self._waits = 0
        self._wait_total = 0.0
        self._wait_max = 0.0
        self._expired = 0
        self._nats_seconds_last = 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, key={self.key!r})"

    # -- synchronous API ------------------------------------------------------------

    def take(self, now: float | None = None) -> None:
        """Record one grant locally; it joins the host's budget at the next acquire."""
        self.local.take(now)
        self._unpublished_grants.append(self._wall())

    def back_off(self, now: float | None = None) -> float:
        """Block grants after a 429/418, here at once and host-wide from the next acquire.

        Returns the block length (see :meth:`upbus.RollingWindowLimiter.back_off`).
        """
        length = self.local.back_off(now)
        self._unpublished_block = max(self._unpublished_block, self._wall() + length)
        return length

    def reset_back_off(self) -> None:
        """Let the next back-off start short again; a block in force stays."""
        self.local.reset_back_off()

    def status(self, now: float | None = None) -> dict[str, object]:
        """The local limiter's status, plus how the host's budget is doing.

        ``shared`` is False while NATS is unreachable (``outage`` says why) and
        grants come from this process's limiter alone. ``host_used`` is the number
        of the host's grants in the (first) window at the last read or grant;
        ``nats_seconds_last`` what the last shared grant spent on NATS, from
        connect to close, waits for a slot left out.
        """
        status = self.local.status(now)
        status.update(
            {
                "shared": self._outage is None,
                "outage": self._outage,
                "bucket": self.bucket,
                "key": self.key,
                "host_used": self._host_used,
                "host_blocked_for": max(0.0, self._blocked_seen - self._wall()),
                "granted_shared": self._granted_shared,
                "granted_local": self._granted_local,
                "conflicts": self._conflicts,
                "fallbacks": self._fallbacks,
                "waits": self._waits,
                "wait_seconds_total": self._wait_total,
                "wait_seconds_max": self._wait_max,
                "expired": self._expired,
                "nats_seconds_last": self._nats_seconds_last,
            }
        )
        return status

    # -- async API ------------------------------------------------------------------

    async def acquire(self, max_wait: float | None = None) -> float:
        """Wait for a slot of the host's budget and take it; return the seconds waited.

        ``max_wait`` (default: the local limiter's) counts from the call, so
        queueing behind this process's other acquirers and the NATS round trips
        use it up too; a grant that would come later is not taken and
        :class:`upbus.LimiterWaitExpired` is raised. One NATS attempt can overrun
        it by up to ``nats.connect_timeout`` per server when NATS is unreachable.
        """
        return await self._run(max_wait, take=True)

    async def wait(self, max_wait: float | None = None) -> float:
        """Wait until the host's budget allows a grant, without taking it."""
        return await self._run(max_wait, take=False)

    async def _run(self, max_wait: float | None, *, take: bool) -> float:
        budget = self._budget(max_wait)
        clock = self.local.clock
        start = clock.now()
        if self._lock is None:
            self._lock = anyio.Lock()  # inside the running loop, never at import time
        lock = self._lock
        queued = lock.locked()
        acquired = False
        with anyio.move_on_after(budget):
            await lock.acquire()  # FIFO among this process's acquirers
            acquired = True
        if not acquired:
            self._expired += 1
            raise LimiterWaitExpired(self.name, clock.now() - start, self.local.delay())
        try:
            if clock.now() >= self._retry_at:
                try:
                    slept = await self._shared(start, budget, take=take)
                except _Unavailable as exc:
                    self._lost(str(exc))
                else:
                    self._back()
                    return self._waited(start, queued or slept)
            left = budget - (clock.now() - start)
            if left <= 0.0:
                self._expired += 1
                raise LimiterWaitExpired(self.name, clock.now() - start, self.local.delay())
            if take:
                waited = await self.local.acquire(left)
                self._granted_local += 1
            else:
                waited = await self.local.wait(left)
            return self._waited(start, queued or waited > 0.0)
        finally:
            lock.release()

    def _budget(self, max_wait: float | None) -> float:
        if max_wait is None:
            return self.local.max_wait
        if isinstance(max_wait, bool) or not isinstance(max_wait, int | float):
            raise OptionError(f"max_wait must be a number, got {max_wait!r}")
        if not max_wait > 0.0:
            raise OptionError(f"max_wait must be > 0, got {max_wait!r}")
        return float(max_wait)

    def _waited(self, start: float, slept: bool) -> float:
        waited = self.local.clock.now() - start if slept else 0.0
        if waited > 0.0:
            self._waits += 1
            self._wait_total += waited
            self._wait_max = max(self._wait_max, waited)
        return waited

    async def _shared(self, start: float, budget: float, *, take: bool) -> bool:
        """Grant (or wait for) a slot of the host's budget; return whether it slept."""
        clock = self.local.clock
        slept = False
        began = clock.now()
        asleep = 0.0
        async with self._store() as store:
            while True:
                current, revision = await store.read()
                wall = self._wall()
                merged = self._merge_unpublished(current, wall)
                self._host_used = self._in_window(merged, wall)
                self._blocked_seen = merged.blocked_until
                needed = max(
                    budget_delay(merged, self.windows, wall, max_block=self.local.backoff_max),
                    self.local.delay(),
                )
                if needed <= 0.0 and not take:
                    break
                dirty = merged != current
                if needed <= 0.0 or dirty:
                    new = grant(merged, self.windows, wall) if needed <= 0.0 else merged
                    written = await store.write(new, revision)
                    if not written:
                        self._conflicts += 1
                        continue  # someone else took a slot or blocked: decide again
                    self._unpublished_grants.clear()
                    self._unpublished_block = -math.inf
                    if needed <= 0.0:
                        self._host_used = self._in_window(new, wall)
                        self._take_locally()
                        break
                    continue
                left = budget - (clock.now() - start)
                if needed > left:
                    await clock.sleep(left)
                    self._expired += 1
                    raise LimiterWaitExpired(self.name, clock.now() - start, needed - left)
                dozed = clock.now()
                await clock.sleep(needed)
                asleep += clock.now() - dozed
                slept = True
        # Closing the connection included: what the caller pays over a local grant.
        self._nats_seconds_last = max(0.0, clock.now() - began - asleep)
        return slept

    def _in_window(self, budget: SharedBudget, wall: float) -> int:
        period = self.windows[0][1]
        return sum(1 for t in budget.grants if 0.0 <= wall - t <= period)

    def _merge_unpublished(self, current: SharedBudget, wall: float) -> SharedBudget:
        """``current`` with this process's unpublished back-off and grants in it."""
        horizon = max(period for _, period in self.windows)
        self._unpublished_grants = [t for t in self._unpublished_grants if wall - t <= horizon]
        if self._unpublished_block <= wall:
            self._unpublished_block = -math.inf
        blocked = max(current.blocked_until, self._unpublished_block)
        if not self._unpublished_grants and blocked == current.blocked_until:
            return current
        keep = max(limit for limit, _ in self.windows)
        grants = sorted(current.grants + self._unpublished_grants)[-keep:]
        return SharedBudget(grants, blocked)

    def _take_locally(self) -> None:
        self._granted_shared += 1
        # The shared grant is made; a back-off that came in while writing it cannot
        # undo that, and take() would refuse, so only then does the local copy skip it.
        if self.local.delay() <= 0.0:
            self.local.take()

    @asynccontextmanager
    async def _store(self) -> AsyncIterator[_Store]:
        settings = self.settings
        timeout = settings.nats.connect_timeout
        try:
            client = await connect(settings, f"upbus limiter {self.key}", reconnect=False)
        except (NatsUnavailable, ConfigError) as exc:
            raise _unavailable(exc) from None
        try:
            try:
                with anyio.fail_after(timeout):
                    kv = await bucket(client, self.bucket)
            except Exception as exc:
                raise _unavailable(exc) from None
            yield _Store(kv, self.key, timeout)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                await client.close()

    def _lost(self, reason: str) -> None:
        self._fallbacks += 1
        self._retry_at = self.local.clock.now() + self.retry_interval
        if self._outage is None:
            log.warning(
                "%s: the host's shared connect budget is unavailable (%s); "
                "this process limits its own connects until NATS is back",
                self.name,
                reason,
            )
        self._outage = reason

    def _back(self) -> None:
        if self._outage is not None:
            log.info("%s: the host's shared connect budget is back", self.name)
        self._outage = None
        self._retry_at = -math.inf
