"""Fault recovery: from a fault to each component's first data message after the reconnect.

Run: ``.venv/bin/python bench/bench_recovery.py`` (``--faults``, ``--transports``,
``--kinds``, ``--runs``, ``--heartbeat-interval``, ``--heartbeat-timeout``; about 20
seconds for the defaults, 100 faults on each transport; ``--runs 3`` about a minute).

The fault cycle of ``tests/test_faults.py``, against the in-process
:class:`~upbus.sim.Simulator` on 127.0.0.1: one :class:`~upbus.Bus` per transport
with 20 components (overlapping and distinct ticker, trade and orderbook wishes on
ten KRW codes; some called back through ``on_message``, some iterating their
buffer), and ``--faults`` faults injected one after the other, cycling through:

* ``drop_fin`` / ``drop_rst``: the server closes the socket without a close frame;
* ``stall``: the server stops reading and writing, the socket stays open (found only
  by the heartbeat: ``--heartbeat-interval`` + ``--heartbeat-timeout`` at most);
* ``garbage``: bytes that are not a WebSocket frame;
* ``error_close``: an error frame (``WRONG_FORMAT``), then the server's close after
  50 ms; ``too_many``: the same with ``TOO_MANY_REQUEST``, which backs the client's
  connect limiter off (``backoff_initial`` 50 ms);
* ``refused_503`` / ``refused_429`` / ``refused_silent``: the socket is dropped and
  upgrades are refused (HTTP 503, HTTP 429, or closed unanswered) until the
  simulator has refused one; the retry waits a random 0–50 ms (``reconnect.initial``),
  after a 429 also the connect limiter's back-off.

The next fault comes once every component got data after the reconnect. Per fault and
component: ``total`` from the injection (``anyio.current_time()`` just before the
simulator call) to the component's first data message after its ``reconnected``
event, split into ``detect`` (to the ``gap`` event in the component's stream),
``reconnect`` (``gap`` → ``reconnected``: the connect, including refused attempts
and waits) and ``data`` (``reconnected`` → first message: the whole-state request,
the simulator's snapshots, routing and delivery). Every time is the one event loop's
clock, taken in the component when the item reaches it. Connect limits are lifted
(1,000 a second on both sides, reported as limiter waits) so that back-to-back faults
measure recovery, not the exchange's 5 connects a second.

``--kinds`` runs only the kinds named. Unlike the test, no component changes its
wishes during the refusals, and the callbacks are all ``async def``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

import upbus
from upbus.core._bus import Bus
from upbus.core.subscriptions._specs import Spec
from upbus.plugins.picows_transport import picows_installed
from upbus.sim import SimConfig, Simulator

KINDS = (
    "drop_fin",
    "drop_rst",
    "stall",
    "garbage",
    "error_close",
    "too_many",
    "refused_503",
    "refused_429",
    "refused_silent",
)
REFUSALS = {"refused_503": 503, "refused_429": 429, "refused_silent": 0}
ERRORS = {"error_close": "WRONG_FORMAT", "too_many": "TOO_MANY_REQUEST"}
SHARED = ("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-DOGE", "KRW-ADA")
DISTINCT = ("KRW-AVAX", "KRW-XLM", "KRW-SUI", "KRW-BCH")
STEP_TIMEOUT = 10.0  # one fault's whole recovery
PHASES = ("total", "detect", "reconnect", "data")


def component_specs(index: int, components: int) -> list[Spec]:
    """The test's wishes: the last few components each want a code nobody else does."""
    distinct = index - (components - len(DISTINCT))
    if distinct >= 0:
        code = DISTINCT[distinct]
        return [upbus.ticker(code), upbus.trade(code), upbus.orderbook(code, depth=5)]
    a, b = SHARED[index % len(SHARED)], SHARED[(index + 1) % len(SHARED)]
    return [
        [upbus.ticker(a, b)],
        [upbus.trade(a), upbus.ticker(b)],
        [upbus.orderbook(a, depth=5), upbus.trade(b)],
        [upbus.orderbook(a, depth=15), upbus.ticker(a)],
    ][index % 4]


