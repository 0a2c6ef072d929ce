"""Scale-out over NATS: fan-out throughput, added latency, gateway CPU and lease churn.

Run: ``.venv/bin/python bench/bench_scaleout.py`` (about 3.5 minutes; ``--quick``
under 2: one short round of each; ``--rounds`` for more; ``--only fanout|latency|churn``,
repeatable, runs only those sections; ``--profile DIR`` writes a cProfile of every
gateway and remote child to DIR).

Everything runs on 127.0.0.1: a ``nats-server -js`` this script starts on a free port
with its store in a temporary directory, the in-process
:class:`~upbus.sim.Simulator`, and child processes (this script with ``--child``),
each on asyncio, each driven through its stdin (``mark`` answers one JSON line with
its monotonic time, ``time.process_time()`` and counters; ``stop`` ends it cleanly):

* ``gateway``: a :class:`~upbus.plugins.nats.Gateway` (what ``upbus gateway`` runs),
  with a frame tap of the bench's own registered before the gateway's (hook
  ``upbus_frame_tap``, ``tryfirst``), which notes ``time.monotonic_ns()`` when a read
  reaches the taps: the gateway's receive time;
* ``remote``: a remote bus (``upstream = "gateway"``) with one component iterating
  its Subscriber (``overflow="block"``, capacity 65,536, as in
  ``bench_throughput.py``: nothing is conflated or dropped in the bus);
* ``local``: the same component on an exchange-mode bus connected to the simulator;
* ``churn``: a process holding several remote buses, one component each.

Sections:

1. **Fan-out** (``fanout``): the simulator floods (``rate="max"``) DEFAULT tickers on
   10 KRW codes. Each round runs the local bus, then the gateway with 1, 2 and 4
   remote processes subscribed to the same 10 tickers. After a warm-up a window
   measures each bus's msgs/s and CPU µs per message, the gateway's published msgs/s,
   CPU µs per published message and drops, and nats-server's CPU (``/proc``).
   Target: every one of 4 remotes ≥ 0.5× the local bus's msgs/s (the ratio within
   each round: the local bus ran right before).
2. **Latency** (``latency``): the simulator cannot pace 10,000 msgs/s (it generates
   each paced message in Python), so the paced sender of ``bench_latency.py`` feeds the
   gateway: DEFAULT tickers and trades alternating on the same 10 codes, 10,000 msgs/s
   in all, ``time.monotonic_ns()`` written into each frame's ``timestamp`` when sent.
   CLOCK_MONOTONIC is one clock for every process on the machine, so the gateway's
   receive time (from its tap, by stamp) and the remote component's
   ``monotonic_ns()`` when the message reaches it compare directly. With 1, 2 and 4
   remotes (a fresh gateway each): p50 / p99 / max of gateway receive → remote
   component (target p99 ≤ 5 ms with 4 remotes), sender → remote, and the CPU µs per
   message of the gateway and of the remotes.
3. **Lease churn** (``churn``): 100 remote buses in 10 processes (10 each, every bus
   wanting the ticker of a code of its own) against a gateway on a slow simulator
   (``nats.lease_ttl`` 2 s, ``debounce`` 0.1 s on both sides). Each cycle (one per
   round): every process not running starts; the two oldest are SIGKILLed; the next
   two exit cleanly; those four start again; then two are SIGKILLed and two exit
   cleanly at the same moment. For each step, the time from the event (the kill, the
   ``stop`` sent, or the last bus of the step registered) to the first request the
   simulator accepted whose ticker codes are the union of the live buses' wishes,
   beside its bound: ``lease_ttl + debounce`` after a kill, ``debounce`` after a clean
   exit, twice ``debounce`` after a start (the remote bus's, then the gateway's); and
   the simulator's limit violations over the whole section (target: none).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import Process

import upbus
from upbus.core.hooks._hookspecs import hookimpl
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel, Spec
from upbus.core.wire._messages import Message
from upbus.settings import NatsSettings
from upbus.sim import SimConfig, Simulator
from upbus.sim.markets import POPULAR, markets_for
from upbus.sim.protocol import Subscribe

CODES = POPULAR
SCRIPT = Path(__file__).resolve()
FANOUT_TARGET = 0.5  # per-remote msgs/s over the local bus's
LATENCY_TARGET_MS = 5.0  # p99 gateway receive -> remote component, 4 remotes
PACED_RATE = 10_000.0
CHURN_LEASE_TTL = 2.0
CHURN_DEBOUNCE = 0.1
CHURN_WORKERS = 10
CHURN_BUSES = 10  # per worker process
READY_TIMEOUT = 60.0
STEP_TIMEOUT = 20.0


# -- the children ----------------------------------------------------------------------------


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


@dataclass
class Counts:
    """What a child counts, reported at each ``mark``."""

    count: int = 0
    gaps: int = 0
    first: anyio.Event = field(default_factory=anyio.Event)
    stamps: list[int] = field(default_factory=list)  # (sent stamp, arrival ns) pairs, flat


async def control(
    stop: anyio.Event, extra: Callable[[], dict[str, Any]], counts: Counts | None
) -> None:
    """Answer ``mark`` on stdin with times and counters; set ``stop`` on ``stop``."""
    while True:
        line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        command = line.strip()
        if command == "mark":
            record = {"mark": True, "t": time.monotonic(), "cpu": time.process_time()}
            if counts is not None:
                record.update(count=counts.count, gaps=counts.gaps)
            record.update(extra())
            emit(record)
        elif command in ("stop", ""):  # "" : the parent closed our stdin
            stop.set()
            return


class Lossless:
    # As in bench_throughput.py: when the buffer is full the bus waits (backpressure).
    upbus_overflow = "block"
    upbus_capacity = 65_536


async def consume(subscriber: Any, counts: Counts, record: bool) -> None:
    stamps = counts.stamps
    now = time.monotonic_ns
    async for item in subscriber:
        if isinstance(item, upbus.BusEvent):
            if isinstance(item, upbus.ConnectionEvent) and item.state == "gap":
                counts.gaps += 1
            continue
        if record:
            stamps.append(item.timestamp)
            stamps.append(now())
        counts.count += 1
        if counts.count == 1:
            counts.first.set()


def workload_specs(workload: str) -> list[Spec]:
    if workload == "paced":
        return [upbus.ticker(*CODES), upbus.trade(*CODES)]
    return [upbus.ticker(*CODES)]


async def child_bus(args: argparse.Namespace) -> None:
    """A ``remote`` or ``local`` child: one component on one bus until ``stop``."""
    if args.child == "remote":
        settings = upbus.Settings(
            upstream="gateway",
            nats_url=args.nats,
            nats=NatsSettings(lease_ttl=args.lease_ttl, prefix=args.prefix),
            autoload_plugins=False,
        )
    else:
        settings = upbus.Settings(public_url=args.url, debounce=0.0, autoload_plugins=False)
    counts = Counts()
    stop = anyio.Event()
    record = args.record is not None
    async with upbus.Bus(settings) as bus, anyio.create_task_group() as tg:
        component = Lossless()  # the bus holds components weakly: keep it
        subscriber = await bus.register_component(component, workload_specs(args.workload))
        tg.start_soon(consume, subscriber, counts, record)
        tg.start_soon(control, stop, dict, counts)
        with anyio.fail_after(READY_TIMEOUT):
            await counts.first.wait()
        emit({"ready": time.monotonic()})
        await stop.wait()
        tg.cancel_scope.cancel()
    if record:
        await anyio.Path(args.record).write_bytes(orjson.dumps(counts.stamps))
    emit({"done": True, "count": counts.count, "gaps": counts.gaps})


class ReceiveTap:
    """The bench's frame tap in the gateway: the first receive time of each stamp."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.received: dict[int, int] = {}

    @hookimpl(tryfirst=True)
    def upbus_frame_tap(self, channel: Channel, settings: upbus.Settings) -> Any:
        if not self.record or channel is not Channel.PUBLIC:
            return None
        received = self.received
        now = time.monotonic_ns

        def tap(frames: Sequence[bytes | str], messages: list[Message]) -> None:
            at = now()
            for message in messages:
                received.setdefault(message.timestamp, at)

        return tap


