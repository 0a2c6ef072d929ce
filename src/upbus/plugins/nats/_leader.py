"""Leader election among gateways: compare-and-set on one JetStream KV key.

The leader writes its record (gateway id, epoch, time) to the leader key every
quarter of ``leader_ttl``, each write conditional on the revision of its previous
one. A standby reads the key as often; when the revision has not moved for
``leader_ttl``, or the key is gone, it writes its own record conditional on the
revision it saw (or on the key being absent): of several standbys exactly one
succeeds. A leader whose conditional write fails, or that has not managed a write
for ``leader_ttl``, stops leading at once, so two leaders overlap by less than one
``leader_ttl``. All timing is on each process's own monotonic clock: only "has the
revision moved" crosses machines, never a timestamp.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import orjson

from upbus.plugins.nats._subjects import LEADER_KEY

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

__all__ = ("Leadership",)

log = logging.getLogger("upbus.gateway")


class Leadership:
    """Runs one gateway's side of the election; calls ``on_change(epoch or None)``."""

    def __init__(
        self,
        kv: KeyValue,
        gateway: str,
        ttl: float,
        on_change: Callable[[str | None], None],
        *,
        nats_url: str = "",
    ) -> None:
        self._kv = kv
        self.gateway = gateway
        self._ttl = ttl
        self._on_change = on_change
        self._nats_url = nats_url
        self.epoch: str | None = None  # set while leading
        self._revision = 0  # of our last write while leading
        self._renewed = 0.0  # monotonic time our last successful write was sent
        self._seen_revision: int | None = None
        self._seen_at = 0.0
        self.leader: str | None = None  # the gateway that leads, as far as we know

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    def current_epoch(self) -> str | None:
        """The epoch to publish under: ``None`` unless the lead was renewed within the TTL.

        Checked per socket read, so a leader that was paused (a stopped process, a
        long GC, a lost NATS) stops publishing the moment its lead may have passed
        on, before its own renewal loop has noticed.
        """
        if self.epoch is None or time.monotonic() - self._renewed >= self._ttl:
            return None
        return self.epoch

    async def run(self) -> None:
        """Lead or stand by, until cancelled; resign (delete the key) when leading."""
        try:
            while True:
                if self.leading:
                    await self._renew()
                else:
                    await self._stand_by()
                await anyio.sleep(self._ttl / 4)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self.resign()

    async def resign(self) -> None:
        """Stop leading and free the key, so a standby takes over at once."""
        if not self.leading:
            return
        revision = self._revision
        self._step_down("resigned")
        try:
            await self._kv.delete(LEADER_KEY, last=revision)
        except Exception as exc:
            log.debug("leader key not deleted: %s", exc)

    def _record(self, epoch: str) -> bytes:
        return orjson.dumps(
            {"gateway": self.gateway, "epoch": epoch, "nats": self._nats_url, "at": time.time()}
        )

    async def _renew(self) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        assert self.epoch is not None
        sent = time.monotonic()
        try:
            self._revision = await self._kv.update(
                LEADER_KEY, self._record(self.epoch), last=self._revision
            )
            self._renewed = sent
        except KeyWrongLastSequenceError:
            self._step_down("another gateway took the lead")
        except Exception as exc:
            if time.monotonic() - self._renewed >= self._ttl:
                self._step_down(f"could not renew the lead for {self._ttl} s: {exc}")

    async def _stand_by(self) -> None:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        now = time.monotonic()
        try:
            entry = await self._kv.get(LEADER_KEY)
        except KeyNotFoundError:
            entry = None
        except Exception as exc:
            log.debug("leader key not read: %s", exc)
            return
        epoch = secrets.token_hex(4)
        try:
            if entry is None or entry.value is None:
                revision = await self._kv.create(LEADER_KEY, self._record(epoch))
            else:
                if entry.revision != self._seen_revision:
                    self._seen_revision, self._seen_at = entry.revision, now
                    self.leader = _gateway_of(entry.value)
                    return
                if now - self._seen_at < self._ttl:
                    return
                revision = await self._kv.update(
                    LEADER_KEY, self._record(epoch), last=self._seen_revision
                )
        except KeyWrongLastSequenceError:
            return  # another standby was faster
        except Exception as exc:
            log.debug("lead not taken: %s", exc)
            return
        self._revision, self._renewed = revision, now
        self.epoch, self.leader = epoch, self.gateway
        log.info("gateway %s leads (epoch %s)", self.gateway, epoch)
        self._on_change(epoch)

    def _step_down(self, why: str) -> None:
        # Resigning is the normal way out; losing the lead is worth a warning.
        level = logging.INFO if why == "resigned" else logging.WARNING
        log.log(level, "gateway %s stops leading: %s", self.gateway, why)
        self.epoch = None
        self.leader = None
        self._seen_revision = None
        self._on_change(None)


def _gateway_of(value: bytes) -> str | None:
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    gateway = record.get("gateway") if isinstance(record, dict) else None
    return gateway if isinstance(gateway, str) else None
