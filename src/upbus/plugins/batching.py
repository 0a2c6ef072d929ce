"""Default batching policy: one debounced pending task per connection."""

from __future__ import annotations

from opentelemetry.trace import Tracer

from upbus import PendingTaskBatcher, Settings, SubscriptionManager
from upbus.plugin import Batcher, Channel, RequestLimiter, RequestSink, hookimpl


@hookimpl(trylast=True)
def upbus_make_batcher(
    channel: Channel,
    settings: Settings,
    manager: SubscriptionManager,
    sink: RequestSink,
    limiter: RequestLimiter,
    tracer: Tracer,
) -> Batcher:
    return PendingTaskBatcher(
        channel,
        source=lambda: manager.state(channel),
        current_version=lambda: manager.version(channel),
        sink=sink,
        limiter=limiter,
        debounce=settings.debounce,
        max_wait=settings.rate_limit.max_wait,
        tracer=tracer,
    )
