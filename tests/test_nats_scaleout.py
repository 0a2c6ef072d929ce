"""Scale-out over NATS with real processes: gateways, remote buses, a real nats-server.

Gateways run as ``upbus gateway`` subprocesses and remote buses as subprocesses of
``nats_remote.py`` (or in this process, where the test needs to watch a
component's events closely); the simulator runs in this process, so the test
sees every connection and request the exchange would.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.abc import Process
from clirun import UPBUS, clean_environment
from natsserver import NatsServer
from simbus import ACCESS, SECRET, funded_config

import upbus
from upbus.sim import SimConfig, Simulator
from upbus.sim.protocol import Subscribe

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REMOTE = [sys.executable, str(Path(__file__).with_name("nats_remote.py"))]
LEASE_TTL = 2.0


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=40.0)


class Lines:
    """A subprocess whose stdout lines are collected as they come."""

    def __init__(self, process: Process, name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[str] = []
        self.changed = anyio.Event()

    async def collect(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode() for line in complete)
            self.changed.set()
            self.changed = anyio.Event()

    async def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float) -> None:
        with anyio.fail_after(timeout):
            while not predicate(self.lines):
                if self.process.returncode is not None:
                    raise AssertionError(f"{self.name} exited: {self.lines[-20:]}")
                await self.changed.wait()

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines if line.startswith("{")]

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


@asynccontextmanager
async def processes() -> AsyncIterator[Callable[..., Any]]:
    """Start subprocesses whose output is collected; every one is killed on exit."""
    started: list[Lines] = []
    async with anyio.create_task_group() as tg:

        async def start(command: list[str], name: str, env: dict[str, str]) -> Lines:
            process = await anyio.open_process(
                command, stdout=-1, stderr=None, env=clean_environment(**env)
            )
            lines = Lines(process, name)
            started.append(lines)
            tg.start_soon(lines.collect)
            return lines

        try:
            yield start
        finally:
            for lines in started:
                lines.kill()
            for lines in started:
                with anyio.move_on_after(5):
                    await lines.process.wait()
            tg.cancel_scope.cancel()


def gateway_env(nats: NatsServer, sim: Simulator) -> dict[str, str]:
    return {
        "UPBUS_NATS_URL": nats.url,
        "UPBUS_PUBLIC_URL": sim.public_url,
        "UPBUS_PRIVATE_URL": sim.private_url,
        "UPBUS_NATS__LEASE_TTL": str(LEASE_TTL),
    }


def ticker_codes(sim: Simulator) -> set[str]:
    """The ticker codes of the last request the exchange accepted."""
    for record in reversed(sim.requests):
        if isinstance(record.parsed, Subscribe) and record.endpoint == "public":
            return {
                code
                for entry in record.parsed.entries
                if entry.type == "ticker"
                for code in entry.codes or ()
            }
    return set()


def public_connections(sim: Simulator) -> int:
    return sum(1 for c in sim.connections if c.endpoint == "public" and c.status == 101)


def data_codes(lines: list[str]) -> set[str]:
    return {orjson.loads(line)["code"] for line in lines if '"code"' in line}


async def test_two_remote_processes_share_one_upstream_and_a_killed_one_leaves_it(
    nats_server: NatsServer, sim: Simulator
) -> None:
    async with processes() as start:
        gateway = await leading_gateway(start, gateway_env(nats_server, sim))
        assert gateway.lines[0].startswith("upbus gateway ")
        assert gateway.lines[0].endswith(f"ready on {nats_server.url}")
        env = {"UPBUS_NATS__LEASE_TTL": str(LEASE_TTL)}
        first = await start(
            [*REMOTE, nats_server.url, "ticker", "KRW-BTC", "KRW-ETH"], "first", env
        )
        second = await start(
            [*REMOTE, nats_server.url, "ticker", "KRW-ETH", "KRW-XRP"], "second", env
        )
        await first.wait_for(lambda lines: data_codes(lines) == {"KRW-BTC", "KRW-ETH"}, 15)
        await second.wait_for(lambda lines: data_codes(lines) == {"KRW-ETH", "KRW-XRP"}, 15)
        await sim.wait_until(lambda: ticker_codes(sim) == {"KRW-BTC", "KRW-ETH", "KRW-XRP"}, 5)
        assert public_connections(sim) == 1

        first.kill()
        killed = time.monotonic()
        await sim.wait_until(lambda: ticker_codes(sim) == {"KRW-ETH", "KRW-XRP"}, LEASE_TTL + 2)
        left_after = time.monotonic() - killed
        # The survivor keeps its data, on the same upstream connection.
        seen = len(second.lines)
        await second.wait_for(lambda lines: data_codes(lines[seen:]) == {"KRW-ETH", "KRW-XRP"}, 10)
        assert public_connections(sim) == 1
        assert data_codes(second.lines) == {"KRW-ETH", "KRW-XRP"}
        assert data_codes(first.lines) == {"KRW-BTC", "KRW-ETH"}
        assert not sim.violations
        assert left_after <= LEASE_TTL + 2


class Collector:
    """A component that keeps what it receives, with the time it came."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Any]] = []
        self.changed = anyio.Event()

    async def on_message(self, message: upbus.Message) -> None:
        self.items.append((time.monotonic(), message))
        self.changed.set()
        self.changed = anyio.Event()

    async def on_event(self, event: upbus.BusEvent) -> None:
        self.items.append((time.monotonic(), event))
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        with anyio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()

    def states(self) -> list[str]:
        return [item.state for _t, item in self.items if isinstance(item, upbus.ConnectionEvent)]

    def messages(self) -> list[tuple[float, Any]]:
        return [(t, item) for t, item in self.items if not isinstance(item, upbus.BusEvent)]


