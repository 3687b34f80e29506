"""OpenTelemetry: an OTLP exporter when `--otlp-endpoint` is given, W3C trace context across processes.

Without an endpoint the tracer is OpenTelemetry's no-op default: spans cost next to nothing.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import propagate, trace

TRACER_NAME = "tokenmill"


def setup_tracing(otlp_endpoint: str | None, service_name: str) -> None:
    """Export spans over OTLP/gRPC to `otlp_endpoint` (e.g. http://localhost:4317)."""
    if not otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def extract_context(carrier: dict[str, Any]) -> Any:
    """The trace context of an incoming request (HTTP headers or gRPC metadata, W3C `traceparent`)."""
    return propagate.extract(carrier)


def inject_context() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata, for the hop to a model server."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())
