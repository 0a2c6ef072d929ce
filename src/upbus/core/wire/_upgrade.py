"""The HTTP/1.1 upgrade of the default transport, done through httpx.

httpx sends the ``GET`` with the WebSocket headers, so its proxy settings
(``HTTPS_PROXY`` and friends, ``CONNECT`` tunnels for ``https``), TLS settings and
timeouts apply; this module checks the ``101`` answer (RFC 6455 §4.1) and hands
back the raw network stream for :class:`~upbus.core.wire._httpx.WsConnection` to
frame. Every failure becomes a :class:`TransportError` naming the URL without its
secrets, or a :class:`HandshakeRejected` with the refusal's status and body.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Mapping

import anyio
import httpcore
import httpx

from upbus.core.wire._frames import (
    INVALID_URL,
    MAX_ERROR_BODY,
    accept_token,
    exception_leaves,
    safe_url,
)
from upbus.core.wire._transport import HandshakeRejected, TransportError

__all__ = ("check_url", "upgrade")

logger = logging.getLogger("upbus.transport")

# ws:// and wss:// are requested as http:// and https:// so that httpx's proxy
# settings for those schemes apply.
_HTTP_SCHEMES = {"ws": "http", "wss": "https"}


def check_url(url: str) -> tuple[str, str]:
    """``(where, http_url)``: ``url`` fit for messages and as httpx requests it.

    Raises :class:`TransportError` for a URL that does not parse or is not a
    ``ws://`` or ``wss://`` URL.
    """
    where = safe_url(url)
    scheme = url.partition(":")[0].lower()
    if where == INVALID_URL:
        raise TransportError("cannot connect: the URL does not parse")
    if scheme not in _HTTP_SCHEMES:
        raise TransportError(f"cannot connect to {where}: expected a ws:// or wss:// URL")
    return where, _HTTP_SCHEMES[scheme] + url[len(scheme) :]


async def upgrade(
    client: httpx.AsyncClient,
    http_url: str,
    headers: Mapping[str, str],
    *,
    where: str,
    close_timeout: float,
) -> tuple[httpx.Response, httpcore.AsyncNetworkStream]:
    """Upgrade ``http_url`` (from :func:`check_url`) to a WebSocket with ``headers``.

    Returns the ``101`` response (closing it closes the socket) and its network
    stream. ``where`` names the endpoint in errors; header values never appear in
    them. A refused or invalid answer is closed within ``close_timeout`` before
    the error is raised.
    """
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    request_headers = httpx.Headers(dict(headers))
    request_headers["Connection"] = "Upgrade"
    request_headers["Upgrade"] = "websocket"
    request_headers["Sec-WebSocket-Version"] = "13"
    request_headers["Sec-WebSocket-Key"] = key
    try:
        request = client.build_request("GET", http_url, headers=request_headers)
        response = await client.send(request, stream=True)
    except httpx.TimeoutException as exc:
        raise TransportError(
            f"cannot connect to {where}: timed out ({type(exc).__name__})"
        ) from exc
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        raise TransportError(f"cannot connect to {where}: {type(exc).__name__}: {exc}") from exc
    except ExceptionGroup as group:
        # anyio's happy-eyeballs connect groups what httpx does not map (an
        # OverflowError for a bad port, say); callers get one plain error.
        causes = "; ".join(f"{type(e).__name__}: {e}" for e in exception_leaves(group))
        raise TransportError(f"cannot connect to {where}: {causes}") from group

    try:
        if response.status_code != 101:
            raise HandshakeRejected(response.status_code, await _read_body(response))
        _check_upgrade(response, key, where)
        stream: httpcore.AsyncNetworkStream | None = response.extensions.get("network_stream")
        if stream is None:
            raise TransportError(
                f"cannot use the upgrade from {where}: the httpx transport exposes no "
                "network stream (WebSocket needs httpx's HTTP/1.1 transport)"
            )
    except BaseException:
        with anyio.move_on_after(close_timeout, shield=True):
            try:
                await response.aclose()
            except Exception as exc:  # the error being raised matters more
                logger.debug("closing the refused upgrade to %s failed: %r", where, exc)
        raise
    return response, stream


async def _read_body(response: httpx.Response) -> str:
    """The start of a refused upgrade's body, or ``""`` if it cannot be read."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_ERROR_BODY * 4:
                break
    except (httpx.HTTPError, httpx.StreamError):
        pass  # the status is what matters
    return b"".join(chunks).decode("utf-8", "replace")[:MAX_ERROR_BODY]


def _check_upgrade(response: httpx.Response, key: str, where: str) -> None:
    """Fail unless the 101 response completes the handshake for ``key`` (RFC 6455 §4.1)."""
    headers = response.headers
    problem = None
    if headers.get("upgrade", "").lower() != "websocket":
        problem = "no 'Upgrade: websocket' header"
    elif "upgrade" not in {t.strip().lower() for t in headers.get("connection", "").split(",")}:
        problem = "no 'Connection: Upgrade' header"
    elif headers.get("sec-websocket-accept", "").strip() != accept_token(key):
        problem = "wrong Sec-WebSocket-Accept"
    elif "sec-websocket-extensions" in headers:
        problem = "an extension was accepted that was not offered"
    elif "sec-websocket-protocol" in headers:
        problem = "a subprotocol was chosen that was not offered"
    if problem is not None:
        raise TransportError(f"invalid WebSocket upgrade from {where}: {problem}")
