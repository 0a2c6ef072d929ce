"""The default policy plugins, found through entry points and built from settings."""

from __future__ import annotations

import types

import pytest

import upbus
from upbus.core.hooks._manager import PluginManager
from upbus.core.sending._batcher import PendingTaskBatcher
from upbus.core.subscriptions._manager import SubscriptionManager
from upbus.core.subscriptions._merge import RefCountMerger
from upbus.core.subscriptions._specs import Channel
from upbus.core.subscriptions._state import MergedState
from upbus.settings import Settings


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
    with pytest.raises(ValueError, match="unknown rate limiter kind 'bogus'"):
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
