"""`upbus run` — the main job — and what it records, as a user runs it."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import orjson
import pytest
from clirun import UPBUS, clean_environment, run_upbus

from upbus.plugins.replay import read_recording

TABLES = ("tickers", "trades", "orderbooks", "candles", "my_orders", "my_assets")


def rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        present = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        return sum(
            db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES if t in present
        )


@pytest.mark.parametrize(
    "stops",
    [[signal.SIGTERM], [signal.SIGINT], [signal.SIGTERM, signal.SIGTERM, signal.SIGINT]],
    ids=["SIGTERM", "SIGINT", "repeated"],
)
def test_a_signal_stops_run_and_every_accepted_message_is_stored(
    tmp_path: Path, stops: list[int]
) -> None:
    database = tmp_path / "upbus.db"
    process = subprocess.Popen(
        [*UPBUS, "run", "--sim", "--db", str(database), "--status-every", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=clean_environment(),
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        assert "recording into" in process.stdout.readline()
        # Status lines count what arrived; stop once a good number has.
        for line in process.stderr:
            found = re.search(r"(\d+) messages", line)
            if found and int(found.group(1)) >= 40:
                break
        process.send_signal(stops[0])
        if stops[1:]:  # a double Ctrl-C while it stops must not cut the flush short
            for line in process.stderr:
                if "upbus: stopping" in line:
                    break
            for stop in stops[1:]:
                process.send_signal(stop)
        out, _err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == 0
    stored = re.search(r"stored (\d+) of (\d+) accepted messages", out)
    assert stored is not None, out
    written, accepted = int(stored.group(1)), int(stored.group(2))
    assert accepted >= 40
    assert written == accepted == rows(database)  # N in, N out


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    database = folder / "upbus.db"
    result = run_upbus("run", "--sim", "--db", str(database), "--seconds", "1.5", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert rows(database) > 0
    return database


def test_db_summarises_what_the_store_holds(recording: Path) -> None:
    result = run_upbus("db", str(recording))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^tickers: \d+ rows", result.stdout, re.M)
    assert re.search(r"^  KRW-BTC +\d+ rows", result.stdout, re.M)


def test_replay_prints_the_recording_in_order(recording: Path) -> None:
    result = run_upbus("replay", str(recording), "--count", "6", "--format", "json")
    assert result.returncode == 0, result.stderr
    printed = [orjson.loads(line) for line in result.stdout.splitlines()]
    recorded = [orjson.loads(frame) for _at, frame in list(read_recording(recording))[:6]]
    assert [(m["type"], m["code"], m["timestamp"]) for m in printed] == [
        (m["type"], m["code"], m["timestamp"]) for m in recorded
    ]
    # Nothing connects during a replay: no connection event is shown as if it did.
    assert "connected" not in result.stderr


def test_the_status_line_tells_failing_connects_and_their_last_error(tmp_path: Path) -> None:
    refused = "ws://127.0.0.1:9/websocket/v1"  # the discard port: nothing listens
    result = run_upbus(
        "run", "--url", refused, "--seconds", "2", "--status-every", "0.3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    status = [line for line in result.stderr.splitlines() if line.startswith("public: ")]
    assert status, result.stderr
    assert "waiting for subscriptions" not in result.stderr
    failing = re.search(r"(\d+) failed connects \(last: (.+)\)$", status[-1])
    assert failing is not None, status[-1]
    assert int(failing.group(1)) >= 1
    assert "cannot connect" in failing.group(2)
    assert re.match(r"public: (connecting|backing off), 0 messages", status[-1])


def test_run_reports_the_json_lines_recorder_without_the_store(tmp_path: Path) -> None:
    env = {"UPBUS_PLUGINS__JSONL__ENABLED": "true"}
    result = run_upbus("run", "--sim", "--no-store", "--seconds", "1.5", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first, *_, last = result.stdout.splitlines()
    assert "recording into upbus.jsonl;" in first
    assert "not recording" not in result.stdout
    stored = re.fullmatch(r"stored (\d+) of (\d+) accepted messages in upbus.jsonl", last)
    assert stored is not None, result.stdout
    lines = (tmp_path / "upbus.jsonl").read_bytes().splitlines()
    assert int(stored.group(1)) == int(stored.group(2)) == len(lines) > 0
    assert not (tmp_path / "upbus.db").exists()


def test_run_reports_each_enabled_recorder(tmp_path: Path) -> None:
    env = {"UPBUS_PLUGINS__JSONL__ENABLED": "true"}
    result = run_upbus("run", "--sim", "--seconds", "1.5", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "recording into upbus.db and upbus.jsonl;" in result.stdout
    counts = dict(
        (where, (int(n), int(m)))
        for n, m, where in re.findall(
            r"stored (\d+) of (\d+) accepted messages in (\S+)", result.stdout
        )
    )
    assert counts["upbus.db"] == (rows(tmp_path / "upbus.db"),) * 2
    lines = len((tmp_path / "upbus.jsonl").read_bytes().splitlines())
    assert counts["upbus.jsonl"] == (lines, lines)


def test_replay_does_not_record_itself_into_the_store_it_replays(recording: Path) -> None:
    before = rows(recording)
    env = {"UPBUS_PLUGINS__SQLITE__ENABLED": "true", "UPBUS_PLUGINS__SQLITE__PATH": str(recording)}
    result = run_upbus("replay", str(recording), "--speed", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == before  # every recorded message, once
    assert rows(recording) == before


def test_a_store_that_cannot_start_stops_run_with_one_clear_line(tmp_path: Path) -> None:
    env = {"UPBUS_PLUGINS__SQLITE__SPECS": '[{"type": "ticker", "codes": ["x"]}]'}
    result = run_upbus("run", "--sim", "--seconds", "1", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1].startswith("Error: the SQLite store did not start")
    )


def test_replay_of_a_missing_or_empty_file_is_one_clear_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_upbus("replay", str(empty))
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {empty} holds no recorded messages"
