"""Trying the private channel: ``upbus sim --orders``, ``upbus watch --private-url``, funds."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anyio
import pytest
from clirun import UPBUS, clean_environment, run_upbus
from simbus import Recorder, make_bus

import upbus
from upbus.sim import AccountConfig, SimConfig, Simulator, run_orders
from upbus.sim.cli import DEFAULT_ACCOUNT

KEYS = {"UPBUS_ACCESS_KEY": "sim-access-key", "UPBUS_SECRET_KEY": "sim-secret-key"}


class Trial:
    """A running ``upbus sim --orders …``: its URLs and the lines it printed so far."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        assert process.stdout is not None
        self.public = process.stdout.readline().strip()
        self.private = process.stdout.readline().strip()
        self.account = process.stdout.readline().strip()


@pytest.fixture
def trial() -> Iterator[Trial]:
    process = subprocess.Popen(
        [*UPBUS, "sim", "--orders", "4", "--order-interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_environment(),
    )
    try:
        yield Trial(process)
    finally:
        if process.poll() is None:
            process.terminate()
            process.communicate(timeout=20)
    assert process.returncode == 0


def test_the_default_account_and_its_keys_are_printed(trial: Trial) -> None:
    assert trial.private.endswith("/websocket/v1/private")
    assert trial.account == (
        "account sim-access-key, secret key sim-secret-key: 100,000,000 KRW, 1 BTC"
    )


def test_watch_my_order_shows_the_scripted_orders(trial: Trial, tmp_path: Path) -> None:
    # The option wins over the setting, which points where nothing listens.
    dead = {"UPBUS_PRIVATE_URL": "ws://127.0.0.1:9/websocket/v1/private"}
    result = run_upbus(
        "watch", "myOrder", "--private-url", trial.private, "--count", "6", "--format", "json",
        "--attempts", "1", env={**KEYS, **dead}, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"-- private connected: {trial.private}" in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == 6
    assert {event["type"] for event in events} == {"myOrder"}
    # The script waited for the subscription: the first order is seen from its start.
    assert events[0]["state"] == "wait"
    first = [event for event in events if event["uuid"] == events[0]["uuid"]]
    assert first[-1]["state"] in ("done", "cancel", "trade")
    assert all(event["code"].startswith("KRW-") for event in events)
    # And the simulator tells, on its own output, what it did.
    assert trial.process.stdout is not None
    assert re.fullmatch(
        r"order 1/4 sim-access-key: (BID|ASK) [\d.]+ KRW-\w+ at [\d.]+: .+\n",
        trial.process.stdout.readline(),
    )


def test_watch_my_asset_shows_the_balances_move(trial: Trial, tmp_path: Path) -> None:
    result = run_upbus(
        "watch", "myAsset", "--private-url", trial.private, "--count", "2", "--format", "json",
        env=KEYS, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["type"] for event in events] == ["myAsset", "myAsset"]
    # The first comes from placing the first order, which locks what it may spend.
    placed = events[0]["assets"]
    assert len(placed) == 1
    assert placed[0]["currency"] in ("KRW", "BTC", "ETH", "XRP", "SOL", "DOGE", "ADA")
    assert Decimal(str(placed[0]["locked"])) > 0


def test_watch_table_lines_show_each_order_s_state_side_price_and_fill(
    trial: Trial, tmp_path: Path
) -> None:
    result = run_upbus(
        "watch", "myOrder", "--private-url", trial.private, "--count", "2",
        env=KEYS, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    pattern = (
        r"myOrder +KRW-\w+ +(wait|trade|done|cancel) +(BID|ASK) +[\d,.]+ x [\d,.]+"
        r"  executed [\d,.]+  [0-9a-f]{8}"
    )
    assert re.fullmatch(pattern, first), first
    assert re.fullmatch(pattern, second), second
    assert first.split()[2] == "wait"


@pytest.mark.parametrize(
    ("option", "value"), [("--orders", "-1"), ("--orders", "x"), ("--order-interval", "0")]
)
def test_bad_order_options_are_usage_errors(option: str, value: str) -> None:
    result = run_upbus("sim", option, value)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"Error: argument {option}: ")


# -- default funds -------------------------------------------------------------------------


def test_an_account_config_starts_with_the_funds_of_the_command_line_account() -> None:
    account = AccountConfig("mine", "m" * 64)
    assert account.balances is None
    assert account.starting_balances() == {"KRW": Decimal(100_000_000), "BTC": Decimal(1)}
    assert account.starting_balances("th") == {"THB": Decimal(2_500_000), "BTC": Decimal(1)}
    assert AccountConfig("mine", "m", {}).starting_balances() == {}
    # The account `upbus sim` serves without --account, as its output line says.
    assert DEFAULT_ACCOUNT.starting_balances() == {"KRW": Decimal(100_000_000), "BTC": Decimal(1)}


async def _held(config: SimConfig, access_key: str) -> dict[str, Decimal]:
    async with Simulator(config) as sim:
        return {currency: held.balance for currency, held in sim.balances(access_key).items()}


def test_python_and_command_line_accounts_hold_the_same() -> None:
    config = SimConfig(accounts=(AccountConfig("mine", "m" * 64),))
    held = anyio.run(_held, config, "mine")
    process = subprocess.Popen(
        [*UPBUS, "sim", "--account", "mine:secret"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_environment(),
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(3)]
    finally:
        process.terminate()
        process.communicate(timeout=20)
    shown = ", ".join(f"{amount:,} {currency}" for currency, amount in held.items())
    assert lines[2] == f"account mine: {shown}"
    assert held == {"KRW": Decimal(100_000_000), "BTC": Decimal(1)}


# -- the script in-process -----------------------------------------------------------------


@pytest.mark.anyio
async def test_run_orders_covers_every_order_state_and_settles_the_funds() -> None:
    config = SimConfig(accounts=(AccountConfig("k", "s" * 64),))
    lines: list[str] = []
    async with Simulator(config) as sim:
        async with make_bus(sim, access_key="k", secret_key="s" * 64) as bus:
            recorder = Recorder()
            await bus.register_component(recorder, [upbus.my_order(), upbus.my_asset()])
            with anyio.fail_after(20):
                await run_orders(sim, 8, interval=0.03, report=lines.append)

            def orders() -> list[upbus.MyOrder]:
                return [m for m in recorder.messages if isinstance(m, upbus.MyOrder)]

            def ended() -> set[str]:
                return {m.uuid for m in orders() if m.state in ("done", "cancel")}

            await recorder.wait_for(lambda: len(ended()) == 8)
        balances = sim.balances("k")
        assert not sim.violations
    assert [line.split(":")[0] for line in lines] == [f"order {n}/8 k" for n in range(1, 9)]
    states = {m.state for m in orders()}
    assert states == {"wait", "trade", "done", "cancel"}
    # Every order was seen from its start: the script waited for the subscription.
    assert len({m.uuid for m in orders() if m.state == "wait"}) == 8
    bases = ("BTC", "ETH", "XRP", "SOL", "DOGE", "ADA")
    assert {m.code for m in orders()} <= {f"KRW-{base}" for base in bases}
    # Nothing is left locked once every order has ended, and money was spent or made.
    assert all(held.locked == 0 for held in balances.values())
    assert balances["KRW"].balance != Decimal(100_000_000)


@pytest.mark.anyio
async def test_run_orders_trades_the_regions_markets() -> None:
    config = SimConfig(region="th", accounts=(AccountConfig("k", "s" * 64),))
    async with Simulator(config) as sim, make_bus(sim, access_key="k", secret_key="s" * 64) as bus:
        recorder = Recorder()
        await bus.register_component(recorder, [upbus.my_order()])
        with anyio.fail_after(20):
            await run_orders(sim, 2, interval=0.03)
        await recorder.wait_for(lambda: len(recorder.messages) >= 2)
    assert all(message.code.startswith("THB-") for message in recorder.messages)
