"""Isolation and quarantine: one bad component must not starve the others.

Run: ``.venv/bin/python bench/bench_isolation.py`` (``--rounds``, ``--window``,
``--components``, ``--rate``, ``--drain``; about 1.5 minutes).

The :class:`~upbus.sim.Simulator` runs on an event loop of its own in a thread of
this process (loopback only), so that code blocking the client's event loop does not
also stop the exchange. It sends ``--rate`` realtime messages/s per connection and
refuses (``INVALID_PARAM``, then close) any request naming one of the ``KRW-BAD*``
codes. Every run starts a fresh :class:`~upbus.Bus` with the default settings, except
``shutdown_drain`` (``--drain``, 2 s).

**1. A blocking handler.** ``--components`` fast components (``async def
on_message`` counting) subscribe to trades on 4 codes, so each gets every message
(``--rate``/s). Three cases, in a rotating order round by round:

* ``without``: only the fast components;
* ``plain``: plus one component whose plain ``def on_message`` sleeps 1 s
  (``time.sleep``) per message, on the same keys (the request on the wire is the
  same); upbus runs it in a thread of its own;
* ``async``: the same blocker as an ``async def on_message`` calling
  ``time.sleep(1)``: it blocks the event loop itself, which no library can undo.
  Shown for contrast; the stall watch should name it in a warning.

The blocker registers once the fast components have data; a timer thread takes
their counts ``--settle`` s later and again ``--window`` s after that (a thread, so
the window ends on time even while the loop is blocked). Figures: msgs/s per fast
component (mean of the components), the ratio with/without per round (target ≥ 0.8),
median and min over rounds. Then, while the blocker still sleeps, ``--registrations``
new fast components are registered one by one: how long ``await
bus.register_component(...)`` takes, and until its first message. Last, how long
leaving ``async with Bus(...)`` takes (the blocker still holds a backlog in the
``plain`` case: expected ≈ ``--drain``, and a warning naming it). The blocker's
sleeps end (a flag it checks) once its run is measured, so no thread outlives the
bench by long.

**2. A poison subscription.** Healthy components (ticker on 2 and trade on 1 of the
10 popular codes each, ``async def`` handlers) run until every one has data; then
components with refused codes register in one event-loop pass: 1 bad code beside
``--healthy-one`` (10) healthy components, and ``--bad`` (4) codes at once beside
``--healthy`` (20), each code its own component, found by bisection. Measured from
that registration: (a) until each bad owner's :class:`~upbus.Rejected` event
(median over owners, and the last), (b) until every healthy component has its first
message after its last ``reconnected`` event (the slowest one), the requests the
simulator refused and the connections it accepted meanwhile. A run ends once all
that holds and nothing changed for ``--quiet`` s. The simulator's connect limit is
lifted (every run opens new connections back to back); the bus's own limiters are
upbus's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
import anyio.to_thread

import upbus
from upbus.core._bus import Bus
from upbus.core.delivery._events import ConnectionEvent, Rejected
from upbus.core.subscriptions._specs import Spec, ticker, trade
from upbus.sim import SimConfig, Simulator
from upbus.sim.markets import POPULAR

CODES = POPULAR[:4]  # part 1: trades on these
BAD_CODES = ("KRW-BADA", "KRW-BADB", "KRW-BADC", "KRW-BADD", "KRW-BADE", "KRW-BADF")
TARGET_RATIO = 0.8
CASES = ("without", "plain", "async")


# -- the simulator, on an event loop of its own ----------------------------------------------


class SimThread:
    """A :class:`Simulator` served from a daemon thread running its own event loop."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.sim: Simulator | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="simulator", daemon=True)

    def __enter__(self) -> Simulator:
        self._thread.start()
        if not self._ready.wait(10) or self.sim is None:
            raise RuntimeError(f"the simulator did not start: {self._error!r}")
        return self.sim

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            anyio.run(self._serve)
        except BaseException as exc:  # reported by __enter__ if it never started
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with Simulator(self.config) as sim:
            self.sim = sim
            self._ready.set()
            await anyio.to_thread.run_sync(self._stop.wait)


def records_since(sim: Simulator, count: int) -> list[Any]:
    """The request records after the first ``count`` (read from another thread)."""
    for _ in range(100):
        with contextlib.suppress(RuntimeError):  # deque mutated during iteration
            total = sim.journal.request_count
            return list(sim.requests)[len(sim.requests) - (total - count) :]
        time.sleep(0.01)
    return []


