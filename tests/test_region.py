"""Regional venues: the ``region`` setting picks the URLs, the simulator serves SGD-… markets."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from clirun import UPBUS, clean_environment, run_upbus
from isolation import clean_env  # noqa: F401  (autouse: every test here)
from simbus import Recorder, settings_for

import upbus
from upbus.core._errors import ConfigError
from upbus.settings import explain_settings, load_settings
from upbus.sim import AccountConfig, SimConfig, Simulator
from upbus.sim.markets import markets_for

HOSTS = {
    "kr": "api.upbit.com",
    "sg": "sg-api.upbit.com",
    "id": "id-api.upbit.com",
    "th": "th-api.upbit.com",
}
LOCAL = "ws://127.0.0.1:9/websocket/v1"


def sources(settings: upbus.Settings) -> dict[str, str]:
    return {name: source for name, _, source in explain_settings(settings)}


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("region", sorted(HOSTS))
def test_the_region_picks_both_urls(region: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPBUS_REGION", region)
    settings = load_settings()
    assert settings.region == region
    assert settings.public_url == f"wss://{HOSTS[region]}/websocket/v1"
    assert settings.private_url == f"wss://{HOSTS[region]}/websocket/v1/private"
    assert upbus.Settings(region=region).public_url == settings.public_url


def test_korea_is_the_default_and_its_urls_say_default() -> None:
    settings = load_settings()
    assert (settings.region, settings.public_url) == ("kr", "wss://api.upbit.com/websocket/v1")
    shown = sources(settings)
    assert shown["region"] == shown["public_url"] == shown["private_url"] == "default"


def test_an_explicit_url_wins_from_any_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "upbus.toml").write_text(f'region = "sg"\nprivate_url = "{LOCAL}/private"\n')
    monkeypatch.setenv("UPBUS_PUBLIC_URL", LOCAL)
    settings = load_settings()
    assert (settings.public_url, settings.private_url) == (LOCAL, f"{LOCAL}/private")
    shown = sources(settings)
    assert shown["public_url"] == "environment variable UPBUS_PUBLIC_URL"
    assert shown["private_url"] == str(tmp_path / "upbus.toml")
    # An argument beats both, and the other URL still follows the region.
    settings = load_settings(region="th", public_url="ws://127.0.0.1:1/websocket/v1")
    assert settings.public_url == "ws://127.0.0.1:1/websocket/v1"
    assert settings.private_url == f"{LOCAL}/private"


def test_a_url_that_follows_the_region_names_it_as_its_source(tmp_path: Path) -> None:
    (tmp_path / "upbus.toml").write_text('region = "id"\n')
    shown = sources(load_settings())
    assert shown["region"] == str(tmp_path / "upbus.toml")
    assert shown["public_url"] == shown["private_url"] == "default for region id"


def test_upbus_config_shows_the_region_and_where_the_urls_come_from(tmp_path: Path) -> None:
    result = run_upbus(
        "config", env={"UPBUS_REGION": "sg", "UPBUS_PRIVATE_URL": f"{LOCAL}/private"}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert rows["region"].endswith("'sg'  [environment variable UPBUS_REGION]")
    assert rows["public_url"].endswith(
        "'wss://sg-api.upbit.com/websocket/v1'  [default for region sg]"
    )
    assert rows["private_url"].endswith(
        f"'{LOCAL}/private'  [environment variable UPBUS_PRIVATE_URL]"
    )


def test_a_bad_region_is_an_error_naming_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(region="eu")
    message = str(info.value)
    assert "region = 'eu' (from argument)" in message
    assert all(f"'{region}'" in message for region in HOSTS)
    result = run_upbus("config", env={"UPBUS_REGION": "SGP"}, cwd=tmp_path)
    assert result.returncode == 1
    assert "environment variable UPBUS_REGION" in result.stderr
    assert "'kr', 'sg', 'id' or 'th'" in result.stderr
    with pytest.raises(ConfigError, match="region"):
        load_settings(region=["sg"])


# -- the simulator -------------------------------------------------------------------------


def test_each_region_lists_its_own_markets_with_plausible_prices() -> None:
    korea, singapore = markets_for("kr"), markets_for("sg")
    assert "SGD-XRP" in singapore
    assert "KRW-XRP" not in singapore
    assert "KRW-XRP" in korea
    assert "SGD-XRP" not in korea
    for region, quote in (("sg", "SGD"), ("id", "IDR"), ("th", "THB")):
        markets = markets_for(region)
        assert "USDT-BTC" in markets
        # BTC is worth more than ETH, and ETH more than XRP, in every currency.
        btc, eth, xrp = (markets[f"{quote}-{base}"].price for base in ("BTC", "ETH", "XRP"))
        assert btc > eth > xrp > 0
    assert Decimal(2) < singapore["SGD-XRP"].price < Decimal(4)
    with pytest.raises(ValueError, match="kr, sg, id, th"):
        markets_for("eu")
    with pytest.raises(ConfigError, match="kr, sg, id, th"):
        SimConfig(region="eu")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_bus_gets_sgd_xrp_from_the_singapore_simulator() -> None:
    async with Simulator(SimConfig(region="sg", rate=200.0)) as sim:
        settings = settings_for(sim, region="sg")
        assert settings.region == "sg"
        async with upbus.Bus(settings) as bus:
            recorder = Recorder()
            specs = [upbus.ticker("SGD-XRP", "KRW-XRP"), upbus.trade("SGD-XRP")]
            await bus.register_component(recorder, specs)
            await recorder.wait_for(lambda: len(recorder.messages) >= 30)
        assert not sim.violations
    codes = {message.code for message in recorder.messages}
    kinds = {message.type for message in recorder.messages}
    # KRW-XRP is not listed in Singapore: like any unknown code it gets nothing.
    assert codes == {"SGD-XRP"}
    assert kinds == {"ticker", "trade"}
    prices = [message.trade_price for message in recorder.messages if message.type == "ticker"]
    assert all(Decimal(2) < Decimal(str(price)) < Decimal(4) for price in prices)


@pytest.mark.anyio
async def test_accounts_start_with_the_regions_currency() -> None:
    accounts = (AccountConfig("k", "s" * 64), AccountConfig("given", "g" * 64, {"SGD": Decimal(5)}))
    async with Simulator(SimConfig(region="sg", accounts=accounts)) as sim:
        held = {currency: b.balance for currency, b in sim.balances("k").items()}
        given = {currency: b.balance for currency, b in sim.balances("given").items()}
    assert held == {"SGD": Decimal(100_000), "BTC": Decimal(1)}
    assert given == {"SGD": Decimal(5)}


# -- from the command line -------------------------------------------------------------------


@pytest.fixture
def singapore_sim() -> Iterator[tuple[str, str]]:
    """``upbus sim --region sg`` in a subprocess: its public and private URLs."""
    process = subprocess.Popen(
        [*UPBUS, "sim", "--region", "sg", "--rate", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_environment(),
    )
    try:
        assert process.stdout is not None
        public, private = process.stdout.readline().strip(), process.stdout.readline().strip()
        assert process.stdout.readline().strip().endswith(": 100,000 SGD, 1 BTC")
        yield public, private
        process.terminate()
        _, stderr = process.communicate(timeout=20)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_upbus_watch_against_upbus_sim_region_sg(
    singapore_sim: tuple[str, str], tmp_path: Path
) -> None:
    public, private = singapore_sim
    env = {"UPBUS_REGION": "sg", "UPBUS_PUBLIC_URL": public, "UPBUS_PRIVATE_URL": private}
    result = run_upbus(
        "watch", "ticker", "SGD-XRP", "SGD-BTC", "--count", "4", "--format", "json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 4
    assert {line["code"] for line in lines} == {"SGD-XRP", "SGD-BTC"}
    assert {line["type"] for line in lines} == {"ticker"}


def test_upbus_sim_refuses_an_unknown_region() -> None:
    result = run_upbus("sim", "--region", "eu")
    assert result.returncode == 2
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("Error: ")
    assert "'eu'" in last
    assert all(region in last for region in HOSTS)


def test_run_with_the_embedded_simulator_serves_the_region_s_markets() -> None:
    ran = run_upbus(
        "run",
        "--sim",
        "--no-store",
        "--seconds",
        "2",
        env={
            "UPBUS_REGION": "sg",
            "UPBUS_PLUGINS__CONSOLE__ENABLED": "true",
            "UPBUS_PLUGINS__CONSOLE__SPECS": '[{"type": "ticker", "codes": ["SGD-XRP"]}]',
        },
    )
    assert ran.returncode == 0, ran.stderr
    assert "SGD-XRP" in ran.stdout