class Tracker:
    """Wakes the harness whenever any component received anything."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def changed(self) -> None:
        self._event.set()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        with anyio.fail_after(timeout):
            while not predicate():
                self._event = anyio.Event()
                await self._event.wait()


@dataclass(eq=False)
class Component:
    """Notes when each connection event and the first message after it arrived."""

    tracker: Tracker
    # (state, arrival time, arrival time of the first message after it or None)
    events: list[list[Any]] = field(default_factory=list)

    def take(self, item: Any) -> None:
        now = anyio.current_time()
        if isinstance(item, upbus.ConnectionEvent):
            self.events.append([item.state, now, None])
        elif item.type in ("ticker", "trade", "orderbook") and self.events[-1][2] is None:
            self.events[-1][2] = now
        else:
            return
        self.tracker.changed()

    def recovered(self, outages: int) -> bool:
        return len(self.events) == 1 + 2 * outages and self.events[-1][2] is not None


@dataclass(eq=False)
class Callback(Component):
    async def on_message(self, message: Any) -> None:
        self.take(message)

    async def on_connection_state(self, event: Any) -> None:
        self.take(event)


@dataclass(eq=False)
class Iterating(Component):
    async def consume(self, subscriber: Any) -> None:
        async for item in subscriber:
            self.take(item)


async def inject(sim: Simulator, kind: str, connection: int) -> None:
    if kind == "drop_fin":
        sim.drop(connection)
    elif kind == "drop_rst":
        sim.drop(connection, reset=True)
    elif kind == "stall":
        sim.stall(connection)
    elif kind == "garbage":
        sim.send_garbage(connection)
    elif kind in ERRORS:
        sim.send_error(connection, ERRORS[kind], "injected by the benchmark")
    else:
        status = REFUSALS[kind]
        sim.refuse_connections(STEP_TIMEOUT, status=status or None)
        sim.drop(connection)
        await sim.wait_until(
            lambda: any(
                record.id > connection
                and record.status == status
                and (status or record.close_reason == "refused")
                for record in sim.connections
            ),
            STEP_TIMEOUT,
        )
        sim.refuse_connections(0)


def live_connection(sim: Simulator) -> int:
    return [record.id for record in sim.connections if record.status == 101][-1]


async def cycle(
    transport: str, kinds: list[str], args: argparse.Namespace
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Run ``args.faults`` faults on ``transport``; samples per kind and phase, and counters."""
    config = SimConfig(
        rate=args.rate, connect_limit=(args.connects_per_second, 1.0), error_close_delay=0.05
    )
    tracker = Tracker()
    components: list[Component] = [
        (Callback if index % 2 else Iterating)(tracker) for index in range(args.components)
    ]
    samples: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PHASES} for k in kinds}
    async with Simulator(config) as sim:
        settings = upbus.Settings(
            public_url=sim.public_url,
            transport=transport,
            debounce=0.02,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            reconnect={"initial": 0.05, "maximum": 0.2},
            rate_limit={
                "connect_per_second": args.connects_per_second,
                "backoff_initial": 0.05,
                "backoff_max": 0.2,
            },
        )
        async with Bus(settings) as bus, anyio.create_task_group() as consumers:
            for index, component in enumerate(components):
                subscriber = await bus.register_component(
                    component, component_specs(index, args.components)
                )
                if isinstance(component, Iterating):
                    consumers.start_soon(component.consume, subscriber)
            await tracker.wait_until(lambda: all(c.recovered(0) for c in components), STEP_TIMEOUT)
            started = time.perf_counter()
            for number in range(1, args.faults + 1):
                kind = kinds[(number - 1) % len(kinds)]
                connection = live_connection(sim)
                injected = anyio.current_time()
                await inject(sim, kind, connection)
                try:
                    await tracker.wait_until(
                        lambda n=number: all(c.recovered(n) for c in components), STEP_TIMEOUT
                    )
                except TimeoutError:
                    raise SystemExit(
                        f"{transport}: no recovery from fault {number} ({kind})"
                    ) from None
                if kind == "stall":
                    sim.drop(connection)  # release the stalled socket
                for component in components:
                    gap, reconnected = component.events[-2], component.events[-1]
                    phases = samples[kind]
                    phases["total"].append(reconnected[2] - injected)
                    phases["detect"].append(gap[1] - injected)
                    phases["reconnect"].append(reconnected[1] - gap[1])
                    phases["data"].append(reconnected[2] - reconnected[1])
            elapsed = time.perf_counter() - started
            metrics = bus.get_connection_metrics()["public"]
            connect = bus.get_rate_limiter_status()["connect"]["ip"]
            consumers.cancel_scope.cancel()
        counters = {
            "elapsed": elapsed,
            "reconnects": metrics["reconnects"],
            "connect_failures": metrics["connect_failures"],
            "heartbeat_timeouts": metrics["heartbeat_timeouts"],
            "limiter_waits": connect["waits"],
            "back_offs": connect["back_offs"],
            "violations": len(sim.violations),
        }
    return samples, counters