async def child_gateway(args: argparse.Namespace) -> None:
    from upbus.plugins.nats import Gateway

    settings = upbus.Settings(
        public_url=args.url,
        nats_url=args.nats,
        nats=NatsSettings(lease_ttl=args.lease_ttl, prefix=args.prefix),
        debounce=args.debounce,
        autoload_plugins=False,
    )
    plugins = PluginManager.load(settings)
    tap = ReceiveTap(args.record is not None)
    plugins.register(tap, "bench receive tap")

    def status(line: str) -> None:
        if line.startswith("leading"):
            emit({"leading": time.monotonic()})

    gateway = Gateway(settings, plugin_manager=plugins, on_status=status)
    stop = anyio.Event()

    def extra() -> dict[str, Any]:
        return {"published": gateway.published, "dropped": gateway.dropped}

    async with anyio.create_task_group() as tg:
        tg.start_soon(gateway.run)
        tg.start_soon(control, stop, extra, None)
        await stop.wait()
        tg.cancel_scope.cancel()
    if args.record is not None:
        flat = [value for pair in tap.received.items() for value in pair]
        await anyio.Path(args.record).write_bytes(orjson.dumps(flat))
    emit({"done": True, **extra()})


class ChurnComponent:
    def on_message(self, message: Any) -> None:
        pass