def remote_bus(nats: NatsServer, **nats_section: Any) -> upbus.Bus:
    return upbus.Bus(
        upstream="gateway",
        nats_url=nats.url,
        nats={"lease_ttl": LEASE_TTL, **nats_section},
        autoload_plugins=False,
    )


async def leading_gateway(start: Callable[..., Any], env: dict[str, str], *options: str) -> Lines:
    """An ``upbus gateway`` process, once it says it leads."""
    gateway = await start([*UPBUS, *options, "gateway"], "gateway", env)
    await gateway.wait_for(lambda lines: any("leading" in x for x in lines), 15)
    return gateway


def private_env(base: dict[str, str], *, publish: bool) -> dict[str, str]:
    """A gateway's environment with the test account's keys, as account alice."""

    env = {**base, "UPBUS_ACCESS_KEY": ACCESS, "UPBUS_SECRET_KEY": SECRET}
    env["UPBUS_NATS__ACCOUNT"] = "alice"
    if publish:
        env["UPBUS_NATS__PUBLISH_PRIVATE"] = "true"
    return env


async def leader_and_standby(start: Callable[..., Any], env: dict[str, str]) -> list[Lines]:
    """Two ``upbus gateway`` processes: the first leading, the second ready, standing by."""
    leader = await leading_gateway(start, env)
    standby = await start([*UPBUS, "gateway"], "second gateway", env)
    await standby.wait_for(lambda lines: any("ready on" in x for x in lines), 15)
    return [leader, standby]


async def test_killing_the_leader_hands_over_within_two_seconds_without_duplicates(
    nats_server: NatsServer, sim: Simulator
) -> None:
    async with processes() as start:
        leader, standby = await leader_and_standby(start, gateway_env(nats_server, sim))
        async with remote_bus(nats_server) as bus:
            component = Collector()
            await bus.register_component(
                component, [upbus.ticker("KRW-BTC", "KRW-ETH"), upbus.trade("KRW-BTC")]
            )
            await component.wait_for(lambda: len(component.messages()) >= 20, 15)
            assert not any("leading" in x for x in standby.lines)

            leader.kill()
            killed = time.monotonic()
            before = len(component.items)
            await component.wait_for(
                lambda: (
                    any(
                        not isinstance(item, upbus.BusEvent)
                        for _t, item in component.items[before:]
                    )
                    and "reconnected" in component.states()
                ),
                10,
            )
            await standby.wait_for(lambda lines: any("leading" in x for x in lines), 1)
            after = component.items[before:]
            kinds = [
                item.state if isinstance(item, upbus.ConnectionEvent) else "data"
                for _t, item in after
            ]
            assert kinds[:2] == ["gap", "reconnected"], kinds[:5]
            first_data = next(t for t, item in after if not isinstance(item, upbus.BusEvent))
            resumed = first_data - killed
            trades = [
                item.sequential_id for _t, item in component.messages() if item.type == "trade"
            ]
            assert len(trades) == len(set(trades)), "a trade was delivered twice"
            assert resumed < 2.0, f"data resumed {resumed:.2f} s after the leader died"
        assert not sim.violations


