"""``upbus run`` recording into PostgreSQL, stopped by SIGTERM as a service manager does."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from clirun import UPBUS, clean_environment
from pgtest import DSN
from required import import_or_skip

# The postgres extra is optional; the test extra installs it, so CI runs these tests.
psycopg = import_or_skip("psycopg", "the postgres extra (psycopg) is not installed")

TABLES = ("tickers", "trades", "orderbooks", "candles", "my_orders", "my_assets")


def postgres_rows(schema: str) -> int:
    with psycopg.connect(DSN, autocommit=True) as db:
        return sum(
            db.execute(f'SELECT count(*) FROM "{schema}"."{t}"'.encode()).fetchone()[0]
            for t in TABLES
        )


def sqlite_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        present = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        return sum(
            db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES if t in present
        )


@pytest.mark.parametrize("with_sqlite", [False, True], ids=["postgres", "postgres+sqlite"])
def test_sigterm_stops_run_and_postgres_holds_every_accepted_message(
    tmp_path: Path, schema: str, with_sqlite: bool
) -> None:
    database = tmp_path / "upbus.db"
    store = ["--db", str(database)] if with_sqlite else ["--no-store"]
    # The default flush_interval (1 s) leaves rows accepted but unwritten at the
    # signal: the stop must write them.
    env = clean_environment(
        UPBUS_PLUGINS__POSTGRES__ENABLED="true",
        UPBUS_PLUGINS__POSTGRES__DSN=DSN,
        UPBUS_PLUGINS__POSTGRES__SCHEMA=schema,
    )
    process = subprocess.Popen(
        [*UPBUS, "run", "--sim", *store, "--status-every", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        assert f"schema {schema}" in process.stdout.readline()
        # Status lines count what arrived on the connection; stop once a good number
        # has (the store subscribes once its schema is ready, so it has fewer).
        for line in process.stderr:
            found = re.search(r"(\d+) messages", line)
            if found and int(found.group(1)) >= 60:
                break
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == 0, err
    stored = re.search(r"stored (\d+) of (\d+) accepted messages in postgresql .* schema", out)
    assert stored is not None, out
    written, accepted = int(stored.group(1)), int(stored.group(2))
    assert accepted >= 20
    assert written == accepted == postgres_rows(schema)
    if with_sqlite:
        stored = re.search(rf"stored (\d+) of (\d+) accepted messages in {database}", out)
        assert stored is not None, out
        assert int(stored.group(1)) == int(stored.group(2)) == sqlite_rows(database) >= 20
