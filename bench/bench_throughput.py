"""The whole stack under a flood: upbus's Bus vs minimal websockets and picows clients.

Run: ``.venv/bin/python bench/bench_throughput.py [--messages N] [--runs R]``

The simulator runs as its own process, ``python -m upbus.sim --port 0 --rate max``: it
repeats a ring of pre-encoded frames as fast as the socket takes them (see
``upbus.sim.flood``), so the client is what is measured. Every run of every
contender is a fresh subprocess (this script with ``--child``), so its CPU time and
peak RSS are its own. Contenders, all on asyncio:

* ``A upbus/httpx``: ``upbus.Bus`` with the default transport (httpx + httpx-ws;
  ``--transport NAME``, repeatable, adds an A per transport setting) and one
  component that counts messages by iterating its Subscriber (``async for``;
  ``--style``, repeatable, adds an A per style: ``batches``, ``async for`` over
  ``Subscriber.batches()``; ``plain`` / ``async``, a ``def`` / ``async def
  on_message``); overflow ``"block"`` (capacity 65,536), so nothing is conflated or
  dropped (the drops column checks that);
* ``B websockets``: ``websockets.asyncio.client.connect``, send the subscription,
  ``async for`` every message, ``orjson.loads``, count;
* ``C picows``: a ``picows`` listener that ``orjson.loads`` every binary frame's
  payload and counts.

upbus does more per message than B and C: typed decoding into message structs,
routing by (type, code) and a per-component buffer; B and C produce bare dicts.

Two workloads: DEFAULT tickers on 10 KRW codes, SIMPLE trades on the same codes.
Per workload one warm-up run each, then ``--runs`` rounds of A, B, C so that load on
a shared machine hits them alike. A run's window opens at the first message after
the snapshots (one per code) and closes at the N-th; over it the child measures wall
and CPU time (``time.process_time``) and the parent the simulator's CPU time
(``/proc``), which tells whether the simulator was the bottleneck. Peak RSS is the
child's ``ru_maxrss``; "of it streaming" is how much it grew during the window.

To profile the upbus client against a running simulator::

    .venv/bin/python -m upbus.sim --port 0 --rate max &   # prints its URL
    .venv/bin/python bench/bench_throughput.py --child upbus --url URL \
        --workload trade --profile upbus.prof
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import orjson

from upbus.sim.markets import POPULAR

CODES = POPULAR
# workload -> (type, format, the first bytes of every data frame)
WORKLOADS: dict[str, tuple[str, Literal["DEFAULT", "SIMPLE"], bytes]] = {
    "ticker": ("ticker", "DEFAULT", b'{"type":"ticker"'),
    "trade": ("trade", "SIMPLE", b'{"ty":"trade"'),
}
CHILD_TIMEOUT = 120.0  # seconds one run may take, connecting included


def subscription(workload: str) -> str:
    kind, fmt, _ = WORKLOADS[workload]
    return json.dumps([{"ticket": "bench"}, {"type": kind, "codes": list(CODES)}, {"format": fmt}])


# -- the children --------------------------------------------------------------------------


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass(frozen=True)
class Options:
    style: str  # how the upbus component consumes
    transport: str  # the upbus transport setting


@dataclass(frozen=True)
class Contender:
    label: str
    child: str
    transport: str = ""
    style: str = "iterate"


def contenders(transports: list[str], styles: list[str]) -> list[Contender]:
    uppers = [
        Contender(
            f"A upbus/{name}" + ("" if styles == ["iterate"] else f" {style}"),
            "upbus",
            name,
            style,
        )
        for name in transports
        for style in styles
    ]
    return [*uppers, Contender("B websockets", "websockets"), Contender("C picows", "picows")]


@dataclass
class Window:
    """The streaming window of one run, measured in the child.

    Every client first gets one snapshot per code; the window opens at the first
    message after them (``tick`` returns True there) and closes at the ``n``-th.
    """

    n: int
    wall: float = 0.0
    cpu: float = 0.0
    count: int = -len(CODES)  # 0 once the snapshots are in
    drops: int = 0
    rss_open: float = 0.0  # peak RSS (MiB) when the window opened: imports, connection

    def open(self) -> None:
        self.rss_open = peak_rss_mib()
        print("START", flush=True)  # the parent samples the simulator's CPU now
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def close(self) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


async def child_upbus(url: str, workload: str, window: Window, options: Options) -> None:
    import anyio

    import upbus

    kind, fmt, _ = WORKLOADS[workload]
    specs = upbus.ticker(*CODES) if workload == "ticker" else upbus.trade(*CODES)
    done = anyio.Event()

    def count(message: Any) -> None:
        if window.count >= window.n:
            return  # the bus hands over what is buffered when it stops: not counted
        window.count += 1
        if window.count == 0:
            assert message.type == kind, message
        elif window.count == 1:
            window.open()
        elif window.count == window.n:
            window.close()
            done.set()

    class Lossless:
        # Lossless: when the buffer is full the receive loop waits (backpressure).
        upbus_overflow = "block"
        upbus_capacity = 65_536

    class Plain(Lossless):
        def on_message(self, message: Any) -> None:
            count(message)

    class Async(Lossless):
        async def on_message(self, message: Any) -> None:
            count(message)

    settings = upbus.Settings(public_url=url, format=fmt, debounce=0.0, transport=options.transport)
    async with upbus.Bus(settings) as bus:
        if options.style == "iterate":
            reader = Lossless()  # no on_message: the component reads its Subscriber
            subscriber = await bus.register_component(reader, specs)
            async for item in subscriber:
                if item.type == "connection":
                    continue  # the "connected" event
                window.count += 1
                if window.count == 0:
                    assert item.type == kind, item
                elif window.count == 1:
                    window.open()
                elif window.count == window.n:
                    window.close()
                    break
        elif options.style == "batches":
            reader = Lossless()
            subscriber = await bus.register_component(reader, specs)
            async for items in subscriber.batches():
                for item in items:
                    if item.type == "connection":
                        continue
                    window.count += 1
                    if window.count == 0:
                        assert item.type == kind, item
                    elif window.count == 1:
                        window.open()
                    elif window.count == window.n:
                        window.close()
                        break
                if window.count >= window.n:
                    break
        else:
            component = Async() if options.style == "async" else Plain()
            await bus.register_component(component, specs)
            await done.wait()
        window.drops = sum(s["dropped"] for s in bus.get_subscription_stats()["subscribers"])


async def child_websockets(url: str, workload: str, window: Window, options: Options) -> None:
    from websockets.asyncio.client import connect

    prefix = WORKLOADS[workload][2]
    loads = orjson.loads
    # A short close_timeout: a client that stops reading mid-flood never sees the
    # server's close frame behind the data in flight (outside the window anyway).
    connect_ws = connect(
        url, compression=None, max_size=None, ping_interval=None, close_timeout=0.5
    )
    async with connect_ws as ws:
        await ws.send(subscription(workload))
        async for message in ws:
            loads(message)
            window.count += 1
            if window.count == 0:
                assert isinstance(message, bytes)
                assert message.startswith(prefix), message[:40]
            elif window.count == 1:
                window.open()
            elif window.count == window.n:
                window.close()
                break


async def child_picows(url: str, workload: str, window: Window, options: Options) -> None:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    prefix = WORKLOADS[workload][2]
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loads = orjson.loads
    binary = WSMsgType.BINARY

    class Listener(WSListener):
        def on_ws_connected(self, transport: WSTransport) -> None:
            transport.send(WSMsgType.TEXT, subscription(workload).encode())

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if done.done():
                return  # the rest of the last socket read
            if frame.msg_type is not binary:
                if frame.msg_type is WSMsgType.CLOSE and not done.done():
                    done.set_exception(ConnectionError("closed by the server"))
                return
            payload = frame.get_payload_as_memoryview()
            loads(payload)
            window.count += 1
            if window.count == 0:
                assert bytes(payload[: len(prefix)]) == prefix, bytes(payload[:40])
            elif window.count == 1:
                window.open()
            elif window.count == window.n:
                window.close()
                done.set_result(None)
                transport.send_close()
                transport.disconnect()

    transport, _listener = await ws_connect(Listener, url)
    try:
        await done
    finally:
        transport.disconnect()


CHILDREN: dict[str, Callable[[str, str, Window, Options], Coroutine[None, None, None]]] = {
    "upbus": child_upbus,
    "websockets": child_websockets,
    "picows": child_picows,
}


def run_child(args: argparse.Namespace) -> None:
    window = Window(args.messages)
    child = CHILDREN[args.child]
    coroutine = child(args.url, args.workload, window, Options(args.style[0], args.transport[0]))
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(asyncio.run, coroutine)
        profiler.dump_stats(args.profile)
    else:
        asyncio.run(coroutine)
    result = {
        "wall": window.wall,
        "cpu": window.cpu,
        "count": window.count,
        "drops": window.drops,
        "rss_mib": peak_rss_mib(),
        "rss_open_mib": window.rss_open,
    }
    print(json.dumps(result), flush=True)


# -- the parent ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux ``/proc``), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    rate: float  # messages/s
    cpu_us: float  # client CPU µs per message
    rss_mib: float
    growth_mib: float  # peak RSS growth over the window
    drops: int
    sim_busy: float | None  # the simulator's CPU time / the window's wall time


def child_command(contender: Contender, url: str, workload: str, messages: int) -> list[str]:
    """The command line of one child run of ``contender`` (this script with ``--child``)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", contender.child]
    command += ["--url", url, "--workload", workload, "--messages", str(messages)]
    command += ["--style", contender.style]
    if contender.transport:
        command += ["--transport", contender.transport]
    return command


