"""What only the picows transport does, and how the plugin is chosen.

The shared contract is in ``test_transport``; here are picows's own TLS and proxy
settings, its receive buffer and read pausing, pongs written without a reader, the
choice between transports, and a Bus on picows end to end. The transport runs on
asyncio only; every wait is bounded with ``anyio.fail_after``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest
from simbus import Recorder, settings_for
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsservers import WAIT, Peer, connected, receive, serve, server_tls

import upbus
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel
from upbus.core.wire._httpx import HttpxWsTransport
from upbus.core.wire._picows import PicowsConnection, PicowsTransport, proxy_from_environment
from upbus.plugins import picows_transport
from upbus.plugins.replay import ReplayTransport
from upbus.sim import SimConfig, Simulator

# -- connecting --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_wss_with_a_given_tls_context(certificate: Path) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept(TextMessage("over tls"))
        await peer.expect(CloseConnection)

    trust = ssl.create_default_context(cafile=certificate / "cert.pem")
    async with (
        serve(handler, server_tls(certificate)) as url,
        PicowsTransport(ssl_context=trust, trust_env=False) as transport,
    ):
        with anyio.fail_after(WAIT):
            conn = await transport.connect(url, {})
            assert await conn.receive_batch() == ["over tls"]
            await conn.aclose()


@pytest.mark.anyio
async def test_connect_goes_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tunnels: list[bytes] = []

    async def proxy(client: anyio.abc.SocketStream) -> None:
        """A minimal HTTP CONNECT proxy."""
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await client.receive()
            request_line = head.split(b"\r\n", 1)[0]
            tunnels.append(request_line)
            host, port = request_line.split(b" ")[1].rsplit(b":", 1)
            async with await anyio.connect_tcp(host.decode(), int(port)) as upstream:
                await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")

                async def pipe(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                    try:
                        async for chunk in a:
                            await b.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    with anyio.CancelScope(shield=True):
                        await b.send_eof()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(pipe, client, upstream)
                    tg.start_soon(pipe, upstream, client)

    async def handler(peer: Peer) -> None:
        await peer.accept(TextMessage("through the tunnel"))
        await peer.expect(CloseConnection)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    proxy_port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg, serve(handler) as url:
        tg.start_soon(listener.serve, proxy)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with PicowsTransport() as transport:
            with anyio.fail_after(WAIT):
                conn = await transport.connect(url, {})
                assert await conn.receive_batch() == ["through the tunnel"]
                await conn.aclose()
        tg.cancel_scope.cancel()
    server_port = url.split(":")[2].split("/")[0]
    assert tunnels == [f"CONNECT 127.0.0.1:{server_port} HTTP/1.1".encode()]


def test_proxy_from_environment_follows_httpx_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    proxy_for = proxy_from_environment
    assert proxy_for("wss://api.upbit.com/websocket/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://secure-proxy:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy:3128")
    assert proxy_for("wss://api.upbit.com/websocket/v1") == "http://secure-proxy:3128"
    assert proxy_for("ws://127.0.0.1:8765/websocket/v1") == "http://plain-proxy:3128"
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert proxy_for("ws://127.0.0.1:8765/websocket/v1") is None
    assert proxy_for("wss://api.upbit.com/websocket/v1") == "http://secure-proxy:3128"
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("ALL_PROXY", "socks5://socks:1080")
    assert proxy_for("wss://api.upbit.com/websocket/v1") == "socks5://socks:1080"


# -- receiving ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_reader_that_falls_behind_pauses_the_socket_and_loses_nothing() -> None:
    frames = [BytesMessage(b"%05d" % i) for i in range(2000)]

    async def handler(peer: Peer) -> None:
        await peer.accept()
        for start in range(0, len(frames), 100):
            await peer.send(*frames[start : start + 100])
        await peer.next_event()

    transport = PicowsTransport(max_pending=50, trust_env=False)
    received: list[bytes | str] = []
    async with connected(handler, transport) as conn:
        assert isinstance(conn, PicowsConnection)
        with anyio.fail_after(WAIT):
            # Nobody reads: the socket stops being read. (Polled: no event to wait on.)
            while not conn._read_paused:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert 50 <= len(conn._batch) < 2000
        while len(received) < len(frames):
            received += await receive(conn)
    assert received == [f.data for f in frames]


@pytest.mark.anyio
async def test_a_backlog_comes_back_in_bounded_batches_in_order() -> None:
    frames = [BytesMessage(b"%05d" % i) for i in range(3000)]

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(*frames)
        await peer.next_event()

    transport = PicowsTransport(max_pending=1000, trust_env=False)
    sizes: list[int] = []
    received: list[bytes | str] = []
    async with connected(handler, transport) as conn:
        assert isinstance(conn, PicowsConnection)
        with anyio.fail_after(WAIT):
            while not conn._read_paused:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            while len(received) < len(frames):
                batch = await conn.receive_batch()
                sizes.append(len(batch))
                received += batch
    assert received == [f.data for f in frames]
    assert max(sizes) == 256  # the backlog was over 256 and came back in slices


@pytest.mark.parametrize("size", [300_000, None])
@pytest.mark.anyio
async def test_the_socket_receive_buffer_is_bounded_unless_told_otherwise(
    size: int | None,
) -> None:
    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.next_event()

    transport = PicowsTransport(receive_buffer=size, trust_env=False)
    async with connected(handler, transport) as conn:
        assert isinstance(conn, PicowsConnection)
        assert conn._transport is not None
        sock = conn._transport.underlying_transport.get_extra_info("socket")
        actual = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if size is None:
        with socket.socket() as fresh:  # what the kernel gives a socket nobody set
            assert actual == fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    else:
        assert actual == 2 * size  # Linux doubles the value set, for its bookkeeping


@pytest.mark.anyio
async def test_server_ping_is_answered_without_a_reader() -> None:
    """picows answers pings as they arrive, unlike the default transport."""
    answered = anyio.Event()
    pongs: list[bytes] = []

    async def handler(peer: Peer) -> None:
        await peer.accept()
        await peer.send(Ping(b"hb-1"))
        pongs.append((await peer.expect(Pong)).payload)  # type: ignore[attr-defined]
        answered.set()
        await peer.send(TextMessage("after the pong"))
        await peer.next_event()

    async with connected(handler, PicowsTransport(trust_env=False)) as conn:
        with anyio.fail_after(WAIT):
            await answered.wait()  # nobody is in receive_batch
        assert await receive(conn) == ["after the pong"]
    assert pongs == [b"hb-1"]


# -- choosing the transport --------------------------------------------------------------


def load(**settings: object) -> tuple[PluginManager, upbus.Settings]:
    loaded = upbus.Settings(**settings)  # type: ignore[arg-type]
    return PluginManager.load(loaded), loaded


@pytest.mark.anyio
async def test_auto_on_asyncio_with_picows_installed_chooses_picows() -> None:
    manager, settings = load(heartbeat_timeout=3.0)
    transport = manager.make_transport(Channel.PUBLIC, settings)
    assert isinstance(transport, PicowsTransport)
    assert (transport._handshake_timeout, transport._close_timeout) == (3.0, 3.0)
    assert manager.make_transport(Channel.PRIVATE, settings) is not transport
    await transport.aclose()


@pytest.mark.anyio
async def test_httpx_setting_chooses_the_default_transport() -> None:
    manager, settings = load(transport="httpx")
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), HttpxWsTransport)


@pytest.mark.anyio
async def test_a_configured_recording_still_beats_auto(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    manager, settings = load(plugins={"replay": {"path": str(path)}})
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), ReplayTransport)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_on_trio_auto_falls_back_and_picows_is_refused() -> None:
    manager, settings = load()
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), HttpxWsTransport)
    manager, settings = load(transport="picows")
    with pytest.raises(upbus.ConfigError, match="asyncio backend") as caught:
        manager.make_transport(Channel.PUBLIC, settings)
    assert "running on trio" in str(caught.value)
    assert "pip install 'upbus[fast]'" in str(caught.value)


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_connect_refuses_trio() -> None:
    with pytest.raises(upbus.ConfigError, match="asyncio backend only"):
        await PicowsTransport().connect("ws://127.0.0.1:9/", {})


def test_outside_an_event_loop_auto_keeps_the_default() -> None:
    manager, settings = load()
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), HttpxWsTransport)
    manager, settings = load(transport="picows")  # checked again at connect
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), PicowsTransport)


@pytest.mark.anyio
async def test_without_picows_auto_falls_back_and_picows_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(picows_transport, "picows_installed", lambda: False)
    manager, settings = load()
    assert isinstance(manager.make_transport(Channel.PUBLIC, settings), HttpxWsTransport)
    manager, settings = load(transport="picows")
    with pytest.raises(upbus.ConfigError, match="picows package is not installed"):
        manager.make_transport(Channel.PUBLIC, settings)


def test_the_plugin_module_loads_without_picows() -> None:
    script = """
