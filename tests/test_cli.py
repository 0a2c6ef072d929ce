"""The ``upbus`` command, run as a subprocess against the simulator."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from clirun import UPBUS, run_upbus


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    process = subprocess.Popen(
        [*UPBUS, "sim", "--port", "0", "--rate", "50"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("ws://127.0.0.1:")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_watch_prints_one_json_object_per_line_and_exits_after_count(sim_url: str) -> None:
    result = run_upbus(
        "watch",
        "ticker",
        "KRW-BTC",
        "KRW-ETH",
        "--url",
        sim_url,
        "--count",
        "4",
        "--format",
        "json",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    objects = [orjson.loads(line) for line in lines]
    assert {obj["type"] for obj in objects} == {"ticker"}
    assert {obj["code"] for obj in objects} <= {"KRW-BTC", "KRW-ETH"}
    assert all("trade_price" in obj and "stream_type" in obj for obj in objects)


def test_watch_table_narrows_the_book_to_the_depth_asked(sim_url: str) -> None:
    result = run_upbus("watch", "orderbook", "KRW-BTC.5", "--url", sim_url, "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(5 units)") == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["watch", "tickr", "KRW-BTC"], "'tickr' is not a supported type"),
        (["watch", "ticker", "krw-btc"], "'krw-btc' is not a market code"),
        (["watch", "myAsset", "KRW-BTC"], "myAsset takes no codes"),
    ],
)
def test_bad_specs_are_one_clear_line(args: list[str], words: str) -> None:
    result = run_upbus(*args)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_url_is_one_clear_line() -> None:
    result = run_upbus(
        "watch", "ticker", "KRW-BTC", "--url", "ws://127.0.0.1:9/websocket/v1", "--attempts", "1"
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: public: gave up after 1 failed connect attempt(s)")


def test_config_shows_values_with_their_source_and_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "upbus.toml").write_text("debounce = 0.2\n")
    result = run_upbus(
        "config",
        env={"UPBUS_SECRET_KEY": "very-secret-value", "UPBUS_HEARTBEAT_INTERVAL": "12"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "UPBUS_HEARTBEAT_INTERVAL" in lines["heartbeat_interval"]
    assert "upbus.toml" in lines["debounce"]
    assert "0.2" in lines["debounce"]
    assert "very-secret-value" not in result.stdout
    assert "**********" in lines["secret_key"]


def test_bad_settings_are_one_clear_line(tmp_path: Path) -> None:
    result = run_upbus("config", env={"UPBUS_DEBOUNCE": "soon"}, cwd=tmp_path)
    assert result.returncode == 1
    assert "debounce" in result.stderr
    assert "UPBUS_DEBOUNCE" in result.stderr
    assert "Traceback" not in result.stderr


def test_plugins_lists_the_defaults_with_their_distribution(tmp_path: Path) -> None:
    result = run_upbus("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line[:1] != " "}
    for name in ("merge", "batching", "ratelimit", "transport"):
        assert "loaded" in rows[name]
        assert "upbus" in rows[name]


def test_demo_runs_and_reports_one_request(tmp_path: Path) -> None:
    result = run_upbus("demo", "--seconds", "1.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "chart | ticker" in result.stdout
    assert "book  | orderbook KRW-BTC" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "3 components shared 3 entries in 1 request(s)"


def test_the_command_alone_shows_its_help_and_succeeds() -> None:
    result = run_upbus()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    assert "Commands:" in result.stdout
    assert result.stdout == run_upbus("--help").stdout


@pytest.mark.parametrize("command", ["", "run", "watch", "replay", "db", "demo", "config"])
def test_help_texts_show_no_markup(command: str) -> None:
    result = run_upbus(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "`" not in result.stdout
    listed = result.stdout.partition("Commands:")[2].splitlines()
    assert not [line for line in listed if line.endswith("...")]  # each summary fits its line
