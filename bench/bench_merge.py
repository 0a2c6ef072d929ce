"""Merge at scale: one register/unregister with 10,000 live components.

Contenders, measured side by side in one run, alternating A B A B after a warm-up:

A. upbus's SubscriptionManager: incremental reference counts, so one change costs
   in proportion to the component's own specs.
B. The seed's ``_recalculate_subscriptions`` approach: after every change, the union
   of every live component's specs is computed again from scratch.

Run: ``python bench/bench_merge.py`` (``--components``, ``--runs``). Prints the
median and min-max cost of one change for each, and the ratio B/A.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable

from upbus.core.subscriptions._manager import SubscriptionManager
from upbus.core.subscriptions._merge import RefCountMerger
from upbus.core.subscriptions._specs import Channel, Spec, candle, orderbook, ticker, trade

# About as many KRW markets as the exchange lists.
CODES = [f"KRW-C{i:03d}" for i in range(250)]


class Component:
    pass


def random_specs(rng: random.Random) -> list[Spec]:
    """What a chart, an order book view or a strategy typically asks for."""
    specs = [ticker(*rng.sample(CODES, rng.randint(1, 5)))]
    if rng.random() < 0.5:
        specs.append(
            orderbook(*rng.sample(CODES, rng.randint(1, 3)), depth=rng.choice([5, 15, 30]))
        )
    if rng.random() < 0.3:
        specs.append(trade(*rng.sample(CODES, rng.randint(1, 3))))
    if rng.random() < 0.2:
        specs.append(candle(rng.choice(["1m", "5m"]), *rng.sample(CODES, rng.randint(1, 2))))
    return specs


class Recalculating:
    """The seed's approach, for comparison: recompute the union on every change."""

    def __init__(self) -> None:
        self.specs: dict[int, list[Spec]] = {}

    def register_component(self, component: object, specs: list[Spec]) -> None:
        self.specs[id(component)] = specs
        self._recalculate_subscriptions()

    def unregister_component(self, component: object) -> None:
        del self.specs[id(component)]
        self._recalculate_subscriptions()

    def _recalculate_subscriptions(self) -> None:
        merger = RefCountMerger()
        for specs in self.specs.values():
            for spec in specs:
                if spec.channel is Channel.PUBLIC:
                    merger.add(spec.wishes())
        merger.entries()


def populate(
    manager: SubscriptionManager | Recalculating, count: int, seed: int
) -> list[Component]:
    rng = random.Random(seed)
    components = [Component() for _ in range(count)]
    for component in components:
        if isinstance(manager, Recalculating):
            manager.specs[id(component)] = random_specs(rng)  # one recalculation at the end
        else:
            manager.register_component(component, random_specs(rng))
    if isinstance(manager, Recalculating):
        manager._recalculate_subscriptions()
    return components


def time_changes(
    manager: SubscriptionManager | Recalculating,
    components: list[Component],
    changes: int,
    seed: int,
) -> float:
    """Seconds per change: unregister a live component, then register it with new specs."""
    rng = random.Random(seed)
    plan = [(rng.choice(components), random_specs(rng)) for _ in range(changes // 2)]
    gc.collect()
    start = time.perf_counter()
    for component, specs in plan:
        manager.unregister_component(component)
        manager.register_component(component, specs)
    return (time.perf_counter() - start) / (2 * len(plan))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--components", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    incremental = SubscriptionManager()
    recalculating = Recalculating()
    kept = [
        populate(incremental, args.components, seed=1),
        populate(recalculating, args.components, seed=1),
    ]
    stats = incremental.get_subscription_stats()["public"]
    print(
        f"{args.components} live components, {stats['codes']} codes in "
        f"{stats['entries']} entries, {stats['wishes']} wishes"
    )

    contenders: list[tuple[str, Callable[[int], float]]] = [
        ("incremental (upbus)", lambda run: time_changes(incremental, kept[0], 4000, run)),
        ("full recomputation (seed)", lambda run: time_changes(recalculating, kept[1], 20, run)),
    ]
    for _name, measure in contenders:  # warm-up
        measure(0)
    results: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for run in range(1, args.runs + 1):
        for name, measure in contenders:
            results[name].append(measure(run))

    for name, samples in results.items():
        us = [s * 1e6 for s in samples]
        print(
            f"{name:28s} median {statistics.median(us):10.1f} µs/change  "
            f"(min {min(us):.1f}, max {max(us):.1f}, {len(us)} runs)"
        )
    a = statistics.median(results["incremental (upbus)"])
    b = statistics.median(results["full recomputation (seed)"])
    print(f"ratio full/incremental: {b / a:,.0f}x")


if __name__ == "__main__":
    main()
