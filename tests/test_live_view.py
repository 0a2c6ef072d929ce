"""The live terminal view: rendered against a real bus, and the commands on a terminal or not.

The view is rendered into an in-memory terminal; the commands run as subprocesses,
with stdout on a pipe (the plain fallback) or on a pseudo-terminal (the live view).
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from clirun import UPBUS, clean_environment, run_upbus
from rich.console import Console, RenderableType
from simbus import make_bus

import upbus
from upbus.cli._live import Named, Rates, bus_view, status_line
from upbus.cli._printer import Board
from upbus.plugins.sqlite_store import store_for
from upbus.sim import SimConfig, Simulator

pytestmark = pytest.mark.anyio


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=100.0)


def render(renderable: RenderableType, width: int = 160) -> str:
    console = Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)
    console.print(renderable)
    output = console.file.getvalue()
    assert isinstance(output, str)
    return output


def row(text: str, *first: str) -> list[str]:
    """The cells of the one rendered line that starts with the words ``first``."""
    found = [line.split() for line in text.splitlines() if line.split()[: len(first)] == [*first]]
    assert len(found) == 1, f"{len(found)} lines start with {first}:\n{text}"
    return found[0]


class Clock:
    """A clock the test sets, so that a rate's time span is known exactly."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Quiet:
    async def on_message(self, message: upbus.Message) -> None:
        pass


class NeverReads:
    """A component nobody takes messages from: its buffer fills, then drops."""


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (the debug entry points have nothing to wait on) until it holds."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


# -- the view, against a bus on the simulator ----------------------------------------


async def test_the_view_shows_state_merged_counts_and_rates_per_type(sim: Simulator) -> None:
    chart, book = Quiet(), Quiet()
    clock = Clock(100.0)
    rates = Rates(clock=clock)
    async with make_bus(sim) as bus:
        chart_sub = await bus.register_component(chart, [upbus.ticker("KRW-BTC", "KRW-ETH")])
        await bus.register_component(book, [upbus.orderbook("KRW-BTC", depth=5)])
        await until(lambda: len(bus.get_connection_metrics()["public"]["messages_by_type"]) == 2)

        names = {chart_sub.label: Named("chart", "KRW-BTC 1.00")}
        first = render(bus_view(bus, rates=rates, components=names))
        before = bus.get_connection_metrics()["public"]["messages_by_type"]
        # Before a second reading there is no rate to tell.
        assert row(first, "public", "ticker")[3] == "-"

        def grown() -> bool:
            now = bus.get_connection_metrics()["public"]["messages_by_type"]
            return all(now.get(kind, 0) > before.get(kind, 0) for kind in ("ticker", "orderbook"))

        await until(grown)
        clock.now = 102.0
        text = render(bus_view(bus, rates=rates, components=names))
        # Nothing awaited since the render: these are the figures it read.
        metrics = bus.get_connection_metrics()["public"]
        subscriptions = bus.get_subscription_stats()
        limiter = bus.get_rate_limiter_status()["message"]["public"]
        requests = bus.get_pending_task_status()["public"]["requests_sent"]

    channel = row(text, "public", "connected")
    assert channel[3] == f"{metrics['messages_in']:,}"
    total = sum(metrics["messages_by_type"].values()) - sum(before.values())
    assert channel[4] == f"{total / 2:,.1f}"
    assert " ".join(channel[6:10]) == (
        f"{subscriptions['public']['entries']} entries, {subscriptions['public']['codes']} codes"
    )
    assert subscriptions["public"]["entries"] == 2
    assert " ".join(channel[10:]) == f"{requests} sent"
    for kind, count in metrics["messages_by_type"].items():
        rate = (count - before.get(kind, 0)) / 2
        assert row(text, "public", kind)[2:] == [f"{count:,}", f"{rate:,.1f}"]

    delivered = {s["subscriber"]: s for s in subscriptions["subscribers"]}[chart_sub.label]
    cells = row(text, "chart")
    assert cells[1:6] == [
        "auto",
        f"{delivered['delivered']:,}",
        f"{delivered['buffered']:,}",
        f"{delivered['conflated']:,}",
        "0",
    ]
    assert cells[6:] == ["KRW-BTC", "1.00"]

    left = ", ".join(
        f"{w['limit'] - w['used']}/{w['limit']} per {w['period']:g} s" for w in limiter["windows"]
    )
    assert f"requests public        {left}" in re.sub(r" {2,}", " " * 8, text)
    assert "private" not in text.split("Rate limits")[0]  # a channel never used is left out


