"""The items a component's stream carries besides exchange messages.

They travel through the same buffer as the data, in order with it, so a component
learns what happened at the place in the stream where it happened: a connection
gap, messages its buffer had to drop, wishes the exchange refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from upbus.core.subscriptions._specs import Wish

__all__ = ("BusEvent", "ConnectionEvent", "Dropped", "Rejected")


@dataclass(frozen=True, slots=True)
class BusEvent:
    """Base class of every event the bus puts into a component's stream.

    ``isinstance(item, upbus.BusEvent)`` tells events from exchange messages.
    """


@dataclass(frozen=True, slots=True)
class ConnectionEvent(BusEvent):
    """A connection changed state: ``connected``, ``gap`` or ``reconnected``.

    It reaches every subscriber of the channel in order with the data: messages
    received after a gap come after the ``gap`` and ``reconnected`` events.
    """

    channel: str
    state: str
    detail: str
    type: str = "connection"


@dataclass(frozen=True, slots=True)
class Dropped(BusEvent):
    """The component's buffer dropped messages since its last ``Dropped`` event.

    It comes before the next item the component takes. ``count`` is the number of
    messages dropped; ``keys`` says how many of each ``(type, code)``. Only a
    policy that loses messages makes it (``drop_oldest``, and trades under the
    default policy); conflation, which keeps the newest message of a key, does not.
    """

    count: int
    keys: tuple[tuple[str, str | None, int], ...]
    type: str = "dropped"


@dataclass(frozen=True, slots=True)
class Rejected(BusEvent):
    """The exchange refused a request because of some of this component's wishes.

    Those ``wishes`` are quarantined: they are left out of every request until the
    component registers again without them (or unregisters). ``detail`` is the
    exchange's error, e.g. ``INVALID_PARAM: codes field is empty``.
    """

    channel: str
    wishes: tuple[Wish, ...]
    detail: str
    type: str = "rejected"
