"""The connect budget that the processes of one host share through NATS.

Against a real ``nats-server`` (tests/natsserver.py) and the strict simulator: buses
in separate processes that reconnect as fast as they may stay within 5 connects per
rolling second together, where the same processes without NATS break the limit;
many limiters racing on the compare-and-set never grant more than the rule allows;
a back-off reaches the other processes; without NATS a process still connects, on
its own budget, with one warning per outage.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import nats
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from clirun import clean_environment
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from natsserver import NatsServer, free_port

import upbus
from upbus.core.sending._ratelimit import RollingWindowLimiter
from upbus.plugins.nats._limiter import (
    SharedBudget,
    SharedConnectLimiter,
    budget_delay,
    budget_key,
    grant,
)
from upbus.sim import SimConfig, Simulator

HOST = "testhost"


def nats_settings(url: str, **overrides: object) -> upbus.Settings:
    options: dict[str, object] = {"nats_url": url, "nats": {"host": HOST}}
    options.update(overrides)
    return upbus.Settings(**options)  # type: ignore[arg-type]


def fast_local(limit: int = 5, period: float = 0.3, margin: float = 0.05) -> RollingWindowLimiter:
    """A connect limiter with a short period, so a test sees several windows quickly."""
    return RollingWindowLimiter(
        "connect ip", [(limit, period)], margin=margin, backoff_initial=0.4, backoff_max=1.0
    )


def crowded(times: Sequence[float], limit: int, period: float) -> list[tuple[float, float]]:
    """Every run of ``limit + 1`` grants inside a closed interval of ``period``."""
    ordered = sorted(times)
    return [
        (ordered[i], ordered[i + limit])
        for i in range(len(ordered) - limit)
        if ordered[i + limit] - ordered[i] <= period
    ]


class Values:
    """Every value written to a budget key, in order, as a watcher receives them."""

    def __init__(self) -> None:
        self.seen: list[SharedBudget] = []
        self._changed = anyio.Event()

    def add(self, value: SharedBudget) -> None:
        self.seen.append(value)
        self._changed.set()

    def grants(self) -> set[float]:
        return {t for value in self.seen for t in value.grants}

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Return once ``predicate()`` holds, re-checked at every value."""
        with anyio.fail_after(timeout):
            while not predicate():
                self._changed = anyio.Event()
                await self._changed.wait()


@asynccontextmanager
async def watching(url: str, key: str) -> AsyncIterator[Values]:
    """Collect every value any writer puts into ``key``, through a KV watch."""
    client = await nats.connect(url)
    try:
        kv = await client.jetstream().create_key_value(bucket="upbus_limits", history=1)
        watcher = await kv.watch(key)
        values = Values()

        async def collect() -> None:
            async for entry in watcher:
                if entry is not None and entry.value:
                    values.add(SharedBudget.decode(entry.value))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect)
                yield values
                tg.cancel_scope.cancel()
        finally:
            await watcher.stop()
    finally:
        await client.close()


# -- (d) the window arithmetic ------------------------------------------------------

windows_strategy = st.lists(
    st.tuples(st.integers(1, 6), st.floats(0.05, 3.0)), min_size=1, max_size=3
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    windows=windows_strategy,
    gaps=st.lists(st.floats(0.0, 1.5), min_size=1, max_size=60),
    block=st.one_of(st.none(), st.tuples(st.integers(0, 59), st.floats(0.01, 2.0))),
    start=st.floats(1.7e9, 1.8e9),
)
def test_a_greedy_acquirer_on_the_shared_value_never_breaks_a_window_and_never_waits_too_long(
    windows: list[tuple[int, float]],
    gaps: list[float],
    block: tuple[int, float] | None,
    start: float,
) -> None:
    budget = SharedBudget()
    granted: list[float] = []
    now = start
    for index, gap in enumerate(gaps):
        now += gap
        if block is not None and block[0] == index:
            budget = SharedBudget(budget.grants, now + block[1])
        needed = budget_delay(budget, windows, now)
        assert needed >= 0.0
        if needed > 1e-3:
            # The wait is no longer than the rule needs: a little earlier is refused.
            assert budget_delay(budget, windows, now + needed - 1e-3) > 0.0
        at = now + needed
        assert budget_delay(budget, windows, at) == 0.0
        assert at >= budget.blocked_until
        budget = grant(budget, windows, at)
        # What the key holds stays small: only what can still decide a grant.
        assert len(budget.grants) <= max(limit for limit, _ in windows)
        assert SharedBudget.decode(budget.encode()) == budget
        granted.append(at)
        now = at
    for limit, period in windows:
        assert crowded(granted, limit, period) == []