async def test_the_view_shows_drops_per_component_and_what_a_store_wrote(
    sim: Simulator, tmp_path: Path
) -> None:
    database = tmp_path / "live.db"
    plugins = {"sqlite": {"enabled": True, "path": str(database), "flush_interval": 0.05}}
    async with make_bus(sim, plugins=plugins) as bus:
        store = store_for(bus)
        assert store is not None
        never_reads = NeverReads()
        lagging = await bus.register_component(
            never_reads, [upbus.trade("KRW-BTC")], overflow="drop_oldest", capacity=2
        )

        def dropped() -> int:
            stats = bus.get_subscription_stats()["subscribers"]
            return int({s["subscriber"]: s for s in stats}[lagging.label]["dropped"])

        await until(lambda: dropped() >= 3 and store.stats()["written"] >= 3)
        written_before = store.stats()["written"]
        text = render(bus_view(bus, [store]))
        stats, lost = store.stats(), dropped()

    assert row(text, lagging.label)[1:] == ["drop_oldest", "0", "2", "0", f"{lost:,}"]
    cells = row(text, str(database))
    assert cells[1] == f"{stats['accepted']:,}"  # counted on the loop, like the render
    # The writer thread may write between the render and the reading after it.
    assert written_before <= int(cells[2].replace(",", "")) <= stats["written"]
    assert row(text, "public", "ticker")[3] == "-"  # no Rates given: no rates shown


async def test_the_view_tells_failing_connects_and_their_last_error() -> None:
    refused = "ws://127.0.0.1:9/websocket/v1"  # the discard port: nothing listens
    settings = upbus.Settings(public_url=refused, reconnect={"initial": 0.05, "maximum": 0.2})
    component = Quiet()  # held here: the bus holds components weakly
    async with upbus.Bus(settings) as bus:
        assert "waiting for subscriptions" in render(bus_view(bus))
        await bus.register_component(component, [upbus.ticker("KRW-BTC")])
        await until(lambda: bus.get_connection_metrics()["public"]["connect_failures"] >= 2)
        text = render(bus_view(bus))
        metrics = bus.get_connection_metrics()["public"]
    assert "waiting for subscriptions" not in text
    state = re.search(r"^public +(connecting|backing off) ", text, re.MULTILINE)
    assert state is not None, text
    problem = f"public: {metrics['connect_failures']} failed connects, last: TransportError"
    assert problem in text
    assert "cannot connect to ws://127.0.0.1:9/websocket/v1" in text


async def test_the_plain_status_line_gives_each_channels_rate(sim: Simulator) -> None:
    clock = Clock(10.0)
    rates = Rates(clock=clock)
    component = Quiet()
    async with make_bus(sim) as bus:
        await bus.register_component(component, [upbus.ticker("KRW-BTC")])
        await until(lambda: bus.get_connection_metrics()["public"]["messages_in"] >= 1)
        first = bus.get_connection_metrics()["public"]["messages_in"]
        status_line(bus, rates)
        await until(lambda: bus.get_connection_metrics()["public"]["messages_in"] >= first + 4)
        clock.now = 14.0
        line = status_line(bus, rates)
        now = bus.get_connection_metrics()["public"]["messages_in"]
    seen = re.fullmatch(r"public: connected, (\d+) messages \(([\d.]+)/s\), 0 reconnects", line)
    assert seen is not None, line
    assert int(seen.group(1)) == now
    assert seen.group(2) == f"{(now - first) / 4:.1f}"