async def test_nats_restarted_under_a_gateway_and_a_remote_both_recover(
    nats_server: NatsServer, sim: Simulator
) -> None:
    async with processes() as start:
        await leading_gateway(start, gateway_env(nats_server, sim))
        async with remote_bus(nats_server) as bus:
            component = Collector()
            await bus.register_component(component, [upbus.ticker("KRW-BTC")])
            await component.wait_for(lambda: len(component.messages()) >= 5, 15)

            nats_server.restart()
            before = len(component.items)
            await component.wait_for(
                lambda: (
                    "reconnected" in component.states()[-3:]
                    and any(
                        not isinstance(item, upbus.BusEvent)
                        for _t, item in component.items[before:]
                    )
                ),
                20,
            )
            assert "gap" in [
                item.state for _t, item in component.items[before:] if hasattr(item, "state")
            ]
            # The lease lives again: a new wish reaches the exchange.
            other = Collector()
            await bus.register_component(other, [upbus.ticker("KRW-SOL")])
            await sim.wait_until(lambda: "KRW-SOL" in ticker_codes(sim), 10)
            await other.wait_for(lambda: len(other.messages()) >= 1, 10)
            assert ticker_codes(sim) == {"KRW-BTC", "KRW-SOL"}
        assert not sim.violations


async def test_a_remote_bus_without_a_gateway_says_so_and_gets_data_once_one_starts(
    nats_server: NatsServer, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="upbus")
    async with remote_bus(nats_server, leader_ttl=0.3) as bus:
        component = Collector()
        await bus.register_component(component, [upbus.ticker("KRW-BTC")])
        with anyio.fail_after(10):
            # The metrics are snapshots with nothing to wait on: read them until they tell.
            while bus.get_connection_metrics()["public"]["upstream"]["state"] != "no gateway":  # noqa: ASYNC110
                await anyio.sleep(0.05)
        upstream = bus.get_connection_metrics()["public"]["upstream"]
        assert upstream["gateway"] is None
        assert upstream["nats_url"] == nats_server.url
        assert any("no gateway is leading" in r.getMessage() for r in caplog.records)
        assert not component.messages()

        async with processes() as start:
            gateway = await start([*UPBUS, "gateway"], "gateway", gateway_env(nats_server, sim))
            await component.wait_for(lambda: len(component.messages()) >= 1, 15)
            assert bus.get_connection_metrics()["public"]["upstream"]["state"] == "connected"
            assert any("leading" in x for x in gateway.lines)


async def test_a_remote_bus_without_nats_url_names_the_setting() -> None:
    with pytest.raises(upbus.ConfigError, match="nats_url"):
        async with upbus.Bus(upstream="gateway", autoload_plugins=False):
            pass


