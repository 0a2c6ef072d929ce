"""The default policy plugins, found through entry points and built from settings."""

from __future__ import annotations

import types

import pytest

import upbus
import upbus.plugin
from upbus import PendingTaskBatcher, PluginManager, Settings, SubscriptionManager
from upbus.core.subscriptions._merge import RefCountMerger
from upbus.plugin import Channel, MergedState


class NullSink:
    async def send_state(self, state: MergedState) -> int:
        return 0


def test_defaults_answer_the_policy_hooks_from_settings() -> None:
    settings = Settings(
        debounce=0.25,
        rate_limit={"messages_per_second": 3, "messages_per_minute": 50, "max_wait": 2.0},
    )
    plugins = PluginManager.load(settings)
    states = {info.name: info.state for info in plugins.report()}
    assert {states[name] for name in ("merge", "batching", "ratelimit")} == {"loaded"}

    assert isinstance(plugins.make_merger(Channel.PUBLIC, settings), RefCountMerger)
    messages = plugins.make_rate_limiter("message", "public#1", settings)
    status = messages.status(now=0.0)
    assert [(w["limit"], w["period"]) for w in status["windows"]] == [(3, 1.0), (50, 60.0)]
    assert status["margin"] == settings.rate_limit.margin
    connects = plugins.make_rate_limiter("connect", "ip", settings)
    assert [(w["limit"], w["period"]) for w in connects.status(now=0.0)["windows"]] == [(5, 1.0)]
    with pytest.raises(upbus.OptionError, match="unknown rate limiter kind 'bogus'"):
        plugins.make_rate_limiter("bogus", "ip", settings)

    manager = SubscriptionManager(lambda channel: plugins.make_merger(channel, settings))
    batcher = plugins.make_batcher(Channel.PUBLIC, settings, manager, NullSink(), messages)
    assert isinstance(batcher, PendingTaskBatcher)
    assert batcher.status()["latest_version"] == 0


def test_the_package_root_exports_what_it_lists() -> None:
    public = {
        name
        for name, value in vars(upbus).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    public.discard("annotations")  # from __future__
    assert set(upbus.__all__) - {"__version__"} == public


def test_the_plugin_module_exports_what_it_lists() -> None:
    public = {
        name
        for name, value in vars(upbus.plugin).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    public.discard("annotations")
    assert set(upbus.plugin.__all__) == public
    # What a plugin author needs is there under its own name.
    for name in (
        "hookimpl",
        "Merger",
        "Batcher",
        "RateLimiter",
        "Transport",
        "Connection",
        "Ticker",
        "Message",
        "Overflow",
        "ConnectionEvent",
        "HandshakeRejected",
    ):
        assert name in upbus.plugin.__all__, name
    assert upbus.plugin.hookimpl is upbus.hookimpl


def test_the_package_root_exports_messages_protocols_and_transport_errors() -> None:
    for name in (
        "Ticker",
        "Trade",
        "Orderbook",
        "Candle",
        "MyOrder",
        "MyAsset",
        "Message",
        "Overflow",
        "HandshakeRejected",
        "ConnectionClosed",
        "Merger",
        "Batcher",
        "RateLimiter",
        "Transport",
        "Connection",
    ):
        assert getattr(upbus, name) is getattr(upbus.plugin, name), name


def test_the_default_rate_limiter_meets_the_hook_s_protocol() -> None:
    limiter = PluginManager.load(Settings()).make_rate_limiter("message", "public#1", Settings())
    for method in ("wait", "take", "acquire", "back_off", "status"):
        assert callable(getattr(limiter, method)), method


def test_a_recording_beats_every_other_transport_by_its_marker_not_load_order(
    tmp_path: pytest.TempPathFactory,
) -> None:
    """replay is tryfirst, picows in between, the default trylast: load order is moot."""
    from upbus.plugins import picows_transport, replay, transport

    recording = tmp_path / "session.jsonl"  # type: ignore[operator]
    recording.write_text("")
    settings = Settings(plugins={"replay": {"path": str(recording)}}, autoload_plugins=False)
    for order in ((replay, picows_transport, transport), (transport, picows_transport, replay)):
        plugins = PluginManager()
        for module in order:
            plugins.register(module, module.__name__.rsplit(".", 1)[1])
        chosen = plugins.make_transport(Channel.PUBLIC, settings)
        assert isinstance(chosen, replay.ReplayTransport)
    impls = {
        impl.plugin_name: (impl.tryfirst, impl.trylast)
        for impl in plugins.pluggy.hook.upbus_make_transport.get_hookimpls()
    }
    assert impls == {
        "replay": (True, False),
        "picows_transport": (False, False),
        "transport": (False, True),
    }


@pytest.mark.parametrize(
    ("capacity", "policy"), [(0, "auto"), (1.5, "auto"), (16, "newest"), (True, "block")]
)
def test_a_bad_buffer_option_is_an_option_error_and_a_value_error(
    capacity: object, policy: object
) -> None:
    with pytest.raises(upbus.OptionError) as caught:
        upbus.Subscriber("chart", capacity, policy)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, upbus.UpbusError)


def test_usage_and_option_errors_keep_their_builtin_bases() -> None:
    assert issubclass(upbus.OptionError, ValueError)
    assert issubclass(upbus.UsageError, RuntimeError)
    assert issubclass(upbus.UsageError, upbus.UpbusError)
    from upbus.plugins.ma_cross import MaCross
    from upbus.plugins.replay import ReplayTransport

    with pytest.raises(upbus.OptionError, match="speed"):
        ReplayTransport("nowhere.jsonl", speed=-1.0)
    with pytest.raises(upbus.OptionError, match="fast < slow"):
        MaCross("KRW-BTC", fast=5, slow=5)
