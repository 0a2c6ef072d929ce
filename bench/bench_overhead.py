"""upbus's own cost per message, without a socket: decode, route, buffer, take.

Run: ``.venv/bin/python bench/bench_overhead.py`` (``--messages``, ``--runs``,
``--batch``, ``--policy``, ``--bus-messages``, ``--bus-runs``, ``--skip-bus``; about a
minute on 2 cores).

The same pre-encoded frames (the simulator's encoder: DEFAULT tickers and SIMPLE
trades on 10 KRW codes, exchange spellings) go through, side by side in one run,
alternating after a warm-up:

* ``orjson.loads``: the baseline, untyped dicts;
* ``decode``: :class:`FrameDecoder` only;
* ``upbus S=n``: ``FrameDecoder.decode`` → ``Router.deliver`` (route, narrow, buffer
  into ``n`` :class:`Subscriber` objects, all subscribed to the same keys) → each
  subscriber's ``take()`` until empty, as the delivery task of an ``async def
  on_message`` does. One ``deliver`` call per ``--batch`` frames (one socket read).

Then the full :class:`Bus` in-process: a fake transport hands the same frames to the
bus's real receive loop (``--bus-batch`` frames per read, one event-loop turn per
read), and each component's ``on_message`` is driven by its delivery task. That adds
a wakeup (a future) and a task switch; messages per wakeup are counted.

Figures are µs per message read from the socket (so with ``S`` subscribers each
message is delivered ``S`` times), median and min-max over many short runs; each
round runs every contender once, in a rotating order, and ratios, differences and
per-subscriber slopes are medians of the per-round figures, so that a neighbour
slowing the shared core for a few seconds hits the compared figures alike.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

import anyio
import anyio.lowlevel
import orjson

import upbus
from upbus.core._bus import Bus
from upbus.core.delivery._buffer import Subscriber
from upbus.core.delivery._router import Router
from upbus.core.hooks._hookspecs import hookimpl
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel, Spec, ticker, trade
from upbus.core.wire._codec import FrameDecoder
from upbus.core.wire._messages import Message
from upbus.sim.encode import encode_frame
from upbus.sim.market import Market
from upbus.sim.markets import POPULAR

CODES = POPULAR
DISTINCT = 2000  # distinct frames per kind, cycled
SUBSCRIBER_COUNTS = (1, 10, 100)
TARGET_ONE = 4.0  # µs per message with one subscriber
TARGET_EACH = 1.0  # µs per additional subscriber


def build_frames(count: int = DISTINCT) -> dict[str, list[bytes]]:
    """``count`` realistic frames per kind: trades on the codes in turn, rendered."""
    market = Market(seed=7, start_ms=1_790_000_000_000)
    tickers: list[bytes] = []
    trades: list[bytes] = []
    for i in range(count):
        state = market.trade(CODES[i % len(CODES)])
        now = market.now_ms()
        tickers.append(encode_frame([("ticker", state.ticker_fields("REALTIME", now))], "DEFAULT"))
        trades.append(encode_frame([("trade", state.trade_fields("REALTIME", now))], "SIMPLE"))
    mixed = [frame for pair in zip(tickers, trades, strict=True) for frame in pair]
    return {"ticker DEFAULT": tickers, "trade SIMPLE": trades, "mixed": mixed}


def specs() -> list[Spec]:
    return [ticker(*CODES), trade(*CODES)]


def cycle(frames: Sequence[bytes], n: int) -> list[bytes]:
    return [frames[i % len(frames)] for i in range(n)]


# -- the synchronous pipeline -------------------------------------------------------------


def time_orjson(frames: list[bytes]) -> float:
    loads = orjson.loads
    start = time.perf_counter()
    for frame in frames:
        loads(frame)
    return time.perf_counter() - start


def time_decode(frames: list[bytes]) -> float:
    decode = FrameDecoder().decode
    start = time.perf_counter()
    for frame in frames:
        decode(frame)
    return time.perf_counter() - start


def make_router(count: int, policy: Any = "conflate") -> tuple[Router, list[Subscriber]]:
    router = Router()
    subscribers = [Subscriber(f"bench{i}", 1024, policy) for i in range(count)]
    wishes = [wish for spec in specs() for wish in spec.wishes()]
    for subscriber in subscribers:
        router.add(subscriber, wishes)
    return router, subscribers


def time_pipeline(frames: list[bytes], subscribers_count: int, batch: int, policy: Any) -> float:
    """decode → deliver → take, item by item, as an async handler is fed."""
    router, subscribers = make_router(subscribers_count, policy)
    # Every frame here is a data message, so the decoder's results are all Messages.
    decode = cast(Callable[[bytes], list[Message]], FrameDecoder().decode)
    deliver = router.deliver
    takes = [subscriber.take for subscriber in subscribers]
    if batch == 1:
        start = time.perf_counter()
        for frame in frames:
            deliver(decode(frame))
            for take in takes:
                while take() is not None:
                    pass
        elapsed = time.perf_counter() - start
    else:
        reads = [frames[i : i + batch] for i in range(0, len(frames), batch)]
        start = time.perf_counter()
        for read in reads:
            messages: list[Message] = []
            for frame in read:
                messages += decode(frame)
            deliver(messages)
            for take in takes:
                while take() is not None:
                    pass
        elapsed = time.perf_counter() - start
    delivered = sum(subscriber.delivered for subscriber in subscribers)
    dropped = sum(subscriber.dropped for subscriber in subscribers)
    if delivered + dropped != len(frames) * subscribers_count:
        raise AssertionError(f"{delivered} delivered + {dropped} dropped != sent")
    return elapsed


# -- the whole Bus, in-process --------------------------------------------------------------


class FeedConnection:
    """A transport connection that hands prebuilt reads to the bus's receive loop."""

    def __init__(self, reads: list[list[bytes]], started: anyio.Event, sent: list[str]) -> None:
        self._reads = iter(reads)
        self._started = started
        self._sent = sent
        self._subscribed = anyio.Event()
        self.start_time = 0.0

    async def send_text(self, text: str) -> None:
        self._sent.append(text)
        self._subscribed.set()

    async def receive_batch(self) -> Sequence[bytes | str]:
        if not self._subscribed.is_set():
            await self._subscribed.wait()
            self.start_time = time.perf_counter()
            self._started.set()
        # One event-loop turn per read, as a socket read that finds data ready.
        await anyio.lowlevel.checkpoint()
        read = next(self._reads, None)
        if read is None:
            await anyio.sleep_forever()
        assert read is not None
        return read

    async def ping(self, timeout: float) -> float:
        return 0.0

    async def aclose(self, code: int = 1000) -> None:
        pass