async def test_a_cleanly_stopped_remote_leaves_the_upstream_at_once(
    nats_server: NatsServer, sim: Simulator
) -> None:
    async with processes() as start:
        env = {**gateway_env(nats_server, sim), "UPBUS_NATS__LEASE_TTL": "10"}
        await leading_gateway(start, env)
        remote_env = {"UPBUS_NATS__LEASE_TTL": "10"}
        stays = await start([*REMOTE, nats_server.url, "ticker", "KRW-ETH"], "stays", remote_env)
        leaves = await start([*REMOTE, nats_server.url, "ticker", "KRW-BTC"], "leaves", remote_env)
        await stays.wait_for(lambda lines: data_codes(lines) == {"KRW-ETH"}, 15)
        await leaves.wait_for(lambda lines: data_codes(lines) == {"KRW-BTC"}, 15)
        await sim.wait_until(lambda: ticker_codes(sim) == {"KRW-BTC", "KRW-ETH"}, 5)

        leaves.process.send_signal(signal.SIGTERM)
        # Well within the 10 s lease: the lease was deleted, not left to expire.
        await sim.wait_until(lambda: ticker_codes(sim) == {"KRW-ETH"}, 3)
        with anyio.fail_after(5):
            assert await leaves.process.wait() == 0


async def test_a_paused_leader_stops_publishing_and_steps_down_when_it_wakes(
    nats_server: NatsServer, sim: Simulator
) -> None:
    async with processes() as start:
        first, second = await leader_and_standby(start, gateway_env(nats_server, sim))
        async with remote_bus(nats_server) as bus:
            component = Collector()
            await bus.register_component(component, [upbus.trade("KRW-BTC", "KRW-ETH")])
            await component.wait_for(lambda: len(component.messages()) >= 10, 15)

            first.process.send_signal(signal.SIGSTOP)
            await second.wait_for(lambda lines: any("leading" in x for x in lines), 10)
            await component.wait_for(lambda: component.states()[-1:] == ["reconnected"], 10)
            resumed = len(component.items)
            await component.wait_for(lambda: len(component.items) >= resumed + 10, 10)

            first.process.send_signal(signal.SIGCONT)
            await first.wait_for(lambda lines: any("standing by" in x for x in lines), 10)
            woke = len(component.items)
            await component.wait_for(lambda: len(component.items) >= woke + 20, 10)
            # The woken leader published nothing it could deliver, and caused no gap.
            assert "gap" not in component.states()[component.states().index("reconnected") :]
            trades = [item.sequential_id for _t, item in component.messages()]
            assert len(trades) == len(set(trades)), "a trade was delivered twice"


async def test_private_data_crosses_nats_only_when_enabled_and_only_to_its_account(
    nats_server: NatsServer,
) -> None:

    async with Simulator(funded_config(rate=20.0)) as sim, processes() as start:
        env = private_env(gateway_env(nats_server, sim), publish=True)
        await leading_gateway(start, env)
        async with (
            remote_bus(nats_server, account="alice") as alice,
            remote_bus(nats_server, account="mallory") as mallory,
        ):
            mine, theirs = Collector(), Collector()
            await alice.register_component(mine, [upbus.my_order()])
            await mallory.register_component(theirs, [upbus.my_order()])
            await sim.wait_until(
                lambda: any(
                    r.endpoint == "private" and isinstance(r.parsed, Subscribe)
                    for r in sim.requests
                ),
                10,
            )
            await mine.wait_for(lambda: "connected" in mine.states(), 10)
            await theirs.wait_for(lambda: "connected" in theirs.states(), 10)
            order = sim.place_order(ACCESS, "KRW-BTC", "BID", "limit", price="1000", volume="1")
            sim.cancel_order(order)
            await mine.wait_for(lambda: len(mine.messages()) >= 2, 10)
            assert {m.state for _t, m in mine.messages()} == {"wait", "cancel"}
            assert not theirs.messages()