def test_a_grant_ahead_of_a_stepped_back_clock_does_not_block_the_host() -> None:
    windows = [(1, 1.1)]
    now = 1_800_000_000.0
    ahead = SharedBudget([now + 3600.0], now + 3600.0)
    assert budget_delay(ahead, windows, now, max_block=10.0) == 10.0
    assert budget_delay(SharedBudget([now + 3600.0]), windows, now) == 0.0
    assert budget_delay(SharedBudget([now + 0.5]), windows, now) == pytest.approx(1.6, abs=1e-4)


def test_an_unreadable_value_counts_as_empty_and_keys_are_valid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "upbus.nats"):
        assert SharedBudget.decode(b"not json") == SharedBudget()
    assert "unreadable" in caplog.text
    assert SharedBudget.decode(b"") == SharedBudget()
    # Per IP for public connects; one budget per account across hosts for private ones.
    assert budget_key("gw-1", "ip") == "connect.gw-1.ip"
    assert budget_key("gw-1", "account:0123abcd") == "connect.all.account_0123abcd"
    assert budget_key("gw-2", "account:0123abcd") == budget_key("gw-1", "account:0123abcd")


# -- (b) the compare-and-set under contention ---------------------------------------


@pytest.mark.anyio
async def test_racing_limiters_never_grant_more_than_the_window_allows(
    nats_server: NatsServer,
) -> None:
    limit, period, margin = 5, 0.3, 0.05
    racers, rounds = 8, 3
    shared = nats_settings(nats_server.url)
    limiters = [
        SharedConnectLimiter(shared, "ip", fast_local(limit, period, margin)) for _ in range(racers)
    ]
    returned: list[float] = []

    async def race(limiter: SharedConnectLimiter) -> None:
        for _ in range(rounds):
            await limiter.acquire(max_wait=10.0)
            returned.append(time.time())

    total = racers * rounds
    began = time.monotonic()
    async with watching(nats_server.url, limiters[0].key) as values:
        async with anyio.create_task_group() as tg:
            for limiter in limiters:
                tg.start_soon(race, limiter)
        took = time.monotonic() - began
        await values.wait_for(lambda: len(values.grants()) >= total)
    assert len(returned) == total
    assert len(values.grants()) == total  # every grant written once, none lost in a race
    assert crowded(values.grants(), limit, period + margin) == []
    # The race was real, and losing it cost a re-read, not a slot.
    assert sum(int(str(limiter.status()["conflicts"])) for limiter in limiters) > 0
    assert all(limiter.status()["shared"] for limiter in limiters)
    # As fast as the rule allows: after the first 5, a full window per 5 more.
    assert took < (math.ceil(total / limit) - 1) * (period + margin) + 2.0


@pytest.mark.anyio
async def test_a_back_off_in_one_process_makes_the_others_wait(nats_server: NatsServer) -> None:
    shared = nats_settings(nats_server.url)
    hit, other = (SharedConnectLimiter(shared, "ip", fast_local()) for _ in range(2))
    await hit.acquire()
    blocked_from = time.time()
    length = hit.back_off()  # a 429: the whole host must pause, not just this process
    async with watching(nats_server.url, hit.key) as values, anyio.create_task_group() as tg:
        tg.start_soon(hit.acquire)  # publishes the block, then waits it out itself
        await values.wait_for(lambda: any(math.isfinite(v.blocked_until) for v in values.seen))
        waited = await other.acquire()
    assert waited > 0.0
    assert time.time() >= blocked_from + length
    assert other.status()["back_offs"] == 0  # the wait came from the shared block