def one_run(contender: Contender, url: str, workload: str, messages: int, sim_pid: int) -> Run:
    name = contender.label
    command = child_command(contender, url, workload, messages)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    sim_start = sim_end = None
    result: dict[str, Any] | None = None
    try:
        for line in process.stdout:  # two lines: START, then the result
            if line.strip() == "START":
                sim_start = cpu_seconds(sim_pid)
            elif line.startswith("{"):
                sim_end = cpu_seconds(sim_pid)
                result = json.loads(line)
                break
        process.wait(CHILD_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if result is None or process.returncode != 0:
        raise RuntimeError(f"{name} failed (exit status {process.returncode})")
    if result["count"] != messages:
        raise RuntimeError(f"{name} counted {result['count']} of {messages} messages")
    busy = None
    if sim_start is not None and sim_end is not None:
        busy = (sim_end - sim_start) / result["wall"]
    return Run(
        messages / result["wall"],
        result["cpu"] / messages * 1e6,
        result["rss_mib"],
        result["rss_mib"] - result["rss_open_mib"],
        result["drops"],
        busy,
    )


def start_simulator() -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "upbus.sim", "--port", "0", "--rate", "max"]
    sim = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert sim.stdout is not None
    url = sim.stdout.readline().strip()
    if not url.startswith("ws://"):
        sim.kill()
        raise RuntimeError(f"the simulator did not start: {url!r}")
    return sim, url


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def report(workload: str, results: dict[str, list[Run]]) -> None:
    kind, fmt, _ = WORKLOADS[workload]
    print(f"\n{kind} {fmt}, {len(CODES)} codes: median (min–max)")
    print(
        f"{'client':<16} {'msgs/s':>27} {'CPU µs/msg':>20} {'peak RSS MiB':>20} "
        f"{'of it streaming':>16} {'sim CPU busy':>13} {'drops':>6}"
    )
    medians: dict[str, tuple[float, float, float]] = {}
    for name, runs in results.items():
        rates = [run.rate for run in runs]
        costs = [run.cpu_us for run in runs]
        rss = [run.rss_mib for run in runs]
        growth = [run.growth_mib for run in runs]
        busy = [run.sim_busy for run in runs if run.sim_busy is not None]
        medians[name] = statistics.median(rates), statistics.median(costs), statistics.median(rss)
        busy_text = f"{statistics.median(busy):.0%}" if busy else "n/a"
        print(
            f"{name:<16} {spread(rates, ',.0f'):>27} {spread(costs, '.2f'):>20} "
            f"{spread(rss, '.1f'):>20} {spread(growth, '.1f'):>16} {busy_text:>13} "
            f"{sum(run.drops for run in runs):>6}"
        )
    for name, (a_rate, a_cost, a_rss) in medians.items():
        if not name.startswith("A "):
            continue
        for other in ("B websockets", "C picows"):
            o_rate, o_cost, o_rss = medians[other]
            # Runs of one round ran back to back: their ratio is the least disturbed
            # by a neighbour slowing the shared machine for a while.
            pairs = list(zip(results[name], results[other], strict=True))
            rate_ratio = statistics.median(a.rate / o.rate for a, o in pairs)
            cost_ratio = statistics.median(a.cpu_us / o.cpu_us for a, o in pairs)
            print(
                f"{name} / {other}: throughput ×{rate_ratio:.2f} (ratio of medians "
                f"×{a_rate / o_rate:.2f}), CPU per message ×{cost_ratio:.2f} "
                f"(×{a_cost / o_cost:.2f}), peak RSS ×{a_rss / o_rss:.2f}"
            )
    print("(ratios: median over rounds of the ratio within each round)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="messages per run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender")
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), action="append", help="default: both"
    )
    parser.add_argument(
        "--style",
        choices=("iterate", "batches", "plain", "async"),
        action="append",
        help="how the upbus component consumes (repeatable: one contender A per style): "
        "`async for` over its Subscriber (the default), `async for` over "
        "`Subscriber.batches()`, a plain `def on_message`, or `async def on_message`",
    )
    parser.add_argument(
        "--transport",
        action="append",
        help="upbus's transport setting, one contender A per value (repeatable); default "
        "'httpx', the default transport (httpx + httpx-ws). 'auto' picks a fast "
        "transport plugin when one is installed",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--url", help="with --child: the simulator's URL")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="with --child and --url: run under cProfile and write the stats to FILE",
    )
    args = parser.parse_args()
    args.transport = args.transport or ["httpx"]
    args.style = args.style or ["iterate"]
    if args.child:
        if args.workload is None:
            args.workload = ["ticker"]
        args.workload = args.workload[0]
        run_child(args)
        return

    workloads = args.workload or list(WORKLOADS)
    racers = contenders(args.transport, args.style)
    warm_up = min(args.messages, 20_000)
    sim, url = start_simulator()
    try:
        print(
            f"python {platform.python_version()} on {platform.machine()}, "
            f"{os.cpu_count()} CPUs; upbus {version('upbus')}, websockets "
            f"{version('websockets')}, picows {version('picows')}, orjson {version('orjson')}; "
            f"{args.messages:,} messages per run, {args.runs} runs after a warm-up; "
            f"upbus style(s): {', '.join(args.style)}, transport(s): {', '.join(args.transport)}",
            flush=True,
        )
        for workload in workloads:
            for racer in racers:  # warm-up; the simulator also builds its ring here
                one_run(racer, url, workload, warm_up, sim.pid)
            results: dict[str, list[Run]] = {racer.label: [] for racer in racers}
            for number in range(1, args.runs + 1):
                # Each round in another order, so that no contender always runs first.
                shift = (number - 1) % len(racers)
                for racer in racers[shift:] + racers[:shift]:
                    run = one_run(racer, url, workload, args.messages, sim.pid)
                    results[racer.label].append(run)
                    busy = "n/a" if run.sim_busy is None else f"{run.sim_busy:.0%}"
                    print(
                        f"  {workload} run {number} {racer.label:<16} {run.rate:>10,.0f} msgs/s "
                        f"{run.cpu_us:>6.2f} µs CPU/msg {run.rss_mib:>6.1f} MiB "
                        f"sim busy {busy}",
                        flush=True,
                    )
            report(workload, results)
    finally:
        sim.terminate()
        sim.wait(10)


if __name__ == "__main__":
    main()
