"""Memory: RSS growth under a long message stream, and bytes per idle component.

Run: ``.venv/bin/python bench/bench_memory.py`` (``--messages``, ``--components``,
``--runs``, ``--growth-runs``, ``--transports``, ``--modes``; about 2.5 minutes).

Every measurement runs in a fresh child process (``spawn``), so each starts from the
same baseline; the figures are medians over the children, with min-max.

A. **Growth.** The flood sender of ``bench_latency.py`` (another process, 127.0.0.1)
   writes realistic DEFAULT ticker and trade frames on 10 codes as fast as the socket
   takes them, to an ordinary :class:`~upbus.Bus` with 10 components (``on_message``,
   default ``conflate`` buffers) subscribed to both types on all 10 codes. VmRSS
   (``/proc/self/status``) and the number of objects the garbage collector tracks
   (and ``sys.getallocatedblocks()``) are read when the bus has received 200k,
   400k, … ``--messages`` messages. Growth = RSS at the end over RSS at 200k. Target
   < 5 %. Once per transport in ``--transports`` (alternating), with a probe that
   records the largest batch one ``receive_batch`` returned.

B. **Idle components.** ``--components`` components with small specs (a ticker on
   one or two random KRW codes) are registered on a bus whose endpoint refuses
   connections (so no data ever arrives: nothing is buffered, only bookkeeping).
   One component registers first and the failed connect settles before the
   baseline, so the connect attempt's own allocations are not counted. Two kinds:
   ``plain`` (read with ``async for``, no task of its own) and ``callback`` (has
   ``on_message``, so the bus runs a delivery task for it, parked while idle).
   Bytes per component from the VmRSS difference (``rss`` children) and from
   ``tracemalloc`` (``traced`` children, which also list the top allocation sites).
   Target ≤ 2 KB. The time per registration over the last 10 % is printed too.
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import platform
import random
import socket
import statistics
import sys
import time
import tracemalloc
from typing import Any

import anyio

import upbus
from upbus.core._bus import Bus
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import ticker
from upbus.plugins.picows_transport import picows_installed
from upbus.settings import ReconnectSettings
from upbus.sim.markets import MARKETS

KRW = sorted(code for code in MARKETS if code.startswith("KRW-"))
TARGET_GROWTH = 0.05
BASELINE = 200_000
TARGET_BYTES = 2048


def vm_rss() -> int:
    """Resident set size in bytes, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- A. growth under a message stream --------------------------------------------------------


class Counting:
    def __init__(self) -> None:
        self.count = 0

    async def on_message(self, message: object) -> None:
        self.count += 1


Sample = tuple[int, int, int, int, float, int]


async def growth_run(port: int, messages: int, step: int, transport: str) -> list[Sample]:
    """Per ``step``: messages, VmRSS, gc-tracked objects, allocated blocks, seconds, and
    the most frames one ``receive_batch`` has returned so far."""
    from bench_latency import CODES, StampPlugin  # the sender's codes; a batch-size probe

    url = f"ws://127.0.0.1:{port}/websocket/v1?rate=0&n={messages + 10 * step}"
    settings = upbus.Settings(
        public_url=url, debounce=0.0, autoload_plugins=False, transport=transport
    )
    plugins = PluginManager.load(settings)
    probe = StampPlugin(settings, record=False)
    plugins.register(probe, "bench-probe")
    components = [Counting() for _ in range(10)]
    samples: list[Sample] = []
    async with Bus(settings, plugin_manager=plugins) as bus:
        for component in components:
            await bus.register_component(component, [ticker(*CODES), upbus.trade(*CODES)])
        start = time.perf_counter()
        marks = list(range(step, messages + 1, step))
        with anyio.fail_after(600):
            while marks:
                received = bus.get_connection_metrics()["public"]["messages_in"]
                if received >= marks[0]:
                    marks.pop(0)
                    rss, objects = vm_rss(), len(gc.get_objects())
                    blocks = sys.getallocatedblocks()
                    largest = probe.public.largest if probe.public else 0
                    seconds = time.perf_counter() - start
                    samples.append((received, rss, objects, blocks, seconds, largest))
                else:
                    await anyio.sleep(0.005)
    return samples


def growth_child(port: int, messages: int, step: int, transport: str, out: Any) -> None:
    logging.disable(logging.WARNING)
    out.send(anyio.run(growth_run, port, messages, step, transport))


# -- B. idle components ----------------------------------------------------------------------


class Plain:
    """A component that would read its Subscriber with ``async for``."""


class Callback:
    async def on_message(self, message: object) -> None:
        pass


