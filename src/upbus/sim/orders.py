"""Simulated private trading: balances, orders and fills, rendered as myOrder / myAsset.

Tests drive it through the simulator's control API (place, fill, cancel). Each call
returns the private events the exchange would push: myOrder messages in state
``wait``, ``trade``, ``done`` or ``cancel`` (docs/protocol.md, Messages), then one myAsset message
listing the currencies whose balance or locked amount changed (§8.6).

Accounting (exact ``Decimal``, fee ``fee_rate`` of the traded funds):

* limit bid: locks ``price × volume × (1 + fee_rate)`` of the quote currency; a fill
  below the limit refunds the difference at once.
* ``price`` (market buy by amount): ``price`` is the amount to spend; locks
  ``price × (1 + fee_rate)``; the unspent rest is returned when it is done.
* limit or ``market`` ask: locks ``volume`` of the base currency; the fee is taken
  from the proceeds.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_UP, Context, Decimal, localcontext
from typing import Any

__all__ = ("Balance", "Exchange", "Fill", "Order", "OrderError", "PrivateEvent")

_CONTEXT = Context(prec=80)
_ZERO = Decimal(0)
_EIGHT = Decimal("0.00000001")


class OrderError(ValueError):
    """A control-API order call the exchange would refuse (funds, state, parameters)."""


@dataclass(slots=True)
class Balance:
    """One currency of one account: ``balance`` is orderable, ``locked`` held by orders."""

    balance: Decimal = _ZERO
    locked: Decimal = _ZERO


@dataclass(slots=True)
class Fill:
    """One execution of an order."""

    uuid: str
    price: Decimal
    volume: Decimal
    funds: Decimal
    fee: Decimal
    is_maker: bool
    ms: int


@dataclass(slots=True)
class Order:
    """An order and its running totals, as myOrder reports them."""

    uuid: str
    access_key: str
    market: str
    side: str  # "BID" or "ASK"
    ord_type: str  # "limit", "price" or "market"
    price: Decimal | None
    volume: Decimal | None
    remaining: Decimal | None
    reserved_fee: Decimal
    remaining_fee: Decimal
    locked: Decimal
    created_ms: int
    identifier: str | None = None
    time_in_force: str | None = None
    executed: Decimal = _ZERO
    executed_funds: Decimal = _ZERO
    paid_fee: Decimal = _ZERO
    trades_count: int = 0
    state: str = "wait"
    fills: list[Fill] = field(default_factory=list)

    @property
    def quote(self) -> str:
        return self.market.split("-", 1)[0]

    @property
    def base(self) -> str:
        return self.market.split("-", 1)[1]

    @property
    def avg_price(self) -> Decimal:
        if self.executed == 0:
            return _ZERO
        with localcontext(_CONTEXT):
            return (self.executed_funds / self.executed).quantize(_EIGHT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True, slots=True)
class PrivateEvent:
    """A message for the private connections of ``access_key``."""

    access_key: str
    type: str  # "myOrder" or "myAsset"
    code: str | None  # the market, for myOrder code filters
    fields: dict[str, Any]


class Exchange:
    """Accounts and orders; every method returns the private events it causes."""

    def __init__(
        self,
        accounts: Mapping[str, Mapping[str, Decimal]],
        *,
        fee_rate: Decimal,
        seed: int,
        clock_ms: Callable[[], int],
    ) -> None:
        self._balances = {
            key: {currency.upper(): Balance(Decimal(amount)) for currency, amount in held.items()}
            for key, held in accounts.items()
        }
        self._fee_rate = fee_rate
        self._rng = random.Random(f"upbus-sim/{seed}/orders")
        self._clock_ms = clock_ms
        self.orders: dict[str, Order] = {}

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def balances(self, access_key: str) -> dict[str, Balance]:
        """Copies of the account's balances by currency."""
        return {
            currency: Balance(held.balance, held.locked)
            for currency, held in self._account(access_key).items()
        }

    def _account(self, access_key: str) -> dict[str, Balance]:
        try:
            return self._balances[access_key]
        except KeyError:
            raise OrderError(f"unknown access key {access_key[:4]}…") from None

    def _lock(self, access_key: str, currency: str, amount: Decimal) -> None:
        held = self._account(access_key).setdefault(currency, Balance())
        if held.balance < amount:
            raise OrderError(f"insufficient {currency}: {held.balance} available, {amount} needed")
        held.balance -= amount
        held.locked += amount

    def place(
        self,
        access_key: str,
        market: str,
        side: str,
        ord_type: str,
        *,
        price: Decimal | None = None,
        volume: Decimal | None = None,
        identifier: str | None = None,
        time_in_force: str | None = None,
    ) -> tuple[Order, list[PrivateEvent]]:
        """Place an order; it rests in state ``wait`` until filled or cancelled."""
        if "-" not in market:
            raise OrderError(f"bad market {market!r}")
        with localcontext(_CONTEXT):
            if (side, ord_type) == ("BID", "limit"):
                price, volume = _positive(price, "price"), _positive(volume, "volume")
                reserved_fee = price * volume * self._fee_rate
                locked = price * volume + reserved_fee
            elif (side, ord_type) == ("BID", "price"):
                price, volume = _positive(price, "price"), None
                reserved_fee = price * self._fee_rate
                locked = price + reserved_fee
            elif (side, ord_type) == ("ASK", "limit"):
                price, volume = _positive(price, "price"), _positive(volume, "volume")
                reserved_fee, locked = _ZERO, volume
            elif (side, ord_type) == ("ASK", "market"):
                price, volume = None, _positive(volume, "volume")
                reserved_fee, locked = _ZERO, volume
            else:
                raise OrderError(f"unsupported order: side {side!r}, ord_type {ord_type!r}")
            order = Order(
                uuid=self._uuid(),
                access_key=access_key,
                market=market,
                side=side,
                ord_type=ord_type,
                price=price,
                volume=volume,
                remaining=volume,
                reserved_fee=reserved_fee,
                remaining_fee=reserved_fee,
                locked=locked,
                created_ms=self._clock_ms(),
                identifier=identifier,
                time_in_force=time_in_force,
            )
            currency = order.quote if side == "BID" else order.base
            self._lock(access_key, currency, locked)
        self.orders[order.uuid] = order
        return order, [self._order_event(order, "wait"), self._asset_event(order, {currency})]

    def _open(self, order_uuid: str) -> Order:
        order = self.orders.get(order_uuid)
        if order is None:
            raise OrderError(f"unknown order {order_uuid}")
        if order.state not in ("wait", "trade"):
            raise OrderError(f"order {order_uuid} is {order.state}")
        return order

    def fill(
        self,
        order_uuid: str,
        volume: Decimal | None = None,
        price: Decimal | None = None,
        *,
        is_maker: bool = True,
    ) -> list[PrivateEvent]:
        """Execute ``volume`` (default: all that is left) at ``price`` (default: the limit)."""
        order = self._open(order_uuid)
        with localcontext(_CONTEXT):
            fill_price = _positive(price if price is not None else order.price, "price")
            if order.ord_type == "limit":
                assert order.price is not None
                worse = (
                    fill_price > order.price if order.side == "BID" else fill_price < order.price
                )
                if worse:
                    raise OrderError(
                        f"fill price {fill_price} is worse than the limit {order.price}"
                    )
            if order.ord_type == "price":
                assert order.price is not None
                left = order.price - order.executed_funds
                most = (left / fill_price).quantize(_EIGHT, rounding=ROUND_DOWN)
            else:
                assert order.remaining is not None
                most = order.remaining
            fill_volume = most if volume is None else _positive(volume, "volume")
            if fill_volume > most or fill_volume <= 0:
                raise OrderError(f"fill volume {fill_volume} exceeds what is left ({most})")
            funds = fill_price * fill_volume
            fee = funds * self._fee_rate
            fill = Fill(
                self._uuid(), fill_price, fill_volume, funds, fee, is_maker, self._clock_ms()
            )
            self._settle(order, fill)
            if order.ord_type == "price":
                assert order.price is not None
                # Done once the rest cannot buy even the smallest unit at this price.
                done = order.price - order.executed_funds < fill_price * _EIGHT
            else:
                done = order.remaining == 0
            events = [self._order_event(order, "trade", fill)]
            if done:
                self._release(order)
                order.state = "done"
                events.append(self._order_event(order, "done"))
            else:
                order.state = "trade"
        events.append(self._asset_event(order, {order.quote, order.base}))
        return events

    def _settle(self, order: Order, fill: Fill) -> None:
        account = self._account(order.access_key)
        quote = account.setdefault(order.quote, Balance())
        base = account.setdefault(order.base, Balance())
        if order.side == "BID":
            if order.ord_type == "limit":
                assert order.price is not None
                released_fee = order.price * fill.volume * self._fee_rate
                released = order.price * fill.volume + released_fee
            else:
                released_fee = fill.fee
                released = fill.funds + fill.fee
            quote.locked -= released
            quote.balance += released - fill.funds - fill.fee  # refund of a better price
            base.balance += fill.volume
            order.locked -= released
            order.remaining_fee -= released_fee
        else:
            base.locked -= fill.volume
            order.locked -= fill.volume
            quote.balance += fill.funds - fill.fee
        if order.remaining is not None:
            order.remaining -= fill.volume
        order.executed += fill.volume
        order.executed_funds += fill.funds
        order.paid_fee += fill.fee
        order.trades_count += 1
        order.fills.append(fill)

    def _release(self, order: Order) -> None:
        """Return whatever the order still locks to the orderable balance."""
        currency = order.quote if order.side == "BID" else order.base
        held = self._account(order.access_key)[currency]
        held.locked -= order.locked
        held.balance += order.locked
        order.locked = _ZERO
        order.remaining_fee = _ZERO

    def cancel(self, order_uuid: str) -> list[PrivateEvent]:
        """Cancel an open order and release what it locks."""
        order = self._open(order_uuid)
        order.state = "cancel"
        # The cancel message shows what the order held (samples/myOrder.json, SG cancel).
        events = [self._order_event(order, "cancel")]
        with localcontext(_CONTEXT):
            self._release(order)
        currency = order.quote if order.side == "BID" else order.base
        events.append(self._asset_event(order, {currency}))
        return events

    def _order_event(self, order: Order, state: str, fill: Fill | None = None) -> PrivateEvent:
        by_amount = order.ord_type == "price"
        fields: dict[str, Any] = {
            "type": "myOrder",
            "code": order.market,
            "uuid": order.uuid,
            "ask_bid": order.side,
            "order_type": order.ord_type,
            "state": state,
            "trade_uuid": fill.uuid if fill else None,
            "price": fill.price if fill else order.price,
            "avg_price": order.avg_price,
            "volume": fill.volume if fill else order.volume,
            "remaining_volume": order.remaining,
            # A market buy by amount has no volume until something executes (§8.5).
            "executed_volume": None if by_amount and order.executed == 0 else order.executed,
            "trades_count": order.trades_count,
            "reserved_fee": order.reserved_fee,
            "remaining_fee": order.remaining_fee,
            "paid_fee": order.paid_fee,
            "locked": order.locked,
            "executed_funds": order.executed_funds,
            "time_in_force": order.time_in_force,
            "trade_fee": fill.fee if fill else None,
            "is_maker": fill.is_maker if fill else None,
            "identifier": order.identifier,
            "smp_type": None,
            "prevented_volume": None,
            "prevented_locked": _ZERO,
            "trade_timestamp": fill.ms if fill else None,
            # The exchange reports order times in whole seconds (samples/myOrder.json).
            "order_timestamp": order.created_ms // 1000 * 1000,
            "timestamp": self._clock_ms(),
            "stream_type": "REALTIME",
        }
        return PrivateEvent(order.access_key, "myOrder", order.market, fields)

    def _asset_event(self, order: Order, currencies: set[str]) -> PrivateEvent:
        account = self._account(order.access_key)
        now = self._clock_ms()
        assets = [
            {"currency": currency, "balance": held.balance, "locked": held.locked}
            for currency, held in account.items()
            if currency in currencies
        ]
        fields: dict[str, Any] = {
            "type": "myAsset",
            "asset_uuid": self._uuid(),
            "assets": assets,
            "asset_timestamp": now,
            "timestamp": now,
            "stream_type": "REALTIME",
        }
        return PrivateEvent(order.access_key, "myAsset", None, fields)


def _positive(value: Decimal | None, name: str) -> Decimal:
    if value is None:
        raise OrderError(f"{name} is required")
    number = Decimal(value)
    if not number.is_finite() or number <= 0:
        raise OrderError(f"{name} must be positive, got {value}")
    return number
