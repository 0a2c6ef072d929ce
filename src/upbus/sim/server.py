"""The simulator: a loopback listener, the upgrade handshake, and the control API.

Use it as an async context manager::

    async with Simulator(SimConfig(rate=200)) as sim:
        ...connect to sim.public_url / sim.private_url...
        await sim.wait_for_requests(1)
        assert not sim.violations

Upgrades are admitted in this order: a refusal window set by
:meth:`Simulator.refuse_connections`, the path (404), the Origin limit (429), the
connect limit per scope (429, then 418 while banned) and, on the private path, the
token (401, or an INVALID_AUTH frame after the upgrade when
``auth_failure="frame"``). The public scope is the client IP; the private scope is
the token's access key when it names a configured account, else the IP.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Self

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.utilities import RemoteProtocolError

from upbus.sim.auth import Authenticator, AuthError, unverified_access_key
from upbus.sim.config import Rate, SimConfig, check_rate
from upbus.sim.connection import Connection, set_reset_on_close
from upbus.sim.encode import encode_error
from upbus.sim.flood import RingCache
from upbus.sim.limits import ConnectLimiter, RollingWindow
from upbus.sim.orders import Balance, Exchange, Order, PrivateEvent
from upbus.sim.protocol import error_message
from upbus.sim.records import ConnectionRecord, Journal, RequestRecord, Violation

__all__ = ("PRIVATE_PATH", "PUBLIC_PATH", "Simulator")

PUBLIC_PATH = "/websocket/v1"
PRIVATE_PATH = "/websocket/v1/private"
_ENDPOINTS = {PUBLIC_PATH: "public", PRIVATE_PATH: "private"}
_HOST = "127.0.0.1"
_MAX_HANDSHAKE_BYTES = 65536
_RECORDS_KEPT = 100_000


@dataclass(frozen=True, slots=True)
class _Verdict:
    status: int  # 101 to accept, an HTTP status to refuse, 0 to drop without a reply
    name: str = ""
    message: str = ""
    retry_after: float = 0.0
    auth_error: bool = False  # accept, then INVALID_AUTH and close


class Simulator(anyio.AsyncContextManagerMixin):
    """A strict local Upbit WebSocket exchange on 127.0.0.1."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config = config or SimConfig()
        self._rate = config.rate
        self._rings = RingCache(config)
        self._auth = Authenticator(
            {account.access_key: account.secret_key for account in config.accounts},
            reject_reused_nonce=config.reject_reused_nonce,
            require_uuid_nonce=config.require_uuid_nonce,
        )
        limit, window = config.connect_limit
        self._connect_limiter = ConnectLimiter(
            limit,
            window,
            strikes_before_ban=config.connect_strikes_before_ban,
            strike_window=config.connect_strike_window,
            ban_base=config.ban_base,
            ban_factor=config.ban_factor,
            ban_max=config.ban_max,
        )
        self._origin_windows: dict[str, RollingWindow] = {}
        start_ms = config.start_ms
        clock: Callable[[], int] = (
            (lambda: start_ms) if start_ms is not None else (lambda: int(time.time() * 1000))
        )
        self._exchange = Exchange(
            {
                account.access_key: account.starting_balances(config.region)
                for account in config.accounts
            },
            fee_rate=config.fee_rate,
            seed=config.seed,
            clock_ms=clock,
        )
        self._account_keys = frozenset(account.access_key for account in config.accounts)
        self._ids = itertools.count(1)
        self.internal_errors: list[Exception] = []
        self._live: dict[int, Connection] = {}
        self._refuse_until = -math.inf
        self._refuse_status: int | None = None
        self._journal: Journal | None = None
        self._port: int | None = None

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        self._journal = Journal(_RECORDS_KEPT)
        listener = await anyio.create_tcp_listener(local_host=_HOST, local_port=self.config.port)
        self._port = listener.extra(anyio.abc.SocketAttribute.local_port)
        try:
            async with listener, anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, self._handle)
                try:
                    yield self
                finally:
                    async with anyio.create_task_group() as closers:
                        for connection in list(self._live.values()):
                            closers.start_soon(connection.close_going_away)
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The task group wraps an error raised in the ``async with`` body; hand the
            # caller that error itself, as trio-websocket does.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if self.internal_errors:
            # Kept out of the serving loop so one broken connection cannot stop the
            # others, but never hidden: a clean exit reports them.
            raise ExceptionGroup("simulator connection handlers failed", self.internal_errors)

    # -- addresses and records --------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def public_url(self) -> str:
        return f"ws://{_HOST}:{self.port}{PUBLIC_PATH}"

    @property
    def private_url(self) -> str:
        return f"ws://{_HOST}:{self.port}{PRIVATE_PATH}"

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("the simulator is not running")
        return self._journal

    @property
    def requests(self) -> Sequence[RequestRecord]:
        """Every message clients sent (time, connection, endpoint, raw, parsed, error)."""
        return self.journal.requests

    @property
    def connections(self) -> Sequence[ConnectionRecord]:
        """Every upgrade attempt, accepted or refused, with its close time and reason."""
        return self.journal.connections

    @property
    def violations(self) -> Sequence[Violation]:
        """Every broken rule; a well-behaved client leaves this empty."""
        return self.journal.violations

    @property
    def ring_builds(self) -> int:
        """How many ``rate="max"`` rings were generated (each is cached and reused)."""
        return self._rings.builds

    @property
    def live_connections(self) -> list[int]:
        """Ids of the connections being served (stalled ones included)."""
        return list(self._live)

    # -- waiting ----------------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds (checked on every record); TimeoutError after."""
        await self.journal.wait_until(predicate, timeout)

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RequestRecord]:
        """Wait until ``count`` messages in total were received; returns all kept."""
        await self.wait_until(lambda: self.journal.request_count >= count, timeout)
        return list(self.journal.requests)

    async def wait_for_connections(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` upgrade attempts in total were seen."""
        await self.wait_until(lambda: self.journal.connection_count >= count, timeout)

    async def wait_for_violations(self, count: int, timeout: float = 5.0) -> list[Violation]:
        """Wait until ``count`` violations in total were recorded."""
        await self.wait_until(lambda: self.journal.violation_count >= count, timeout)
        return list(self.journal.violations)

    async def wait_for_close(self, connection: int, timeout: float = 5.0) -> ConnectionRecord:
        """Wait until connection ``connection`` is closed; returns its record."""

        def closed() -> ConnectionRecord | None:
            for record in self.journal.connections:
                if record.id == connection and record.closed is not None:
                    return record
            return None

        await self.wait_until(lambda: closed() is not None, timeout)
        record = closed()
        assert record is not None
        return record

    # -- control: rate and faults -----------------------------------------------

    def _connection(self, connection: int) -> Connection:
        try:
            return self._live[connection]
        except KeyError:
            raise KeyError(f"no live connection {connection}") from None

    def set_rate(self, rate: Rate, connection: int | None = None) -> None:
        """Realtime messages/s for one connection, or for all and new ones.

        ``None`` generates every message (about 2,000/s); ``"max"`` repeats a ring of
        pre-encoded frames as fast as the socket takes them (:mod:`upbus.sim.flood`).
        """
        check_rate(rate, ValueError)
        if connection is not None:
            self._connection(connection).set_rate(rate)
            return
        self._rate = rate
        for live in self._live.values():
            live.set_rate(rate)

    def drop(self, connection: int, *, reset: bool = False) -> None:
        """Close a connection's socket without a close frame (``reset``: send RST)."""
        self._connection(connection).drop(reset=reset)

    def stall(self, connection: int) -> None:
        """Stop reading and sending on a connection but keep its socket open."""
        self._connection(connection).stall()

    def send_garbage(self, connection: int, data: bytes = b"\xff\x00garbage\r\n") -> None:
        """Write bytes that are not a WebSocket frame."""
        self._connection(connection).send_raw(data)

    def send_frame(self, connection: int, payload: bytes, *, binary: bool = True) -> None:
        """Send one arbitrary message frame."""
        self._connection(connection).send_frame(payload, binary=binary)

    def send_error(
        self, connection: int, name: str, message: str = "", *, close: bool = True
    ) -> None:
        """Send an ``{"error":...}`` frame, then close (1000) as after a bad request.

        ``close=False`` sends the frame and keeps serving: an error frame the
        exchange does not follow with a close (none is documented; for tests).
        """
        self._connection(connection).send_error(name, message, close=close)

    def refuse_connections(self, seconds: float, *, status: int | None = None) -> None:
        """For ``seconds``, answer upgrades with HTTP ``status``, or drop them if None."""
        self._refuse_until = anyio.current_time() + seconds
        self._refuse_status = status

    # -- control: private trading -----------------------------------------------

    def _publish(self, events: list[PrivateEvent]) -> None:
        for event in events:
            for live in self._live.values():
                if live.endpoint == "private" and live.access_key == event.access_key:
                    live.push_private(event)

    def place_order(
        self,
        access_key: str,
        market: str,
        side: str,
        ord_type: str = "limit",
        *,
        price: Decimal | str | None = None,
        volume: Decimal | str | None = None,
        identifier: str | None = None,
        time_in_force: str | None = None,
    ) -> str:
        """Place an order (``side`` BID/ASK; ``ord_type`` limit/price/market); its uuid."""
        order, events = self._exchange.place(
            access_key,
            market,
            side,
            ord_type,
            price=None if price is None else Decimal(price),
            volume=None if volume is None else Decimal(volume),
            identifier=identifier,
            time_in_force=time_in_force,
        )
        self._publish(events)
        return order.uuid

    def fill_order(
        self,
        order_uuid: str,
        volume: Decimal | str | None = None,
        price: Decimal | str | None = None,
        *,
        is_maker: bool = True,
    ) -> None:
        """Execute part (``volume``) or all of an order, at ``price`` or its limit."""
        self._publish(
            self._exchange.fill(
                order_uuid,
                None if volume is None else Decimal(volume),
                None if price is None else Decimal(price),
                is_maker=is_maker,
            )
        )

    def cancel_order(self, order_uuid: str) -> None:
        """Cancel an open order and release what it locks."""
        self._publish(self._exchange.cancel(order_uuid))

    def has_private_subscriber(self, access_key: str) -> bool:
        """Whether a live connection of ``access_key`` subscribes to myOrder or myAsset."""
        return any(
            live.endpoint == "private" and live.access_key == access_key and live.wants_private
            for live in self._live.values()
        )

    def order(self, order_uuid: str) -> Order:
        """The order's current state."""
        return self._exchange.orders[order_uuid]

    def balances(self, access_key: str) -> dict[str, Balance]:
        """The account's balances by currency (copies)."""
        return self._exchange.balances(access_key)

    # -- serving ----------------------------------------------------------------

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        try:
            await self._serve(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client went away during the handshake
        except Exception as exc:
            # A bug must not take the other connections down; tests assert on this list.
            self.internal_errors.append(exc)
            self.journal.changed()
        finally:
            await anyio.aclose_forcefully(stream)

    async def _serve(self, stream: anyio.abc.SocketStream) -> None:
        journal = self.journal
        record = ConnectionRecord(next(self._ids), None, "", anyio.current_time())
        refusing = anyio.current_time() < self._refuse_until
        if refusing and self._refuse_status is None:
            self._finish(record, 0, "refused", new=True)
            return
        ws = WSConnection(ConnectionType.SERVER)
        request = await self._read_request(stream, ws)
        if request is None:
            self._finish(record, 0, "bad_handshake", new=True)
            return
        path = request.target.partition("?")[0]
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in request.extra_headers
        }
        record.path = path
        record.endpoint = _ENDPOINTS.get(path)
        record.headers = tuple(
            (name, "<redacted>" if name == "authorization" else value)
            for name, value in headers.items()
        )
        if record.endpoint == "private":
            record.access_key = unverified_access_key(headers.get("authorization"))
        journal.add_connection(record)
        if refusing:
            assert self._refuse_status is not None
            verdict = _Verdict(self._refuse_status, "SERVICE_UNAVAILABLE", "refused by the test")
        else:
            peer = stream.extra(anyio.abc.SocketAttribute.remote_address)
            verdict = self._decide(record, headers, str(peer[0]))
        if verdict.status != 101:
            await self._reject(stream, ws, verdict)
            self._finish(record, verdict.status, f"rejected:{verdict.status}")
            return
        await self._run(stream, ws, record, verdict)

    async def _read_request(
        self, stream: anyio.abc.SocketStream, ws: WSConnection
    ) -> Request | None:
        received = 0
        with anyio.move_on_after(self.config.handshake_timeout):
            while received < _MAX_HANDSHAKE_BYTES:
                data = await stream.receive(_MAX_HANDSHAKE_BYTES)
                received += len(data)
                try:
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, Request):
                            return event
                except RemoteProtocolError as exc:
                    if isinstance(exc.event_hint, RejectConnection):
                        await stream.send(ws.send(exc.event_hint))
                    return None
        return None

    def _decide(self, record: ConnectionRecord, headers: dict[str, str], ip: str) -> _Verdict:
        config = self.config
        now = anyio.current_time()
        language = config.language
        if record.endpoint is None:
            return _Verdict(404, "NOT_FOUND", f"no endpoint at {record.path}")
        if "origin" in headers and config.origin_limit is not None:
            window = self._origin_windows.get(ip)
            if window is None:
                window = self._origin_windows[ip] = RollingWindow(*config.origin_limit)
            if not window.hit(now):
                self._violation("origin_rate", record.id, "upgrades with an Origin header")
                return _Verdict(429, "Too Many Requests", "too many requests with Origin")
        known = record.access_key in self._account_keys
        scope = f"key:{record.access_key}" if known else f"ip:{ip}"
        decision = self._connect_limiter.check(scope, now)
        if decision.status == 429:
            self._violation("connect_rate", record.id, f"too many connection attempts ({scope})")
            return _Verdict(429, "Too Many Requests", "too many connection attempts")
        if decision.status == 418:
            self._violation("connect_ban", record.id, f"banned {decision.retry_after:.3f} s more")
            return _Verdict(418, "I'm a teapot", "blocked for a while", decision.retry_after)
        if record.endpoint == "private":
            try:
                record.access_key, _claims = self._auth.verify(headers.get("authorization"))
            except AuthError as exc:
                self._violation("auth", record.id, str(exc))
                if config.auth_failure == "frame":
                    return _Verdict(101, auth_error=True)
                return _Verdict(401, "INVALID_AUTH", error_message("INVALID_AUTH", language))
        return _Verdict(101)

    async def _reject(
        self, stream: anyio.abc.SocketStream, ws: WSConnection, verdict: _Verdict
    ) -> None:
        if verdict.status == 0:
            return
        body = encode_error(verdict.name, verdict.message)
        headers = [
            (b"content-type", b"application/json; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        if verdict.retry_after > 0:
            headers.append((b"retry-after", str(math.ceil(verdict.retry_after)).encode()))
        data = ws.send(RejectConnection(status_code=verdict.status, headers=headers, has_body=True))
        data += ws.send(RejectData(data=body))
        await stream.send(data)

    async def _run(
        self,
        stream: anyio.abc.SocketStream,
        ws: WSConnection,
        record: ConnectionRecord,
        verdict: _Verdict,
    ) -> None:
        extensions: list[Extension] = [PerMessageDeflate()] if self.config.deflate else []
        connection = Connection(
            record, stream, ws, self.config, self.journal, self._rate, rings=self._rings
        )
        # Book-keeping first, so a client that sees the 101 also sees a live connection.
        record.status = 101
        self._live[record.id] = connection
        self.journal.changed()
        try:
            await stream.send(ws.send(AcceptConnection(extensions=extensions)))
            auth_error = None
            if verdict.auth_error:
                auth_error = ("INVALID_AUTH", error_message("INVALID_AUTH", self.config.language))
            await connection.run(auth_error=auth_error)
            if connection.stalled:
                await connection.released.wait()
        finally:
            del self._live[record.id]
            if connection.reset:
                set_reset_on_close(stream)
            self._finish(record, 101, connection.end_reason or "shutdown")

    def _finish(
        self, record: ConnectionRecord, status: int, reason: str, *, new: bool = False
    ) -> None:
        record.status = status
        record.closed = anyio.current_time()
        record.close_reason = reason
        if new:
            self.journal.add_connection(record)
        else:
            self.journal.changed()

    def _violation(self, kind: str, connection: int, detail: str) -> None:
        self.journal.add_violation(Violation(kind, connection, anyio.current_time(), detail))
