"""OpenTelemetry names and helpers (``opentelemetry-api`` only).

Without an SDK every call here is a cheap no-op. Attribute names follow the
messaging semantic conventions; they are spelled out here rather than imported
from the still-incubating semconv package.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind, Tracer, TracerProvider

import upbus

__all__ = (
    "BATCH_COUNT",
    "BODY_SIZE",
    "DESTINATION",
    "OPERATION_NAME",
    "OPERATION_TYPE",
    "SYSTEM",
    "change_context",
    "get_tracer",
)

SYSTEM = "messaging.system"
OPERATION_NAME = "messaging.operation.name"
OPERATION_TYPE = "messaging.operation.type"
DESTINATION = "messaging.destination.name"
BATCH_COUNT = "messaging.batch.message_count"
BODY_SIZE = "messaging.message.body.size"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"


def get_tracer(tracer_provider: TracerProvider | None = None) -> Tracer:
    """The upbus tracer, from ``tracer_provider`` or the global provider."""
    return trace.get_tracer(
        "upbus", upbus.__version__, tracer_provider=tracer_provider, schema_url=SCHEMA_URL
    )


def change_context(tracer: Tracer, channel: str, reason: str, component: str) -> SpanContext:
    """Record a subscription change as a short ``create`` span and return its context.

    Called where the user changed their subscriptions, so the span is a child of
    the caller's trace; the later send span links to it (a background task does not
    see the caller's context).
    """
    span = tracer.start_span(
        f"create upbit.{channel}",
        kind=SpanKind.PRODUCER,
        attributes={
            SYSTEM: "upbit",
            OPERATION_TYPE: "create",
            OPERATION_NAME: reason,
            DESTINATION: channel,
            "upbus.component": component,
        },
    )
    span.end()
    return span.get_span_context()