import sys
sys.modules["picows"] = None  # import picows now raises ImportError
import asyncio
import upbus
from upbus.core.hooks._manager import PluginManager
from upbus.core.subscriptions._specs import Channel
from upbus.core.wire._httpx import HttpxWsTransport

async def main():
    settings = upbus.Settings()
    manager = PluginManager.load(settings)
    assert not manager.errors, manager.errors
    assert manager.is_registered("picows")
    transport = manager.make_transport(Channel.PUBLIC, settings)
    assert isinstance(transport, HttpxWsTransport), transport
    settings = upbus.Settings(transport="picows")
    try:
        manager.make_transport(Channel.PUBLIC, settings)
    except upbus.ConfigError as exc:
        print(exc)
    assert "upbus.core.wire._picows" not in sys.modules

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "needs the picows package (pip install 'upbus[fast]')" in result.stdout


# -- end to end --------------------------------------------------------------------------


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=200.0)


@pytest.mark.anyio
async def test_a_bus_on_picows_delivers_tickers_from_the_simulator(sim: Simulator) -> None:
    async with upbus.Bus(settings_for(sim, transport="picows", debounce=0.02)) as bus:
        component = Recorder()
        await bus.register_component(component, upbus.ticker("KRW-BTC", "KRW-ETH"))
        await component.wait_for(lambda: len(component.messages) >= 20, WAIT)
        assert isinstance(bus._managers[Channel.PUBLIC]._transport, PicowsTransport)
        metrics = bus.get_connection_metrics()["public"]
    assert {message.code for message in component.messages} <= {"KRW-BTC", "KRW-ETH"}
    assert metrics["messages_in"] >= 20
    assert metrics["connects"] == 1