async def test_a_gateway_without_publish_private_serves_no_private_data(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:

    async with Simulator(funded_config(rate=20.0)) as sim, processes() as start:
        env = private_env(gateway_env(nats_server, sim), publish=False)
        await leading_gateway(start, env, "-v")
        async with remote_bus(nats_server, account="alice") as bus:
            component = Collector()
            await bus.register_component(component, [upbus.my_order(), upbus.ticker("KRW-BTC")])
            await component.wait_for(lambda: len(component.messages()) >= 3, 15)
            sim.place_order(ACCESS, "KRW-BTC", "BID", "limit", price="1000", volume="1")
            await component.wait_for(lambda: len(component.messages()) >= 10, 15)
            assert {m.type for _t, m in component.messages()} == {"ticker"}
            assert not any(c.endpoint == "private" for c in sim.connections)


def permissions_config(store: Path, port: int) -> str:
    """docs/scale-out.md's server configuration, on ``port``, with Bob added like Alice."""
    from docs_blocks import extract

    (block,) = [b for b in extract("docs/scale-out.md") if "authorization {" in b.text]
    text = block.text.replace("127.0.0.1:4222", f"127.0.0.1:{port}")
    text = text.replace('store_dir: "nats-store"', f'store_dir: "{store}"')
    alice = text[text.index("    {\n      user: alice") : text.rindex("    }\n") + 6]
    bob = alice.replace("alice", "bob")
    return text.replace(alice, alice + bob)


async def test_the_documented_permissions_keep_one_accounts_orders_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from natsserver import BINARY, free_port, require_nats_server

    require_nats_server()
    port = free_port()
    (tmp_path / "nats.conf").write_text(permissions_config(tmp_path / "store", port))
    server = await anyio.open_process(
        [BINARY, "-c", str(tmp_path / "nats.conf"), "-l", str(tmp_path / "nats.log")]
    )

    def url(user: str) -> str:
        return f"nats://{user}:{user}-secret@127.0.0.1:{port}"

    try:
        async with Simulator(funded_config(rate=20.0)) as sim, processes() as start:
            base = {
                **gateway_env(NatsServer(tmp_path, port), sim),
                "UPBUS_NATS_URL": url("gateway"),
            }
            env = private_env(base, publish=True)
            await leading_gateway(start, env)
            settings = {"upstream": "gateway", "autoload_plugins": False}
            async with (
                upbus.Bus(**settings, nats_url=url("alice"), nats={"account": "alice"}) as alice,
                upbus.Bus(**settings, nats_url=url("bob"), nats={"account": "alice"}) as bob,
            ):
                mine, stolen = Collector(), Collector()
                await alice.register_component(mine, [upbus.my_order(), upbus.ticker("KRW-BTC")])
                await bob.register_component(stolen, [upbus.my_order(), upbus.ticker("KRW-BTC")])
                await mine.wait_for(
                    lambda: any(m.type == "ticker" for _t, m in mine.messages()), 15
                )
                await stolen.wait_for(
                    lambda: any(m.type == "ticker" for _t, m in stolen.messages()), 15
                )
                await sim.wait_until(
                    lambda: any(
                        r.endpoint == "private" and isinstance(r.parsed, Subscribe)
                        for r in sim.requests
                    ),
                    10,
                )
                order = sim.place_order(ACCESS, "KRW-BTC", "BID", "limit", price="1000", volume="1")
                sim.cancel_order(order)
                await mine.wait_for(
                    lambda: sum(m.type == "myOrder" for _t, m in mine.messages()) >= 2, 10
                )
                # Bob reads market data, and Alice's orders not at all.
                assert not [m for _t, m in stolen.messages() if m.type == "myOrder"]
                refusals = [r.getMessage().lower() for r in caplog.records]
                assert any("permissions violation" in r and ".alice." in r for r in refusals)
    finally:
        server.kill()
        await server.wait()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_remote_bus_on_trio_is_a_clear_error(nats_server: NatsServer) -> None:
    with pytest.raises(upbus.ConfigError, match="asyncio only"):
        async with remote_bus(nats_server):
            pass


def test_a_remote_bus_without_the_nats_extra_says_how_to_install_it() -> None:
    import subprocess

    program = (
        "import sys\n"
        "sys.modules['nats'] = None  # as if the extra were not installed\n"
        "import anyio, upbus\n"
        "async def main():\n"
        "    async with upbus.Bus(upstream='gateway', nats_url='nats://127.0.0.1:1'):\n"
        "        pass\n"
        "anyio.run(main)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environment(),
        check=False,
    )
    assert ran.returncode == 1
    assert "upbus.core._errors.ConfigError" in ran.stderr
    assert "needs the nats extra: pip install 'upbus[nats]'" in ran.stderr
