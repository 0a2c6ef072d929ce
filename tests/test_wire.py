"""The whole stack against the strict local simulator, over real loopback sockets."""

from __future__ import annotations

import random
from typing import Any

import anyio
import orjson
import pytest
from simbus import ACCESS, SECRET, Recorder, funded_config, make_bus

import upbus
from upbus.core.wire._messages import MyOrder, Orderbook
from upbus.sim import SimConfig, Simulator


def body(raw: str) -> list[Any]:
    """A request frame without its ticket and format objects."""
    return [obj for obj in orjson.loads(raw) if "ticket" not in obj and "format" not in obj]


@pytest.fixture(autouse=True, params=["httpx", "picows"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs over the default transport and over the optional fast one."""
    monkeypatch.setenv("UPBUS_TRANSPORT", request.param)
    return str(request.param)


@pytest.fixture
def sim_config() -> SimConfig:
    return funded_config(rate=200.0)


@pytest.mark.anyio
async def test_concurrent_registrations_make_one_request_then_whole_replacement_sets(
    sim: Simulator,
) -> None:
    async with make_bus(sim) as bus:
        components = [Recorder() for _ in range(10)]
        codes = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-ADA"]
        async with anyio.create_task_group() as tg:
            for i, component in enumerate(components):
                tg.start_soon(bus.register_component, component, upbus.ticker(codes[i % 5]))
        (first,) = await sim.wait_for_requests(1)
        await components[0].wait_for(lambda: len(components[0].messages) >= 3)
        assert body(first.raw) == [{"type": "ticker", "codes": sorted(codes)}]
        assert len(sim.requests) == 1

        later = Recorder()
        await bus.register_component(later, upbus.trade("KRW-BTC"))
        await sim.wait_for_requests(2)
        assert body(sim.requests[1].raw) == [
            {"type": "ticker", "codes": sorted(codes)},
            {"type": "trade", "codes": ["KRW-BTC"]},
        ]

        for component in [*components, later]:
            await bus.unregister_component(component)
        # No unsubscribe exists: with nothing wanted, the connection closes.
        await sim.wait_until(lambda: not any(c.is_open for c in sim.connections))
        assert len(sim.requests) == 2
        assert bus.get_connection_metrics()["public"]["state"] == "idle"
    assert list(sim.violations) == []


@pytest.mark.anyio
async def test_each_component_gets_exactly_its_own_wish(sim: Simulator) -> None:
    async with make_bus(sim) as bus:
        shallow, deep, snapshots, ticks = Recorder(), Recorder(), Recorder(), Recorder()
        await bus.register_component(shallow, upbus.orderbook("KRW-BTC", depth=5))
        await bus.register_component(deep, upbus.orderbook("KRW-BTC", depth=15))
        await bus.register_component(snapshots, upbus.ticker("KRW-ETH", only_snapshot=True))
        await bus.register_component(ticks, upbus.ticker("KRW-ETH"))  # widens to both
        await shallow.wait_for(lambda: len(shallow.messages) >= 5)
        await deep.wait_for(lambda: len(deep.messages) >= 5)
        assert body(sim.requests[-1].raw) == [
            {"type": "orderbook", "codes": ["KRW-BTC.15"]},
            {"type": "ticker", "codes": ["KRW-ETH"]},
        ]
        for message in shallow.messages:
            assert isinstance(message, Orderbook)
            assert len(message.orderbook_units) == 5
            assert message.total_ask_size == pytest.approx(
                sum(unit.ask_size for unit in message.orderbook_units)
            )
        assert {len(m.orderbook_units) for m in deep.messages if isinstance(m, Orderbook)} == {15}
        await snapshots.wait_for(lambda: len(snapshots.messages) >= 1)
        assert {m.stream_type for m in snapshots.messages} == {"SNAPSHOT"}


@pytest.mark.anyio
async def test_a_killed_connection_reconnects_and_restores_the_whole_state(
    sim: Simulator,
) -> None:
    async with make_bus(sim) as bus:
        chart = Recorder()
        await bus.register_component(chart, [upbus.ticker("KRW-BTC"), upbus.trade("KRW-ETH")])
        await chart.wait_for(lambda: len(chart.messages) >= 3)
        (first,) = sim.requests
        sim.drop(first.connection)
        await chart.wait_for(lambda: "reconnected" in chart.order and chart.order[-1] == "msg")
        second = sim.requests[1]
        assert second.connection != first.connection
        assert body(second.raw) == body(first.raw)
        # Consumers learn about the gap before any post-gap data.
        gap = chart.order.index("gap")
        assert chart.order[gap : gap + 2] == ["gap", "reconnected"]
        assert bus.get_connection_metrics()["public"]["reconnects"] == 1
    assert list(sim.violations) == []


@pytest.mark.anyio
async def test_a_stalled_connection_is_found_by_the_heartbeat_and_replaced(
    sim: Simulator,
) -> None:
    async with make_bus(sim, heartbeat_interval=0.2, heartbeat_timeout=0.3) as bus:
        chart = Recorder()
        await bus.register_component(chart, upbus.ticker("KRW-BTC"))
        (first,) = await sim.wait_for_requests(1)
        await chart.wait_for(lambda: len(chart.messages) >= 1)
        sim.stall(first.connection)
        await sim.wait_for_requests(2, timeout=10)
        await chart.wait_for(lambda: "reconnected" in chart.order and chart.order[-1] == "msg")
        metrics = bus.get_connection_metrics()["public"]
        assert metrics["heartbeat_timeouts"] == 1
        assert "no pong" in metrics["last_error"]
        assert body(sim.requests[1].raw) == [{"type": "ticker", "codes": ["KRW-BTC"]}]


@pytest.mark.anyio
async def test_error_frames_and_garbage_are_survived(sim: Simulator) -> None:
    limits = {"backoff_initial": 0.2, "backoff_max": 1.0}
    async with make_bus(sim, rate_limit=limits) as bus:
        chart = Recorder()
        await bus.register_component(chart, upbus.ticker("KRW-BTC"))
        (first,) = await sim.wait_for_requests(1)
        await chart.wait_for(lambda: len(chart.messages) >= 1)
        sim.send_frame(first.connection, b"\xff\x00 not json at all")
        sim.send_frame(first.connection, b'{"type":"ticker","code":')
        await chart.wait_for(lambda: bus.get_connection_metrics()["public"]["decode_errors"] >= 2)
        seen = len(chart.messages)
        await chart.wait_for(lambda: len(chart.messages) > seen)  # same connection, streaming
        assert len(sim.requests) == 1

        sim.send_garbage(first.connection)  # bytes that are not even a WebSocket frame
        await sim.wait_for_requests(2, timeout=10)  # a new connection, state re-sent

        for name in ["WRONG_FORMAT", "INVALID_PARAM", "TOO_MANY_REQUEST"]:
            connection = sim.requests[-1].connection
            count = len(sim.requests)
            sim.send_error(connection, name, "test")
            await sim.wait_for_requests(count + 1, timeout=10)  # reconnected, state re-sent
            assert body(sim.requests[-1].raw) == [{"type": "ticker", "codes": ["KRW-BTC"]}]
        metrics = bus.get_connection_metrics()["public"]
        assert metrics["error_frames"] == 3
        assert metrics["last_error"] is not None
        status = bus.get_rate_limiter_status()
        assert status["connect"]["ip"]["granted"] == 5
        # "Too many requests" outlives the connection it came on: the reconnect waited.
        assert status["connect"]["ip"]["back_offs"] == 1
    assert list(sim.violations) == []


@pytest.mark.anyio
async def test_private_channel_sees_fills_of_orders_placed_on_the_simulator(
    sim: Simulator,
) -> None:
    async with make_bus(sim, access_key=ACCESS, secret_key=SECRET) as bus:
        trader = Recorder()
        await bus.register_component(trader, [upbus.my_order("KRW-BTC"), upbus.my_asset()])
        await sim.wait_for_requests(1)
        await sim.wait_until(
            lambda: any(c.is_open and c.endpoint == "private" for c in sim.connections)
        )
        uuid = sim.place_order(ACCESS, "KRW-BTC", "BID", "limit", price="100000000", volume="0.01")
        sim.fill_order(uuid)
        await trader.wait_for(
            lambda: any(isinstance(m, MyOrder) and m.state == "done" for m in trader.messages)
        )
        states = [m.state for m in trader.messages if isinstance(m, MyOrder)]
        assert states[0] == "wait"
        assert "trade" in states
        assert states[-1] == "done"
        assert all(m.uuid == uuid for m in trader.messages if isinstance(m, MyOrder))
        assert body(sim.requests[0].raw) == [
            {"type": "myAsset"},
            {"type": "myOrder", "codes": ["KRW-BTC"]},
        ]


@pytest.mark.anyio
async def test_a_bad_key_is_reported_clearly(sim: Simulator) -> None:
    async with make_bus(sim, access_key=ACCESS, secret_key="wrong-secret") as bus:
        trader = Recorder()  # components are held weakly: keep a reference
        await bus.register_component(trader, upbus.my_asset())
        # A second attempt comes only after the first refusal was handled.
        await sim.wait_until(lambda: sum(c.status == 401 for c in sim.connections) >= 2)
        metrics = bus.get_connection_metrics()["private"]
        assert "HTTP 401" in metrics["last_error"]
        assert metrics["connect_failures"] >= 1
        assert "wrong-secret" not in str(metrics)


@pytest.mark.anyio
async def test_private_specs_without_keys_are_refused_at_registration(sim: Simulator) -> None:
    async with make_bus(sim) as bus:
        with pytest.raises(upbus.ConfigError, match="UPBUS_ACCESS_KEY"):
            await bus.register_component(Recorder(), upbus.my_order())
        assert bus.get_subscription_stats()["components"] == 0


@pytest.mark.anyio
async def test_churn_never_breaks_a_limit_and_ends_in_the_final_state(sim: Simulator) -> None:
    rng = random.Random(7)
    codes = ["KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL", "KRW-ADA", "KRW-DOGE"]
    async with make_bus(sim, debounce=0.01) as bus:
        components = [Recorder() for _ in range(50)]
        live: dict[int, upbus.Spec] = {}
        for step in range(3000):
            index = rng.randrange(len(components))
            if index in live and rng.random() < 0.4:
                await bus.unregister_component(components[index])
                del live[index]
            else:
                spec = upbus.ticker(*rng.sample(codes, rng.randint(1, 3)))
                await bus.register_component(components[index], spec)
                live[index] = spec
            if step % 20 == 0:
                await anyio.sleep(0.01)
        final = sorted({code for spec in live.values() for code in spec.codes})
        with anyio.fail_after(30):
            while True:
                pending = bus.get_pending_task_status()["public"]["pending"]
                if (
                    not pending
                    and sim.requests
                    and body(sim.requests[-1].raw) == [{"type": "ticker", "codes": final}]
                ):
                    break
                await anyio.sleep(0.05)
        assert len(sim.requests) < 300  # batched: far fewer requests than changes
    assert list(sim.violations) == []


@pytest.mark.anyio
async def test_verification_and_text_ping_are_charged_to_the_budget_and_break_no_limit(
    sim: Simulator,
) -> None:
    async with make_bus(
        sim, verify_subscriptions=True, verify_delay=0.1, text_ping=True, heartbeat_interval=0.2
    ) as bus:
        chart = Recorder()
        await bus.register_component(
            chart, [upbus.ticker("KRW-BTC"), upbus.orderbook("KRW-ETH", depth=5)]
        )
        await sim.wait_until(
            lambda: (
                any("LIST_SUBSCRIPTIONS" in r.raw for r in sim.requests)
                and any(r.raw == "PING" for r in sim.requests)
            )
        )
        await chart.wait_for(lambda: bus.get_connection_metrics()["public"]["verified"] == 1)
        metrics = bus.get_connection_metrics()["public"]
        assert metrics["drift_detected"] == 0
        assert metrics["message_limiter"]["granted"] >= 3  # the state, the LIST, a PING
        subscribes = [r for r in sim.requests if r.raw.startswith("[") and "LIST" not in r.raw]
        assert len(subscribes) == 1  # in sync: nothing re-sent
    assert list(sim.violations) == []