async def child_churn(args: argparse.Namespace) -> None:
    """Several remote buses, each wanting the ticker of one code, until ``stop``."""
    settings = upbus.Settings(
        upstream="gateway",
        nats_url=args.nats,
        nats=NatsSettings(lease_ttl=args.lease_ttl, prefix=args.prefix),
        debounce=args.debounce,
        autoload_plugins=False,
    )
    stop = anyio.Event()
    codes = args.codes.split(",")
    async with anyio.create_task_group() as tg:
        tg.start_soon(control, stop, dict, None)  # returns at "stop"
        async with contextlib.AsyncExitStack() as stack:
            buses = [await stack.enter_async_context(upbus.Bus(settings)) for _ in codes]
            components = [ChurnComponent() for _ in buses]  # held weakly by the buses
            for bus, component, code in zip(buses, components, codes, strict=True):
                await bus.register_component(component, [upbus.ticker(code)])
            emit({"registered": time.monotonic()})
            await stop.wait()
        # Every bus has closed cleanly here: its lease is deleted.
    emit({"done": True})


CHILDREN = {
    "remote": child_bus,
    "local": child_bus,
    "gateway": child_gateway,
    "churn": child_churn,
}


# -- the parent: processes --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NatsServer:
    """``nats-server -js`` on 127.0.0.1 and a free port, its store in ``store``."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        log = store / "nats-server.log"
        command = ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(self.port)]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "-sd", str(store / "js")], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while b"Server is ready" not in log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def child_environment() -> dict[str, str]:
    # Settings come from the command line only, not from UPBUS_* variables around.
    return {k: v for k, v in os.environ.items() if not k.startswith("UPBUS_")}


class Child:
    """A child process of this script: JSON lines out, commands in."""

    def __init__(self, process: Process, name: str) -> None:
        self.process = process
        self.name = name
        self.records: list[dict[str, Any]] = []
        self.changed = anyio.Event()

    async def collect(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.records.extend(orjson.loads(line) for line in complete if line.startswith(b"{"))
            self.changed.set()
            self.changed = anyio.Event()
        self.changed.set()

    async def expect(self, key: str, timeout: float = READY_TIMEOUT, after: int = 0) -> Any:
        """The value of ``key`` in the first record (from index ``after``) that has it."""
        with anyio.fail_after(timeout):
            while True:
                for record in self.records[after:]:
                    if key in record:
                        return record[key] if record[key] is not True else record
                if self.process.returncode is not None:
                    raise RuntimeError(f"{self.name} exited ({self.process.returncode})")
                await self.changed.wait()

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(command.encode() + b"\n")

    async def mark(self) -> dict[str, Any]:
        after = len(self.records)
        await self.send("mark")
        record: dict[str, Any] = await self.expect("mark", 10, after)
        return record

    async def stop(self, timeout: float = 15) -> dict[str, Any] | None:
        if self.process.returncode is None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self.send("stop")
        with anyio.move_on_after(timeout):
            await self.process.wait()
        if self.process.returncode is None:
            self.kill()
            await self.process.wait()
        return next((r for r in reversed(self.records) if "done" in r), None)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


@contextlib.asynccontextmanager
async def children(profile: str | None) -> AsyncIterator[Callable[..., Any]]:
    """Start children of this script; every one still running is killed on exit."""
    started: list[Child] = []
    script = str(SCRIPT)
    async with anyio.create_task_group() as tg:

        async def start(name: str, *arguments: str) -> Child:
            command = [sys.executable, script, "--child", *arguments]
            if profile and arguments[0] in ("gateway", "remote"):
                command += ["--profile", profile]
            process = await anyio.open_process(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                env=child_environment(),
            )  # fmt: skip
            child = Child(process, name)
            started.append(child)
            tg.start_soon(child.collect)
            return child

        try:
            yield start
        finally:
            for child in started:
                child.kill()
            with anyio.CancelScope(shield=True):
                for child in started:
                    with anyio.move_on_after(5):
                        await child.process.wait()
            tg.cancel_scope.cancel()


# -- section 1: fan-out under a flood ---------------------------------------------------------


@dataclass
class Window:
    """Deltas between two marks of one child."""

    seconds: float
    cpu: float
    count: int
    gaps: int = 0
    dropped: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.count * 1e6 if self.count else float("nan")


def window(a: dict[str, Any], b: dict[str, Any], key: str = "count") -> Window:
    return Window(
        b["t"] - a["t"],
        b["cpu"] - a["cpu"],
        b[key] - a[key],
        b.get("gaps", 0) - a.get("gaps", 0),
        b.get("dropped", 0) - a.get("dropped", 0),
    )


@dataclass
class FanoutRun:
    remotes: list[Window]
    gateway: Window | None
    nats_busy: float  # nats-server CPU s per wall s
    sim_busy: float  # this process's (the simulator's) CPU s per wall s
    nats_cpu: float = 0.0  # nats-server CPU s over the window

    @property
    def system_us(self) -> float:
        """CPU µs of gateway, nats-server and remote together per message a bus got."""
        count = sum(w.count for w in self.remotes)
        cpu = sum(w.cpu for w in self.remotes) + self.nats_cpu
        cpu += self.gateway.cpu if self.gateway else 0.0
        return cpu / count * 1e6 if count else float("nan")


async def measured(
    members: list[Child], gateway: Child | None, nats: NatsServer, warm: float, seconds: float
) -> FanoutRun:
    """Marks over one window after ``warm`` seconds; children are running and ready."""
    await anyio.sleep(warm)
    watched = [*members, *([gateway] if gateway else [])]
    nats0, sim0, wall0 = nats.cpu(), time.process_time(), time.monotonic()
    first = [await child.mark() for child in watched]
    await anyio.sleep(seconds)
    last = [await child.mark() for child in watched]
    nats1, sim1, wall1 = nats.cpu(), time.process_time(), time.monotonic()
    wins = [window(a, b) for a, b in zip(first[: len(members)], last[: len(members)], strict=True)]
    gw = window(first[-1], last[-1], "published") if gateway else None
    wall = wall1 - wall0
    return FanoutRun(wins, gw, (nats1 - nats0) / wall, (sim1 - sim0) / wall, nats1 - nats0)


async def fanout_section(
    start: Callable[..., Any], nats: NatsServer, rounds: int, warm: float, seconds: float
) -> dict[str, list[FanoutRun]]:
    counts = (1, 2, 4)
    results: dict[str, list[FanoutRun]] = {"local": [], **{f"{k} remote": [] for k in counts}}
    prefix = "flood"
    async with Simulator(SimConfig(rate="max")) as sim:
        common = ["--nats", nats.url, "--prefix", prefix, "--lease-ttl", "6"]
        gateway = await start("gateway", "gateway", "--url", sim.public_url, *common)
        await gateway.expect("leading")
        # A warm-up: builds the simulator's ring for this subscription (about 2 s).
        local = await start("local", "local", "--url", sim.public_url, "--workload", "ticker")
        await local.expect("ready")
        await local.stop()
        for number in range(1, rounds + 1):
            local = await start("local", "local", "--url", sim.public_url, "--workload", "ticker")
            await local.expect("ready")
            run = await measured([local], None, nats, warm, seconds)
            await local.stop()
            results["local"].append(run)
            print(
                f"  round {number} local bus: {run.remotes[0].rate:,.0f} msgs/s, "
                f"{run.remotes[0].cpu_us:.2f} µs CPU/msg, simulator busy {run.sim_busy:.0%}",
                flush=True,
            )
            for k in counts:
                members = [
                    await start(f"remote {i}", "remote", *common, "--workload", "ticker")
                    for i in range(k)
                ]
                for member in members:
                    await member.expect("ready")
                run = await measured(members, gateway, nats, warm, seconds)
                for member in members:
                    await member.stop()
                results[f"{k} remote"].append(run)
                assert run.gateway is not None
                print(
                    f"  round {number} {k} remote(s): "
                    + ", ".join(f"{w.rate:,.0f}" for w in run.remotes)
                    + f" msgs/s each ({sum(w.gaps for w in run.remotes)} gaps); gateway "
                    f"{run.gateway.rate:,.0f} published/s, {run.gateway.cpu_us:.2f} µs CPU/msg, "
                    f"{run.gateway.dropped} dropped; nats-server busy {run.nats_busy:.0%}, "
                    f"simulator {run.sim_busy:.0%}",
                    flush=True,
                )
        await gateway.stop()
        violations = len(sim.violations)
    print(f"  simulator violations: {violations}")
    return results


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def report_fanout(results: dict[str, list[FanoutRun]]) -> bool:
    print("\nFan-out, DEFAULT tickers on 10 codes, simulator flood: median (min–max) over rounds")
    print(
        f"{'bus':<10} {'msgs/s per bus':>28} {'× local':>8} {'CPU µs/msg':>20} "
        f"{'gateway published/s':>26} {'gateway µs/msg':>20} {'dropped':>8} {'nats busy':>10} "
        f"{'all µs/msg':>11}"
    )
    local = [run.remotes[0].rate for run in results["local"]]
    for name, runs in results.items():
        rates = [w.rate for run in runs for w in run.remotes]
        costs = [w.cpu_us for run in runs for w in run.remotes]
        # The ratio within each round: the local bus ran right before the remotes.
        ratios = [
            w.rate / lr for run, lr in zip(runs, local, strict=True) for w in run.remotes if lr
        ]
        gw = [run.gateway for run in runs if run.gateway is not None]
        gw_rate = spread([g.rate for g in gw], ",.0f") if gw else "-"
        gw_cost = spread([g.cpu_us for g in gw], ".2f") if gw else "-"
        dropped = str(sum(g.dropped for g in gw)) if gw else "-"
        ratio = f"×{median(ratios):.2f}" if name != "local" else "×1"
        print(
            f"{name:<10} {spread(rates, ',.0f'):>28} {ratio:>8} {spread(costs, '.2f'):>20} "
            f"{gw_rate:>26} {gw_cost:>20} {dropped:>8} "
            f"{median([run.nats_busy for run in runs]):>10.0%} "
            f"{median([run.system_us for run in runs]):>11.2f}"
        )
    four = [
        w.rate / lr
        for run, lr in zip(results["4 remote"], local, strict=True)
        for w in run.remotes
        if lr
    ]
    met = bool(four) and median(four) >= FANOUT_TARGET
    together = [
        sum(w.rate for w in run.remotes) / lr
        for run, lr in zip(results["4 remote"], local, strict=True)
        if lr
    ]
    print(f"the 4 remotes together: ×{median(together):.2f} the local bus")
    print(
        "(all µs/msg: CPU of the gateway, nats-server and every bus over the messages the "
        "buses got; for the local bus, its own)"
    )
    print(
        f"target: each of 4 remotes ≥ {FANOUT_TARGET}× the local bus: "
        f"median ×{median(four):.2f}, worst ×{min(four, default=float('nan')):.2f}: "
        + ("MET" if met else "MISSED")
    )
    return met


# -- section 2: latency at 10k msgs/s ---------------------------------------------------------


def percentiles(values: list[int]) -> tuple[float, float, float]:
    """p50, p99, max in ms of nanosecond values."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] / 1e6, ordered[min(n - 1, int(n * 0.99))] / 1e6, ordered[-1] / 1e6