class FeedTransport:
    def __init__(self, make: Callable[[], FeedConnection]) -> None:
        self._make = make

    async def connect(self, url: str, headers: Mapping[str, str]) -> FeedConnection:
        return self._make()

    async def aclose(self) -> None:
        pass


class FeedPlugin:
    def __init__(self, connection: FeedConnection) -> None:
        self.connection = connection

    @hookimpl
    def upbus_make_transport(self, channel: Channel, settings: upbus.Settings) -> FeedTransport:
        return FeedTransport(lambda: self.connection)


class Component:
    """Counts messages, and wakeups: a wakeup follows each message that empties the buffer."""

    def __init__(self, expected: int, done: Callable[[], None]) -> None:
        self.subscriber: Subscriber | None = None
        self.count = 0
        self.wakeups = 0
        self.expected = expected
        self.done = done

    async def on_message(self, message: object) -> None:
        self.count += 1
        assert self.subscriber is not None
        if not len(self.subscriber):
            self.wakeups += 1
        if self.count == self.expected:
            self.done()


async def bus_run(frames: list[bytes], count: int, batch: int) -> tuple[float, float, int]:
    """Seconds for ``frames`` through the Bus to ``count`` components; msgs/wakeup; lost."""
    reads = [frames[i : i + batch] for i in range(0, len(frames), batch)]
    started = anyio.Event()
    connection = FeedConnection(reads, started, [])
    settings = upbus.Settings(
        public_url="ws://127.0.0.1:9/websocket/v1", debounce=0.0, autoload_plugins=False
    )
    plugins = PluginManager.load(settings)
    plugins.register(FeedPlugin(connection), "bench-feed")
    finished = anyio.Event()
    remaining = [count]
    end = [0.0]

    def done() -> None:
        remaining[0] -= 1
        if not remaining[0]:
            end[0] = time.perf_counter()
            finished.set()

    components = [Component(len(frames), done) for _ in range(count)]
    async with Bus(settings, plugin_manager=plugins) as bus:
        for component in components:
            component.subscriber = await bus.register_component(
                component, specs(), overflow="drop_oldest", capacity=1024
            )
        with anyio.fail_after(120):
            await finished.wait()
        lost = sum(s.dropped + s.overflowed for s in (c.subscriber for c in components) if s)
    messages = sum(c.count for c in components)
    wakeups = sum(c.wakeups for c in components)
    return end[0] - connection.start_time, messages / max(1, wakeups), lost


# -- running ---------------------------------------------------------------------------------


def summary(samples: list[float]) -> tuple[float, float, float]:
    return statistics.median(samples), min(samples), max(samples)


def line(name: str, samples: list[float], extra: str = "") -> None:
    med, low, high = summary(samples)
    print(f"  {name:24s} {med:8.2f} µs/msg  (min {low:.2f}, max {high:.2f}){extra}")


