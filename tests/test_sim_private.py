"""The simulator's private endpoint: JWT auth, myOrder and myAsset, over loopback sockets."""

from __future__ import annotations

import base64
import json
import uuid
from decimal import Decimal
from typing import Any

import anyio
import jwt
import pytest
from upbit_samples import SAMPLES
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from upbus.sim import AccountConfig, OrderError, SimConfig, Simulator

pytestmark = pytest.mark.anyio

ACCESS = "test-access-key"
# 64 characters: long enough for HS512 without PyJWT's short-key warning.
SECRET = "s" * 64
OTHER = "other-access-key"


def config(**overrides: Any) -> SimConfig:
    settings: dict[str, Any] = {
        "error_close_delay": 0.02,
        "close_timeout": 0.5,
        "accounts": (
            AccountConfig(ACCESS, SECRET, {"KRW": Decimal("1000000"), "BTC": Decimal("0.5")}),
            AccountConfig(OTHER, "o" * 64, {"KRW": Decimal(10)}),
        ),
    }
    settings.update(overrides)
    return SimConfig(**settings)


def token(algorithm: str = "HS256", secret: str = SECRET, **claims: Any) -> str:
    payload = {"access_key": ACCESS, "nonce": str(uuid.uuid4()), **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def recv(ws: ClientConnection) -> Any:
    with anyio.fail_after(5):
        frame = await ws.recv()
    assert isinstance(frame, bytes)
    return json.loads(frame, parse_float=Decimal)


async def subscribe(ws: ClientConnection, *entries: dict[str, Any], fmt: str = "DEFAULT") -> None:
    await ws.send(json.dumps([{"ticket": "p"}, *entries, {"format": fmt}]))


# -- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
async def test_valid_tokens_are_accepted(algorithm: str) -> None:
    async with Simulator(config()) as sim:
        async with connect(sim.private_url, additional_headers=bearer(token(algorithm))):
            assert sim.connections[-1].access_key == ACCESS
        assert not sim.violations
        assert dict(sim.connections[-1].headers)["authorization"] == "<redacted>"


def _unsigned() -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {"access_key": ACCESS, "nonce": str(uuid.uuid4())}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


BAD_HEADERS = {
    "no header": {},
    "not bearer": {"Authorization": f"Basic {token()}"},
    "alg none": bearer(_unsigned()),
    "bad signature": bearer(token(secret="x" * 64)),
    "unknown key": bearer(token(access_key="nobody")),
    "no nonce": bearer(jwt.encode({"access_key": ACCESS}, SECRET, algorithm="HS256")),
    "nonce not a uuid": bearer(token(nonce="12345")),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
async def test_bad_credentials_get_401(case: str) -> None:
    async with Simulator(config()) as sim:
        with pytest.raises(InvalidStatus) as info:
            async with connect(sim.private_url, additional_headers=BAD_HEADERS[case]):
                pass
        response = info.value.response
        assert response.status_code == 401
        assert json.loads(response.body or b"")["error"]["name"] == "INVALID_AUTH"
        assert [v.kind for v in sim.violations] == ["auth"]


async def test_a_reused_nonce_is_refused() -> None:
    headers = bearer(token())
    async with Simulator(config()) as sim:
        async with connect(sim.private_url, additional_headers=headers):
            pass
        with pytest.raises(InvalidStatus):
            async with connect(sim.private_url, additional_headers=headers):
                pass
        assert sim.violations[-1].detail == "nonce was used before"


async def test_auth_failure_as_an_error_frame() -> None:
    async with Simulator(config(auth_failure="frame")) as sim, connect(sim.private_url) as ws:
        assert (await recv(ws))["error"]["name"] == "INVALID_AUTH"
        with anyio.fail_after(5), pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1000


async def test_public_types_are_refused_on_the_private_endpoint() -> None:
    headers = bearer(token())
    async with (
        Simulator(config()) as sim,
        connect(sim.private_url, additional_headers=headers) as ws,
    ):
        await subscribe(ws, {"type": "ticker", "codes": ["KRW-BTC"]})
        assert (await recv(ws))["error"]["name"] == "INVALID_PARAM"


async def test_codes_on_my_asset_are_a_wrong_format() -> None:
    headers = bearer(token())
    async with (
        Simulator(config()) as sim,
        connect(sim.private_url, additional_headers=headers) as ws,
    ):
        await subscribe(ws, {"type": "myAsset", "codes": ["KRW-BTC"]})
        assert (await recv(ws))["error"]["name"] == "WRONG_FORMAT"


async def test_private_connects_are_limited_per_access_key_not_per_ip() -> None:
    async with Simulator(config(connect_limit=(5, 10.0))) as sim:
        for _ in range(5):
            async with connect(sim.public_url):
                pass
        for _ in range(5):  # the IP's budget is spent; the key has its own
            async with connect(sim.private_url, additional_headers=bearer(token())):
                pass
        with pytest.raises(InvalidStatus) as info:
            async with connect(sim.private_url, additional_headers=bearer(token())):
                pass
        assert info.value.response.status_code == 429
        assert [v.kind for v in sim.violations] == ["connect_rate"]


# -- orders and balances -----------------------------------------------------------------


def _asset(message: dict[str, Any]) -> dict[str, tuple[Decimal, Decimal]]:
    return {a["currency"]: (a["balance"], a["locked"]) for a in message["assets"]}


async def test_limit_buy_partial_then_full_fill() -> None:
    async with Simulator(config()) as sim:
        async with connect(sim.private_url, additional_headers=bearer(token())) as ws:
            await subscribe(ws, {"type": "myOrder"}, {"type": "myAsset"})
            await sim.wait_for_requests(1)
            order = sim.place_order(
                ACCESS, "KRW-BTC", "BID", "limit", price="100000000", volume="0.003"
            )
            wait = await recv(ws)
            assert (wait["type"], wait["state"], wait["uuid"]) == ("myOrder", "wait", order)
            assert wait["locked"] == Decimal("300150")  # 300000 + 0.05 % fee
            assert (wait["trade_uuid"], wait["trade_fee"], wait["is_maker"]) == (None, None, None)
            assert _asset(await recv(ws)) == {"KRW": (Decimal("699850"), Decimal("300150"))}

            sim.fill_order(order, volume="0.001", price="99000000", is_maker=False)
            trade = await recv(ws)
            assert (trade["state"], trade["price"], trade["volume"]) == (
                "trade",
                Decimal(99000000),
                Decimal("0.001"),
            )
            assert trade["trade_fee"] == Decimal("49.5")
            assert trade["remaining_volume"] == Decimal("0.002")
            assert trade["is_maker"] is False
            # 100050 was reserved for 0.001; 99049.5 was spent; 1000.5 comes back.
            assert _asset(await recv(ws)) == {
                "KRW": (Decimal("700850.5"), Decimal("200100")),
                "BTC": (Decimal("0.501"), Decimal(0)),
            }

            sim.fill_order(order)
            assert (await recv(ws))["state"] == "trade"
            done = await recv(ws)
            assert (done["state"], done["executed_volume"], done["trades_count"]) == (
                "done",
                Decimal("0.003"),
                2,
            )
            assert done["avg_price"] == Decimal("99666666.66666667")
            assert done["locked"] == 0
            assert _asset(await recv(ws)) == {
                "KRW": (Decimal("700850.5"), Decimal(0)),
                "BTC": (Decimal("0.503"), Decimal(0)),
            }
        balances = sim.balances(ACCESS)
        assert (balances["KRW"].balance, balances["BTC"].balance) == (
            Decimal("700850.5"),
            Decimal("0.503"),
        )
        assert not sim.violations


async def test_market_buy_by_amount_reports_nulls_like_the_exchange() -> None:
    sample = json.loads((SAMPLES / "myOrder.json").read_text(encoding="utf-8"))
    live = next(e for e in sample["examples"] if e["id"] == "myorder-wait-live-ccxt-2025")
    headers = bearer(token())
    async with (
        Simulator(config()) as sim,
        connect(sim.private_url, additional_headers=headers) as ws,
    ):
        await subscribe(ws, {"type": "myOrder", "codes": []})
        await sim.wait_for_requests(1)
        sim.place_order(ACCESS, "KRW-BTC", "BID", "price", price="5000")
        wait = await recv(ws)
    assert wait.keys() == live["message"].keys()
    nulls = {key for key, value in live["message"].items() if value is None}
    assert {key for key, value in wait.items() if value is None} == nulls
    for key in ("order_type", "state", "price", "avg_price", "reserved_fee", "locked"):
        assert wait[key] == live["message"][key], key


async def test_limit_sell_cancelled() -> None:
    async with Simulator(config()) as sim:
        async with connect(sim.private_url, additional_headers=bearer(token())) as ws:
            await subscribe(ws, {"type": "myOrder"}, {"type": "myAsset"}, fmt="SIMPLE")
            await sim.wait_for_requests(1)
            order = sim.place_order(
                ACCESS, "KRW-BTC", "ASK", "limit", price="150000000", volume="0.2"
            )
            assert (await recv(ws))["s"] == "wait"
            assert (await recv(ws))["ast"] == [
                {"cu": "BTC", "b": Decimal("0.3"), "l": Decimal("0.2")}
            ]
            sim.cancel_order(order)
            cancel = await recv(ws)
            assert (cancel["ty"], cancel["s"], cancel["rv"]) == (
                "myOrder",
                "cancel",
                Decimal("0.2"),
            )
            assert (await recv(ws))["ast"] == [{"cu": "BTC", "b": Decimal("0.5"), "l": 0}]
        with pytest.raises(OrderError):
            sim.cancel_order(order)


async def test_my_order_codes_filter_and_type_filter() -> None:
    headers = bearer(token())
    async with (
        Simulator(config()) as sim,
        connect(sim.private_url, additional_headers=headers) as ws,
    ):
        await subscribe(ws, {"type": "myOrder", "codes": ["KRW-ETH"]})
        await sim.wait_for_requests(1)
        sim.place_order(ACCESS, "KRW-BTC", "BID", "limit", price="1000", volume="1")
        sim.place_order(OTHER, "KRW-ETH", "BID", "limit", price="1", volume="1")
        sim.place_order(ACCESS, "KRW-ETH", "BID", "limit", price="1000", volume="1")
        # Only our KRW-ETH order, and no myAsset: that type is not subscribed.
        first = await recv(ws)
        assert (first["code"], first["type"]) == ("KRW-ETH", "myOrder")
        await ws.send("PING")
        assert await recv(ws) == {"status": "UP"}


async def test_orders_the_exchange_would_refuse() -> None:
    async with Simulator(config()) as sim:
        with pytest.raises(OrderError):  # 10 KRW cannot lock 1000
            sim.place_order(OTHER, "KRW-BTC", "BID", "limit", price="1000", volume="1")
        with pytest.raises(OrderError):
            sim.place_order(ACCESS, "KRW-BTC", "ASK", "price", price="1000")
        order = sim.place_order(ACCESS, "KRW-BTC", "BID", "limit", price="1000", volume="1")
        with pytest.raises(OrderError):  # a buy never fills above its limit
            sim.fill_order(order, price="1001")
        with pytest.raises(OrderError):
            sim.fill_order(order, volume="2")
        assert sim.order(order).state == "wait"
