"""Default merge policy: reference counts per (type, code, level)."""

from __future__ import annotations

from upbus.core.subscriptions._merge import RefCountMerger
from upbus.plugin import Channel, Merger, hookimpl
from upbus.settings import Settings


@hookimpl(trylast=True)
def upbus_make_merger(channel: Channel, settings: Settings) -> Merger:
    return RefCountMerger()
