"""Which wishes a refused request blames, and keeping them out of the state.

When the exchange refuses a request (an error frame such as ``INVALID_PARAM``,
then the close), :class:`Refusals` finds the wishes that caused it, with the
:class:`~upbus.core.subscriptions._quarantine.RequestTracker`, and has the
:class:`~upbus.core.subscriptions._manager.SubscriptionManager` keep them out of
the state (:mod:`upbus.core.subscriptions._quarantine`), so the reconnect serves
everything else instead of sending the same refused state again; ``on_rejected``
tells their owners.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from anyio.abc import TaskGroup

from upbus.core._clock import Clock
from upbus.core.connection._metrics import ConnectionMetrics
from upbus.core.connection._sink import ConnectionSink
from upbus.core.subscriptions._manager import Rejected, SubscriptionManager
from upbus.core.subscriptions._quarantine import Key, RequestTracker, Verdict, describe, entry_keys
from upbus.core.subscriptions._specs import Channel, Wish
from upbus.core.subscriptions._state import MergedState
from upbus.core.wire._messages import Message
from upbus.core.wire._transport import Connection

__all__ = ("OnRejected", "Refusals")

log = logging.getLogger("upbus.connection")

OnRejected = Callable[[list[tuple[object, tuple[Wish, ...]]], str], None]
"""``on_rejected(rejected, detail)``: per live component, the wishes the exchange refused."""


class Refusals:
    """The quarantine tracking of one channel's connections.

    :param confirm_after: seconds a request must stand on its connection without
        an error to count as accepted, when no data for a key it added arrived first.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        subscriptions: SubscriptionManager,
        sink: ConnectionSink,
        metrics: ConnectionMetrics,
        clock: Clock,
        confirm_after: float,
        on_rejected: OnRejected | None,
    ) -> None:
        self.channel = channel
        self.tracker = RequestTracker()
        self._subscriptions = subscriptions
        self._sink = sink
        self._metrics = metrics
        self._clock = clock
        self._confirm_after = confirm_after
        self._on_rejected = on_rejected
        self.tasks: TaskGroup | None = None  # the manager's own, for deferred notices
        self.progress = False  # this connection's refusal led to a new, narrower state
        subscriptions.add_rejection_listener(self._on_late_rejection)

    def connected(self) -> None:
        """A new connection: it has accepted nothing yet."""
        self.progress = False
        self.tracker.connected()

    def sent(self, conn: Connection, state: MergedState, tasks: TaskGroup | None) -> None:
        """A request went out on ``conn``: it is accepted when data or time confirms it."""
        request = self.tracker.sent(entry_keys(state.entries))
        if tasks is not None:
            tasks.start_soon(self._confirm_later, conn, request)

    def refused(self, detail: str) -> None:
        """The exchange refused a request of this connection: find the wishes to blame."""
        self._metrics.counts["requests_refused"] += 1
        verdict = self.tracker.rejected(detail)
        if verdict is None:
            log.warning(
                "%s: the exchange refused a request that added nothing to the last "
                "accepted state (%s); sending the state again after the reconnect",
                self.channel.value,
                detail,
            )
            return
        self.progress = True
        if verdict.quarantine:
            self._quarantine(verdict.quarantine, detail)
        else:
            self._hold(verdict)
        self.release_if_idle()

    def _quarantine(self, keys: frozenset[Key], detail: str) -> None:
        self._metrics.counts["quarantine_decisions"] += 1
        rejected = self._subscriptions.quarantine(self.channel, keys, detail)
        entries = ", ".join(sorted(describe(key) for key in keys))
        owners = ", ".join(sorted({type(component).__name__ for component, _ in rejected}))
        log.error(
            "%s: the exchange refused %s (%s); quarantined, no longer sent, for %d component(s)%s",
            self.channel.value,
            entries,
            detail,
            len(rejected),
            f" ({owners})" if owners else "",
        )
        self._report(rejected, detail)

    def _hold(self, verdict: Verdict) -> None:
        self._subscriptions.hold(self.channel, verdict.hold, verdict.detail)
        tried = verdict.suspects - verdict.hold
        log.warning(
            "%s: the exchange refused a request adding %d entries (%s); trying %s "
            "first, holding back %s",
            self.channel.value,
            len(verdict.suspects),
            verdict.detail,
            ", ".join(sorted(describe(key) for key in tried)),
            ", ".join(sorted(describe(key) for key in verdict.hold)),
        )

    def _try_held(self) -> None:
        """Put the next held suspects back into the state (or quarantine a block of one
        that must be bad), until the state changed or nothing is held."""
        subscriptions = self._subscriptions
        while (step := self.tracker.next_step()) is not None:
            if step.quarantine:
                self._quarantine(step.quarantine, step.detail)
            if step.release:
                log.info(
                    "%s: trying %s, held back after a refusal",
                    self.channel.value,
                    ", ".join(sorted(describe(key) for key in step.release)),
                )
                if subscriptions.release(self.channel, step.release):
                    return
        # Nothing left to try, yet something held (the search was interrupted):
        # it all goes out again, and a refusal starts a new search.
        subscriptions.release(self.channel)

    def release_if_idle(self) -> None:
        """With nothing else left to send, what is held back is what goes out next."""
        # Held keys wait for an accepted request; with nothing else to send, none
        # would ever come.
        subscriptions = self._subscriptions
        if subscriptions.held(self.channel) and not subscriptions.state(self.channel):
            self._try_held()

    def _report(self, rejected: Rejected, detail: str) -> None:
        if not rejected or self._on_rejected is None:
            return
        try:
            self._on_rejected(rejected, detail)
        except Exception:
            log.exception("%s: rejection listener failed", self.channel.value)

    def _on_late_rejection(self, channel: Channel, rejected: Rejected, detail: str) -> None:
        # A component registered a key that is quarantined already. This runs inside
        # register_component: report from a task, once the registration is complete.
        if channel is not self.channel:
            return
        if self.tasks is None:
            self._report(rejected, detail)
        else:
            self.tasks.start_soon(self._report_soon, rejected, detail)

    async def _report_soon(self, rejected: Rejected, detail: str) -> None:
        self._report(rejected, detail)

    def _accepted(self) -> None:
        """A request of this connection was accepted: try what was held back."""
        if self._subscriptions.held(self.channel):
            self._try_held()

    def witness(self, batch: list[Message]) -> None:
        """Data arrived: a key a waiting request added means the request was accepted."""
        witness = self.tracker.witness
        for message in batch:
            if witness(message.type, message.code):
                self._accepted()
                return

    async def _confirm_later(self, conn: Connection, request: int) -> None:
        await self._clock.sleep(self._confirm_after)
        sink = self._sink
        if sink.conn is conn and sink.error_frame is None and self.tracker.confirm(request):
            self._accepted()
