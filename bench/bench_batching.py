"""Batching: N concurrent registrations become one request frame, how soon after the last.

Run: ``.venv/bin/python bench/bench_batching.py`` (``--sizes``, ``--runs``,
``--debounce``, ``--spread``; about a minute).

Against the in-process :class:`~upbus.sim.Simulator` (one per invocation), each run
starts a fresh :class:`~upbus.Bus` and registers N components (random ticker codes,
some trades, each with ``on_message``) from N concurrent tasks. Four scenarios,
alternating run by run after a warm-up:

* ``warm``: the connection is already up with one earlier subscription (its request
  sent, the message limiter has room), as for components that join a running app;
* ``cold``: nothing is connected yet, so the connect happens during the debounce;
* ``burst``: the N tasks register one after the other in one event-loop pass;
* ``spread``: each task first sleeps a random 0 to ``--spread`` seconds (20 ms, well
  inside the debounce), as components that start up concurrently do.

Per run: the request frames the simulator received for the burst (``sim.requests``,
must be exactly 1; a further ``3 × debounce`` is waited out to catch a late second
one), the time from the *last* register call's return to the simulator's record of
the frame that carried the final state, and from the *first* call to the first
frame. Both times are ``anyio.current_time()`` on the one event loop the bus and the
simulator share: ``RequestRecord.time`` is taken that way when the simulator's reader
has parsed the frame, so the figure includes the loopback write and the simulator's
read. Target: one frame, and ``last → wire ≤ debounce + 5 ms``.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
from typing import Any

import anyio

import upbus
from upbus.core._bus import Bus
from upbus.core.subscriptions._specs import Spec, ticker, trade
from upbus.sim import SimConfig, Simulator
from upbus.sim.markets import MARKETS

KRW = sorted(code for code in MARKETS if code.startswith("KRW-"))
SLACK = 0.005  # the target: debounce + 5 ms


class Component:
    def __init__(self) -> None:
        self.count = 0

    async def on_message(self, message: object) -> None:
        self.count += 1


def component_specs(rng: random.Random) -> list[Spec]:
    specs = [ticker(*rng.sample(KRW, rng.randint(1, 3)))]
    if rng.random() < 0.3:
        specs.append(trade(rng.choice(KRW)))
    return specs


def settings(sim: Simulator, debounce: float) -> upbus.Settings:
    return upbus.Settings(
        public_url=sim.public_url,
        private_url=sim.private_url,
        debounce=debounce,
        autoload_plugins=False,
    )


def limiter_has_room(bus: Bus) -> bool:
    status = bus.get_rate_limiter_status()["message"].get("public")
    if status is None:
        return True
    return all(window["used"] < window["limit"] for window in status["windows"])


async def one_run(
    sim: Simulator, size: int, warm: bool, spread: float, debounce: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    plan = [(Component(), component_specs(rng), rng.uniform(0, spread)) for _ in range(size)]
    async with Bus(settings(sim, debounce)) as bus:
        base = Component()
        if warm:
            before = sim.journal.request_count
            await bus.register_component(base, ticker("KRW-BTC"))
            await sim.wait_for_requests(before + 1, timeout=10)
            for _ in range(1000):  # up to 10 s; the base request used one slot only
                if limiter_has_room(bus):
                    break
                await anyio.sleep(0.01)
        waits_before = _limiter_waits(bus)
        tasks_before = bus.get_pending_task_status()["public"]["tasks_created"]
        before = sim.journal.request_count
        starts: list[float] = []
        ends: list[float] = []

        async def register(component: Component, specs: list[Spec], delay: float) -> None:
            if delay:
                await anyio.sleep(delay)
            starts.append(anyio.current_time())
            await bus.register_component(component, specs)
            ends.append(anyio.current_time())

        async with anyio.create_task_group() as tg:
            for component, specs, delay in plan:
                tg.start_soon(register, component, specs, delay)
        await sim.wait_for_requests(before + 1, timeout=10)
        await anyio.sleep(3 * debounce)  # a second frame for the burst would show up here
        frames = sim.journal.request_count - before
        records = list(sim.requests)[-frames:]
        waited = _limiter_waits(bus) - waits_before
        tasks = bus.get_pending_task_status()["public"]["tasks_created"] - tasks_before
    first, last = min(starts), max(ends)
    return {
        "frames": frames,
        "last": records[-1].time - last,  # the frame that carried the final state
        "first": records[0].time - first,
        "spread": last - first,
        "limiter_waits": waited,
        "tasks": tasks,
    }


def _limiter_waits(bus: Bus) -> int:
    status = bus.get_rate_limiter_status()["message"].get("public")
    return 0 if status is None else int(status["waits"])


def ms(values: list[float]) -> str:
    values = [v * 1000 for v in values]
    return f"{statistics.median(values):6.1f} ({min(values):.1f}–{max(values):.1f})"


SCENARIOS = (("warm", "burst"), ("warm", "spread"), ("cold", "burst"), ("cold", "spread"))


async def main_async(args: argparse.Namespace) -> None:
    # A benchmark reconnects once per run: lift the simulator's connect limit.
    config = SimConfig(rate=5.0, connect_limit=(1000, 1.0))
    contenders = [(size, *scenario) for size in args.sizes for scenario in SCENARIOS]

    async def measure(size: int, warmth: str, timing: str, seed: int) -> dict[str, Any]:
        spread = args.spread if timing == "spread" else 0.0
        return await one_run(sim, size, warmth == "warm", spread, args.debounce, seed)

    async with Simulator(config) as sim:
        for contender in contenders:  # warm-up
            await measure(*contender, seed=0)
        results: dict[tuple[int, str, str], list[dict[str, Any]]] = {c: [] for c in contenders}
        for run in range(1, args.runs + 1):
            for contender in contenders:
                results[contender].append(await measure(*contender, seed=run))
        violations = list(sim.violations)

    debounce_ms = args.debounce * 1000
    print(
        f"Python {platform.python_version()}; debounce {debounce_ms:.0f} ms; spread "
        f"{args.spread * 1000:.0f} ms; {args.runs} runs; target: 1 frame, last change → wire "
        f"≤ {debounce_ms + SLACK * 1000:.0f} ms; ms as median (min–max)"
    )
    print(
        f"{'N':>5} {'scenario':13} {'frames':>6}  {'last change → wire':24} "
        f"{'first change → wire':24} {'registrations took':24} verdict"
    )
    failures = 0
    for (size, warmth, timing), runs in results.items():
        frames = sorted({r["frames"] for r in runs})
        last = [r["last"] for r in runs]
        one_frame = frames == [1]
        in_time = statistics.median(last) <= args.debounce + SLACK
        ok = one_frame and in_time
        failures += not ok
        why = ", ".join(
            reason for reason, bad in (("frames", not one_frame), ("time", not in_time)) if bad
        )
        print(
            f"{size:>5} {warmth + ' ' + timing:13} {','.join(map(str, frames)):>6}  "
            f"{ms(last):24} {ms([r['first'] for r in runs]):24} "
            f"{ms([r['spread'] for r in runs]):24} {'PASS' if ok else 'FAIL (' + why + ')'}"
        )
        over = [r["last"] - args.debounce for r in runs]
        print(
            f"{'':>21}last → wire − debounce {statistics.median(over) * 1000:+.1f} ms "
            f"(max {max(over) * 1000:+.1f}); limiter waits "
            f"{sum(r['limiter_waits'] for r in runs)}; send tasks per burst "
            f"{sorted({r['tasks'] for r in runs})}"
        )
    print(f"simulator violations: {len(violations)}; failed rows: {failures}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--debounce", type=float, default=0.1)
    parser.add_argument(
        "--spread", type=float, default=0.02, help="seconds the spread registrations span"
    )
    args = parser.parse_args()
    anyio.run(main_async, args)


if __name__ == "__main__":
    main()