@dataclass
class LatencyRun:
    remotes: int
    added: tuple[float, float, float]  # gateway receive -> remote component
    total: tuple[float, float, float]  # sender -> remote component
    samples: int
    unmatched: int
    gateway: Window
    nats_busy: float
    remote_us: float  # median over the remotes of their CPU µs per message


async def latency_run(
    start: Callable[..., Any],
    nats: NatsServer,
    port: int,
    k: int,
    seconds: float,
    workdir: Path,
    run_id: str,
) -> LatencyRun:
    prefix = f"paced{run_id}"
    count = int(PACED_RATE * (seconds + 30))  # more than the run takes; it stops first
    url = f"ws://127.0.0.1:{port}/websocket/v1?rate={PACED_RATE:g}&n={count}"
    common = ["--nats", nats.url, "--prefix", prefix, "--lease-ttl", "6"]
    gw_file = workdir / f"gateway-{run_id}.json"
    gateway = await start("gateway", "gateway", "--url", url, *common, "--record", str(gw_file))
    await gateway.expect("leading")
    files = [workdir / f"remote-{run_id}-{i}.json" for i in range(k)]
    members = [
        await start(f"remote {i}", "remote", *common, "--workload", "paced", "--record", str(f))
        for i, f in enumerate(files)
    ]
    ready = max([await member.expect("ready") for member in members])
    run = await measured(members, gateway, nats, 0.5, seconds)
    for member in members:
        await member.stop()
    await gateway.stop()
    assert run.gateway is not None
    # The window: stamps sent between the first and the last mark.
    low = int((ready + 0.5) * 1e9)
    high = low + int(seconds * 1e9)
    raw = orjson.loads(gw_file.read_bytes())
    received = dict(zip(raw[::2], raw[1::2], strict=True))
    added: list[int] = []
    total: list[int] = []
    unmatched = 0
    for path in files:
        flat = orjson.loads(path.read_bytes())
        for stamp, arrival in zip(flat[::2], flat[1::2], strict=True):
            if not low <= stamp < high:
                continue
            at = received.get(stamp)
            if at is None:
                unmatched += 1
                continue
            added.append(arrival - at)
            total.append(arrival - stamp)
    if not added:
        raise RuntimeError("no message of the window reached a remote")
    return LatencyRun(
        k,
        percentiles(added),
        percentiles(total),
        len(added),
        unmatched,
        run.gateway,
        run.nats_busy,
        median([w.cpu_us for w in run.remotes]),
    )


