"""``--otel console|otlp``: the batching spans of ``upbus run`` and ``upbus demo``, exported.

The SDK and the exporters come with the ``otel`` extra and are imported only when an
exporter is asked for, by the option or by ``OTEL_TRACES_EXPORTER``; otherwise the
bus keeps the global provider (a no-op unless the program configured one).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

import click

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ("EXPORTERS", "otel_option", "tracing")

EXPORTERS = ("console", "otlp")
INSTALL = "pip install 'upbus[otel]'"

F = TypeVar("F", bound=Callable[..., Any])


def otel_option(func: F) -> F:
    """Add ``--otel console|otlp``; the command receives ``tracer_provider`` (or None).

    The provider is flushed and shut down when the command's context closes, after
    the command returned, raised or was stopped by a signal.
    """

    def setup(ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
        return ctx.with_resource(tracing(value))

    return click.option(
        "--otel",
        "tracer_provider",
        type=click.Choice([*EXPORTERS, "none"]),
        callback=setup,
        help=(
            "Export the batching spans: console (JSON lines on stderr) or otlp "
            "(OTLP/HTTP, to OTEL_EXPORTER_OTLP_ENDPOINT). Default: OTEL_TRACES_EXPORTER, "
            "else none. Needs the otel extra."
        ),
    )(func)


@contextmanager
def tracing(option: str | None) -> Iterator[TracerProvider | None]:
    """An SDK provider exporting to what ``option`` (else ``OTEL_TRACES_EXPORTER``) names.

    Yields None when no exporter is asked for. On leaving, the queued spans are
    exported and the provider shut down.
    """
    names = _wanted(option)
    if not names:
        yield None
        return
    try:
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if "otlp" in names:
            from opentelemetry.exporter.otlp.proto.http import trace_exporter  # noqa: F401
    except ImportError:
        problem = f"exporting spans to {' and '.join(names)} needs the otel extra: {INSTALL}"
        if option is None:
            # Only the environment asked, perhaps for another program: run without spans.
            click.echo(f"upbus: OTEL_TRACES_EXPORTER ignored; {problem}", err=True)
            yield None
            return
        raise click.ClickException(problem) from None
    # The environment's service name and resource attributes win over the default.
    resource = Resource.create({"service.name": "upbus"}).merge(OTELResourceDetector().detect())
    # Shut down here, not at interpreter exit, so the spans are out before the
    # command's last lines and exit status.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    try:
        yield provider
    finally:
        _shut_down(provider)


def _wanted(option: str | None) -> list[str]:
    """The exporters asked for: the option's, else those of ``OTEL_TRACES_EXPORTER``."""
    if option is not None:
        return [] if option == "none" else [option]
    listed = os.environ.get("OTEL_TRACES_EXPORTER", "")
    names = [n.strip().lower() for n in listed.split(",") if n.strip() and n.strip() != "none"]
    if not names:
        return []
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # Already configured (say by opentelemetry-instrument): the bus uses that
        # global provider, and a second one would export every span twice.
        return []
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        click.echo(
            f"upbus: OTEL_TRACES_EXPORTER: {', '.join(unknown)} ignored; upbus exports "
            f"to {' or '.join(EXPORTERS)}",
            err=True,
        )
    return [n for n in dict.fromkeys(names) if n in EXPORTERS]


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stdout carries the command's data; one span per line keeps stderr greppable.
        return ConsoleSpanExporter(
            out=cast("IO[str]", _CurrentStderr()),
            formatter=lambda span: span.to_json(indent=None) + "\n",
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Without arguments it reads OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else
    # OTEL_EXPORTER_OTLP_ENDPOINT plus /v1/traces, else http://localhost:4318/v1/traces.
    return OTLPSpanExporter()


class _CurrentStderr:
    """On a terminal, whatever ``sys.stderr`` is when a span is written.

    A live view replaces ``sys.stderr`` while it draws, to print what is written there
    above the view rather than inside it. Its replacement writes to the view's terminal,
    so stderr redirected to a file keeps the original.
    """

    def __init__(self) -> None:
        self._original = sys.stderr

    def _target(self) -> IO[str]:
        return sys.stderr if self._original.isatty() else self._original

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()


class _Abandoned(Exception):
    pass


def _shut_down(provider: TracerProvider) -> None:
    """Export what is queued; a signal meanwhile gives up on it instead of a traceback.

    The recorders have written by now (the bus closed first), so only spans are at
    stake: an unreachable collector may hold the exit for up to the OTLP timeout.
    """

    def abandon(_signum: int, _frame: FrameType | None) -> None:
        raise _Abandoned

    if threading.current_thread() is not threading.main_thread():
        provider.shutdown()  # signal handlers can only be set in the main thread
        return
    previous = {sig: signal.signal(sig, abandon) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        provider.shutdown()
    except _Abandoned:
        click.echo("upbus: stopped before the remaining spans were exported", err=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