# -- log capture -------------------------------------------------------------------------------


class Capture(logging.Handler):
    """Keeps upbus's WARNING and ERROR records of the current run, printing none."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def matching(self, *words: str) -> list[str]:
        return [line for line in self.lines if all(word in line for word in words)]


@contextlib.contextmanager
def captured() -> Iterator[Capture]:
    logger = logging.getLogger("upbus")
    capture = Capture()
    logger.addHandler(capture)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate


def settings(sim: Simulator, drain: float) -> upbus.Settings:
    return upbus.Settings(
        public_url=sim.public_url,
        private_url=sim.private_url,
        shutdown_drain=drain,
        autoload_plugins=False,
    )


async def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    for _ in range(max(1, math.ceil(timeout / step))):
        if predicate():
            return True
        await anyio.sleep(step)
    return predicate()


# -- 1. a blocking handler -------------------------------------------------------------------


class Fast:
    """Counts its messages on the event loop."""

    def __init__(self) -> None:
        self.count = 0
        self.first_at: float | None = None

    async def on_message(self, message: object) -> None:
        if not self.count:
            self.first_at = time.perf_counter()
        self.count += 1


class PlainBlocker:
    """A plain ``def on_message`` that sleeps a second per message (until released)."""

    def __init__(self, released: threading.Event) -> None:
        self.released = released
        self.count = 0

    def on_message(self, message: object) -> None:
        self.count += 1
        if not self.released.is_set():
            time.sleep(1.0)


class AsyncBlocker:
    """The same as an ``async def``: ``time.sleep`` blocks the event loop itself."""

    def __init__(self, released: threading.Event) -> None:
        self.released = released
        self.count = 0

    async def on_message(self, message: object) -> None:
        self.count += 1
        if not self.released.is_set():
            time.sleep(1.0)  # noqa: ASYNC251  (the point of this case)


def window(
    fast: Sequence[Fast],
    blocker: PlainBlocker | AsyncBlocker | None,
    settle: float,
    seconds: float,
    release: threading.Event | None,
) -> tuple[float, list[int], float, list[int], int]:
    """In a thread: the fast components' counts ``settle`` s from now and ``seconds`` later,
    and the messages the blocker began handling meanwhile."""
    time.sleep(settle)
    start, before = time.perf_counter(), [c.count for c in fast]
    blocked = 0 if blocker is None else blocker.count
    time.sleep(seconds)
    end, after = time.perf_counter(), [c.count for c in fast]
    blocked = 0 if blocker is None else blocker.count - blocked
    if release is not None:
        release.set()  # the async blocker: let the event loop go after the window
    return start, before, end, after, blocked


async def isolation_run(sim: Simulator, args: argparse.Namespace, case: str) -> dict[str, Any]:
    released = threading.Event()
    fast = [Fast() for _ in range(args.components)]
    blocker: PlainBlocker | AsyncBlocker | None = None
    result: dict[str, Any] = {"case": case}
    with captured() as log:
        async with Bus(settings(sim, args.drain)) as bus:
            for component in fast:
                await bus.register_component(component, trade(*CODES))
            if not await wait_for(lambda: all(c.count for c in fast), 15):
                raise RuntimeError("the fast components got no data")
            if case != "without":
                blocker = (PlainBlocker if case == "plain" else AsyncBlocker)(released)
            measured: list[Any] = []
            release = released if case == "async" else None
            timer = threading.Thread(
                target=lambda: measured.append(
                    window(fast, blocker, args.settle, args.window, release)
                ),
                daemon=True,
            )
            timer.start()
            subscriber = None
            if blocker is not None:
                subscriber = await bus.register_component(blocker, trade(*CODES))
                result["label"] = subscriber.label
            await wait_for(lambda: not timer.is_alive(), args.settle + args.window + 30, 0.05)
            start, before, end, after, result["blocked"] = measured[0]
            rates = [(a - b) / (end - start) for a, b in zip(after, before, strict=True)]
            result["rate"] = statistics.fmean(rates)
            result["slowest"] = min(rates)
            calls: list[float] = []
            firsts: list[float] = []
            if case != "async":
                for _ in range(args.registrations):
                    newcomer = Fast()
                    began = time.perf_counter()
                    await bus.register_component(newcomer, trade(*CODES))
                    calls.append(time.perf_counter() - began)
                    if await wait_for(lambda c=newcomer: c.first_at is not None, 10, 0.001):
                        assert newcomer.first_at is not None
                        firsts.append(newcomer.first_at - began)
                    await anyio.sleep(0.05)
            result["register"] = calls
            result["first"] = firsts
            result["blocker_busy"] = blocker is not None and not released.is_set()
            result["stalls"] = bus.stall_watch.stalls
            if subscriber is not None and blocker is not None:
                # Taken from its buffer (handed to its thread) but not yet begun.
                result["unhandled"] = subscriber.delivered - blocker.count
            leaving = time.perf_counter()
        result["exit"] = time.perf_counter() - leaving
        if case == "plain" and blocker is not None and not released.is_set():
            # Does the handler thread go on calling on_message after the bus has stopped?
            calls = blocker.count
            await anyio.sleep(args.after)
            result["calls_after_exit"] = blocker.count - calls
        released.set()
        label = result.get("label", "?")
        result["stall_lines"] = log.matching("has not turned")
        result["stall_named"] = log.matching("has not turned", label)
        result["drain_named"] = log.matching("shutdown drain limit", label)
    return result


# -- 2. a poison subscription ----------------------------------------------------------------


class Healthy:
    """Notes its gaps and reconnects, and its first message after the last reconnect."""

    def __init__(self) -> None:
        self.count = 0
        self.gaps = 0
        self.reconnects = 0
        self.in_gap = False
        self.recovered_at: float | None = None
        self.changed_at = 0.0

    async def on_message(self, message: object) -> None:
        self.count += 1
        if self.recovered_at is None and self.reconnects:
            self.recovered_at = self.changed_at = time.perf_counter()

    async def on_event(self, event: object) -> None:
        if isinstance(event, ConnectionEvent):
            self.changed_at = time.perf_counter()
            if event.state == "gap":
                self.gaps += 1
                self.in_gap = True
            elif event.state == "reconnected":
                self.reconnects += 1
                self.in_gap = False
                self.recovered_at = None


class BadOwner:
    """Holds a code the exchange refuses; notes when it hears so."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.rejected_at: float | None = None
        self.detail = ""

    async def on_message(self, message: object) -> None:
        pass

    async def on_event(self, event: object) -> None:
        if isinstance(event, Rejected) and self.rejected_at is None:
            self.rejected_at = time.perf_counter()
            self.detail = event.detail


