"""The live terminal view of a running bus, and the plain status line used without a terminal.

Everything shown is read from the bus's debug entry points and the recorders'
``stats()``, polled a few times per second; nothing here touches the message path.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

import anyio
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from upbus.core._bus import Bus

__all__ = (
    "Named",
    "Rates",
    "Recorder",
    "bus_view",
    "doing",
    "show_live",
    "status_line",
    "wants_live",
)

REFRESH = 0.25  # seconds between two redraws of a live view

_DOING = {
    "connecting": "connecting",
    "backoff": "backing off",
    "gap": "disconnected",
    "reconnected": "connected",
    "closed": "closed",
}
_STYLE = {"connected": "green", "connecting": "yellow", "backing off": "yellow"}


class Recorder(Protocol):
    """What the view reads from a store or recording file."""

    @property
    def path(self) -> object: ...

    def stats(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Named:
    """How the view shows one subscriber: a name instead of its label, and its latest value."""

    name: str
    last: str = ""


class Rates:
    """Messages per second per (channel, type), from the growth of the cumulative counters.

    Each :meth:`observe` is one reading. A rate spans at least ``window`` seconds of
    readings when there are that many, so a redraw every quarter second does not make
    the figures jump with each message that happens to land on either side of it.
    """

    def __init__(self, window: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._readings: deque[tuple[float, dict[tuple[str, str], int]]] = deque()
        self.current: dict[tuple[str, str], float] = {}

    def observe(self, metrics: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], float]:
        """Take a reading of ``get_connection_metrics()``; return the rates it gives."""
        now = self.clock()
        counts = {
            (channel, kind): int(n)
            for channel, m in metrics.items()
            for kind, n in m["messages_by_type"].items()
        }
        if self._readings and now <= self._readings[-1][0]:
            return self.current  # no time passed: nothing new to divide by
        self._readings.append((now, counts))
        while len(self._readings) > 2 and self._readings[1][0] <= now - self.window:
            self._readings.popleft()
        if len(self._readings) >= 2:
            then, before = self._readings[0]
            elapsed = now - then
            # A counter that went down was started over: count from zero.
            self.current = {
                key: (n - before.get(key, 0) if n >= before.get(key, 0) else n) / elapsed
                for key, n in counts.items()
            }
        return self.current

    def known(self) -> bool:
        """Whether two readings have been taken, so that the rates mean something."""
        return len(self._readings) >= 2

    def of_channel(self, channel: str) -> float:
        return sum(rate for (ch, _kind), rate in self.current.items() if ch == channel)


def doing(state: str) -> str:
    """A connection state as a user reads it."""
    return _DOING.get(state, state)


def _tried(metrics: Mapping[str, Any]) -> bool:
    return bool(metrics["state"] != "idle" or metrics["connects"] or metrics["connect_failures"])


def _failing(metrics: Mapping[str, Any]) -> bool:
    return bool(
        metrics["state"] not in ("connected", "reconnected") and metrics["connect_failures"]
    )


def status_line(bus: Bus, rates: Rates | None = None) -> str:
    """One line: what each channel that has tried to connect is doing."""
    metrics = bus.get_connection_metrics()
    if rates is not None:
        rates.observe(metrics)
    parts = []
    for channel, m in metrics.items():
        if not _tried(m):
            continue
        line = f"{channel}: {doing(m['state'])}, {m['messages_in']} messages"
        if rates is not None and rates.known():
            line += f" ({rates.of_channel(channel):.1f}/s)"
        line += f", {m['reconnects']} reconnects"
        if _failing(m):
            line += f", {m['connect_failures']} failed connects (last: {m['last_error']})"
        parts.append(line)
    return "; ".join(parts) or "waiting for subscriptions"


def _table(title: str, *columns: str) -> Table:
    """A table of columns ``name`` (a word), ``#name`` (a number) or ``~name`` (free text).

    Words and numbers are never folded: on a narrow terminal, free text wraps.
    """
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for column in columns:
        table.add_column(
            column.lstrip("#~"),
            justify="right" if column.startswith("#") else "left",
            no_wrap=not column.startswith("~"),
        )
    return table


def _since(connected_since: float | None) -> str:
    if connected_since is None:
        return ""
    seconds = max(time.time() - connected_since, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _rate(rates: Rates | None, value: float) -> str:
    return f"{value:,.1f}" if rates is not None and rates.known() else "-"


def _budget(limiter: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{w['limit'] - w['used']}/{w['limit']} per {w['period']:g} s" for w in limiter["windows"]
    )


def bus_view(
    bus: Bus,
    recorders: Sequence[Recorder] = (),
    *,
    rates: Rates | None = None,
    components: Mapping[str, Named] | None = None,
) -> RenderableType:
    """What ``bus`` is doing, as one rich renderable, read from its debug entry points.

    ``rates`` keeps the previous counters between calls (without it, no rates are
    shown); ``components`` names subscribers by label, and adds each one's latest value.
    Call it from the bus's event loop.
    """
    metrics = bus.get_connection_metrics()
    if rates is not None:
        rates.observe(metrics)
    subscriptions = bus.get_subscription_stats()
    pending = bus.get_pending_task_status()
    limiters = bus.get_rate_limiter_status()
    parts: list[RenderableType] = []

    channels = _table(
        "Connections", "channel", "state", "#up", "#messages", "#msg/s", "#reconnects",
        "~merged", "~requests",
    )  # fmt: skip
    problems: list[Text] = []
    for channel, m in metrics.items():
        merged = subscriptions[channel]
        if not (_tried(m) or merged["entries"]):
            continue
        state = doing(m["state"])
        refused = len(merged["quarantined"])
        task = pending[channel]
        requests = f"{task['requests_sent']} sent"
        if task["phase"] != "idle":
            requests += f", v{task['latest_version']} {task['phase']}"
        channels.add_row(
            channel,
            Text(state, style=_STYLE.get(state, "red")),
            _since(m["connected_since"]) if state == "connected" else "",
            f"{m['messages_in']:,}",
            _rate(rates, rates.of_channel(channel) if rates is not None else 0.0),
            str(m["reconnects"]),
            f"{merged['entries']} entries, {merged['codes']} codes"
            + (f", {refused} refused" if refused else ""),
            requests,
        )
        if _failing(m):
            problems.append(
                Text(
                    f"{channel}: {m['connect_failures']} failed connects, last: {m['last_error']}",
                    style="red",
                )
            )
    if channels.row_count:
        parts.append(channels)
        parts.extend(problems)
    else:
        parts.append(Text("waiting for subscriptions", style="yellow"))

    by_type = _table("Messages", "channel", "type", "#received", "#per s")
    for channel, m in metrics.items():
        for kind, count in sorted(m["messages_by_type"].items()):
            value = rates.current.get((channel, kind), 0.0) if rates is not None else 0.0
            by_type.add_row(channel, kind, f"{count:,}", _rate(rates, value))
    if by_type.row_count:
        parts.append(by_type)

    named = components or {}
    show_last = any(n.last for n in named.values())
    listed = _table(
        "Components", "component", "policy", "#delivered", "#buffered", "#conflated", "#dropped",
        *(["~last"] if show_last else []),
    )  # fmt: skip
    for s in subscriptions["subscribers"]:
        who = named.get(s["subscriber"])
        dropped = s["dropped"]
        row: list[str | Text] = [
            who.name if who is not None else s["subscriber"],
            s["policy"],
            f"{s['delivered']:,}",
            f"{s['buffered']:,}",
            f"{s['conflated']:,}",
            Text(f"{dropped:,}", style="red" if dropped else ""),
        ]
        if show_last:
            row.append(who.last if who is not None else "")
        listed.add_row(*row)
    if listed.row_count:
        parts.append(listed)

    limits = _table("Rate limits", "limiter", "~left", "#waits", "#blocked")
    scoped = [(f"connect {scope}", s) for scope, s in limiters["connect"].items()]
    scoped += [(f"requests {ch}", s) for ch, s in limiters["message"].items() if s is not None]
    for name, status in scoped:
        blocked = status["blocked_for"]
        limits.add_row(
            name,
            _budget(status),
            str(status["waits"]),
            Text(f"{blocked:.1f} s", style="red") if blocked else "",
        )
    parts.append(limits)

    if recorders:
        stored = _table("Recorders", "recorder", "#accepted", "#written", "#pending", "#lost")
        for recorder in recorders:
            stats = recorder.stats()
            lost = stats.get("lost", 0)
            stored.add_row(
                str(recorder.path),
                f"{stats['accepted']:,}",
                f"{stats['written']:,}",
                f"{stats.get('pending', 0):,}",
                Text(f"{lost:,}", style="red" if lost else ""),
            )
        parts.append(stored)
    # A blank line between tables: their titles would otherwise run into the rows above.
    spaced: list[RenderableType] = []
    for part in parts:
        spaced += [part, Text("")] if isinstance(part, Table) else [part]
    return Group(*spaced[:-1])  # the last part is always a table: no blank line after it


def wants_live(plain: bool = False) -> bool:
    """Whether to draw a live view: stdout is a terminal and plain lines were not asked for."""
    return not plain and sys.stdout.isatty()


@contextmanager
def _logs_above(original: TextIO) -> Iterator[None]:
    """Send log records that went to the terminal's stderr through the live console.

    Written straight to the terminal, a log line would land inside the redrawn view and
    be overwritten; through the console it is printed above it.
    """
    moved = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream is original
    ]
    if sys.stderr is original:
        moved = []  # the console did not take stderr over: nothing to move
    for handler in moved:
        handler.setStream(sys.stderr)
    try:
        yield
    finally:
        for handler in moved:
            handler.setStream(original)


async def show_live(
    render: Callable[[], RenderableType],
    *,
    console: Console | None = None,
    every: float = REFRESH,
) -> None:
    """Draw ``render()`` in place every ``every`` seconds until cancelled; the last stays.

    Redraws run on the event loop rather than in rich's refresh thread, because the
    bus's debug entry points must be called from the loop.
    """
    console = console if console is not None else Console()
    original = sys.stderr
    with Live(render(), console=console, auto_refresh=False) as live, _logs_above(original):
        try:
            while True:
                await anyio.sleep(every)
                live.update(render(), refresh=True)
        finally:
            live.update(render())  # what it stopped at, not what it was a moment before
