"""The check that the exchange holds the state sent (``verify_subscriptions``).

A while after each request, a ``LIST_SUBSCRIPTIONS`` frame asks the exchange what
it holds; a reply that differs from the state sent makes the sink ask for the
whole latest state again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from upbus.core._clock import Clock
from upbus.core.connection._metrics import ConnectionMetrics
from upbus.core.connection._sink import ConnectionSink
from upbus.core.subscriptions._state import MergedState
from upbus.core.wire._codec import encode_list_subscriptions, new_ticket
from upbus.core.wire._messages import SubscriptionList

__all__ = ("DriftCheck",)

log = logging.getLogger("upbus.connection")


class DriftCheck:
    """Compares the exchange's list of subscriptions with the last state sent."""

    def __init__(
        self,
        sink: ConnectionSink,
        metrics: ConnectionMetrics,
        *,
        clock: Clock,
        delay: float,
        fmt: str = "DEFAULT",
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._clock = clock
        self._delay = delay
        self._format = fmt
        self._expected: MergedState | None = None

    def reset(self) -> None:
        """The connection ended: a reply still due is not for the next one."""
        self._expected = None

    async def later(self, state: MergedState) -> None:
        """After the delay, ask what the exchange holds, unless a newer request went out."""
        await self._clock.sleep(self._delay)
        if self._sink.last_sent is not state:
            return  # a newer request went out; its own check follows
        self._expected = state
        self._metrics.counts["verifications"] += 1
        await self._sink.send_extra(encode_list_subscriptions(new_ticket(), self._format))

    def check(self, reply: SubscriptionList) -> None:
        """The exchange's answer: count it as verified, or re-send the whole state."""
        expected, self._expected = self._expected, None
        if expected is None or expected is not self._sink.last_sent:
            return
        wanted = _streams((entry.type, entry.codes or ()) for entry in expected.entries)
        seen = _streams((entry.type, entry.codes or ()) for entry in reply.result)
        counts = self._metrics.counts
        if wanted == seen:
            counts["verified"] += 1
        else:
            counts["drift_detected"] += 1
            log.warning(
                "%s: the exchange's subscriptions differ from the state sent "
                "(missing %d, unexpected %d); re-sending it",
                self._sink.channel.value,
                len(wanted - seen),
                len(seen - wanted),
            )
            self._sink.resync()


def _streams(entries: Iterable[tuple[str, tuple[str, ...]]]) -> set[tuple[str, str]]:
    # Whether the exchange echoes depth suffixes is not documented: compare without.
    return {(kind, code.partition(".")[0]) for kind, codes in entries for code in codes or ("",)}
