"""One in-memory span exporter for the whole test process.

OpenTelemetry's API accepts one global TracerProvider per process, so two test modules
that each install their own provider with their own exporter see nothing in whichever
runs second. Every tracing test takes its spans from here (ADR 0016).
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

EXPORTER = InMemorySpanExporter()
_installed: list[TracerProvider] = []


def memory_spans() -> InMemorySpanExporter:
    """The process's exporter, installed on first use and cleared for each test."""
    if not _installed:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        _installed.append(provider)
    EXPORTER.clear()
    return EXPORTER