def healthy_specs(index: int) -> list[Spec]:
    first = POPULAR[index % len(POPULAR)]
    second = POPULAR[(index * 3 + 1) % len(POPULAR)]
    return [ticker(first, second), trade(first)]


async def poison_run(
    sim: Simulator, args: argparse.Namespace, bad_count: int, healthy_count: int
) -> dict[str, Any]:
    healthy = [Healthy() for _ in range(healthy_count)]
    bad = [BadOwner(code) for code in BAD_CODES[:bad_count]]
    with captured() as log:
        async with Bus(settings(sim, args.drain)) as bus:
            for index, component in enumerate(healthy):
                await bus.register_component(component, healthy_specs(index))
            if not await wait_for(lambda: all(c.count for c in healthy), 15):
                raise RuntimeError("the healthy components got no data")
            await anyio.sleep(0.2)
            requests, connections = sim.journal.request_count, sim.journal.connection_count
            began = time.perf_counter()
            for owner in bad:  # no checkpoint in between: one batch, one request
                await bus.register_component(owner, trade(owner.code))

            def settled() -> bool:
                return all(owner.rejected_at is not None for owner in bad) and all(
                    c.reconnects and not c.in_gap and c.recovered_at is not None for c in healthy
                )

            finished = False
            with anyio.move_on_after(args.timeout):
                while True:
                    await wait_for(settled, args.timeout)
                    last = max(max(c.changed_at for c in healthy), began)
                    await anyio.sleep(max(0.0, last + args.quiet - time.perf_counter()))
                    if settled() and max(c.changed_at for c in healthy) <= last:
                        finished = True
                        break
            metrics = bus.get_connection_metrics()["public"]
        records = records_since(sim, requests)
        accepted = sim.journal.connection_count - connections
    rejected = [o.rejected_at - began for o in bad if o.rejected_at is not None]
    recovered = [c.recovered_at - began for c in healthy if c.recovered_at is not None]
    return {
        "finished": finished,
        "rejected": rejected,
        "all_rejected": len(rejected) == len(bad),
        "recovered": max(recovered) if len(recovered) == len(healthy) else None,
        "refused": sum(1 for r in records if r.error is not None),
        "requests": len(records),
        "connections": accepted,
        "gaps": statistics.median(c.gaps for c in healthy),
        "quarantine_lines": len(log.matching("quarantined")),
        "details": sorted({o.detail for o in bad}),
        "metrics": {k: v for k, v in metrics.items() if k in ("requests_refused", "connects")},
    }


