"""What both WebSocket transports share, on the standard library alone.

The RFC 6455 rules a client checks in a server's frame headers and upgrade answer,
URLs made fit for messages, the limits both transports default to, and the ping
bookkeeping. Nothing here imports httpx, httpcore, wsproto or picows, so either
transport can use it without pulling in the other's dependencies.
"""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import urlsplit, urlunsplit

__all__ = (
    "INVALID_URL",
    "MAX_ERROR_BODY",
    "MAX_MESSAGE_SIZE",
    "MAX_PENDING",
    "PingWaiter",
    "accept_token",
    "exception_leaves",
    "header_problem",
    "safe_url",
)

MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # Upbit's largest messages are a few kB
MAX_PENDING = 1024  # messages read ahead for a receive loop that is not reading
MAX_ERROR_BODY = 1_000  # characters of a refused upgrade's body kept in the error
INVALID_URL = "<invalid URL>"  # what safe_url answers for a URL that does not parse

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_OPCODES = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})  # RFC 6455 §5.2


def accept_token(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value a server must answer ``key`` with."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment, fit for error messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return INVALID_URL
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def header_problem(b0: int, b1: int, length: int, canonical: bool) -> str | None:
    """What makes a server frame's header invalid (close code 1002), or ``None``.

    ``b0`` and ``b1`` are the header's first two bytes, ``length`` the payload
    length it gives and ``canonical`` whether that length is in its shortest form.
    No extension is ever negotiated, so any reserved bit is an error.
    """
    opcode = b0 & 0x0F
    if b0 & 0x70:
        return f"reserved bits 0x{b0 & 0x70:02x} set, but no extension was negotiated"
    if opcode not in _OPCODES:
        return f"unknown opcode 0x{opcode:x}"
    if b1 & 0x80:
        return "a masked frame from the server (RFC 6455 §5.1)"
    if opcode >= 0x8:
        if not b0 & 0x80:
            return "a fragmented control frame"
        if length > 125:
            return f"a control frame of {length} bytes (at most 125)"
    if not canonical:
        if length >= 1 << 63:
            return "a 64-bit payload length with the most significant bit set"
        return "a payload length not in its shortest form"
    return None


class PingWaiter:
    """One outstanding ping; whoever reads its pong fills ``answered_at``."""

    __slots__ = ("answered_at", "sent_at")

    def __init__(self) -> None:
        self.sent_at = 0.0
        self.answered_at: float | None = None


def exception_leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    """The exceptions inside ``group`` and its nested groups, flattened.

    anyio's happy-eyeballs connect groups the errors of its attempts; callers get
    one plain :class:`~upbus.core.wire._transport.TransportError` naming them all.
    """
    leaves: list[Exception] = []
    for exc in group.exceptions:
        leaves.extend(exception_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves
