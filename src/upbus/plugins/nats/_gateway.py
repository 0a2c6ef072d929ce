"""The gateway: one process's exchange connections serving every remote bus over NATS.

A gateway is an ordinary exchange-mode :class:`~upbus.Bus` (the same
WebSocketManager, limiters, batcher and merge plugin) plus three duties:

- it watches the lease bucket and keeps, per live lease, the remote bus's wishes;
- while it leads (:mod:`~upbus.plugins.nats._leader`), it registers each lease's
  wishes on its bus as one component, so the merge plugin merges them with the
  gateway's own components into one upstream state per channel, and it expires a
  lease whose renewals stopped for ``nats.lease_ttl``;
- while it leads, it publishes every frame its connections receive, once, to the
  subject of its (type, code) and its epoch, as received (through the
  ``upbus_frame_tap`` hook): remote buses decode and narrow them themselves.

A standby gateway watches the same leases but registers nothing, so it holds no
exchange connection; when it takes the lead, the state is ready at once.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from opentelemetry.trace import TracerProvider

from upbus.core._bus import Bus
from upbus.core._errors import UpbusError
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import PRIVATE_TYPES, Channel, Spec, parse_specs
from upbus.core.wire._codec import FrameDecoder
from upbus.core.wire._messages import Message
from upbus.plugin import FrameTap, hookimpl
from upbus.plugins.nats._client import NatsUnavailable, bucket, connect, host_name, shown_url
from upbus.plugins.nats._leader import Leadership
from upbus.plugins.nats._remote import account_name
from upbus.plugins.nats._subjects import (
    data_subject,
    events_subject,
    gateway_bucket,
    leases_bucket,
    private_subject,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.kv import KeyValue

    from upbus.core.hooks._hookspecs import ConnectionState
    from upbus.settings import Settings

__all__ = ("Gateway",)

log = logging.getLogger("upbus.gateway")

# A list format packs several messages into a frame; the gateway publishes one
# message per subject, so it asks for the same fields unpacked.
_UNPACKED = {"JSON_LIST": "DEFAULT", "SIMPLE_LIST": "SIMPLE"}
# NATS messages waiting for the publisher; past this the oldest half go, counted,
# and the remote buses get a gap.
MAX_BACKLOG = 100_000
# Leases renewed longer ago than this (by the writer's clock) are stale at start.
CLOCK_SLACK = 1.0


class RemoteBus:
    """A live lease, registered on the gateway's bus as one component while it leads."""

    __slots__ = ("__weakref__", "key")

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"RemoteBus({self.key})"


@dataclass
class _Lease:
    revision: int
    specs: tuple[Spec, ...]
    seen: float  # monotonic time of the last renewal we saw
    holder: RemoteBus = field(init=False)


