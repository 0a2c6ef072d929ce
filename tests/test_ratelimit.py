"""Tests for upbus.core.sending._ratelimit.

The synchronous tests drive the limiter with explicit times. The async tests run on
trio with ``MockClock(autojump_threshold=0)``: virtual time jumps to the next
deadline as soon as every task is blocked, so minutes of limiter waiting take
milliseconds and timings can be asserted exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import anyio
import pytest
from anyio.abc import TaskStatus
from hypothesis import example, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from upbus.core._errors import LimiterWaitExpired
from upbus.core.sending._ratelimit import (
    DEFAULT_MARGIN,
    RollingWindowLimiter,
    upbit_connect_limiter,
    upbit_message_limiter,
)

UPBIT_WINDOWS = ((5, 1.0), (100, 60.0))
# How late, at most, a grant may come after the instant the rolling-window rule
# first allows it (the limiter aims 1 µs past the forbidden boundary instant).
LATENESS = 1e-5


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    """Trio on virtual time for every async test in this module."""
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


def max_in_closed_window(grants: Sequence[float], period: float) -> int:
    """The most grants inside any closed interval ``[a, a + period]``.

    A busiest closed interval can always be slid right until its start is a grant,
    so it is enough to look at the intervals starting at each grant.
    """
    best = 0
    end = 0
    for start, first in enumerate(grants):
        end = max(end, start)
        while end < len(grants) and grants[end] - first <= period:
            end += 1
        best = max(best, end - start)
    return best


def serve(limiter: RollingWindowLimiter, arrivals: Sequence[float]) -> list[float]:
    """A simulated client: requests served in order, each granted at ``t + delay(t)``.

    ``t`` is the later of the request's arrival and the previous grant (a request
    queues behind the one before it).
    """
    grants: list[float] = []
    for arrival in arrivals:
        ready = max(arrival, grants[-1]) if grants else arrival
        at = ready + limiter.delay(ready)
        limiter.take(at)
        grants.append(at)
    return grants


# -- 1. the rolling-window property -------------------------------------------------

gaps = st.lists(
    st.one_of(
        st.just(0.0),
        st.floats(0.0, 0.05),
        st.floats(0.0, 0.5),
        st.floats(0.0, 3.0),
        st.sampled_from([0.2, 0.25, 1.0, 60.0]),
    ),
    min_size=1,
    max_size=400,
)


@settings(max_examples=150, deadline=None)
@given(
    start=st.one_of(st.just(0.0), st.floats(0.0, 1e6)),
    gaps=gaps,
    margin=st.one_of(st.sampled_from([0.0, 0.001, 0.1, 0.25]), st.floats(0.0, 1.0)),
)
@example(start=0.0, gaps=[0.0] * 400, margin=0.0)
@example(start=0.1, gaps=[0.0] * 5 + [1.0] * 5 + [0.2] * 300, margin=0.0)
def test_rolling_windows_are_never_exceeded_and_grants_are_prompt(
    start: float, gaps: list[float], margin: float
) -> None:
    arrivals: list[float] = []
    t = start
    for gap in gaps:
        t += gap
        arrivals.append(t)
    limiter = RollingWindowLimiter("prop", UPBIT_WINDOWS, margin=margin)
    grants = serve(limiter, arrivals)

    # Safety: at most L grants in any closed interval of length P (and of P + margin).
    for limit, period in UPBIT_WINDOWS:
        assert max_in_closed_window(grants, period) <= limit
        assert max_in_closed_window(grants, period + margin) <= limit

    # Liveness and promptness: every request is granted, in order, no earlier than
    # it is ready, and no later than the rule requires (plus a tiny epsilon).
    assert len(grants) == len(arrivals)
    for i, (arrival, granted) in enumerate(zip(arrivals, grants, strict=True)):
        ready = max(arrival, grants[i - 1]) if i else arrival
        assert granted >= ready
        binding = [
            grants[i - limit] + period + margin
            for limit, period in UPBIT_WINDOWS
            if i >= limit and ready - grants[i - limit] <= period + margin
        ]
        if binding:
            assert granted <= max(binding) + LATENESS
        else:
            assert granted == ready


def test_a_burst_is_spread_exactly_as_the_rule_implies() -> None:
    limiter = RollingWindowLimiter("burst", UPBIT_WINDOWS)
    grants = serve(limiter, [0.0] * 250)
    # Five per second for 20 s (100 grants), then the minute window holds the
    # 101st until 60 s after the first; the pattern repeats each minute.
    for k, granted in enumerate(grants):
        block = k // 5
        expected = 60.0 * (block // 20) + block % 20
        assert granted == pytest.approx(expected, abs=1e-4)
    assert grants[-1] == pytest.approx(129.0, abs=1e-4)


def test_the_boundary_instant_itself_is_refused() -> None:
    limiter = RollingWindowLimiter("edge", [(5, 1.0)])
    for _ in range(5):
        limiter.take(0.0)
    # A grant at exactly 1.0 would put six grants in the closed window [0, 1].
    assert limiter.delay(1.0) > 0.0
    with pytest.raises(RuntimeError, match="no slot free"):
        limiter.take(1.0)
    assert limiter.delay(0.5) == pytest.approx(0.5, abs=LATENESS)
    assert limiter.delay(1.0 + LATENESS) == 0.0
    limiter.take(1.0 + LATENESS)


def test_margin_lengthens_every_period() -> None:
    limiter = RollingWindowLimiter("margin", [(2, 1.0)], margin=0.25)
    limiter.take(10.0)
    limiter.take(10.0)
    assert limiter.delay(11.0) == pytest.approx(0.25, abs=LATENESS)
    assert limiter.delay(11.25) > 0.0
    assert limiter.delay(11.25 + LATENESS) == 0.0


def test_take_refuses_times_that_go_backwards() -> None:
    limiter = RollingWindowLimiter("order", [(5, 1.0)])
    limiter.take(3.0)
    with pytest.raises(ValueError, match="earlier than the previous grant"):
        limiter.take(2.0)


# -- 2. a naive token bucket, for contrast ------------------------------------------


class NaiveTokenBucket:
    """Capacity 5, refilled continuously at 5 tokens/s, starting full."""

    def __init__(self, capacity: float = 5.0, rate: float = 5.0) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self.updated = 0.0

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def delay(self, now: float) -> float:
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


def test_a_token_bucket_overshoots_a_rolling_second_where_ours_does_not() -> None:
    arrivals = [0.0] * 20  # a burst, e.g. many components subscribing at start-up

    bucket = NaiveTokenBucket()
    bucket_grants: list[float] = []
    for arrival in arrivals:
        ready = max(arrival, bucket_grants[-1]) if bucket_grants else arrival
        at = ready + bucket.delay(ready)
        bucket.take(at)
        bucket_grants.append(at)

    ours = serve(RollingWindowLimiter("ours", [(5, 1.0)]), arrivals)

    assert max_in_closed_window(bucket_grants, 1.0) >= 9
    assert max_in_closed_window(ours, 1.0) == 5


# -- 3. async behaviour on virtual time ----------------------------------------------


@pytest.mark.anyio
async def test_concurrent_acquirers_are_fifo_and_respect_both_windows() -> None:
    limiter = upbit_message_limiter("msg", margin=0.0, max_wait=1000.0)
    t0 = anyio.current_time()
    log: list[tuple[int, float]] = []

    async def worker(index: int, *, task_status: TaskStatus[None]) -> None:
        # started() lets the next worker start only once this one has queued.
        task_status.started()
        await limiter.acquire()
        log.append((index, anyio.current_time() - t0))

    async with anyio.create_task_group() as tg:
        for index in range(250):
            await tg.start(worker, index)

    assert [index for index, _ in log] == list(range(250))  # FIFO
    grants = [at for _, at in log]
    assert grants == sorted(grants)
    assert max_in_closed_window(grants, 1.0) == 5
    assert max_in_closed_window(grants, 60.0) == 100
    for k, granted in enumerate(grants):
        block = k // 5
        assert granted == pytest.approx(60.0 * (block // 20) + block % 20, abs=1e-4)
    # 250 grants: 100 in the first minute, 100 in the second, 50 in the third.
    assert anyio.current_time() - t0 == pytest.approx(129.0, abs=1e-4)

    status = limiter.status()
    assert status["granted"] == 250
    assert status["waits"] == 245  # all but the first five waited
    assert status["wait_seconds_max"] == pytest.approx(129.0, abs=1e-4)
    assert status["expired"] == 0


@pytest.mark.anyio
async def test_staggered_acquirers_with_the_default_margin() -> None:
    limiter = upbit_message_limiter("msg", max_wait=1000.0)
    t0 = anyio.current_time()
    log: list[tuple[int, float]] = []

    async def worker(index: int) -> None:
        await anyio.sleep(index * 0.003)
        await limiter.acquire()
        log.append((index, anyio.current_time() - t0))

    async with anyio.create_task_group() as tg:
        for index in range(120):
            tg.start_soon(worker, index)

    assert [index for index, _ in log] == list(range(120))
    grants = [at for _, at in log]
    assert max_in_closed_window(grants, 1.0 + DEFAULT_MARGIN) == 5
    assert max_in_closed_window(grants, 60.0 + DEFAULT_MARGIN) == 100
    # The 101st grant waits for the first (at 0.0) to leave the 60.1 s window.
    assert grants[100] == pytest.approx(60.0 + DEFAULT_MARGIN, abs=1e-4)


@pytest.mark.anyio
async def test_acquire_expires_after_exactly_max_wait_and_takes_nothing() -> None:
    limiter = RollingWindowLimiter("exp", [(5, 1.0)], max_wait=0.5)
    for _ in range(5):
        assert await limiter.acquire() == 0.0
    t0 = anyio.current_time()
    with pytest.raises(LimiterWaitExpired) as info:
        await limiter.acquire()  # the default max_wait, 0.5 s
    assert anyio.current_time() - t0 == 0.5
    assert info.value.limiter == "exp"
    assert info.value.waited == pytest.approx(0.5)
    assert info.value.needed == pytest.approx(0.5, abs=LATENESS)

    t1 = anyio.current_time()
    with pytest.raises(LimiterWaitExpired):
        await limiter.wait(max_wait=0.25)
    assert anyio.current_time() - t1 == 0.25

    status = limiter.status()
    assert status["granted"] == 5
    assert status["expired"] == 2
    assert status["waits"] == 0
    # The slot that was due at 1.0 is still free: nothing was taken on expiry.
    assert await limiter.acquire() == pytest.approx(0.25, abs=LATENESS)
    assert limiter.status()["granted"] == 6


@pytest.mark.anyio
async def test_max_wait_covers_the_time_spent_queued() -> None:
    limiter = RollingWindowLimiter("queue", [(1, 1.0)])
    limiter.take(anyio.current_time())
    t0 = anyio.current_time()
    outcome: dict[str, float] = {}

    async def first(*, task_status: TaskStatus[None]) -> None:
        task_status.started()
        outcome["first"] = await limiter.acquire(max_wait=10.0)

    async def second(*, task_status: TaskStatus[None]) -> None:
        task_status.started()
        try:
            await limiter.acquire(max_wait=0.4)
        except LimiterWaitExpired:
            outcome["second_expired_after"] = anyio.current_time() - t0

    async with anyio.create_task_group() as tg:
        await tg.start(first)
        await tg.start(second)

    # The second acquirer never reached the front of the queue: it expired after
    # 0.4 s behind the first, which was granted at 1.0 s.
    assert outcome["second_expired_after"] == pytest.approx(0.4)
    assert outcome["first"] == pytest.approx(1.0, abs=LATENESS)
    assert limiter.status()["granted"] == 2
    assert limiter.status()["expired"] == 1


@pytest.mark.anyio
async def test_wait_does_not_take_and_rechecks_after_sleeping() -> None:
    limiter = RollingWindowLimiter("wait", [(2, 1.0)], backoff_initial=1.5)
    t0 = anyio.current_time()
    assert await limiter.wait() == 0.0
    assert limiter.status()["granted"] == 0
    limiter.take()
    limiter.take()
    waited: list[float] = []

    async def waiter() -> None:
        waited.append(await limiter.wait())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.5)
        # While the waiter sleeps towards t=1.0, the exchange complains: the block
        # (until 2.0) must be noticed when the waiter wakes and re-checks.
        assert limiter.back_off() == 1.5

    assert waited == [pytest.approx(2.0)]
    assert anyio.current_time() - t0 == pytest.approx(2.0)
    assert limiter.status()["granted"] == 2


@pytest.mark.anyio
async def test_back_off_blocks_doubles_caps_and_resets() -> None:
    limiter = RollingWindowLimiter(
        "backoff", [(5, 1.0)], backoff_initial=1.0, backoff_max=8.0, max_wait=100.0
    )
    t0 = anyio.current_time()
    assert limiter.back_off() == 1.0
    assert limiter.status()["blocked_for"] == 1.0
    assert limiter.delay() == 1.0
    assert await limiter.acquire() == pytest.approx(1.0)
    assert anyio.current_time() - t0 == pytest.approx(1.0)
    assert limiter.status()["blocked_for"] == 0.0

    # Further back-offs within backoff_max of the previous one double, up to the cap.
    lengths = []
    for _ in range(5):
        lengths.append(limiter.back_off())
        await anyio.sleep(0.1)
    assert lengths == [2.0, 4.0, 8.0, 8.0, 8.0]
    assert limiter.status()["blocked_for"] == pytest.approx(8.0 - 0.1)

    # Blocked for longer than max_wait: expiry, nothing taken.
    with pytest.raises(LimiterWaitExpired):
        await limiter.acquire(max_wait=2.0)

    # Quiet for more than backoff_max after the last back-off: start over.
    await anyio.sleep(8.0 + 0.01)
    assert limiter.delay() == 0.0
    assert limiter.back_off() == 1.0

    status = limiter.status()
    assert status["back_offs"] == 7
    assert status["granted"] == 1
    assert status["expired"] == 1


@pytest.mark.anyio
async def test_status_reports_usage_and_wait_statistics() -> None:
    limiter = upbit_message_limiter("stats", margin=0.0, max_wait=100.0)
    t0 = anyio.current_time()
    for _ in range(7):
        await limiter.acquire()
    # Grants at 0 (x5) and just after 1.0 (x2). Only the sixth waited: by then the
    # seventh's L-th most recent grant was also at 0, more than 1 s before.
    status = limiter.status()
    assert status["name"] == "stats"
    assert status["granted"] == 7
    assert status["waits"] == 1
    assert status["wait_seconds_total"] == pytest.approx(1.0, abs=1e-4)
    assert status["wait_seconds_max"] == pytest.approx(1.0, abs=1e-4)
    assert status["expired"] == 0
    assert status["back_offs"] == 0
    assert status["blocked_for"] == 0.0
    assert status["windows"] == [
        {"limit": 5, "period": 1.0, "used": 2},
        {"limit": 100, "period": 60.0, "used": 7},
    ]
    later = limiter.status(now=t0 + 30.0)
    assert later["windows"] == [
        {"limit": 5, "period": 1.0, "used": 0},
        {"limit": 100, "period": 60.0, "used": 7},
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_acquire_works_on_asyncio_with_a_limiter_built_outside_the_loop() -> None:
    # No timing is checked here (asyncio has no virtual clock); a free slot is
    # granted without waiting.
    limiter = _built_outside_loop
    assert await limiter.acquire() == 0.0
    assert limiter.status()["granted"] == 1


_built_outside_loop = upbit_connect_limiter("connect")


def test_convenience_constructors() -> None:
    msg = upbit_message_limiter("m", per_second=3, per_minute=50, margin=0.2, max_wait=4.0)
    assert msg.windows == ((3, 1.0), (50, 60.0))
    assert msg.margin == 0.2
    assert msg.max_wait == 4.0
    connect = upbit_connect_limiter("c")
    assert connect.windows == ((5, 1.0),)
    assert connect.margin == DEFAULT_MARGIN


# -- 4. constructor validation -------------------------------------------------------


@pytest.mark.parametrize(
    ("windows", "kwargs", "message"),
    [
        ([], {}, "windows must hold"),
        ([(0, 1.0)], {}, r"windows\[0\] limit"),
        ([(5, 1.0), (1.5, 1.0)], {}, r"windows\[1\] limit"),
        ([(True, 1.0)], {}, r"windows\[0\] limit"),
        ([(5, 0.0)], {}, r"windows\[0\] period must be > 0"),
        ([(5, -1.0)], {}, r"windows\[0\] period must be > 0"),
        ([(5, math.inf)], {}, r"windows\[0\] period must be finite"),
        ([(5, math.nan)], {}, r"windows\[0\] period"),
        ([(5,)], {}, r"windows\[0\] must be a \(limit, period\) pair"),
        ([(5, 1.0)], {"margin": -0.1}, "margin must be >= 0"),
        ([(5, 1.0)], {"margin": math.nan}, "margin"),
        ([(5, 1.0)], {"max_wait": 0.0}, "max_wait must be > 0"),
        ([(5, 1.0)], {"max_wait": -1.0}, "max_wait must be > 0"),
        ([(5, 1.0)], {"backoff_initial": 0.0}, "backoff_initial must be > 0"),
        ([(5, 1.0)], {"backoff_max": 0.5}, "backoff_max"),
    ],
)
def test_constructor_validation(
    windows: list[tuple[int, float]], kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RollingWindowLimiter("bad", windows, **kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_per_call_max_wait_is_validated() -> None:
    limiter = RollingWindowLimiter("v", [(1, 1.0)])
    with pytest.raises(ValueError, match="max_wait must be > 0"):
        await limiter.acquire(max_wait=0.0)
    with pytest.raises(ValueError, match="max_wait must be > 0"):
        await limiter.wait(max_wait=-1.0)
