"""``upbus run --otel``: the batching spans exported from the command line, as a user runs it."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from clirun import UPBUS, clean_environment
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from upbus.cli._otel import tracing

# A store on the simulator subscribes, so the batcher has something to send and trace.
RUN = ("run", "--sim", "--seconds", "1", "--db", "upbus.db")
BATCHING_SPANS = {"create upbit.public", "send upbit.public"}


def otel_env(**extra: str) -> dict[str, str]:
    """A clean environment without the OTel variables of whoever runs the tests."""
    clean = {k: v for k, v in clean_environment().items() if not k.startswith("OTEL_")}
    return {**clean, **extra}


def upbus(
    *args: str, cwd: Path, code: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``upbus *args`` to completion, or ``python -c code *args`` when ``code`` is given."""
    command = [sys.executable, "-c", code] if code is not None else UPBUS
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=otel_env(**env),
        check=False,
    )


def spans_on(stderr: str) -> list[dict[str, Any]]:
    """The console exporter's spans: one JSON object per line."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith('{"name": ')]


# -- a collector: a plain HTTP server that keeps what is POSTed to /v1/traces ---------


@dataclass
class Collector:
    url: str
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    received: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    hold: bool = False  # answer nothing until `release` is set, like a stuck collector

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) of every span received."""
        found = []
        for _path, body in self.bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    assert scope_spans.scope.name == "upbus"
                    found += [(resource, span) for span in scope_spans.spans]
        return found


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


