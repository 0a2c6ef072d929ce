"""The PostgreSQL store across real server restarts, on a cluster of the test's own.

The test makes a throwaway cluster (``initdb``), starts it on a free port and restarts
it twice while a bus records into it: once as an operator does (``pg_ctl restart -m
fast``: backends are told to go, the server checkpoints) and once as a crash does
(``-m immediate``: no checkpoint; the next start replays the WAL). The server must
not run as root, so as root it runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from required import import_or_skip, skip_unless_required
from simbus import Recorder, make_bus

from upbus.plugins import postgres_store
from upbus.sim import SimConfig, Simulator

# The postgres extra is optional; the test extra installs it, so CI runs these.
psycopg = import_or_skip("psycopg", "the postgres extra (psycopg) is not installed")

pytestmark = pytest.mark.anyio

SPECS = [
    {"type": "ticker", "codes": ["KRW-BTC", "KRW-ETH"]},
    {"type": "trade", "codes": ["KRW-BTC", "KRW-ETH"]},
]
TABLES = ("tickers", "trades", "orderbooks", "candles", "my_orders", "my_assets")


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(rate=1000.0)


def server_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on the PATH, or Debian's versioned one."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for folder in reversed(folders):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Cluster:
    """A PostgreSQL cluster in a temporary folder, run by ``pg_ctl``."""

    bin: Path
    folder: Path
    port: int
    runas: list[str]

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        data, log = self.folder / "data", self.folder / "log"
        command = [str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options]
        done = subprocess.run(
            [*self.runas, *command, "-w", "-t", "20", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"pg_ctl {' '.join(args)}: {done.stderr}\n{self.log()}"

    def log(self) -> str:
        path = self.folder / "log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A fresh cluster of the test's own, listening on a free port; removed after the test."""
    binaries = server_binaries()
    if binaries is None:
        skip_unless_required("PostgreSQL server binaries (initdb, pg_ctl) not found")
    runas: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root.
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            skip_unless_required("running as root and no postgres user to run PostgreSQL as")
        runuser = shutil.which("runuser")
        if runuser is None:
            skip_unless_required("running as root and no runuser to run PostgreSQL as postgres")
        runas = [str(runuser), "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="upbus-pg-"))
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    try:
        subprocess.run(
            [
                *runas,
                str(binaries / "initdb"),
                "-D",
                str(folder / "data"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        server = Cluster(binaries, folder, free_port(), runas)
        server.pg_ctl("start")
        try:
            yield server
        finally:
            server.pg_ctl("stop", "-m", "immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as db:
        return db.execute(sql.encode()).fetchall()


async def test_restarts_of_the_server_lose_and_duplicate_no_accepted_row(
    sim: Simulator, cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "upbus.plugins.postgres")
    section = {
        "enabled": True,
        "dsn": cluster.dsn,
        "specs": SPECS,
        "batch_size": 20,
        "flush_interval": 0.02,
    }
    bus = make_bus(sim, debounce=0.01, reconnect={}, plugins={"postgres": section})
    async with bus:
        store = postgres_store.store_for(bus)
        assert store is not None
        watcher = Recorder()
        await bus.register_component(watcher, SPECS)
        for mode in ("fast", "immediate"):
            await watcher.wait_for(lambda: store.written >= 100)
            written = store.written
            # In a thread: the bus goes on accepting messages while the server is away.
            await anyio.to_thread.run_sync(cluster.pg_ctl, "restart", "-m", mode)
            # Rows accepted while the server was down, written after it came back.
            await watcher.wait_for(lambda w=written: store.written >= w + 200, timeout=20)
    stats = store.stats()
    assert stats["lost"] == stats["pending"] == 0
    assert stats["written"] == stats["accepted"]
    assert caplog.text.count("reconnected") >= 2, caplog.text
    counts = [query(cluster.dsn, f"SELECT count(*) FROM upbus.{t}")[0][0] for t in TABLES]
    assert sum(counts) == stats["accepted"]
    # Ids are given once per message: 1 … accepted, each once, means nothing missing
    # and nothing written twice.
    ids = " UNION ALL ".join(f"SELECT id FROM upbus.{t}" for t in TABLES)
    ((low, high, distinct),) = query(
        cluster.dsn, f"SELECT min(id), max(id), count(DISTINCT id) FROM ({ids}) AS all_ids"
    )
    assert (low, high, distinct) == (1, stats["accepted"], stats["accepted"])
    ((trades, sequence),) = query(
        cluster.dsn, "SELECT count(*), count(DISTINCT (code, sequential_id)) FROM upbus.trades"
    )
    assert trades == sequence > 0
