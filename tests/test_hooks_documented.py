"""Every hook is in docs/plugins.md's hook table with its kind, and every hook there exists."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import upbus.plugin
from upbus.plugin import HOOKS, UpbusHookSpecs

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
_ROW = re.compile(r"^\| `(upbus_\w+)` \| ([^|]+) \|")


def documented() -> dict[str, str]:
    """The hook table under "Hook reference": hook name -> its kind column."""
    text = DOC.read_text()
    table = text[text.index("## Hook reference") :]
    rows = {}
    for line in table.splitlines():
        match = _ROW.match(line)
        if match:
            rows[match[1]] = match[2].strip()
        elif rows and not line.startswith("|"):
            break  # the end of the first table
    return rows


def specs() -> dict[str, Callable[..., object]]:
    return {
        name: value
        for name, value in vars(UpbusHookSpecs).items()
        if name.startswith("upbus_") and callable(value)
    }


def test_every_spec_has_a_declared_kind() -> None:
    assert set(HOOKS) == set(specs())


def test_the_table_lists_every_hook_and_only_those() -> None:
    assert set(documented()) == set(HOOKS)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_each_hook_is_documented_with_its_kind(name: str) -> None:
    column = documented()[name]
    info = HOOKS[name]
    assert column.split(",")[0] == info.kind
    assert ("firstresult" in column) is info.firstresult


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_pluggy_s_marker_agrees_with_the_declared_kind(name: str) -> None:
    options = specs()[name].upbus_spec  # type: ignore[attr-defined]
    assert options["firstresult"] is HOOKS[name].firstresult


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_each_spec_documents_every_parameter(name: str) -> None:
    function = specs()[name]
    doc = inspect.getdoc(function) or ""
    parameters = [p for p in inspect.signature(function).parameters if p != "self"]
    for parameter in parameters:
        assert f":param {parameter}:" in doc, f"{name} does not document {parameter!r}"
    # And the reference section names the hook with the same parameters.
    assert f"`{name}({', '.join(parameters)})`" in DOC.read_text()


def test_each_policy_hook_names_a_bundled_default() -> None:
    defaults = {name: info.default for name, info in HOOKS.items() if info.firstresult}
    assert defaults == {
        "upbus_make_merger": "merge",
        "upbus_make_batcher": "batching",
        "upbus_make_rate_limiter": "ratelimit",
        "upbus_make_transport": "transport",
    }
    assert all(info.default is None for info in HOOKS.values() if not info.firstresult)
    assert upbus.plugin.HOOKS is HOOKS