async def latency_section(
    start: Callable[..., Any], nats: NatsServer, rounds: int, seconds: float
) -> list[LatencyRun]:
    sys.path.insert(0, str(SCRIPT.parent))
    from bench_latency import start_sender  # the paced sender: a process of its own

    sender, port = start_sender()
    runs: list[LatencyRun] = []
    try:
        with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
            for number in range(1, rounds + 1):
                for k in (1, 2, 4):
                    run = await latency_run(
                        start, nats, port, k, seconds, Path(tmp), f"{number}x{k}"
                    )
                    runs.append(run)
                    print(
                        f"  round {number} {k} remote(s): gateway → remote p50/p99/max "
                        f"{run.added[0]:.2f}/{run.added[1]:.2f}/{run.added[2]:.2f} ms, sender "
                        f"→ remote p99 {run.total[1]:.2f} ms, {run.samples:,} samples "
                        f"({run.unmatched} unmatched); gateway {run.gateway.rate:,.0f}/s, "
                        f"{run.gateway.cpu_us:.2f} µs CPU/msg; remotes {run.remote_us:.2f} µs "
                        f"CPU/msg; nats-server busy {run.nats_busy:.0%}",
                        flush=True,
                    )
    finally:
        sender.terminate()
        sender.join(5)
    return runs


