"""The connect budget shared through NATS: what a grant costs, and how it holds up.

Run: ``.venv/bin/python bench/bench_nats_limiter.py`` (``--acquires``, ``--seconds``,
``--processes``; about 30 seconds; needs ``nats-server`` on ``PATH``).

It starts its own ``nats-server -js`` on 127.0.0.1 with a temporary store, then:

1. **Latency.** ``--acquires`` grants, one after the other, from a
   :class:`~upbus.plugins.nats._limiter.SharedConnectLimiter` and from the plain
   :class:`~upbus.RollingWindowLimiter` it wraps, alternating, both with a limit
   too large to ever wait: the shared one's figure is the NATS connect, bucket
   lookup, read, compare-and-set and close it adds to every connect.
2. **Contention.** 1, 2 and ``--processes`` processes, each with one limiter
   acquiring in a loop for ``--seconds``, against one key: with Upbit's rule (5 a
   second plus the 0.1 s margin), the grants per second of all of them together and
   the most grants any closed 1.1 s interval held (must be at most 5); then with a
   rule that never binds, the compare-and-set's own ceiling and how often a writer
   lost the race.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

import upbus
from upbus.core.sending._ratelimit import RollingWindowLimiter
from upbus.plugins.nats._limiter import SharedConnectLimiter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def nats_server() -> Iterator[str]:
    """A throwaway JetStream server; yields its URL."""
    if shutil.which("nats-server") is None:
        sys.exit("nats-server is not on PATH (Debian package nats-server)")
    with tempfile.TemporaryDirectory() as store:
        port = free_port()
        log = Path(store) / "log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 10
            while b"Server is ready" not in log.read_bytes():
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"nats-server did not start: {log.read_text()[-500:]}")
                time.sleep(0.02)
            yield f"nats://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=10)


def limiter(
    url: str,
    limit: int,
    period: float,
    margin: float,
    host: str = "bench",
    wall: Callable[[], float] = time.time,
) -> SharedConnectLimiter:
    settings = upbus.Settings(nats_url=url, nats={"host": host})  # type: ignore[arg-type]
    local = RollingWindowLimiter("connect ip", [(limit, period)], margin=margin, max_wait=60.0)
    return SharedConnectLimiter(settings, "ip", local, wall_clock=wall)


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return (
        f"median {1e3 * statistics.median(ordered):7.3f} ms, p90 {1e3 * p90:7.3f}, "
        f"max {1e3 * ordered[-1]:7.3f}"
    )


async def latency(url: str, acquires: int) -> None:
    shared = limiter(url, 10**9, 1.0, 0.1)
    local = RollingWindowLimiter("connect ip", [(10**9, 1.0)], margin=0.1)
    for warm in range(5):
        await shared.acquire()
        await local.acquire()
        del warm
    times: dict[str, list[float]] = {"local": [], "shared": []}
    for _ in range(acquires):
        for name, one in (("local", local), ("shared", shared)):
            began = time.perf_counter()
            await one.acquire()
            times[name].append(time.perf_counter() - began)
    print(f"acquire latency, {acquires} grants each, never waiting:")
    for name, values in times.items():
        print(f"  {name:6}  {ms(values)}")
    added = statistics.median(times["shared"]) - statistics.median(times["local"])
    print(f"  added by sharing: {1e3 * added:.3f} ms per connect (median)")


def worker(url: str, host: str, rule: str, seconds: float) -> None:
    """One contending process: say "ready", wait for "go", acquire for ``seconds``."""
    limit, period, margin = RULES[rule]
    decided: list[float] = []

    def wall() -> float:
        # The limiter's last reading before a grant returns is the grant's own time.
        decided.append(time.time())
        return decided[-1]

    async def run() -> dict[str, object]:
        one = limiter(url, limit, period, margin, host, wall)
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        grants: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await one.acquire()
            grants.append(decided[-1])
        status = one.status()
        return {"grants": grants, "conflicts": status["conflicts"], "shared": status["shared"]}

    print(json.dumps(anyio.run(run)), flush=True)


def most_in_window(times: list[float], period: float) -> int:
    ordered = sorted(times)
    most, low = 0, 0
    for high, t in enumerate(ordered):
        while t - ordered[low] > period:
            low += 1
        most = max(most, high - low + 1)
    return most


# (limit, period, margin): Upbit's rule, and one that never binds (a 1 ms period keeps
# the shared value tiny, so what is measured is the compare-and-set itself).
RULES = {"upbit": (5, 1.0, 0.1), "unbound": (1000, 0.001, 0.0)}


def contention(url: str, processes: int, rule: str, seconds: float) -> None:
    host = f"bench-{rule}-{processes}"  # a key of its own: no grants left from a run before
    command = [sys.executable, __file__, "--worker", url, host, rule, str(seconds)]
    running = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    for process in running:  # all imported and connected to nothing yet: start together
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    for process in running:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    reports = [json.loads(p.communicate(timeout=seconds + 60)[0]) for p in running]
    grants = sorted(t for report in reports for t in report["grants"])
    conflicts = sum(report["conflicts"] for report in reports)
    assert all(report["shared"] for report in reports), "NATS was not used"
    # A loop may overrun the end by one wait; count only the first `seconds` of grants.
    rate = sum(1 for t in grants if t < grants[0] + seconds) / seconds
    line = f"  {processes} process{'es' if processes > 1 else '  '}: {rate:9.1f} grants/s"
    if rule == "upbit":
        line += f", most in any closed 1.1 s: {most_in_window(grants, 1.1)} (limit 5)"
    else:
        line += f", lost races per grant: {conflicts / max(1, len(grants)):.2f}"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--acquires", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        url, host, rule, seconds = args.worker
        worker(url, host, rule, float(seconds))
        return
    with nats_server() as url:
        anyio.run(latency, url, args.acquires)
        counts = sorted({1, 2, args.processes})
        print(f"\ngrants under contention, {args.seconds:g} s, Upbit's rule (5 per 1 s + 0.1 s):")
        for processes in counts:
            contention(url, processes, "upbit", args.seconds)
        print(f"\ngrants under contention, {args.seconds:g} s, a rule that never binds:")
        for processes in counts:
            contention(url, processes, "unbound", args.seconds)


if __name__ == "__main__":
    main()
