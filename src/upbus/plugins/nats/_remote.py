"""The remote bus's transport: a "connection" to whichever gateway leads, over NATS.

The bus's WebSocketManager, batcher and router run unchanged on top of it, so
components cannot tell a remote bus from a local one:

- *connecting* waits for a leading gateway (its key in the gateway bucket) and
  binds the connection to that leader's epoch;
- *sending a request* subscribes to the subjects of the state's (type, code) keys
  and writes the state as this bus's lease (a KV key it renews every third of
  ``nats.lease_ttl``; the gateways expire it when renewals stop);
- *receiving* returns the frames the leader published, exactly as the exchange
  sent them, for the manager to decode and the router to narrow;
- the connection *ends* (a ``gap`` for the components, then a reconnect) when
  the leader changes or stops renewing, when the leader's own connection to the
  exchange has a gap, or when NATS is lost. Closing it deletes the lease at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from upbus.core._errors import ConfigError
from upbus.core.subscriptions._specs import PRIVATE_TYPES, Channel, parse_specs
from upbus.core.wire._auth import account_digest
from upbus.core.wire._transport import ConnectionClosed, TransportError
from upbus.plugins.nats._client import (
    NatsUnavailable,
    bucket,
    connect,
    host_name,
    shown_url,
)
from upbus.plugins.nats._subjects import (
    LEADER_KEY,
    data_subject,
    events_subject,
    gateway_bucket,
    leases_bucket,
    private_subject,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js.kv import KeyValue

    from upbus.settings import Settings

__all__ = ("RemoteConnection", "RemoteTransport", "account_name")

log = logging.getLogger("upbus.nats")

# Frames held for a reader that does not read: past this the connection ends with
# a gap rather than growing without bound or dropping silently.
MAX_PENDING = 65536
# Seconds of clock difference between hosts tolerated when judging a leader's record.
CLOCK_SLACK = 1.0


def account_name(settings: Settings) -> str | None:
    """The account in private subjects: ``nats.account``, else from the access key."""
    if settings.nats.account is not None:
        return settings.nats.account
    if settings.access_key is None:
        return None
    # The same name as the bus's private connect scope (``account:<digest>``).
    return account_digest(settings.access_key)


class RemoteTransport:
    """Opens a remote bus's connections to the leading gateway (one per channel)."""

    def __init__(self, channel: Channel, settings: Settings) -> None:
        if settings.nats_url is None:
            raise ConfigError(
                "upstream = 'gateway' needs nats_url: the NATS server the gateways use "
                "(UPBUS_NATS_URL=nats://host:4222)"
            )
        try:
            import nats  # noqa: F401  (only to fail early and clearly without the extra)
        except ImportError:
            raise ConfigError(
                "a remote bus (upstream = 'gateway') needs the nats extra: "
                "pip install 'upbus[nats]'"
            ) from None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError(
                "a remote bus (upstream = 'gateway') runs on asyncio only: nats-py has no "
                "trio support"
            ) from None
        self.channel = channel
        self.settings = settings
        self.key = f"{host_name(settings)}-{os.getpid()}-{secrets.token_hex(4)}-{channel.value}"
        self._client: Client | None = None  # control: leases and the leader key
        self._data: Client | None = None  # market data subscriptions
        self._away: set[str] = set()  # the clients nats-py is reconnecting
        self._leases: KeyValue | None = None
        self._gateway: KeyValue | None = None
        self._lost = asyncio.Event()  # set while NATS is disconnected
        self._state = "idle"
        self._leader: dict[str, Any] | None = None
        self._warned = False
        # The leader record a connection ended on for silence: not to be bound to again.
        self.silent: tuple[str, int] | None = None
        self.current: RemoteConnection | None = None

    def status(self) -> dict[str, Any]:
        """What ``get_connection_metrics()`` shows as the channel's ``upstream``."""
        leader = self._leader or {}
        return {
            "mode": "gateway",
            "nats_url": shown_url(self.settings.nats_url or ""),
            "state": self._state,
            "gateway": leader.get("gateway"),
            "epoch": leader.get("epoch"),
            "lease": self.key,
        }

    async def connect(self, url: str, headers: Mapping[str, str]) -> RemoteConnection:
        client = await self._ensure_client()
        assert self._leases is not None
        assert self._gateway is not None
        leader, revision = await self._await_leader(self._gateway)
        self._leader = leader
        conn = RemoteConnection(self, client, self._leases, self._gateway, leader, revision)
        try:
            await conn.start()
        except Exception as exc:  # NATS went away meanwhile: a failed connect, retried
            self._state = "NATS unreachable"
            raise NatsUnavailable(f"subscribing on NATS failed: {exc}") from None
        self._state = "connected"
        self.current = conn
        return conn

    async def _ensure_client(self) -> Client:
        """The data client, once both clients are connected and the buckets found.

        Two connections: the control one (leases, the leader key) must not queue
        its requests behind a flood of market data on the data one.
        """
        if (
            self._client is not None
            and self._data is not None
            and not self._client.is_closed
            and not self._data.is_closed
        ):
            return self._data
        await self.aclose()
        self._state = "connecting to NATS"
        try:
            self._client = await self._connect("control")
            self._data = await self._connect("data")
            self._leases = await bucket(self._client, leases_bucket(self.settings.nats.prefix))
            self._gateway = await bucket(self._client, gateway_bucket(self.settings.nats.prefix))
        except NatsUnavailable:
            self._state = "NATS unreachable"
            await self.aclose()
            raise
        except Exception as exc:
            self._state = "NATS unreachable"
            await self.aclose()
            raise NatsUnavailable(
                f"NATS at {shown_url(self.settings.nats_url or '')}: {exc}"
            ) from None
        return self._data

    async def _connect(self, role: str) -> Client:
        async def disconnected() -> None:
            # nats-py reconnects by itself, but what was published meanwhile is lost
            # to us: the components must hear of the gap, however short.
            self._away.add(role)
            self._lost.set()
            if self.current is not None:
                self.current.end("the connection to NATS was lost")

        async def reconnected() -> None:
            self._away.discard(role)
            if not self._away:
                self._lost.clear()

        return await connect(
            self.settings,
            f"upbus remote {self.key} {role}",
            on_disconnect=disconnected,
            on_reconnect=reconnected,
        )

    def ended(self, reason: str) -> None:
        """The current connection ended: say so in the status until the next one."""
        self._state = f"reconnecting ({reason})"

    def lost(self) -> bool:
        return self._lost.is_set()

    async def _await_leader(self, kv: KeyValue) -> tuple[dict[str, Any], int]:
        """The leader's record and revision, once a live leader holds the key."""
        ttl = self.settings.nats.leader_ttl
        started = time.monotonic()
        first: int | None = None
        self._state = "waiting for a gateway"
        while True:
            try:
                entry = await _get(kv, LEADER_KEY)
            except Exception as exc:  # NATS is away; nats-py is reconnecting
                log.debug("leader not read: %s", exc)
                self._state = "NATS unreachable"
                await asyncio.sleep(0.2)
                continue
            if entry is not None:
                record, revision = entry
                fresh = abs(time.time() - float(record.get("at", 0))) <= ttl + CLOCK_SLACK
                if first is None:
                    first = revision
                if self.silent == (str(record.get("epoch")), revision):
                    fresh = False  # the record of a leader already found silent
                if fresh or revision != first:
                    if self._warned:
                        log.warning(
                            "%s: gateway %s leads on %s again",
                            self.channel.value,
                            record.get("gateway"),
                            shown_url(self.settings.nats_url or ""),
                        )
                        self._warned = False
                    return record, revision
            if not self._warned and time.monotonic() - started > 2 * ttl + CLOCK_SLACK:
                self._warned = True
                self._state = "no gateway"
                log.warning(
                    "%s: no gateway is leading on %s; waiting for one (start `upbus gateway`)",
                    self.channel.value,
                    shown_url(self.settings.nats_url or ""),
                )
            await asyncio.sleep(min(0.1, ttl / 4))

    async def aclose(self) -> None:
        for client in (self._data, self._client):
            if client is not None and not client.is_closed:
                try:
                    await client.close()
                except Exception as exc:  # closing must not fail the bus's exit
                    log.debug("closing NATS: %s", exc)
        self._client = self._data = None
        self._away.clear()
        self._lost.clear()


