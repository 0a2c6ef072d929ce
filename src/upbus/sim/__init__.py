"""A strict local Upbit WebSocket exchange for tests, demos and benchmarks.

It serves ``ws://127.0.0.1:PORT/websocket/v1`` and ``/websocket/v1/private`` over real
sockets, enforces the exchange's rules as docs/protocol.md states them
(replace-not-add subscriptions, errors then close, connect and message limits, JWT
auth, idle timeout) and records
every request, connection and violation so tests can assert on them.

It shares no code with the upbus client, so a misreading of the protocol cannot hide
by being shared.
"""

from upbus.sim.cli import run_cli
from upbus.sim.config import DEFAULT_FUNDS, AccountConfig, SimConfig, default_balances
from upbus.sim.orders import Balance, Order, OrderError
from upbus.sim.records import ConnectionRecord, RequestRecord, Violation
from upbus.sim.server import PRIVATE_PATH, PUBLIC_PATH, Simulator
from upbus.sim.trader import run_orders

__all__ = (
    "DEFAULT_FUNDS",
    "PRIVATE_PATH",
    "PUBLIC_PATH",
    "AccountConfig",
    "Balance",
    "ConnectionRecord",
    "Order",
    "OrderError",
    "RequestRecord",
    "SimConfig",
    "Simulator",
    "Violation",
    "default_balances",
    "run_cli",
    "run_orders",
)