@pytest.mark.anyio
async def test_wait_takes_nothing_and_max_wait_expires_with_nothing_taken(
    nats_server: NatsServer,
) -> None:
    shared = nats_settings(nats_server.url)
    filler, other = (SharedConnectLimiter(shared, "ip", fast_local()) for _ in range(2))
    async with watching(nats_server.url, filler.key) as values:
        for _ in range(5):
            assert await filler.acquire() == 0.0
        await values.wait_for(lambda: len(values.grants()) == 5)

        with pytest.raises(upbus.LimiterWaitExpired):
            await other.acquire(max_wait=0.05)  # the window is full for 0.35 s
        waited = await other.wait()
        assert 0.0 < waited < 1.0
        assert await other.acquire() == 0.0  # wait() left the slot it found free
        await values.wait_for(lambda: len(values.grants()) == 6)
    status = other.status()
    assert status["expired"] == 1
    assert status["granted_shared"] == 1
    assert status["waits"] == 1


# -- (c) without NATS --------------------------------------------------------------


@pytest.mark.anyio
async def test_without_nats_a_process_connects_on_its_own_budget_with_one_warning_per_outage(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    shared = nats_settings(nats_server.url, nats={"host": HOST, "connect_timeout": 0.1})
    limiter = SharedConnectLimiter(shared, "ip", fast_local(), retry_interval=0.5)
    await limiter.acquire()
    assert limiter.status()["shared"] is True
    with caplog.at_level(logging.INFO, "upbus.nats"):
        nats_server.stop()
        with anyio.fail_after(10):
            # Until NATS was tried, and found missing, twice: still one warning.
            while limiter.status()["fallbacks"] != 2:
                await limiter.acquire()
        status = limiter.status()
        assert status["shared"] is False
        assert "unreachable" in str(status["outage"])
        assert int(str(status["granted_local"])) >= 2
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "limits its own connects" in warnings[0].getMessage()

        nats_server.start()  # same port and store
        with anyio.fail_after(10):
            while not limiter.status()["shared"]:
                await limiter.acquire()
        assert limiter.status()["granted_shared"] == 2
        assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)

        nats_server.stop()  # a second outage gets its own warning
        await limiter.acquire()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_a_bus_on_trio_gets_its_own_budget_and_is_told_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = SharedConnectLimiter(
        nats_settings(f"nats://127.0.0.1:{free_port()}"), "ip", fast_local()
    )
    with caplog.at_level(logging.WARNING, "upbus.nats"):
        assert await limiter.acquire() == 0.0
    assert "asyncio" in str(limiter.status()["outage"])
    assert "asyncio" in caplog.text


def test_the_hook_builds_it_for_exchange_mode_connects_only() -> None:
    from upbus.plugins import nats as plugin

    url = "nats://127.0.0.1:4222"
    made = plugin.upbus_make_rate_limiter("connect", "ip", nats_settings(url))
    assert isinstance(made, SharedConnectLimiter)
    assert made.key == f"connect.{HOST}.ip"
    assert made.windows == ((5, 1.1),)
    assert plugin.upbus_make_rate_limiter("message", "ip", nats_settings(url)) is None
    assert plugin.upbus_make_rate_limiter("connect", "ip", upbus.Settings()) is None


# -- (a) separate processes against the simulator -----------------------------------