def report_latency(runs: list[LatencyRun]) -> bool:
    print(
        f"\nLatency at {PACED_RATE:,.0f} msgs/s (tickers and trades, 10 codes), ms: "
        "median over rounds of each round's percentile"
    )
    print(
        f"{'remotes':>7} {'gw → remote p50':>16} {'p99':>8} {'max':>8} "
        f"{'sender → remote p99':>20} {'gateway µs CPU/msg':>19} {'remote µs CPU/msg':>18} "
        f"{'nats busy':>10}"
    )
    met = True
    for k in (1, 2, 4):
        mine = [run for run in runs if run.remotes == k]
        p99 = median([run.added[1] for run in mine])
        if k == 4:
            met = p99 <= LATENCY_TARGET_MS
        print(
            f"{k:>7} {median([run.added[0] for run in mine]):>16.2f} {p99:>8.2f} "
            f"{median([run.added[2] for run in mine]):>8.2f} "
            f"{median([run.total[1] for run in mine]):>20.2f} "
            f"{median([run.gateway.cpu_us for run in mine]):>19.2f} "
            f"{median([run.remote_us for run in mine]):>18.2f} "
            f"{median([run.nats_busy for run in mine]):>10.0%}"
        )
    print(
        f"target: p99 gateway receive → remote component ≤ {LATENCY_TARGET_MS} ms with 4 "
        "remotes: " + ("MET" if met else "MISSED")
    )
    return met


