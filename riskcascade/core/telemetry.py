"""OpenTelemetry set-up and the few span helpers the rest of the code uses.

Every process (the orchestrator and each Ray Serve replica) calls ``configure_tracing`` once with the same
TracingSettings; spans then go to the configured exporter. Ray Serve does not carry our context through
``handle.remote()``, so callers inject W3C trace context into a plain dict (``inject_context``) that travels as
an argument, and replicas continue the trace from it (``span(..., carrier=...)``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from riskcascade.core.config import TracingSettings

TRACER_NAME = "riskcascade"
_lock = threading.Lock()
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None


def configure_tracing(settings: TracingSettings, component: str) -> TracerProvider | None:
    """Install a tracer provider for this process (first call wins); None when tracing is off."""
    global _provider
    with _lock:
        if _provider is not None or settings.exporter == "none":
            return _provider
        resource = Resource.create(
            {"service.name": f"{settings.service_name}-{component}", "riskcascade.component": component}
        )
        provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio))
        )
        if settings.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True)
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def shutdown_tracing() -> None:
    """Flush and stop this process's exporter (call on clean shutdown)."""
    with _lock:
        if _provider is not None:
            _provider.force_flush()
            _provider.shutdown()


def tracer() -> trace.Tracer:
    """This process's tracer, looked up once (OpenTelemetry's proxy tracer follows a provider set later)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


def inject_context() -> dict[str, str]:
    """The current trace context as a W3C carrier dict, to pass through a Ray Serve handle call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextmanager
def span(name: str, carrier: dict[str, str] | None = None, links: Sequence[dict[str, str]] = (),
         **attributes: Any) -> Iterator[trace.Span]:
    """A span named ``name``; with ``carrier`` it continues the trace the carrier came from. ``links`` are
    carriers of other spans this one also serves (a batch call links the calls it carries, OTel's way)."""
    parent = propagate.extract(carrier) if carrier else None
    token = otel_context.attach(parent) if parent is not None else None
    span_links = [trace.Link(c) for c in _span_contexts(links)] if links else None
    try:
        with tracer().start_as_current_span(name, attributes=attributes or None, links=span_links) as current:
            yield current
    finally:
        if token is not None:
            otel_context.detach(token)


def _span_contexts(carriers: Sequence[dict[str, str]]) -> Iterator[trace.SpanContext]:
    for carrier in carriers:
        context = trace.get_current_span(propagate.extract(carrier)).get_span_context()
        if context.is_valid:
            yield context


def current_trace_id() -> str:
    """The current trace id as 32 hex characters, or "" when no trace is recorded."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