def ms(value: float) -> str:
    return f"{value * 1000:7.1f}"


def commit() -> str:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return found.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


async def main_async(args: argparse.Namespace) -> None:
    transports = [t for t in args.transports if t != "picows" or picows_installed()]
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    counters: dict[str, list[dict[str, Any]]] = {t: [] for t in transports}
    for run in range(args.runs):
        # Alternate the order, so load from elsewhere hits both transports alike.
        turn = run % len(transports)
        for transport in transports[turn:] + transports[:turn]:
            samples, counted = await cycle(transport, args.kinds, args)
            counters[transport].append(counted)
            into = results.setdefault(transport, {})
            for kind, phases in samples.items():
                mine = into.setdefault(kind, {phase: [] for phase in PHASES})
                for phase, values in phases.items():
                    mine[phase].extend(values)

    print(
        f"Python {platform.python_version()}; commit {commit()}; {args.faults} faults per "
        f"transport and run, {args.runs} run(s); {args.components} components; heartbeat "
        f"{args.heartbeat_interval * 1000:.0f} ms + {args.heartbeat_timeout * 1000:.0f} ms; "
        f"simulator {args.rate:g} msgs/s"
    )
    print("ms per (fault, component): total = fault → first data after the reconnect")
    header = f"{'transport':9} {'kind':15} {'n':>5} {'median':>7} {'max':>7}"
    print(header + "   median of: detect reconnect    data")
    for transport, kinds in results.items():
        everything: list[float] = []
        for kind, phases in kinds.items():
            total = phases["total"]
            if not total:
                continue
            everything.extend(total)
            medians = [statistics.median(phases[p]) for p in PHASES[1:]]
            print(
                f"{transport:9} {kind:15} {len(total):>5} {ms(statistics.median(total))} "
                f"{ms(max(total))}              {ms(medians[0])}  {ms(medians[1])} {ms(medians[2])}"
            )
        print(
            f"{transport:9} {'all':15} {len(everything):>5} {ms(statistics.median(everything))} "
            f"{ms(max(everything))}"
        )
        for counted in counters[transport]:
            print(
                f"{'':9} cycle {counted['elapsed']:.1f} s: reconnects {counted['reconnects']}, "
                f"failed connects {counted['connect_failures']}, heartbeat timeouts "
                f"{counted['heartbeat_timeouts']}, connect limiter back-offs "
                f"{counted['back_offs']} and waits {counted['limiter_waits']} (for back-offs "
                f"too), simulator violations {counted['violations']}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=100, help="faults per transport and run")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--transports", nargs="+", default=["httpx", "picows"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--components", type=int, default=20)
    parser.add_argument("--rate", type=float, default=100.0, help="simulator msgs/s")
    parser.add_argument("--heartbeat-interval", type=float, default=0.1)
    parser.add_argument("--heartbeat-timeout", type=float, default=0.3)
    parser.add_argument("--connects-per-second", type=int, default=1000)
    args = parser.parse_args()
    # The faults make upbus and picows log warnings and errors by the hundred; the
    # figures are the output.
    logging.getLogger().addHandler(logging.NullHandler())
    if args.components <= len(DISTINCT):
        parser.error(f"--components must be more than {len(DISTINCT)}")
    anyio.run(main_async, args)


if __name__ == "__main__":
    main()
