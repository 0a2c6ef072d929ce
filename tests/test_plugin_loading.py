"""Plugin loading through real entry points, and the typed hook calls.

The third-party plugins here are a real (if tiny) distribution: modules plus an
``upbus_testplugins-1.0.dist-info`` directory written to ``tmp_path``, which is put
on ``sys.path`` so ``importlib.metadata`` finds its ``[upbus]`` entry points next
to upbus's own.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from clirun import clean_environment

from upbus.core._errors import PluginError, PluginLoadError
from upbus.core.hooks._hookspecs import hookimpl
from upbus.core.hooks._manager import PluginInfo, PluginManager
from upbus.core.subscriptions._merge import RefCountMerger
from upbus.core.subscriptions._specs import Channel
from upbus.settings import Settings, load_settings

PLUGIN_MODULES = {
    "upbus_testplugin_ok": '''
        from upbus.core.hooks._hookspecs import hookimpl


        class MarkerMerger:
            """Not a working merger: tests only check that this object is returned."""


        MERGER = MarkerMerger()
        COMPONENT = MarkerMerger()


        @hookimpl
        def upbus_make_merger(channel, settings):
            return MERGER


        @hookimpl
        def upbus_components(settings):
            return [(COMPONENT, "ticker:KRW-BTC")]
    ''',
    "upbus_testplugin_broken": """
        raise ImportError("upbus_testplugin_broken needs the missing library frobnicate")
    """,
    "upbus_testplugin_syntax": """
        def upbus_make_merger(channel, settings:
    """,
    "upbus_testplugin_badsig": """
        from upbus.core.hooks._hookspecs import hookimpl


        @hookimpl
        def upbus_make_merger(channel, settings, colour):
            return None
    """,
    "upbus_testplugin_unknown": """
        from upbus.core.hooks._hookspecs import hookimpl


        @hookimpl
        def upbus_no_such_hook():
            pass


        @hookimpl
        def upbus_components(settings):
            return [(object(), "from a plugin that should have been unregistered")]
    """,
    "upbus_testplugin_async": """
        from upbus.core.hooks._hookspecs import hookimpl


        @hookimpl
        async def upbus_make_merger(channel, settings):
            return None
    """,
}

ENTRY_POINTS = """\
[upbus]
ok = upbus_testplugin_ok
broken = upbus_testplugin_broken
syntax = upbus_testplugin_syntax
badsig = upbus_testplugin_badsig
unknown = upbus_testplugin_unknown
asyncmerger = upbus_testplugin_async
"""


def write_distribution(root: Path, name: str, version: str, entry_points: str) -> None:
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture(autouse=True)
def _no_upbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in os.environ.keys() - clean_environment().keys():
        monkeypatch.delenv(key)


@pytest.fixture
def testplugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Install the ``upbus_testplugins`` distribution into ``tmp_path``."""
    for module, source in PLUGIN_MODULES.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
    write_distribution(tmp_path, "upbus_testplugins", "1.0", ENTRY_POINTS)
    # Also invalidates the import and importlib.metadata path caches.
    monkeypatch.syspath_prepend(tmp_path)
    yield tmp_path
    for module in PLUGIN_MODULES:
        sys.modules.pop(module, None)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(_cwd=tmp_path, **overrides)


def by_name(manager: PluginManager) -> dict[str, PluginInfo]:
    return {info.name: info for info in manager.report()}


# -- discovery ---------------------------------------------------------------------------


def test_defaults_are_found_through_upbus_entry_points(tmp_path: Path) -> None:
    manager = PluginManager.load(make_settings(tmp_path))

    report = by_name(manager)
    for name in ("merge", "batching"):
        assert report[name].state == "loaded"
        assert report[name].distribution == "upbus"
        assert report[name].module == f"upbus.plugins.{name}"
        assert report[name].error is None
    assert report["merge"].hooks == ("upbus_make_merger",)
    assert isinstance(manager.make_merger(Channel.PUBLIC, make_settings(tmp_path)), RefCountMerger)


def test_third_party_plugin_loads_and_wins_over_the_trylast_default(testplugins: Path) -> None:
    settings = make_settings(testplugins)
    manager = PluginManager.load(settings)

    ok = by_name(manager)["ok"]
    assert ok == PluginInfo(
        name="ok",
        distribution="upbus_testplugins",
        version="1.0",
        module="upbus_testplugin_ok",
        hooks=("upbus_components", "upbus_make_merger"),
        state="loaded",
        error=None,
    )
    plugin = sys.modules["upbus_testplugin_ok"]
    assert manager.make_merger(Channel.PUBLIC, settings) is plugin.MERGER
    assert by_name(manager)["merge"].state == "loaded"


@pytest.mark.parametrize(
    ("name", "cause", "message"),
    [
        ("broken", ImportError, "needs the missing library frobnicate"),
        ("syntax", SyntaxError, "SyntaxError"),
        ("badsig", Exception, "{'colour'} are declared in the hookimpl"),
        ("unknown", Exception, "unknown hook 'upbus_no_such_hook'"),
        ("asyncmerger", Exception, "with 'async def'; this hook must be synchronous"),
    ],
)
def test_a_broken_plugin_is_reported_and_the_rest_still_load(
    testplugins: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    cause: type[Exception],
    message: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="upbus.plugins")
    settings = make_settings(testplugins)
    manager = PluginManager.load(settings)

    info = by_name(manager)[name]
    assert info.state == "failed"
    assert info.distribution == "upbus_testplugins"
    assert info.hooks == ()
    assert info.error is not None
    assert f"plugin {name!r} from distribution 'upbus_testplugins' failed to load" in info.error
    assert message in info.error
    assert not manager.is_registered(name)

    [error] = [e for e in manager.errors if e.name == name]
    assert error.distribution == "upbus_testplugins"
    assert isinstance(error.cause, cause)
    assert error.__cause__ is error.cause

    [record] = [r for r in caplog.records if f"plugin {name!r}" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "distribution upbus_testplugins 1.0" in record.getMessage()

    # Neither the failure nor its position in the group stopped anything else.
    report = by_name(manager)
    assert report["ok"].state == "loaded"
    assert report["merge"].state == "loaded"
    assert report["batching"].state == "loaded"
    ok = sys.modules["upbus_testplugin_ok"]
    assert manager.components(object(), settings) == [(ok.COMPONENT, "ticker:KRW-BTC")]


def test_disabled_plugins_are_not_imported_and_stay_blocked(testplugins: Path) -> None:
    settings = make_settings(testplugins, disabled_plugins=["ok", "broken"])
    manager = PluginManager.load(settings)

    report = by_name(manager)
    for name in ("ok", "broken"):
        assert report[name].state == "disabled"
        assert report[name].error is None
        assert not manager.is_registered(name)
    assert "upbus_testplugin_ok" not in sys.modules
    assert isinstance(manager.make_merger(Channel.PUBLIC, settings), RefCountMerger)
    with pytest.raises(PluginLoadError, match="plugin 'ok' is disabled"):
        manager.register(object(), "ok")


def test_disabling_the_default_merge_plugin_gives_a_clear_error(testplugins: Path) -> None:
    settings = make_settings(testplugins, disabled_plugins=["merge", "ok"])
    manager = PluginManager.load(settings)

    assert by_name(manager)["merge"].state == "disabled"
    with pytest.raises(PluginError) as caught:
        manager.make_merger(Channel.PUBLIC, settings)
    assert str(caught.value) == (
        "no plugin provides upbus_make_merger (the default plugin 'merge' is disabled)"
    )


def test_autoload_off_loads_only_upbus_own_entry_points(testplugins: Path) -> None:
    settings = make_settings(testplugins, autoload_plugins=False)
    manager = PluginManager.load(settings)

    report = by_name(manager)
    assert report["merge"].state == "loaded"
    assert {report[name].state for name in ("ok", "broken", "badsig")} == {"disabled"}
    assert "upbus_testplugin_ok" not in sys.modules
    assert isinstance(manager.make_merger(Channel.PUBLIC, settings), RefCountMerger)


def test_a_duplicate_entry_point_name_loses_to_the_first(testplugins: Path) -> None:
    # A third party cannot take a default's name: upbus's own entry points go first.
    write_distribution(testplugins, "upbus_clash", "2.0", "[upbus]\nmerge = upbus_testplugin_ok\n")
    manager = PluginManager.load(make_settings(testplugins))

    merges = [info for info in manager.report() if info.name == "merge"]
    assert [(m.distribution, m.state) for m in merges] == [
        ("upbus", "loaded"),
        ("upbus_clash", "failed"),
    ]
    assert merges[1].error is not None
    assert "already taken by 'upbus.plugins.merge' from distribution 'upbus'" in merges[1].error


def test_explicit_entry_points_need_no_distribution(testplugins: Path) -> None:
    entry_points = [
        EntryPoint(name="mine", value="upbus_testplugin_ok", group="upbus"),
        EntryPoint(name="mine", value="upbus_testplugin_broken", group="upbus"),
    ]
    settings = make_settings(testplugins)
    manager = PluginManager.load(settings, entry_points=entry_points)

    first, second = manager.report()
    assert (first.name, first.distribution, first.version, first.state) == (
        "mine",
        None,
        None,
        "loaded",
    )
    assert second.state == "failed"
    # Only the given entry points count: no default is loaded.
    assert not manager.is_registered("merge")
    assert (
        manager.make_merger(Channel.PUBLIC, settings) is sys.modules["upbus_testplugin_ok"].MERGER
    )


# -- policy hooks ------------------------------------------------------------------------


class AsyncMerger:
    @hookimpl
    async def upbus_make_merger(self, channel: Channel, settings: Settings) -> None:
        return None


def test_async_impl_of_a_firstresult_hook_is_refused_at_registration(tmp_path: Path) -> None:
    manager = PluginManager.load(make_settings(tmp_path))

    with pytest.raises(PluginLoadError, match="'async def'; this hook must be synchronous"):
        manager.register(AsyncMerger(), "sneaky")
    assert not manager.is_registered("sneaky")


def test_async_impl_that_slipped_past_registration_is_refused_at_call(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    manager = PluginManager.load(settings)
    manager.pluggy.register(AsyncMerger(), "sneaky")  # no upbus checks on this path

    # The coroutine is closed, so no "never awaited" warning (an error in this suite).
    with pytest.raises(PluginError, match="plugin 'sneaky' returned an awaitable"):
        manager.make_merger(Channel.PUBLIC, settings)


def test_a_default_that_failed_to_load_is_named_when_nobody_answers(tmp_path: Path) -> None:
    entry_points = [EntryPoint(name="merge", value="upbus_no_such_module", group="upbus")]
    settings = make_settings(tmp_path)
    manager = PluginManager.load(settings, entry_points=entry_points)

    with pytest.raises(PluginError, match=r"the default plugin 'merge' failed to load: No module"):
        manager.make_merger(Channel.PUBLIC, settings)


# -- notification hooks ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    async def upbus_startup(self, bus: object) -> None:
        self.calls.append("startup")

    @hookimpl
    def upbus_shutdown(self, bus: object) -> None:
        self.calls.append("shutdown")


class RaisesAtCall:
    @hookimpl
    def upbus_startup(self, bus: object) -> None:
        raise RuntimeError("startup exploded")


class RaisesWhenAwaited:
    @hookimpl
    async def upbus_startup(self, bus: object) -> None:
        raise RuntimeError("startup exploded later")


@pytest.mark.anyio
async def test_a_raising_startup_impl_is_isolated_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = PluginManager()
    recorder = Recorder()
    manager.register(RaisesAtCall(), "at_call")
    manager.register(recorder, "recorder")
    manager.register(RaisesWhenAwaited(), "when_awaited")

    pending = manager.startup(bus=object())
    assert len(pending) == 2
    for awaitable in pending:
        await awaitable

    assert recorder.calls == ["startup"]
    assert manager.failures == {"at_call": 1, "when_awaited": 1}
    messages = [r.getMessage() for r in caplog.records if r.name == "upbus.plugins"]
    assert "plugin 'at_call' failed in upbus_startup" in messages
    assert "plugin 'when_awaited' failed in upbus_startup" in messages

    assert manager.shutdown(bus=object()) == []
    assert recorder.calls == ["startup", "shutdown"]


class Components:
    @hookimpl
    def upbus_components(self, settings: Settings) -> list[tuple[object, Any]]:
        return [(self, "ticker:KRW-ETH")]


class BusAwareComponents:
    """Takes the bus too: one component per bus, and no state of its own to find it."""

    @hookimpl
    def upbus_components(self, bus: object, settings: Settings) -> list[tuple[object, Any]]:
        return [(bus, "trade:KRW-BTC")]


class BadComponents:
    @hookimpl
    def upbus_components(self, settings: Settings) -> list[object]:
        return ["not a pair"]


class RaisingComponents:
    @hookimpl
    def upbus_components(self, settings: Settings) -> None:
        raise ValueError("no components today")


def test_components_are_flattened_and_bad_answers_isolated(tmp_path: Path) -> None:
    manager = PluginManager()
    good = Components()
    manager.register(good, "good")
    manager.register(BadComponents(), "bad")
    manager.register(RaisingComponents(), "raising")

    assert manager.components(object(), make_settings(tmp_path)) == [(good, "ticker:KRW-ETH")]
    assert manager.failures == {"bad": 1, "raising": 1}


def test_components_are_told_the_bus_and_the_settings_only_form_still_works(
    tmp_path: Path,
) -> None:
    manager = PluginManager()
    settings_only = Components()
    manager.register(settings_only, "settings_only")
    manager.register(BusAwareComponents(), "bus_aware")
    first, second = object(), object()

    # pluggy calls the later-registered plugin first.
    assert manager.components(first, make_settings(tmp_path)) == [
        (first, "trade:KRW-BTC"),
        (settings_only, "ticker:KRW-ETH"),
    ]
    assert manager.components(second, make_settings(tmp_path))[0] == (second, "trade:KRW-BTC")
    assert manager.failures == {}


# -- registration in code ----------------------------------------------------------------


def test_register_report_unregister(tmp_path: Path) -> None:
    manager = PluginManager()
    good = Components()
    manager.register(good, "good")

    assert manager.is_registered("good")
    assert manager.report() == [
        PluginInfo(
            name="good",
            distribution=None,
            version=None,
            module=f"{__name__}:Components",
            hooks=("upbus_components",),
            state="loaded",
            error=None,
        )
    ]
    with pytest.raises(PluginLoadError, match="already registered"):
        manager.register(Components(), "good")

    assert manager.unregister("good") is good
    assert not manager.is_registered("good")
    assert manager.report() == []
    assert manager.unregister("good") is None