def test_rates_span_a_window_and_start_a_reset_counter_over() -> None:
    clock = Clock(0.0)
    rates = Rates(window=1.0, clock=clock)

    def reading(at: float, tickers: int) -> dict[tuple[str, str], float]:
        clock.now = at
        return rates.observe({"public": {"messages_by_type": {"ticker": tickers}}})

    assert reading(0.0, 0) == {}
    assert not rates.known()
    assert reading(0.25, 5) == {("public", "ticker"): 20.0}
    assert reading(0.5, 20) == {("public", "ticker"): 40.0}  # still from 0.0: within the window
    assert reading(1.5, 50) == {("public", "ticker"): 30.0}  # from 0.5, the newest a window old
    assert reading(1.5, 99) == {("public", "ticker"): 30.0}  # no time passed: unchanged
    assert reading(2.5, 10) == {("public", "ticker"): 10.0}  # went down: counted from zero


async def test_the_watch_board_keeps_one_row_per_code_with_its_latest_values(
    sim: Simulator,
) -> None:
    board = Board("ticker", count=12)
    latest: dict[str, upbus.Ticker] = {}
    async with make_bus(sim) as bus:
        subscriber = await bus.register_component(
            board, [upbus.ticker("KRW-BTC", "KRW-ETH")], overflow="block"
        )
        empty = render(board)
        async for item in subscriber:
            if isinstance(item, upbus.Ticker):
                latest[item.code] = item
            if board.show(item):
                break
    text = render(board)
    assert "nothing yet" in empty
    assert "ticker: 12 messages" in text
    assert "public connected: ws://127.0.0.1:" in text
    counts = {code: seen for code, (_message, seen) in board.rows.items()}
    assert sum(counts.values()) == 12
    assert set(counts) == set(latest) == {"KRW-BTC", "KRW-ETH"}
    for code, message in latest.items():
        cells = [c for c in row(text, "│", code) if c != "│"]
        assert cells[1:4] == [
            f"{message.trade_price:,.2f}",
            f"{message.signed_change_rate * 100:+.2f}%",
            f"{message.acc_trade_volume_24h:,.3f}",
        ]
        assert cells[-1] == str(counts[code])


# -- the commands without a terminal: plain lines ------------------------------------


def test_demo_without_a_terminal_logs_lines_says_connected_once_and_sums_up(
    tmp_path: Path,
) -> None:
    result = run_upbus("demo", "--seconds", "1.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("-- public connected: ws://127.0.0.1:") == 1
    assert "\x1b[" not in result.stdout  # no terminal codes in a pipe
    lines = result.stdout.splitlines()
    for name in ("chart", "book", "tape"):
        logged = sum(line.startswith(f"{name:<6}| ") for line in lines)
        summary = re.search(rf"^{name}: (\d+) messages, 0 dropped, last ", result.stdout, re.M)
        assert summary is not None, result.stdout
        assert int(summary.group(1)) == logged > 0  # the summary counts what was shown
    received = re.search(
        r"^public: (\d+) messages received \(orderbook (\d+), ticker (\d+), trade (\d+)\)$",
        result.stdout,
        re.M,
    )
    assert received is not None, result.stdout
    total, *kinds = map(int, received.groups())
    assert total == sum(kinds)
    assert lines[-1] == "3 components shared 3 entries in 1 request(s)"


def test_run_without_a_terminal_prints_status_lines_with_rates(tmp_path: Path) -> None:
    result = run_upbus("run", "--sim", "--seconds", "1.5", "--status-every", "0.4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    status = [line for line in result.stderr.splitlines() if line.startswith("public: ")]
    assert len(status) >= 2, result.stderr
    for line in status:
        assert re.fullmatch(r"public: connected, \d+ messages \(\d+\.\d/s\), 0 reconnects", line)
    assert "\x1b[" not in result.stdout + result.stderr
    assert re.fullmatch(
        r"stored (\d+) of \1 accepted messages in upbus.db", result.stdout.splitlines()[-1]
    )


# -- the commands on a terminal ------------------------------------------------------


def on_terminal(
    args: list[str], cwd: Path, *, interrupt_when: str | None = None, timeout: float = 30.0
) -> tuple[int, str]:
    """Run ``upbus *args`` with a 120-column pseudo-terminal as its stdin, stdout and stderr.

    With ``interrupt_when``, SIGINT is sent once that text has been printed (Ctrl-C).
    Returns the exit status and everything printed.
    """
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 120, 0, 0))
    env = clean_environment(TERM="xterm-256color")
    env.pop("COLUMNS", None)
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [*UPBUS, *args], stdin=terminal, stdout=terminal, stderr=terminal, cwd=cwd, env=env
    )
    os.close(terminal)
    printed = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the terminal closed: the command and its children are done
                    break
                if not chunk:
                    break
                printed += chunk
                if interrupt_when is not None and interrupt_when.encode() in printed:
                    process.send_signal(signal.SIGINT)
                    interrupt_when = None
            elif process.poll() is not None:
                break
        status = process.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        process.kill()
        process.wait()
        os.close(controller)
    return status, printed.decode(errors="replace")


