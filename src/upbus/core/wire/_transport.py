"""The transport interface: how bytes reach the exchange.

The default implementation (an httpx upgrade, then upbus's own framing with
wsproto) is a plugin; another one (a faster socket library, a replay of a
recording, a bridge) replaces it through the ``upbus_make_transport`` hook. The
interface is deliberately small and batch-oriented: one ``receive_batch`` call
returns every complete frame that one socket read produced, so the per-message path
needs no task hop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from upbus.core._errors import UpbusError

__all__ = (
    "ConnectFailed",
    "Connection",
    "ConnectionClosed",
    "HandshakeRejected",
    "Transport",
    "TransportError",
)


class TransportError(UpbusError):
    """The network failed: the connection could not be made or was lost."""


class HandshakeRejected(TransportError):
    """The server answered the WebSocket upgrade with an HTTP status other than 101."""

    def __init__(self, status_code: int, body: str = "") -> None:
        self.status_code = status_code
        self.body = body
        super().__init__(f"upgrade refused with HTTP {status_code}" + (f": {body}" if body else ""))


class ConnectionClosed(TransportError):
    """The connection closed; ``code`` and ``reason`` come from the close frame, if any."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"connection closed (code {code}{', ' + reason if reason else ''})")


class ConnectFailed(TransportError):
    """A channel gave up connecting after its configured number of attempts."""


class Connection(Protocol):
    """One open WebSocket connection."""

    async def send_text(self, text: str) -> None:
        """Send one text frame."""
        ...

    async def receive_batch(self) -> Sequence[bytes | str]:
        """Wait for data and return every complete message one socket read produced.

        Control frames (ping, pong, close) are handled inside; a close raises
        :class:`ConnectionClosed`.
        """
        ...

    async def ping(self, timeout: float) -> float:
        """Send a protocol ping and return the round-trip time; ``TimeoutError`` if no pong.

        The pong must be found whether or not a task is in :meth:`receive_batch`:
        the receive loop may be parked on a lossless consumer whose buffer is full.
        So the connection reads on its own meanwhile, keeping the data messages it
        reads for the next :meth:`receive_batch`, but only up to a bound (the
        transports' ``max_pending``). At the bound it stops reading, so TCP pushes
        back on the server, and ``timeout`` stops counting until the reader takes
        messages again: the pong may be queued behind data that may not be read
        yet. A consumer that does not read therefore never makes the connection
        look dead, and a server that stops answering is found whenever the
        connection can read. The returned round trip includes any paused time.
        ``ConnectionClosed`` if the connection ends first.
        """
        ...

    async def aclose(self, code: int = 1000) -> None:
        """Close the connection (bounded, safe to call twice)."""
        ...


class Transport(Protocol):
    """Opens connections; one transport object serves one channel."""

    async def connect(self, url: str, headers: Mapping[str, str]) -> Connection:
        """Open a WebSocket connection, raising :class:`TransportError` subclasses on failure."""
        ...

    async def aclose(self) -> None:
        """Release what the transport holds (an HTTP client, say); called when the bus stops."""
        ...
