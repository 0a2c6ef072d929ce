"""Every error a user can cause is an UpbusError, and keeps the builtin base it had."""

from __future__ import annotations

import pytest

import upbus
from upbus.core.sending._batcher import PendingTaskBatcher
from upbus.core.subscriptions._manager import SubscriptionManager


def test_bad_limiter_options_are_option_errors() -> None:
    with pytest.raises(upbus.OptionError, match="windows must hold at least one") as caught:
        upbus.RollingWindowLimiter("x", [])
    assert isinstance(caught.value, ValueError)
    with pytest.raises(upbus.OptionError, match="max_wait must be > 0"):
        upbus.RollingWindowLimiter("x", [(5, 1.0)], max_wait=0)


def test_taking_without_a_free_slot_is_a_usage_error() -> None:
    limiter = upbus.RollingWindowLimiter("edge", [(1, 1.0)])
    limiter.take(0.0)
    with pytest.raises(upbus.UsageError, match="no slot free") as caught:
        limiter.take(0.5)
    assert isinstance(caught.value, RuntimeError)


def test_a_bad_debounce_is_an_option_error() -> None:
    manager = SubscriptionManager()
    with pytest.raises(upbus.OptionError, match="debounce must be >= 0"):
        PendingTaskBatcher(
            upbus.Channel.PUBLIC,
            source=lambda: manager.state(upbus.Channel.PUBLIC),
            current_version=lambda: 0,
            sink=None,  # type: ignore[arg-type]
            limiter=None,  # type: ignore[arg-type]
            debounce=-1,
        )


def test_settings_and_overrides_together_are_refused() -> None:
    with pytest.raises(upbus.OptionError, match="either settings or keyword overrides"):
        upbus.Bus(upbus.Settings(), debounce=1)


def test_a_blocking_bus_that_is_not_running_says_so() -> None:
    bus = upbus.BlockingBus()
    with pytest.raises(upbus.BusNotRunning, match="use `with BlockingBus"):
        bus.register_component(object(), [upbus.ticker("KRW-BTC")])