def plain_text(printed: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", printed).replace("\r", "")


@pytest.mark.slow
def test_demo_on_a_terminal_redraws_in_place_and_sums_up_after_ctrl_c(tmp_path: Path) -> None:
    # Interrupted once the view shows a few messages per second of every type.
    status, printed = on_terminal(["demo"], tmp_path, interrupt_when="trade  ")
    text = plain_text(printed)
    assert status == 0, text
    assert "\x1b[1A" in printed  # the cursor goes back up: redrawn, not scrolled
    assert text.count("-- public connected: ws://127.0.0.1:") == 1
    assert "chart | " not in text  # no line per message
    for heading in ("Connections", "Messages", "Components", "Rate limits"):
        assert heading in text
    assert re.search(r"^chart +auto +\d+ +\d+ +\d+ +0 +ticker KRW-", text, re.M)
    assert re.search(r"^public +connected +\d+s +\d+ +[\d.]+ +0 +3 entries, 5 codes", text, re.M)
    assert re.search(r"^public: \d+ messages received \(orderbook \d+", text, re.M)
    assert text.rstrip().splitlines()[-1] == "3 components shared 3 entries in 1 request(s)"


@pytest.mark.slow
def test_run_on_a_terminal_shows_the_view_or_with_plain_the_status_lines(
    tmp_path: Path,
) -> None:
    status, printed = on_terminal(["run", "--sim", "--seconds", "1.5"], tmp_path)
    text = plain_text(printed)
    assert status == 0, text
    assert "\x1b[1A" in printed
    assert re.search(r"^upbus\.db +[\d,]+ +[\d,]+ +[\d,]+ +0$", text, re.M)  # the store's row
    assert re.search(r"^requests public +\d/5 per 1 s, \d+/100 per 60 s", text, re.M)
    assert not re.search(r"^public: connected", text, re.M)  # no status line under the view
    assert re.fullmatch(r"stored (\d+) of \1 accepted messages in upbus.db", text.splitlines()[-1])

    status, printed = on_terminal(
        ["run", "--sim", "--seconds", "1.2", "--status-every", "0.4", "--plain"], tmp_path
    )
    text = plain_text(printed)
    assert status == 0, text
    assert "\x1b[1A" not in printed
    assert re.search(r"^public: connected, \d+ messages \(\d+\.\d/s\), 0 reconnects$", text, re.M)


@pytest.mark.slow
async def test_watch_table_on_a_terminal_is_one_row_per_code(
    sim: Simulator, tmp_path: Path
) -> None:
    args = ["watch", "ticker", "KRW-BTC", "KRW-ETH", "--url", sim.public_url, "--count", "10"]
    status, printed = await anyio.to_thread.run_sync(lambda: on_terminal(args, tmp_path))
    text = plain_text(printed)
    assert status == 0, text
    final = text[text.rindex("ticker: 10 messages") :]
    counts = [int(m) for m in re.findall(r"^│ KRW-(?:BTC|ETH) .* (\d+) │$", final, re.M)]
    assert len(counts) == 2, final
    assert sum(counts) == 10, final
    assert re.search(r"^ticker +KRW-BTC", text, re.M) is None  # not the line format