async def idle_run(kind: str, traced: bool, count: int, seed: int) -> dict[str, Any]:
    refusing = socket.socket()  # bound but not listening: every connect is refused
    refusing.bind(("127.0.0.1", 0))
    port = refusing.getsockname()[1]
    settings = upbus.Settings(
        public_url=f"ws://127.0.0.1:{port}/websocket/v1",
        autoload_plugins=False,
        reconnect=ReconnectSettings(initial=60.0, maximum=60.0),
    )
    rng = random.Random(seed)
    cls = Callback if kind == "callback" else Plain
    components = [cls() for _ in range(count)]
    plans = [ticker(*rng.sample(KRW, rng.randint(1, 2))) for _ in range(count)]
    first = cls()
    async with Bus(settings) as bus:
        await bus.register_component(first, ticker("KRW-BTC"))
        await anyio.sleep(0.3)  # the connect attempt fails and settles into its back-off
        gc.collect()
        if traced:
            tracemalloc.start(1)
            before = tracemalloc.get_traced_memory()[0]
            base = tracemalloc.take_snapshot()
        else:
            before = vm_rss()
        tail = count - max(1, count // 10)
        tail_start = 0.0
        for index, (component, spec) in enumerate(zip(components, plans, strict=True)):
            if index == tail:
                tail_start = time.perf_counter()
            await bus.register_component(component, spec)
        tail_seconds = time.perf_counter() - tail_start
        await anyio.sleep(0.05)  # delivery tasks start and park
        gc.collect()
        sites: list[tuple[str, int]] = []
        if traced:
            after = tracemalloc.get_traced_memory()[0]
            stats = tracemalloc.take_snapshot().compare_to(base, "lineno")
            sites = [
                (str(stat.traceback[0]).replace(str(_root()), ""), stat.size_diff)
                for stat in stats[:12]
            ]
            tracemalloc.stop()
        else:
            after = vm_rss()
        live = len(bus.get_subscription_stats()["subscribers"])
    refusing.close()
    return {
        "bytes": (after - before) / count,
        "tail_us": tail_seconds / (count - tail) * 1e6,
        "sites": sites,
        "live": live,
    }


def _root() -> str:
    import pathlib

    return str(pathlib.Path(upbus.__file__).parent.parent) + "/"


def idle_child(kind: str, traced: bool, count: int, seed: int, out: Any) -> None:
    logging.disable(logging.WARNING)
    out.send(anyio.run(idle_run, kind, traced, count, seed))


# -- running ---------------------------------------------------------------------------------


def in_child(target: Any, *args: Any) -> Any:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=target, args=(*args, child))
    process.start()
    result = parent.recv()
    process.join()
    return result


def span(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    return (
        f"{statistics.median(values):,.{digits}f} "
        f"({min(values):,.{digits}f}–{max(values):,.{digits}f})"
    )


def report_growth(transport: str, runs: list[list[Sample]], messages: int) -> None:
    print(f"A. growth, transport={transport}: {messages:,} messages, {len(runs)} runs")
    print(
        f"  {'messages':>10}  {'VmRSS MB':24} {'gc objects':24} "
        f"{'allocated blocks':24} {'msgs/s':24} largest batch"
    )
    for i in range(min(len(run) for run in runs)):
        received = statistics.median(run[i][0] for run in runs)
        print(
            f"  {received:>10,.0f}  {span([run[i][1] for run in runs], 1e-6, 2):24} "
            f"{span([run[i][2] for run in runs], 1, 0):24} "
            f"{span([run[i][3] for run in runs], 1, 0):24} "
            f"{span([run[i][0] / run[i][4] for run in runs], 1, 0):24} "
            f"{span([run[i][5] for run in runs], 1, 0)}"
        )
    # The baseline is the first sample at or past 200k messages.
    base = [next(s for s in run if s[0] >= BASELINE) for run in runs]
    growth = [(run[-1][1] - b[1]) / b[1] for run, b in zip(runs, base, strict=True)]
    objects = [float(run[-1][2] - b[2]) for run, b in zip(runs, base, strict=True)]
    blocks = [float(run[-1][3] - b[3]) for run, b in zip(runs, base, strict=True)]
    verdict = "PASS" if statistics.median(growth) < TARGET_GROWTH else "FAIL"
    print(
        f"  RSS growth {BASELINE:,}→{messages:,}: {span(growth, 100, 2)} % "
        f"(target < {TARGET_GROWTH:.0%}): {verdict}; over the same span gc-tracked "
        f"objects {span(objects, 1, 0)}, allocated blocks {span(blocks, 1, 0)}"
    )


def main() -> None:
    from bench_latency import start_sender

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--step", type=int, default=200_000)
    parser.add_argument("--components", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=2, help="children per idle contender")
    parser.add_argument("--modes", nargs="+", default=["rss", "traced"], choices=["rss", "traced"])
    parser.add_argument("--growth-runs", type=int, default=2, help="children per transport")
    parser.add_argument("--transports", nargs="+", default=["picows", "httpx"])
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument("--skip-idle", action="store_true")
    args = parser.parse_args()
    print(f"Python {platform.python_version()} on {platform.machine()}")

    if not args.skip_growth:
        transports = [t for t in args.transports if t != "picows" or picows_installed()]
        sender, port = start_sender()
        grown: dict[str, list[list[Sample]]] = {t: [] for t in transports}
        try:
            for _run in range(args.growth_runs):
                for transport in transports:
                    grown[transport].append(
                        in_child(growth_child, port, args.messages, args.step, transport)
                    )
        finally:
            sender.terminate()
        for transport, runs in grown.items():
            report_growth(transport, runs, args.messages)

    if not args.skip_idle:
        contenders = [
            (kind, mode == "traced") for kind in ("plain", "callback") for mode in args.modes
        ]
        results: dict[tuple[str, bool], list[dict[str, Any]]] = {c: [] for c in contenders}
        for run in range(args.runs):
            for kind, traced in contenders:
                results[(kind, traced)].append(
                    in_child(idle_child, kind, traced, args.components, run)
                )
        print(f"B. idle components: {args.components:,} per child, {args.runs} runs")
        for (kind, traced), children in results.items():
            per = [r["bytes"] for r in children]
            verdict = "PASS" if statistics.median(per) <= TARGET_BYTES else "FAIL"
            print(
                f"  {kind:8s} {'tracemalloc' if traced else 'VmRSS':11s} "
                f"{span(per, 1, 0)} bytes/component ({verdict}, target ≤ {TARGET_BYTES}); "
                f"registration at {args.components:,} live: "
                f"{span([r['tail_us'] for r in children])}"
                " µs"
            )
        for kind in ("plain", "callback") if "traced" in args.modes else ():
            print(f"  top allocation sites, {kind} (bytes per component, first traced run):")
            for site, size in results[(kind, True)][0]["sites"]:
                print(f"    {size / args.components:8.1f}  {site}")


if __name__ == "__main__":
    main()