# A bus that subscribes to one ticker and reports once it is connected; the simulator
# drops every connection after a moment of silence, so the bus reconnects at once, over
# and over, as fast as its connect limiter lets it. Stops when stdin closes.
CLIENT = """
import json, sys
import anyio
import upbus

class Watcher:
    ready = False
    async def on_message(self, message):
        pass
    async def on_connection_state(self, event):
        if not self.ready and event.state == "connected":
            self.ready = True
            print("ready", flush=True)

async def main(url, nats_url, host):
    options = {"public_url": url, "debounce": 0.01,
               "reconnect": {"initial": 0.01, "maximum": 0.05}}
    if nats_url:
        options.update(nats_url=nats_url, nats={"host": host})
    async with upbus.Bus(upbus.Settings(**options)) as bus:
        watcher = Watcher()  # the bus holds components weakly
        await bus.register_component(watcher, upbus.ticker("KRW-BTC"))
        await anyio.to_thread.run_sync(sys.stdin.read)
        limiter = bus.get_rate_limiter_status()["connect"]["ip"]
        connects = bus.get_connection_metrics()["public"]["connects"]
    print(json.dumps({"connects": connects, "shared": limiter.get("shared", False)}), flush=True)

anyio.run(main, *sys.argv[1:])
"""
PROCESSES = 2


@pytest.fixture
def sim_config() -> SimConfig:
    # Silence for 50 ms ends a connection: the snapshot arrives, then at most one
    # realtime message a second, so each connection lives about a tenth of a second.
    return SimConfig(rate=1.0, idle_timeout=0.05)


@asynccontextmanager
async def clients(
    sim: Simulator, nats_url: str, folder: Path
) -> AsyncIterator[Callable[[], Awaitable[list[dict[str, object]]]]]:
    """Start :data:`PROCESSES` client processes, wait until each is connected, and
    yield a function that stops them and returns their reports."""
    async with AsyncExitStack() as stack:
        processes: list[Process] = []
        for index in range(PROCESSES):
            log = stack.enter_context((folder / f"client{index}.log").open("wb"))
            process = await anyio.open_process(
                [sys.executable, "-c", CLIENT, sim.public_url, nats_url, HOST],
                stderr=log,
                cwd=folder,
                env=clean_environment(),
            )
            stack.push_async_callback(_reap, process)
            processes.append(process)
        lines = [BufferedByteReceiveStream(p.stdout) for p in processes if p.stdout]

        async def stop() -> list[dict[str, object]]:
            for process in processes:
                assert process.stdin is not None
                await process.stdin.aclose()
            with anyio.fail_after(15):
                reports = [json.loads(await line.receive_until(b"\n", 4096)) for line in lines]
                for process in processes:
                    assert await process.wait() == 0
            return reports

        with anyio.fail_after(30):
            for line in lines:
                assert await line.receive_until(b"\n", 4096) == b"ready"
        yield stop


async def _reap(process: Process) -> None:
    if process.returncode is None:
        process.kill()
    with anyio.CancelScope(shield=True):
        await process.wait()
        await process.aclose()


@pytest.mark.anyio
async def test_processes_sharing_nats_stay_within_five_connects_a_second_together(
    sim: Simulator, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with clients(sim, nats_server.url, tmp_path) as stop:
        attempts = sim.journal.connection_count
        await sim.wait_until(lambda: sim.journal.connection_count >= attempts + 8, timeout=15)
        reports = await stop()
    assert list(sim.violations) == []
    assert all(report["shared"] is True for report in reports), reports
    # Both kept reconnecting, each held back by the other's connects.
    assert all(int(str(report["connects"])) >= 2 for report in reports), reports
    assert len([c for c in sim.connections if c.status == 101]) >= 10


@pytest.mark.anyio
async def test_the_same_processes_without_nats_break_the_limit(
    sim: Simulator, tmp_path: Path
) -> None:
    # Each process keeps its own 5 a second, so together they make more: the case
    # the shared budget exists for, and proof that the test above can fail.
    async with clients(sim, "", tmp_path) as stop:
        await sim.wait_for_violations(1, timeout=15)
        reports = await stop()
    assert any(v.kind == "connect_rate" for v in sim.violations)
    assert not any(report["shared"] for report in reports)