# -- reporting ---------------------------------------------------------------------------------


def ms(values: Sequence[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values) * 1000:.1f} (max {max(values) * 1000:.1f})"


def us(values: Sequence[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values) * 1e6:.0f} µs (max {max(values) * 1e6:.0f})"


def report_isolation(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> None:
    print(
        f"\n1. Blocking handler: {args.components} fast components (async def, counting), "
        f"trades on {len(CODES)} codes; msgs/s per fast component over {args.window:g} s"
    )
    print(
        f"{'round':>5}  {'without':>8}  {'plain def blocker':>17}  {'ratio':>5}   "
        f"{'async def blocker (cannot fix)':>30}  {'ratio':>5}"
    )
    plain_ratios: list[float] = []
    async_ratios: list[float] = []
    for index, (without, plain, blocked) in enumerate(
        zip(runs["without"], runs["plain"], runs["async"], strict=True), 1
    ):
        plain_ratios.append(plain["rate"] / without["rate"])
        async_ratios.append(blocked["rate"] / without["rate"])
        print(
            f"{index:>5}  {without['rate']:8.1f}  {plain['rate']:17.1f}  "
            f"{plain_ratios[-1]:5.2f}   {blocked['rate']:30.1f}  {async_ratios[-1]:5.2f}"
        )
    ratio = statistics.median(plain_ratios)
    print(
        f"ratio with/without, plain def blocker: median {ratio:.3f}, min {min(plain_ratios):.3f} "
        f"(target ≥ {TARGET_RATIO}: {'PASS' if min(plain_ratios) >= TARGET_RATIO else 'FAIL'}); "
        f"slowest fast component {min(r['slowest'] for r in runs['plain']):.1f} msgs/s"
    )
    print(
        f"ratio with/without, async def blocker: median {statistics.median(async_ratios):.3f}, "
        f"max {max(async_ratios):.3f} (the event loop itself blocked: expected to collapse)"
    )
    for case, title in (("without", "without a blocker"), ("plain", "plain def blocker sleeping")):
        calls = [x for r in runs[case] for x in r["register"]]
        firsts = [x for r in runs[case] for x in r["first"]]
        print(
            f"register_component, {title}: the call {us(calls)}; "
            f"to its first message {ms(firsts)} ms ({len(firsts)}/{len(calls)} got one)"
        )
    for case, title in (("without", "without a blocker"), ("plain", "plain def blocker busy")):
        exits = [r["exit"] for r in runs[case]]
        named = sum(bool(r["drain_named"]) for r in runs[case])
        busy = sum(r["blocker_busy"] for r in runs[case])
        print(
            f"leaving `async with Bus` (shutdown_drain {args.drain:g} s), {title}: "
            f"{ms(exits)} ms; warning naming the blocker in {named}/{len(exits)} runs"
            + (
                f" (blocker still sleeping at exit in {busy}/{len(exits)})"
                if case == "plain"
                else ""
            )
        )
    plain = runs["plain"]
    print(
        "plain def blocker at exit: messages taken from its buffer into its thread but not "
        f"yet handled {[r.get('unhandled') for r in plain]}; on_message calls in the "
        f"{args.after:g} s after the bus had stopped {[r.get('calls_after_exit') for r in plain]}; "
        f"messages it began handling during the window {[r['blocked'] for r in plain]}"
    )
    blocked_runs = runs["async"]
    print(
        "async def blocker: stall warnings "
        f"{[len(r['stall_lines']) for r in blocked_runs]} per run, naming the component in "
        f"{[len(r['stall_named']) for r in blocked_runs]}; it began handling "
        f"{[r['blocked'] for r in blocked_runs]} messages during the window; leaving took "
        f"{ms([r['exit'] for r in blocked_runs])} ms (after its sleeps were switched off)"
    )
    sample = next((r["stall_named"][0] for r in blocked_runs if r["stall_named"]), None)
    if sample is None:
        sample = next((r["stall_lines"][0] for r in blocked_runs if r["stall_lines"]), None)
    if sample is not None:
        print(f"  e.g.: {sample[:240]}")
    sample = next((r["drain_named"][0] for r in runs["plain"] if r["drain_named"]), None)
    if sample is not None:
        print(f"  e.g.: {sample[:240]}")


def report_poison(args: argparse.Namespace, runs: dict[int, list[dict[str, Any]]]) -> None:
    print("\n2. Poison subscription, ms from the bad registration; median (max) over rounds")
    for bad_count, results in runs.items():
        healthy = args.healthy_one if bad_count == 1 else args.healthy
        rejected = [x for r in results for x in r["rejected"]]
        last = [max(r["rejected"]) for r in results if r["rejected"]]
        recovered = [r["recovered"] for r in results if r["recovered"] is not None]
        print(f"{bad_count} bad code(s) among {healthy} healthy components, {len(results)} rounds:")
        print(
            f"  (a) Rejected at its owner: {ms(rejected)}; the last owner of a run {ms(last)}; "
            f"every owner told in {sum(r['all_rejected'] for r in results)}/{len(results)}"
        )
        print(
            f"  (b) every healthy component has fresh data again: {ms(recovered)} "
            f"({len(recovered)}/{len(results)} runs)"
        )
        print(
            f"  requests refused by the simulator {[r['refused'] for r in results]} of "
            f"{[r['requests'] for r in results]}; "
            f"connections {[r['connections'] for r in results]}; "
            f"gaps per healthy component {[r['gaps'] for r in results]}; "
            f"settled in {sum(r['finished'] for r in results)}/{len(results)}"
        )
        details = sorted({d for r in results for d in r["details"]})
        print(f"  Rejected detail: {details[:2]}")


# -- main --------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> None:
    config = SimConfig(rate=args.rate, reject_codes=frozenset(BAD_CODES), connect_limit=(1000, 1.0))
    with SimThread(config) as sim:
        # Warm-up: one short run of each case (imports, first connect, thread start).
        warm = argparse.Namespace(**{**vars(args), "window": 1.0, "settle": 0.3})
        for case in CASES:
            await isolation_run(sim, warm, case)
        runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
        for index in range(args.rounds):
            order = CASES[index % 3 :] + CASES[: index % 3]
            for case in order:
                runs[case].append(await isolation_run(sim, args, case))
        poison: dict[int, list[dict[str, Any]]] = {1: [], args.bad: []}
        for index in range(args.rounds):
            sizes = [1, args.bad] if index % 2 == 0 else [args.bad, 1]
            for size in sizes:
                healthy = args.healthy_one if size == 1 else args.healthy
                poison[size].append(await poison_run(sim, args, size, healthy))
        violations = [v.kind for v in sim.violations]
    transport = "picows (auto)" if _picows() else "httpx (auto)"
    print(
        f"Python {platform.python_version()}; transport {transport}; simulator {args.rate:g} "
        f"msgs/s per connection in a thread of its own; {args.rounds} rounds"
    )
    report_isolation(args, runs)
    report_poison(args, poison)
    kinds = sorted(set(violations))
    print(
        f"\nsimulator violations: {len(violations)} "
        f"({', '.join(f'{k} {violations.count(k)}' for k in kinds) or 'none'})"
    )


def _picows() -> bool:
    from upbus.plugins.picows_transport import picows_installed

    return bool(picows_installed())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=400.0, help="simulator msgs/s")
    parser.add_argument("--components", type=int, default=5, help="fast components")
    parser.add_argument("--window", type=float, default=5.0, help="seconds counted")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before the window")
    parser.add_argument("--registrations", type=int, default=5)
    parser.add_argument("--drain", type=float, default=2.0, help="shutdown_drain, seconds")
    parser.add_argument(
        "--after", type=float, default=1.5, help="seconds watched after the bus stopped"
    )
    parser.add_argument("--healthy-one", type=int, default=10, help="beside 1 bad code")
    parser.add_argument("--healthy", type=int, default=20, help="beside --bad bad codes")
    parser.add_argument("--bad", type=int, default=4, choices=range(2, len(BAD_CODES) + 1))
    parser.add_argument("--quiet", type=float, default=1.0, help="seconds without change")
    parser.add_argument("--timeout", type=float, default=30.0, help="per poison run")
    args = parser.parse_args()
    anyio.run(main_async, args)


if __name__ == "__main__":
    main()
