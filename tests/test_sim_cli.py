"""``upbus sim`` as a user runs it: stopping, its help, and its documentation."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from clirun import UPBUS, clean_environment, run_upbus
from docs_blocks import ROOT


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize(
    "command", [[*UPBUS, "sim"], [sys.executable, "-m", "upbus.sim"]], ids=["upbus", "module"]
)
def test_a_signal_stops_it_with_status_zero(command: list[str], signum: signal.Signals) -> None:
    process = subprocess.Popen(
        [*command, "--port", "0", "--rate", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_environment(),
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("ws://127.0.0.1:")
        assert process.stdout.readline().rstrip().endswith("/websocket/v1/private")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def help_text(*command: str) -> str:
    result = run_upbus(*command, "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_is_laid_out_as_the_other_commands() -> None:
    sim, run = help_text("sim"), help_text("run")
    assert sim.startswith("Usage: upbus sim [OPTIONS]\n\n  ")
    assert re.match(r"Usage: .*upbus run \[OPTIONS\]\n\n  ", run)
    for text in (sim, run):
        assert "\nOptions:\n  --" in text
        assert re.search(r"\n  --help +Show this message and exit\.\n$", text)


def test_help_shows_every_default() -> None:
    text = " ".join(help_text("sim").split())
    for option, default in [
        ("--port", "0"),
        ("--rate", "50"),
        ("--seed", "0"),
        ("--idle-timeout", "120"),
    ]:
        described = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"[default: {default}]" in described, option


def test_a_bad_option_value_is_a_usage_error() -> None:
    result = run_upbus("sim", "--rate", "fast")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[:2] == ["Usage: upbus sim [OPTIONS]", "Try 'upbus sim --help' for help."]
    assert lines[-1].startswith("Error: ")
    assert "'max' or 'flood'" in lines[-1]


def simulator_table() -> dict[str, tuple[str, str]]:
    """The option table of the simulator section of operations.md: option → (default, meaning)."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("## The simulator", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `(--[\w-]+)[^|]*\| ([^|]+) \| ([^|]+) \|$", line)
        if match:
            rows[match[1]] = (match[2].strip("` "), match[3])
    return rows


def test_the_operations_guide_agrees_with_the_help() -> None:
    table = simulator_table()
    text = " ".join(help_text("sim").split())
    shown = set(re.findall(r"  (--[\w-]+)", help_text("sim"))) - {"--help"}
    assert set(table) == shown
    for option, (default, _) in table.items():
        if default != "none":
            described = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
            assert f"[default: {default}]" in described, option
    # Both say what 'max' and 'flood' do, and say the same.
    rate = table["--rate"][1]
    assert "`flood`: generate every message as fast as possible" in rate
    assert "`max`: repeat pre-encoded frames as fast as the socket takes them" in rate
    assert "'flood': generate every message as fast as possible" in text
    assert "'max': repeat pre-encoded frames as fast as the socket takes them" in text
