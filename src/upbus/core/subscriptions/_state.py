"""The merged subscription state of one channel, as the wire will carry it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import SpanContext

from upbus.core.subscriptions._specs import Channel

__all__ = ("MergedState", "StateChange", "WireEntry")


@dataclass(frozen=True, slots=True)
class WireEntry:
    """One data-type object of a request frame.

    ``codes`` is ``None`` when the field is left out (myAsset, myOrder on every
    market); orderbook codes carry their depth suffix (``"KRW-BTC.15"``) unless the
    depth is the exchange's default 30.
    """

    type: str
    codes: tuple[str, ...] | None
    level: float = 0
    only_snapshot: bool = False
    only_realtime: bool = False

    def to_request(self) -> dict[str, Any]:
        """This entry as the exchange's request object."""
        obj: dict[str, Any] = {"type": self.type}
        if self.codes is not None:
            obj["codes"] = list(self.codes)
        if self.level:
            obj["level"] = self.level
        if self.only_snapshot:
            obj["is_only_snapshot"] = True
        if self.only_realtime:
            obj["is_only_realtime"] = True
        return obj


@dataclass(frozen=True, slots=True)
class MergedState:
    """An immutable snapshot of one channel's merged state; ``version`` grows with each change."""

    channel: Channel
    entries: tuple[WireEntry, ...]
    version: int

    def __bool__(self) -> bool:
        return bool(self.entries)

    def request_objects(self) -> list[dict[str, Any]]:
        """The data-type objects of the request frame that installs this state."""
        return [entry.to_request() for entry in self.entries]

    def codes_by_type(self) -> dict[str, set[str]]:
        """The original design's view: ``{data_type: set_of_codes}`` (depth suffixes removed)."""
        view: dict[str, set[str]] = {}
        for entry in self.entries:
            codes = view.setdefault(entry.type, set())
            for code in entry.codes or ():
                codes.add(code.partition(".")[0])
        return view

    def code_count(self) -> int:
        """How many codes the request carries, over all entries."""
        return sum(len(entry.codes or ()) for entry in self.entries)


@dataclass(frozen=True, slots=True)
class StateChange:
    """Announced to listeners after each atomic update that changed a channel's state.

    ``context`` is the span context of the change, for the send span's links.
    """

    channel: Channel
    version: int
    reason: str
    component: str
    context: SpanContext | None = None
