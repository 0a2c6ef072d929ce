"""Connecting to NATS: one place for the options every upbus NATS client uses."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from upbus.core._errors import ConfigError
from upbus.core.wire._transport import TransportError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.kv import KeyValue

    from upbus.settings import Settings

__all__ = ("NatsUnavailable", "bucket", "connect", "host_name", "servers", "shown_url")

log = logging.getLogger("upbus.nats")


class NatsUnavailable(TransportError):
    """The NATS server could not be reached, or a request to it failed."""


def servers(settings: Settings) -> list[str]:
    """The server URLs of ``nats_url``; a ConfigError if it is not set."""
    if settings.nats_url is None:
        raise ConfigError(
            "nats_url is not set: a remote bus and a gateway need a NATS server "
            "(UPBUS_NATS_URL=nats://host:4222)"
        )
    return [url.strip() for url in settings.nats_url.split(",") if url.strip()]


def host_name(settings: Settings) -> str:
    """The name of this host's shared connect budget (``nats.host``, else the host name)."""
    if settings.nats.host is not None:
        return settings.nats.host
    # KV keys allow letters, digits, '-', '_', '/', '=' and '.'; a host name may hold more.
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())


async def connect(
    settings: Settings,
    name: str,
    *,
    reconnect: bool = True,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    """A connected NATS client named ``name``, or :class:`NatsUnavailable`.

    With ``reconnect`` the client keeps reconnecting forever after a lost server,
    quickly (0.2 s between attempts), and re-subscribes its subscriptions itself.
    """
    try:
        import nats
        from nats.errors import Error as NatsError
    except ImportError:
        raise ConfigError("NATS needs the nats extra: pip install 'upbus[nats]'") from None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigError("NATS (nats-py) runs on asyncio only: run the bus with asyncio") from None
    urls = servers(settings)
    timeout = settings.nats.connect_timeout
    credentials = settings.nats.credentials

    async def quiet(exc: Exception) -> None:
        # nats-py reports every failed reconnect attempt: the state is ours to report.
        # A refusal by the server's permissions is a configuration error, though.
        if "permissions violation" in str(exc).lower():
            log.error("%s: NATS refused: %s", name, exc)
        else:
            log.debug("%s: %s", name, exc)

    try:
        # With reconnecting on, nats-py retries a first connect forever; the caller
        # needs an answer, so the first connect gets a deadline of its own.
        with anyio.fail_after(timeout * len(urls) + 0.5):
            return await nats.connect(
                servers=urls,
                name=name,
                connect_timeout=max(1, round(timeout)),
                allow_reconnect=reconnect,
                # nats-py drops a refused server from its pool only for a count above 0.
                max_reconnect_attempts=-1 if reconnect else 1,
                reconnect_time_wait=0.2,  # type: ignore[arg-type,unused-ignore]  # float works
                ping_interval=5,
                max_outstanding_pings=2,
                user_credentials=credentials,
                error_cb=quiet,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
    except (TimeoutError, OSError, NatsError) as exc:
        raise NatsUnavailable(
            f"NATS at {shown_url(settings.nats_url or '')} is unreachable: "
            f"{type(exc).__name__}: {exc}"
        ) from None


async def bucket(client: Client, name: str, *, history: int = 1) -> KeyValue:
    """The KV bucket ``name``, created if missing.

    Looked up first, so a user whose NATS permissions allow using the bucket but
    not creating streams (a remote bus's, docs/scale-out.md) needs no more.
    """
    from nats.js.errors import BucketNotFoundError

    js = client.jetstream(timeout=5)
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=name, history=history)


def shown_url(urls: str) -> str:
    """``urls`` (comma-separated) with any password shown as ``****``, as settings show it."""
    from upbus.settings.sources import mask_credentials

    return mask_credentials(urls)