class Gateway:
    """Runs ``upbus gateway``: see the module docstring.

    :param settings: the gateway's settings; ``nats_url`` is required. ``upstream``
        is taken as ``exchange`` (a gateway talks to the exchange).
    :param on_status: called with one line at each change worth telling an operator
        (ready, leading, standing by).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        plugin_manager: PluginManager | None = None,
        tracer_provider: TracerProvider | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        update: dict[str, Any] = {"upstream": "exchange"}
        if settings.format in _UNPACKED:
            update["format"] = _UNPACKED[settings.format]
        self.settings = settings.model_copy(update=update)
        self.id = f"{host_name(self.settings)}-{os.getpid()}-{secrets.token_hex(3)}"
        self._plugins = plugin_manager
        self._tracer_provider = tracer_provider
        self._on_status = on_status or (lambda line: None)
        self._prefix = self.settings.nats.prefix
        self._account = account_name(self.settings)
        self._leases: dict[str, _Lease] = {}
        self._backlog: deque[tuple[str, bytes]] = deque()
        self._wake = anyio.Event()
        self._subjects: dict[tuple[str, str], str] = {}
        self._decoder = FrameDecoder()
        self._client: Client | None = None
        self._leadership: Leadership | None = None
        self._refused: set[str] = set()
        # Set when NATS reconnects: the lease watch starts over and reads every lease.
        self._rewatch = False
        self.bus: Bus | None = None
        self.published = 0
        self.dropped = 0

    @property
    def epoch(self) -> str | None:
        return None if self._leadership is None else self._leadership.epoch

    def status(self) -> dict[str, Any]:
        """The gateway's role, its leases and what it published."""
        leadership = self._leadership
        return {
            "gateway": self.id,
            "nats_url": shown_url(self.settings.nats_url or ""),
            "leading": self.epoch is not None,
            "epoch": self.epoch,
            "leader": None if leadership is None else leadership.leader,
            "leases": len(self._leases),
            "published": self.published,
            "dropped": self.dropped,
        }

    async def run(self) -> None:
        """Serve until cancelled; resign the lead on the way out.

        A NATS server that is not up yet is waited for (with a warning), so a
        gateway may start before it.
        """
        client = await self._connect("control")
        # Data goes over a connection of its own: a KV request (the lead's renewal)
        # must not wait behind megabytes of frames queued for the server.
        data = await self._connect("data")
        self._client = client
        try:
            leases = await bucket(client, leases_bucket(self._prefix))
            gateway = await bucket(client, gateway_bucket(self._prefix))
            plugins = self._plugins or PluginManager.load(self.settings)
            plugins.register(_GatewayHooks(self), f"gateway {self.id}")
            leadership = Leadership(
                gateway,
                self.id,
                self.settings.nats.leader_ttl,
                self._lead_changed,
                nats_url=shown_url(self.settings.nats_url or ""),
            )
            self._leadership = leadership
            async with (
                Bus(
                    self.settings, plugin_manager=plugins, tracer_provider=self._tracer_provider
                ) as bus,
                anyio.create_task_group() as tg,
            ):
                self.bus = bus
                tg.start_soon(self._watch_leases, leases, name="upbus gateway leases")
                tg.start_soon(self._expire, leases, name="upbus gateway expiry")
                tg.start_soon(self._publish, data, name="upbus gateway publisher")
                self._on_status(
                    f"upbus gateway {self.id} ready on {shown_url(self.settings.nats_url or '')}"
                )
                await leadership.run()
        finally:
            self.bus = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await data.close()
                await client.close()

    async def _connect(self, role: str) -> Client:
        # A server started at the same moment gets a few seconds before a warning.
        warn_at = time.monotonic() + 3
        while True:
            try:
                return await connect(
                    self.settings, f"upbus gateway {self.id} {role}", on_reconnect=self._nats_back
                )
            except NatsUnavailable as exc:
                if warn_at and time.monotonic() >= warn_at:
                    warn_at = 0
                    log.warning("%s; retrying until it answers", exc)
                await anyio.sleep(0.2)

    # -- leadership ---------------------------------------------------------------

    def _lead_changed(self, epoch: str | None) -> None:
        self._subjects.clear()
        self._backlog.clear()  # a former epoch's frames must not go out under any epoch
        if epoch is not None:
            self._on_status(f"leading (epoch {epoch})")
            for key, lease in self._leases.items():
                self._hold(key, lease)
        else:
            self._on_status("standing by")
            for lease in self._leases.values():
                self._release(lease)

    def _hold(self, key: str, lease: _Lease) -> None:
        bus = self.bus
        if bus is None or self.epoch is None or not lease.specs:
            return
        try:
            bus.subscriptions.register(lease.holder, lease.specs)
        except UpbusError as exc:
            log.error("lease %s not served: %s", key, exc)

    def _release(self, lease: _Lease) -> None:
        if self.bus is not None:
            self.bus.subscriptions.unregister_component(lease.holder)

    # -- leases -------------------------------------------------------------------

    async def _nats_back(self) -> None:
        # Watchers of a restarted server may have missed changes: read every lease again.
        self._rewatch = True

    async def _watch_leases(self, kv: KeyValue) -> None:
        while True:
            self._rewatch = False
            try:
                watcher = await kv.watchall()
            except Exception as exc:
                log.debug("lease watch not started: %s", exc)
                await anyio.sleep(0.2)
                continue
            fresh_start = time.time()
            try:
                while not self._rewatch:
                    try:
                        entry = await watcher.updates(timeout=0.5)  # type: ignore[no-untyped-call]
                    except Exception:  # nats-py's TimeoutError when nothing changed
                        continue
                    if entry is not None:
                        self._lease_entry(
                            entry.key, entry.value, entry.revision, entry.operation, fresh_start
                        )
            finally:
                try:
                    await watcher.stop()  # type: ignore[no-untyped-call]
                except Exception as exc:
                    log.debug("lease watch not stopped: %s", exc)

    def _lease_entry(
        self,
        key: str,
        value: bytes | None,
        revision: int | None,
        operation: str | None,
        start: float,
    ) -> None:
        if operation in ("DEL", "PURGE") or not value:
            lease = self._leases.pop(key, None)
            if lease is not None:
                log.info("lease %s ended", key)
                self._release(lease)
            return
        try:
            record = orjson.loads(value)
            if record.get("at", 0) < start - record.get("ttl", 0) - CLOCK_SLACK:
                return  # a lease nobody renewed since before this watch began
            specs = self._allowed(key, tuple(parse_specs(record["request"])), record)
        except (UpbusError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            if key not in self._refused:
                self._refused.add(key)
                log.error("lease %s ignored: %s", key, exc)
            return
        now = time.monotonic()
        lease = self._leases.get(key)
        if lease is None:
            lease = _Lease(revision or 0, specs, now)
            lease.holder = RemoteBus(key)
            self._leases[key] = lease
            log.info("lease %s: %d spec(s)", key, len(specs))
            self._hold(key, lease)
            return
        lease.seen, lease.revision = now, revision or lease.revision
        if specs != lease.specs:
            lease.specs = specs
            if specs:
                self._hold(key, lease)
            else:
                self._release(lease)

    def _allowed(
        self, key: str, specs: tuple[Spec, ...], record: dict[str, Any]
    ) -> tuple[Spec, ...]:
        private = [spec for spec in specs if spec.type in PRIVATE_TYPES]
        if not private:
            return specs
        reason = None
        if not self.settings.nats.publish_private:
            reason = "nats.publish_private is off on this gateway"
        elif self._account is None:
            reason = "this gateway has no API keys"
        elif record.get("account") != self._account:
            reason = f"account {record.get('account')!r} is not this gateway's"
        if reason is None:
            return specs
        if key not in self._refused:
            self._refused.add(key)
            log.warning("lease %s: private data not served: %s", key, reason)
        return tuple(spec for spec in specs if spec.type not in PRIVATE_TYPES)

    async def _expire(self, kv: KeyValue) -> None:
        ttl = self.settings.nats.lease_ttl
        while True:
            # Wake at the first lease's deadline, so a dead bus leaves on time.
            now = time.monotonic()
            first = min((lease.seen + ttl for lease in self._leases.values()), default=now + ttl)
            await anyio.sleep(min(ttl / 4, max(0.02, first - now + 0.01)))
            now = time.monotonic()
            for key, lease in list(self._leases.items()):
                if now - lease.seen <= ttl:
                    continue
                del self._leases[key]
                log.warning("lease %s expired: not renewed for %.1f s", key, ttl)
                self._release(lease)
                if self.epoch is not None:
                    try:
                        # Conditional: a renewal that just arrived must survive.
                        await kv.delete(key, last=lease.revision)
                    except Exception as exc:
                        log.debug("expired lease %s not deleted: %s", key, exc)

    # -- publishing ---------------------------------------------------------------

    def tap(self, channel: Channel, frames: Sequence[bytes | str], messages: list[Message]) -> None:
        """The frame tap: queue each data frame for its subject (leader only).

        The frames of one read that share a subject go out as one NATS message,
        newline-separated (compact JSON holds no raw newline; a frame that does goes
        alone): in a flood that divides the per-message cost of NATS on both sides.
        """
        leadership = self._leadership
        epoch = None if leadership is None else leadership.current_epoch()
        if epoch is None:
            return
        grouped: dict[str, list[bytes]] = {}
        if len(frames) == len(messages):
            # The common read: every frame is one data message, in order.
            for frame, message in zip(frames, messages, strict=True):
                subject = self._subject(channel, epoch, message)
                found = grouped.get(subject)
                if found is None:
                    grouped[subject] = [_as_bytes(frame)]
                else:
                    found.append(_as_bytes(frame))
        else:
            for frame in frames:
                try:
                    decoded = self._decoder.decode(frame)
                except UpbusError:
                    continue
                if len(decoded) == 1 and isinstance(decoded[0], Message):
                    subject = self._subject(channel, epoch, decoded[0])
                    grouped.setdefault(subject, []).append(_as_bytes(frame))
        backlog = self._backlog
        for subject, batch in grouped.items():
            if len(batch) == 1:
                backlog.append((subject, batch[0]))
            elif any(b"\n" in frame for frame in batch):
                backlog.extend((subject, frame) for frame in batch)
            else:
                backlog.append((subject, b"\n".join(batch)))
        if len(backlog) > MAX_BACKLOG:
            self._overflow(channel, backlog)
        self._wake.set()

    def _overflow(self, channel: Channel, backlog: deque[tuple[str, bytes]]) -> None:
        # Publishing fell behind the exchange: what cannot wait is dropped, and the
        # remote buses must hear of the hole as a gap, never lose data silently.
        lost = 0
        while len(backlog) > MAX_BACKLOG // 2:
            backlog.popleft()
            lost += 1
        self.dropped += lost
        log.warning("gateway fell behind: %d messages not published; remote buses get a gap", lost)
        epoch = self.epoch
        if epoch is not None:
            # Before what is left: the remote buses end their connection at the hole.
            detail = f"the gateway fell behind and dropped {lost} messages"
            event = {"channel": channel.value, "state": "gap", "detail": detail}
            backlog.appendleft((events_subject(self._prefix, epoch), orjson.dumps(event)))

    def _subject(self, channel: Channel, epoch: str, message: Message) -> str:
        key = (message.type, message.code)
        subject = self._subjects.get(key)
        if subject is None:
            if channel is Channel.PRIVATE:
                subject = private_subject(
                    self._prefix, self._account or "none", epoch, message.type
                )
            else:
                subject = data_subject(self._prefix, epoch, message.type, message.code)
            self._subjects[key] = subject
        return subject

    async def _publish(self, client: Client) -> None:
        backlog = self._backlog
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while backlog:
                subject, frame = backlog.popleft()
                try:
                    await client.publish(subject, frame)
                except Exception as exc:
                    self.dropped += 1
                    log.debug("not published: %s", exc)
                else:
                    self.published += 1

    def connection_state(self, channel: Channel, state: ConnectionState, detail: str) -> None:
        """Tell the remote buses of a gap in the leader's own connection."""
        epoch, client = self.epoch, self._client
        if epoch is None or client is None or state != "gap":
            return
        event = orjson.dumps({"channel": channel.value, "state": state, "detail": detail})
        self._backlog.append((events_subject(self._prefix, epoch), event))
        self._wake.set()


class _GatewayHooks:
    """The gateway's hook implementations, registered on its own bus's plugin manager."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    @hookimpl
    def upbus_frame_tap(self, channel: Channel, settings: Settings) -> FrameTap | None:
        tap = self._gateway.tap

        def channel_tap(frames: Sequence[bytes | str], messages: list[Message]) -> None:
            tap(channel, frames, messages)

        return channel_tap

    @hookimpl
    def upbus_connection_state(self, channel: Channel, state: ConnectionState, detail: str) -> None:
        self._gateway.connection_state(channel, state, detail)


def _as_bytes(frame: bytes | str) -> bytes:
    return frame if type(frame) is bytes else str(frame).encode()