# -- section 3: lease churn -------------------------------------------------------------------


def accepted_tickers(sim: Simulator, since: float) -> list[tuple[float, frozenset[str]]]:
    """(time, ticker codes) of each public request accepted at or after ``since``."""
    found = []
    for record in sim.requests:
        if record.time < since or record.endpoint != "public":
            continue
        if isinstance(record.parsed, Subscribe) and record.error is None:
            codes = frozenset(
                code
                for entry in record.parsed.entries
                if entry.type == "ticker"
                for code in entry.codes or ()
            )
            found.append((record.time, codes))
    return found


@dataclass
class Step:
    name: str
    seconds: float  # event -> the first accepted request with the union of live wishes
    requests: int  # accepted requests in between
    bound: float


async def follow(sim: Simulator, since: float, wanted: frozenset[str], timeout: float) -> Step:
    def matching() -> tuple[float, int] | None:
        seen = accepted_tickers(sim, since)
        for index, (at, codes) in enumerate(seen):
            if codes == wanted:
                return at, index + 1
        return None

    await sim.wait_until(lambda: matching() is not None, timeout)
    found = matching()
    assert found is not None
    return Step("", found[0] - since, found[1], 0.0)


async def churn_section(
    start: Callable[..., Any], nats: NatsServer, cycles: int
) -> tuple[list[Step], int]:
    all_codes = [code for code in markets_for("kr") if code.startswith("KRW-")]
    groups = [all_codes[i * CHURN_BUSES : (i + 1) * CHURN_BUSES] for i in range(CHURN_WORKERS)]
    prefix = "churn"
    ttl = CHURN_LEASE_TTL
    common = ["--nats", nats.url, "--prefix", prefix, "--lease-ttl", f"{ttl:g}"]
    common += ["--debounce", f"{CHURN_DEBOUNCE:g}"]
    steps: list[Step] = []
    async with Simulator(SimConfig(rate=20.0)) as sim:
        gateway = await start(
            "gateway",
            "gateway",
            "--url",
            sim.public_url,
            *common,
        )
        await gateway.expect("leading")
        workers: dict[int, Child] = {}

        def union() -> frozenset[str]:
            return frozenset(code for i in workers for code in groups[i])

        async def register(indices: Sequence[int]) -> None:
            started = [
                (i, await start(f"churn {i}", "churn", *common, "--codes", ",".join(groups[i])))
                for i in indices
            ]
            times = [await child.expect("registered") for _, child in started]
            workers.update(started)
            event = max(times)
            step = await follow(sim, event, union(), STEP_TIMEOUT)
            name = f"{len(indices)} processes ({len(indices) * CHURN_BUSES} buses) start"
            # The remote bus's debounce, then the gateway's.
            steps.append(Step(name, step.seconds, step.requests, 2 * CHURN_DEBOUNCE))

        async def leave(killed: Sequence[int], stopped: Sequence[int]) -> None:
            event = time.monotonic()
            for i in killed:
                workers.pop(i).kill()
            gone = [workers.pop(i) for i in stopped]
            for child in gone:
                await child.send("stop")
            bound = ttl + CHURN_DEBOUNCE if killed else CHURN_DEBOUNCE
            step = await follow(sim, event, union(), STEP_TIMEOUT)
            name = " and ".join(
                [f"{len(killed)} SIGKILLed"] * bool(killed)
                + [f"{len(stopped)} exit cleanly"] * bool(stopped)
            )
            name = f"{name} ({(len(killed) + len(stopped)) * CHURN_BUSES} buses)"
            steps.append(Step(name, step.seconds, step.requests, bound))
            for child in gone:
                await child.stop()

        for _cycle in range(cycles):
            # Oldest first: each cycle SIGKILLs and stops other processes.
            await register([i for i in range(CHURN_WORKERS) if i not in workers])
            live = list(workers)
            await leave(live[0:2], [])
            await leave([], live[2:4])
            await register(live[0:4])
            live = list(workers)
            await leave(live[0:2], live[2:4])
        for child in list(workers.values()):
            await child.stop()
        await gateway.stop()
        violations = list(sim.violations)
        connections = sum(1 for c in sim.connections if c.endpoint == "public" and c.status == 101)
    for violation in violations:
        print(f"  violation: {violation}")
    print(f"  public connections the gateway opened: {connections}")
    return steps, len(violations)


