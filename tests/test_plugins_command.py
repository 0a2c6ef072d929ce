"""``upbus plugins``: its columns fit whatever names the installed plugins have.

The long-named plugins are a real distribution: a module plus a ``.dist-info``
directory with ``[upbus]`` entry points, made visible through ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from clirun import run_upbus

LONG_NAME = "a_plugin_with_a_rather_long_entry_point_name"
LONG_DIST = "upbus-contrib-very-long-distribution-name"
BROKEN = "another_long_named_plugin_that_fails"

PLUGIN = """\
from upbus.plugin import hookimpl


@hookimpl
def upbus_components(settings):
    return []
"""

# name, state, "distribution version" or "-", module, then optionally the hooks.
ROW = re.compile(
    r"(?P<name>\S+)(?P<g1> +)(?P<state>\S+)(?P<g2> +)(?P<where>\S+ \S+|-)(?P<g3> +)"
    r"(?P<module>\S+)(?:  hooks: (?P<hooks>\S.*))?"
)


def plugins_listing(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "upbus_contrib_long.py").write_text(PLUGIN)
    info = site / f"{LONG_DIST.replace('-', '_')}-10.20.30.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {LONG_DIST}\nVersion: 10.20.30\n")
    (info / "entry_points.txt").write_text(
        f"[upbus]\n{LONG_NAME} = upbus_contrib_long\n{BROKEN} = upbus_contrib_missing\n"
    )
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return run_upbus("plugins", env={"PYTHONPATH": path}, cwd=tmp_path)


def rows(stdout: str) -> tuple[list[re.Match[str]], list[str]]:
    """The table's rows, and the error lines under them."""
    table, errors = [], []
    for line in stdout.splitlines():
        if line.lstrip().startswith("error: "):
            errors.append(line)
            continue
        match = ROW.fullmatch(line)
        assert match is not None, f"not a row of the table: {line!r}"
        table.append(match)
    return table, errors


def test_long_plugin_names_and_distributions_keep_the_columns_aligned(tmp_path: Path) -> None:
    result = plugins_listing(tmp_path)
    assert result.returncode == 0, result.stderr
    table, errors = rows(result.stdout)
    by_name = {row["name"]: row for row in table}
    long, broken, merge = by_name[LONG_NAME], by_name[BROKEN], by_name["merge"]
    assert (long["state"], long["where"]) == ("loaded", f"{LONG_DIST} 10.20.30")
    assert (long["module"], long["hooks"]) == ("upbus_contrib_long", "upbus_components")
    assert (broken["state"], broken["module"], broken["hooks"]) == (
        "failed",
        "upbus_contrib_missing",
        None,
    )
    assert (merge["where"], merge["module"]) == ("upbus 0.1.0", "upbus.plugins.merge")
    # Every column starts where it does on every other row...
    for column in ("state", "where", "module"):
        assert len({row.start(column) for row in table}) == 1, (column, result.stdout)
    # ...two spaces after its predecessor's longest cell: sized to the rows, no wider.
    for gap in ("g1", "g2", "g3"):
        assert min(len(row[gap]) for row in table) == 2, (gap, result.stdout)
    assert table[0].start("state") == len(LONG_NAME) + 2  # the longest name
    assert table[0].start("module") - table[0].start("where") == len(long["where"]) + 2
    # The failure's reason sits under the state column.
    (error,) = errors
    assert error.index("error: ") == broken.start("state")
    assert "ModuleNotFoundError: No module named 'upbus_contrib_missing'" in error


def test_the_columns_shrink_to_upbus_own_plugins(tmp_path: Path) -> None:
    result = run_upbus("plugins", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table, errors = rows(result.stdout)
    assert errors == []
    longest = max(len(row["name"]) for row in table)
    assert longest < 12  # narrower than the old fixed column
    assert {row.start("state") for row in table} == {longest + 2}
    assert {row["where"] for row in table} == {"upbus 0.1.0"}
    assert {row.start("module") - row.start("where") for row in table} == {len("upbus 0.1.0") + 2}
