"""The example plugin distribution under examples/ is found by entry point and runs."""

from __future__ import annotations

import logging
import os
import re
import shlex
import tomllib
from pathlib import Path

import anyio
import pytest
from clirun import run_upbus

import upbus
from upbus import PluginManager
from upbus.sim import SimConfig, Simulator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "upbus-spread-monitor"


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's metadata on the path, as pip would install it (without copying code)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    points = project["entry-points"]["upbus"]
    lines = "".join(f"{name} = {target}\n" for name, target in points.items())
    (info / "entry_points.txt").write_text(f"[upbus]\n{lines}")
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.usefixtures("installed")
def test_the_example_is_discovered_with_its_distribution() -> None:
    plugins = PluginManager.load(upbus.Settings())
    (info,) = [i for i in plugins.report() if i.name == "spread_monitor"]
    assert (info.state, info.distribution, info.version) == (
        "loaded",
        "upbus-spread-monitor",
        "0.1.0",
    )
    assert info.hooks == ("upbus_components",)


def _warned(caplog: pytest.LogCaptureFixture) -> set[str]:
    """The codes the monitors warned about: each warning is ``"<code> spread <bps> bps"``."""
    return {
        record.getMessage().split()[0]
        for record in caplog.records
        if record.name == "upbus_spread_monitor" and record.levelno == logging.WARNING
    }


@pytest.mark.anyio
@pytest.mark.usefixtures("installed")
async def test_the_example_runs_through_the_bus(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="upbus_spread_monitor")
    async with Simulator(SimConfig(rate=200.0)) as sim:
        section = {"enabled": True, "codes": ["KRW-BTC", "KRW-ETH"], "max_spread_bps": 1e-9}
        settings = upbus.Settings(
            public_url=sim.public_url,
            private_url=sim.private_url,
            plugins={"spread_monitor": section},
        )
        # Two buses at once: each gets its own monitor from the components hook.
        async with upbus.Bus(settings) as bus, upbus.Bus(settings) as other:
            assert bus.get_subscription_stats()["components"] == 1
            assert other.get_subscription_stats()["components"] == 1
            # The monitor has no event to wait on: poll what it logs, bounded.
            with anyio.fail_after(10):
                while _warned(caplog) != {"KRW-BTC", "KRW-ETH"}:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            assert '"KRW-BTC.1"' in sim.requests[0].raw  # depth 1 asked on the wire
        assert bus.plugins.failures == {}


def test_the_readme_run_shows_warnings_against_the_simulator(tmp_path: Path) -> None:
    """The README's `upbus run` line, as a user runs it: its threshold is crossed in the run."""
    readme = (EXAMPLE / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("$ ") and " upbus run " in ln]
    words = shlex.split(line[2:])
    start = words.index("upbus")
    assignments, args = words[:start], words[start + 1 :]
    assert all("=" in word for word in assignments)
    assert args[0] == "run"
    assert "--seconds" in args  # bounded as written
    info = tmp_path / "upbus_spread_monitor-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: upbus-spread-monitor\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text("[upbus]\nspread_monitor = upbus_spread_monitor\n")
    env = dict(a.split("=", 1) for a in assignments)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(EXAMPLE / "src")])
    result = run_upbus(*args, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = re.findall(
        r"^WARNING upbus_spread_monitor: (\S+) spread ([\d.]+) bps$", result.stderr, re.M
    )
    assert warnings, result.stderr
    threshold = float(env["UPBUS_PLUGINS__SPREAD_MONITOR__MAX_SPREAD_BPS"])
    assert all(float(bps) > threshold for _code, bps in warnings)