class RemoteConnection:
    """One binding of a remote bus to one leader's epoch (see the module docstring)."""

    def __init__(
        self,
        transport: RemoteTransport,
        client: Client,
        leases: KeyValue,
        gateway: KeyValue,
        leader: dict[str, Any],
        revision: int,
    ) -> None:
        self._transport = transport
        self._settings = transport.settings
        self._client = client
        self._leases = leases
        self._gateway = gateway
        self.epoch = str(leader["epoch"])
        self._revision = revision
        self._revision_seen = time.monotonic()
        self._frames: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._closed: ConnectionClosed | None = None
        self._subscriptions: dict[str, Subscription] = {}
        self._lease: bytes | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._events: Subscription | None = None

    async def start(self) -> None:
        prefix = self._settings.nats.prefix
        self._events = await self._client.subscribe(
            events_subject(prefix, self.epoch), cb=self._on_event
        )
        self._monitor = asyncio.create_task(self._watch(), name="upbus remote lease")

    # -- the Connection protocol ----------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Install the request's state: subscribe to its subjects, then renew the lease."""
        self._check_open()
        request = orjson.loads(text)
        subjects = self._subjects(request)
        try:
            for subject in subjects.keys() - self._subscriptions.keys():
                subscription = await self._client.subscribe(subject, cb=self._on_data)
                self._subscriptions[subject] = subscription
            for subject in self._subscriptions.keys() - subjects.keys():
                await self._subscriptions.pop(subject).unsubscribe()
        except Exception as exc:
            # The transport's errors end this connection; the bus reconnects and resends.
            self.end(f"subscribing on NATS failed: {exc}")
            raise TransportError(f"subscribing on NATS failed: {exc}") from None
        self._lease = orjson.dumps(
            {
                "request": request,
                "channel": self._transport.channel.value,
                "account": account_name(self._settings),
                "at": time.time(),
                "ttl": self._settings.nats.lease_ttl,
            }
        )
        await self._put_lease()

    async def receive_batch(self) -> Sequence[bytes]:
        while not self._frames:
            if self._closed is not None:
                raise self._closed
            self._ready.clear()
            await self._ready.wait()
        frames = list(self._frames)
        self._frames.clear()
        return frames

    async def ping(self, timeout: float) -> float:
        started = time.monotonic()
        try:
            await self._client.flush(timeout=max(1, round(timeout)))
        except Exception as exc:
            if self._closed is not None:
                raise self._closed from None
            raise TimeoutError(f"NATS did not answer: {exc}") from None
        return time.monotonic() - started

    async def aclose(self, code: int = 1000) -> None:
        if self._transport.current is self:
            self._transport.current = None
        if self._closed is None:
            self._closed = ConnectionClosed(code, "closed by the bus")
        self._ready.set()
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        subscriptions = [*self._subscriptions.values()]
        if self._events is not None:
            subscriptions.append(self._events)
        self._subscriptions.clear()
        self._events = None
        try:
            for subscription in subscriptions:
                await subscription.unsubscribe()
            if self._lease is not None:
                # A clean exit takes this bus's wishes out of the upstream at once.
                self._lease = None
                await asyncio.wait_for(self._leases.delete(self._transport.key), 2)
        except Exception as exc:
            # The gateways expire a lease that is no longer renewed.
            log.debug("%s: lease not deleted: %s", self._transport.key, exc)

    # -- inside -------------------------------------------------------------------

    def _subjects(self, request: list[Any]) -> dict[str, None]:
        prefix = self._settings.nats.prefix
        wanted: dict[str, None] = {}
        for spec in parse_specs(request):
            if spec.type in PRIVATE_TYPES:
                account = account_name(self._settings)
                if account is None:
                    raise TransportError(
                        f"{spec.type} over NATS needs nats.account or the access key"
                    )
                wanted[private_subject(prefix, account, self.epoch, spec.type)] = None
                continue
            for code in spec.codes:
                wanted[data_subject(prefix, self.epoch, spec.type, code.partition(".")[0])] = None
        return wanted

    async def _on_data(self, msg: Msg) -> None:
        if self._closed is not None:
            return
        data = msg.data
        if b"\n" in data:
            # The gateway sends the frames of one read for one subject together.
            self._frames.extend(data.split(b"\n"))
        else:
            self._frames.append(data)
        if len(self._frames) > MAX_PENDING:
            self.end(f"the bus fell {MAX_PENDING} frames behind the gateway")
        self._ready.set()

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if event.get("channel") == self._transport.channel.value and event.get("state") == "gap":
            # The leader's own connection broke: components must hear of the gap too.
            self.end(f"the gateway's connection had a gap: {event.get('detail', '')}")

    def end(self, reason: str) -> None:
        """End the connection: the next receive raises ConnectionClosed with ``reason``."""
        if self._closed is None:
            log.info("%s: %s", self._transport.channel.value, reason)
            self._transport.ended(reason)
            self._closed = ConnectionClosed(None, reason)
        self._ready.set()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    async def _put_lease(self) -> None:
        if self._lease is None:
            return
        try:
            await self._leases.put(self._transport.key, self._lease)
        except Exception as exc:
            raise TransportError(f"lease not written to NATS: {exc}") from None

    async def _watch(self) -> None:
        """Renew the lease; end the connection when the leader changes or goes silent."""
        ttl = self._settings.nats.leader_ttl
        renew_every = self._settings.nats.lease_ttl / 3
        next_renewal = time.monotonic() + renew_every
        while self._closed is None:
            await asyncio.sleep(min(0.1, ttl / 4))
            if self._transport.lost():
                self.end("the connection to NATS was lost")
                return
            now = time.monotonic()
            if now >= next_renewal and self._lease is not None:
                next_renewal = now + renew_every
                try:
                    self._lease = _with_time(self._lease)
                    await self._put_lease()
                except TransportError as exc:
                    log.debug("%s: %s", self._transport.key, exc)
            try:
                entry = await _get(self._gateway, LEADER_KEY)
            except Exception as exc:
                log.debug("leader not read: %s", exc)
                continue
            if entry is None:
                self.end("the gateway stopped leading")
                return
            record, revision = entry
            if str(record.get("epoch")) != self.epoch:
                self.end(f"gateway {record.get('gateway')} leads now")
                return
            if revision != self._revision:
                self._revision, self._revision_seen = revision, now
            elif now - self._revision_seen > ttl:
                self._transport.silent = (self.epoch, revision)
                self.end(f"the leading gateway has not renewed its lead for {ttl} s")
                return


async def _get(kv: KeyValue, key: str) -> tuple[dict[str, Any], int] | None:
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    if entry.value is None or entry.revision is None:
        return None
    try:
        record = orjson.loads(entry.value)
    except orjson.JSONDecodeError:
        return None
    return (record, entry.revision) if isinstance(record, dict) else None


def _with_time(lease: bytes) -> bytes:
    record = orjson.loads(lease)
    record["at"] = time.time()
    return orjson.dumps(record)
