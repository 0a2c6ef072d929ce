"""Default merge policy: reference counts per (type, code, level)."""

from __future__ import annotations

from upbus.core.hooks._hookspecs import hookimpl
from upbus.core.subscriptions._merge import Merger, RefCountMerger
from upbus.core.subscriptions._specs import Channel
from upbus.settings import Settings


@hookimpl(trylast=True)
def upbus_make_merger(channel: Channel, settings: Settings) -> Merger:
    return RefCountMerger()