def rotated(items: list[Any], by: int) -> list[Any]:
    """``items`` starting at ``by``: each round runs the contenders in another order."""
    by %= len(items)
    return items[by:] + items[:by]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=4_000, help="frames per run")
    parser.add_argument("--runs", type=int, default=25, help="rounds of every contender")
    parser.add_argument("--batch", type=int, default=1, help="frames per deliver() call")
    parser.add_argument(
        "--policy", default="conflate", choices=["conflate", "drop_oldest", "block"]
    )
    parser.add_argument("--bus-messages", type=int, default=4_000, help="frames per Bus run")
    parser.add_argument("--bus-runs", type=int, default=9)
    parser.add_argument("--bus-batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip-bus", action="store_true", help="only the synchronous path")
    args = parser.parse_args()
    print(
        f"Python {platform.python_version()} on {platform.machine()}; batch {args.batch}, "
        f"policy {args.policy}; µs per message, median of {args.runs} short runs (min–max); "
        "ratios and differences are medians of the per-round figures"
    )

    kinds = build_frames()
    one_subscriber: dict[str, float] = {}
    slopes: dict[str, float] = {}
    for kind, distinct in kinds.items():
        frames = cycle(distinct, args.messages)
        # S=100 costs ~100 deliveries per frame: fewer frames keep the run short.
        few = frames[: max(200, args.messages // 10)]
        contenders: list[tuple[str, Callable[[], float], int]] = [
            ("orjson.loads", partial(time_orjson, frames), len(frames)),
            ("decode only", partial(time_decode, frames), len(frames)),
        ]
        for count in SUBSCRIBER_COUNTS:
            chosen = few if count >= 100 else frames
            pipeline = partial(time_pipeline, chosen, count, args.batch, args.policy)
            contenders.append((f"upbus S={count}", pipeline, len(chosen)))
        for _name, measure, _n in contenders:  # warm-up
            measure()
        results: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
        for run in range(args.runs):
            for name, measure, n in rotated(contenders, run):
                gc.collect()
                results[name].append(measure() / n * 1e6)
        rounds = range(args.runs)
        base = results["orjson.loads"]
        s1, s10, s100 = (results[f"upbus S={count}"] for count in SUBSCRIBER_COUNTS)
        print(f"{kind} ({len(distinct[0])}-{len(distinct[-1])} bytes per frame):")
        for name, samples in results.items():
            ratio = statistics.median(samples[r] / base[r] for r in rounds)
            line(name, samples, f"  ×{ratio:.2f} orjson")
        t1 = statistics.median(s1)
        over = statistics.median(s1[r] - base[r] for r in rounds)
        slope = statistics.median((s100[r] - s1[r]) / 99 for r in rounds)
        first = statistics.median((s10[r] - s1[r]) / 9 for r in rounds)
        then = statistics.median((s100[r] - s10[r]) / 90 for r in rounds)
        one_subscriber[kind], slopes[kind] = t1, slope
        print(
            f"  => upbus = {t1:.2f} µs/msg with 1 subscriber ({over:+.2f} vs orjson), "
            f"+{slope:.2f} µs per additional subscriber (1→10: +{first:.2f}, "
            f"10→100: +{then:.2f})"
        )

    print("targets:")
    for kind in kinds:
        ok1 = one_subscriber[kind] <= TARGET_ONE
        ok2 = slopes[kind] <= TARGET_EACH
        print(
            f"  {kind:16s} one subscriber {one_subscriber[kind]:.2f} ≤ {TARGET_ONE} µs: "
            f"{'PASS' if ok1 else 'FAIL'};  per additional {slopes[kind]:.2f} ≤ "
            f"{TARGET_EACH} µs: {'PASS' if ok2 else 'FAIL'}"
        )

    if args.skip_bus:
        return
    print(f"Bus in-process (mixed frames, fake transport, on_message, {args.bus_runs} runs):")
    mixed = cycle(kinds["mixed"], args.bus_messages)
    bus_contenders: list[tuple[str, int, int, list[bytes]]] = []
    for batch in args.bus_batch:
        for count in SUBSCRIBER_COUNTS:
            frames = mixed if count < 100 else mixed[: max(400, args.bus_messages // 10)]
            bus_contenders.append((f"Bus S={count} batch={batch}", count, batch, frames))
    for _name, count, batch, frames in bus_contenders:  # warm-up
        anyio.run(bus_run, frames[:400], count, batch)
    bus_results: dict[str, list[float]] = {name: [] for name, *_ in bus_contenders}
    per_wakeup: dict[str, list[float]] = {name: [] for name, *_ in bus_contenders}
    lost_total = 0
    for run in range(args.bus_runs):
        for name, count, batch, frames in rotated(bus_contenders, run):
            gc.collect()
            seconds, ratio, lost = anyio.run(bus_run, frames, count, batch)
            bus_results[name].append(seconds / len(frames) * 1e6)
            per_wakeup[name].append(ratio)
            lost_total += lost
    for name, samples in bus_results.items():
        line(name, samples, f"  {statistics.median(per_wakeup[name]):.1f} msgs/wakeup")
    for batch in args.bus_batch:
        b1 = bus_results[f"Bus S=1 batch={batch}"]
        b100 = bus_results[f"Bus S=100 batch={batch}"]
        each = statistics.median((b100[r] - b1[r]) / 99 for r in range(args.bus_runs))
        print(
            f"  => batch {batch}: {statistics.median(b1):.2f} µs/msg with 1 component, "
            f"+{each:.2f} µs per additional component"
        )
    print(f"  messages lost to overflow: {lost_total}")


if __name__ == "__main__":
    main()