def report_churn(steps: list[Step], violations: int) -> bool:
    print(
        f"\nLease churn: event → the simulator's first accepted request with the union of "
        f"live wishes (nats.lease_ttl {CHURN_LEASE_TTL:g} s, debounce {CHURN_DEBOUNCE:g} s)"
    )
    print(f"{'step':<46} {'seconds':>8} {'bound':>7} {'requests':>9}")
    met = violations == 0
    for step in steps:
        print(f"{step.name:<46} {step.seconds:>8.3f} {step.bound:>7.2f} {step.requests:>9}")
    print(f"simulator limit violations: {violations}: " + ("MET" if met else "MISSED"))
    return met


# -- main -------------------------------------------------------------------------------------


async def parent(args: argparse.Namespace, server: str) -> None:
    sections = args.only or ["fanout", "latency", "churn"]
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"upbus {version('upbus')}, nats-py {version('nats-py')}, {server}"
        f"; sections: {', '.join(sections)}{' (quick)' if args.quick else ''}",
        flush=True,
    )
    rounds = 1 if args.quick else args.rounds
    verdicts: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="scaleout-nats-") as tmp:
        nats = NatsServer(Path(tmp))
        try:
            async with children(args.profile) as start:
                if "fanout" in sections:
                    print("\n[fan-out]", flush=True)
                    warm, seconds = (1.0, 2.0) if args.quick else (1.5, 4.0)
                    results = await fanout_section(start, nats, rounds, warm, seconds)
                    verdicts["fan-out ≥ 0.5× local"] = report_fanout(results)
                if "latency" in sections:
                    print("\n[latency]", flush=True)
                    seconds = 2.0 if args.quick else 4.0
                    runs = await latency_section(start, nats, rounds, seconds)
                    verdicts["p99 added latency ≤ 5 ms"] = report_latency(runs)
                if "churn" in sections:
                    print("\n[lease churn]", flush=True)
                    steps, violations = await churn_section(start, nats, rounds)
                    verdicts["churn: no violations"] = report_churn(steps, violations)
        finally:
            nats.stop()
    print("\n" + "; ".join(f"{k}: {'MET' if v else 'MISSED'}" for k, v in verdicts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of fan-out and latency")
    parser.add_argument("--quick", action="store_true", help="one short round of each")
    parser.add_argument(
        "--only", choices=("fanout", "latency", "churn"), action="append", help="repeatable"
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--nats", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="upbus", help=argparse.SUPPRESS)
    parser.add_argument("--lease-ttl", type=float, default=6.0, help=argparse.SUPPRESS)
    parser.add_argument("--debounce", type=float, default=0.1, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="ticker", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--codes", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write a cProfile of every gateway and remote child to DIR (slows them)",
    )
    args = parser.parse_args()
    if args.child:
        # Warnings (a lease expired, a gap) are expected here; the parent counts gaps.
        logging.getLogger("upbus").setLevel(logging.ERROR)
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.runcall(lambda: anyio.run(CHILDREN[args.child], args, backend="asyncio"))
            profiler.dump_stats(Path(args.profile) / f"{args.child}-{os.getpid()}.prof")
        else:
            anyio.run(CHILDREN[args.child], args, backend="asyncio")
        return
    if shutil.which("nats-server") is None:
        raise SystemExit("nats-server is not on PATH (Debian package nats-server)")
    server = subprocess.run(["nats-server", "--version"], capture_output=True, text=True)
    anyio.run(parent, args, server.stdout.strip(), backend="asyncio")


if __name__ == "__main__":
    main()