@pytest.fixture
def collector() -> Iterator[Collector]:
    seen: Collector

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.bodies.append((self.path, body))
            seen.received.set()
            if seen.hold:
                seen.release.wait(60)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    seen = Collector(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        seen.release.set()
        server.shutdown()
        server.server_close()


# -- console --------------------------------------------------------------------------


def test_otel_console_prints_the_batching_spans_on_stderr(tmp_path: Path) -> None:
    result = upbus(*RUN, "--otel", "console", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # stdout is the command's usual output, no span in it.
    assert re.fullmatch(
        r"upbus running against .*; Ctrl-C stops\n"
        r"stored (\d+) of \1 accepted messages in upbus.db\n",
        result.stdout,
    ), result.stdout
    spans = {span["name"]: span for span in spans_on(result.stderr)}
    assert set(spans) == BATCHING_SPANS, result.stderr
    create, send = spans["create upbit.public"], spans["send upbit.public"]
    assert create["kind"] == "SpanKind.PRODUCER"
    assert create["attributes"]["messaging.operation.name"] == "register"
    assert create["attributes"]["upbus.component"].startswith("SqliteStore@")
    assert send["kind"] == "SpanKind.CLIENT"
    assert send["parent_id"] is None
    assert send["attributes"]["messaging.system"] == "upbit"
    assert send["attributes"]["messaging.destination.name"] == "public"
    assert send["attributes"]["upbus.request.types"] == ["ticker", "trade"]
    assert send["attributes"]["messaging.message.body.size"] > 0
    assert [link["context"]["span_id"] for link in send["links"]] == [create["context"]["span_id"]]
    assert send["resource"]["attributes"]["service.name"] == "upbus"


def test_spans_are_exported_when_a_signal_stops_run(tmp_path: Path) -> None:
    process = subprocess.Popen(
        # --seconds bounds the test should the messages never come; the signal comes first.
        [*UPBUS, "run", "--sim", "--seconds", "20", "--status-every", "0.1", "--otel", "console"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=otel_env(),
    )
    assert process.stderr is not None
    seen = []
    try:
        # Messages arriving means the subscription went out, so both spans have ended.
        for line in process.stderr:
            seen.append(line)
            if re.search(r"public: connected, [1-9]\d* messages", line):
                break
        else:
            pytest.fail("no messages arrived:\n" + "".join(seen))
        process.send_signal(signal.SIGTERM)
        _out, rest = process.communicate(timeout=30)
    finally:
        process.kill()
        process.communicate()
    err = "".join(seen) + rest
    assert process.returncode == 0, err
    assert "upbus: stopping" in err
    assert {span["name"] for span in spans_on(err)} == BATCHING_SPANS, err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("on_terminal", [True, False], ids=["terminal", "redirected"])
def test_console_spans_follow_a_live_view_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, on_terminal: bool
) -> None:
    # A live view swaps sys.stderr while it draws, for a proxy that prints above it on
    # the terminal; stderr redirected to a file must keep the spans all the same.
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    original = Terminal() if on_terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", original)
    with tracing("console") as provider:
        assert provider is not None
        proxy = io.StringIO()
        monkeypatch.setattr(sys, "stderr", proxy)
        provider.get_tracer("test").start_span("drawn").end()
    written, untouched = (proxy, original) if on_terminal else (original, proxy)
    assert [span["name"] for span in spans_on(written.getvalue())] == ["drawn"]
    assert untouched.getvalue() == ""


# -- OTLP/HTTP --------------------------------------------------------------------------


def test_otel_otlp_posts_the_spans_to_the_collector(tmp_path: Path, collector: Collector) -> None:
    result = upbus(
        *RUN,
        "--otel",
        "otlp",
        cwd=tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_SERVICE_NAME="trading-box",
    )
    assert result.returncode == 0, result.stderr
    assert not spans_on(result.stderr)
    assert {path for path, _body in collector.bodies} == {"/v1/traces"}
    spans = {span.name: (resource, span) for resource, span in collector.spans()}
    assert set(spans) == BATCHING_SPANS
    resource, send = spans["send upbit.public"]
    assert resource["service.name"] == "trading-box"  # OTEL_SERVICE_NAME wins over "upbus"
    sent = attributes(send.attributes)
    assert sent["messaging.operation.type"] == "send"
    assert sent["upbus.request.types"] == ["ticker", "trade"]
    assert sent["upbus.request.entries"] == 2
    _resource, create = spans["create upbit.public"]
    assert [link.span_id for link in send.links] == [create.span_id]


def test_otel_traces_exporter_variable_selects_the_exporters(
    tmp_path: Path, collector: Collector
) -> None:
    result = upbus(
        *RUN,
        cwd=tmp_path,
        OTEL_TRACES_EXPORTER="console,otlp",
        # The signal's own endpoint is used as it is, path included.
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{collector.url}/collect/traces",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    assert result.returncode == 0, result.stderr
    assert {span["name"] for span in spans_on(result.stderr)} == BATCHING_SPANS
    assert {path for path, _body in collector.bodies} == {"/collect/traces"}
    assert {span.name for _resource, span in collector.spans()} == BATCHING_SPANS
    assert {resource["service.name"] for resource, _span in collector.spans()} == {"upbus"}


def test_the_option_overrides_the_variable(tmp_path: Path, collector: Collector) -> None:
    result = upbus(
        *RUN,
        "--otel",
        "console",
        cwd=tmp_path,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
    )
    assert result.returncode == 0, result.stderr
    assert {span["name"] for span in spans_on(result.stderr)} == BATCHING_SPANS
    assert collector.bodies == []  # the process has exited: nothing can still arrive


def test_without_otel_nothing_is_exported_and_the_sdk_is_not_loaded(
    tmp_path: Path, collector: Collector
) -> None:
    code = (
        "import sys\n"
        "from upbus.cli import main\n"
        "main(sys.argv[1:], standalone_mode=False)\n"
        "print('sdk loaded:', 'opentelemetry.sdk' in sys.modules)\n"
    )
    result = upbus(*RUN, cwd=tmp_path, code=code, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url)
    assert result.returncode == 0, result.stderr
    assert "sdk loaded: False" in result.stdout
    assert "stored" in result.stdout
    assert not spans_on(result.stderr)
    assert collector.bodies == []


def test_a_signal_during_a_stuck_export_stops_waiting(tmp_path: Path, collector: Collector) -> None:
    collector.hold = True
    env = otel_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_EXPORTER_OTLP_TIMEOUT="60",
        OTEL_BSP_SCHEDULE_DELAY="60000",  # the only export is the one at exit
    )
    process = subprocess.Popen(
        [*UPBUS, *RUN, "--otel", "otlp"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        if not collector.received.wait(30):
            process.kill()
            pytest.fail("no export at exit:\n" + "".join(process.communicate()))
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)  # well before the 60 s export timeout
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 0, err
    assert "stored" in out, out
    assert "upbus: stopped before the remaining spans were exported" in err, err
    assert "Traceback" not in err


def test_the_variable_adds_no_provider_to_a_configured_one(tmp_path: Path) -> None:
    # As under opentelemetry-instrument: the program set a global provider first.
    code = (
        "import sys\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "exporter = InMemorySpanExporter()\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(exporter))\n"
        "trace.set_tracer_provider(provider)\n"
        "from upbus.cli import main\n"
        "main(sys.argv[1:], standalone_mode=False)\n"
        "print('global:', sorted({s.name for s in exporter.get_finished_spans()}))\n"
    )
    result = upbus(*RUN, cwd=tmp_path, code=code, OTEL_TRACES_EXPORTER="console")
    assert result.returncode == 0, result.stderr
    assert "global: ['create upbit.public', 'send upbit.public']" in result.stdout
    assert not spans_on(result.stderr)  # not exported a second time


# -- without the otel extra ---------------------------------------------------------------

# The SDK made unimportable, as it is where only upbus's dependencies are installed.
WITHOUT_SDK = (
    "import sys\n"
    "sys.modules['opentelemetry.sdk'] = None\n"
    "from upbus.cli import main\n"
    "main(sys.argv[1:])\n"
)


@pytest.mark.parametrize("command", ["run", "demo"])
def test_otel_without_the_extra_is_one_error_line(tmp_path: Path, command: str) -> None:
    args = RUN if command == "run" else ("demo", "--seconds", "1")
    result = upbus(*args, "--otel", "otlp", cwd=tmp_path, code=WITHOUT_SDK)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: exporting spans to otlp needs the otel extra: pip install 'upbus[otel]'\n"
    )
    assert result.stdout == ""


def test_without_the_extra_the_variable_alone_only_warns(tmp_path: Path) -> None:
    result = upbus(*RUN, cwd=tmp_path, code=WITHOUT_SDK, OTEL_TRACES_EXPORTER="console")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "upbus: OTEL_TRACES_EXPORTER ignored; exporting spans to console needs the otel "
        "extra: pip install 'upbus[otel]'"
    ]
    assert "stored" in result.stdout


def test_demo_takes_otel_too(tmp_path: Path) -> None:
    result = upbus("demo", "--seconds", "1", "--otel", "console", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = [span["name"] for span in spans_on(result.stderr)]
    # Three components register; their changes share one request.
    assert names.count("create upbit.public") == 3
    assert names.count("send upbit.public") == 1
    assert "shared" in result.stdout
