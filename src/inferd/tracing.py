"""OpenTelemetry spans for requests, when the ``inferd[otel]`` extra is installed.

Why optional: most users run one model on one machine and want no tracing stack; an
operator with a collector installs ``inferd[otel]`` and configures the SDK as usual
(exporter, sampler), and inferd's spans join the traces their callers started
(W3C ``traceparent``, ADR 0016). Without the extra, :func:`tracer` is ``None``: the
import is tried once, and a request pays one ``is None`` check.

Spans: ``inferd.request`` per generation (backend, model, token counts, TTFT, stop
reason, error) with children ``inferd.first_token`` (from the request to its first
event: queueing and prompt processing, as seen from outside the backend) and
``inferd.decode`` (first event to the end). Their times are the marks the metrics
take anyway, so tracing adds no per-token work.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

try:  # the one guarded import: everything below checks ``_trace is None``
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    _trace = None  # type: ignore[assignment]
    _propagate = None  # type: ignore[assignment]

#: The instrumentation scope name spans are recorded under.
TRACER_NAME = "inferd"
#: W3C trace-context headers read from a request and sent upstream.
TRACE_HEADERS = ("traceparent", "tracestate")
#: Longest trace header value accepted (the W3C format is 55 characters; tracestate
#: is bounded at 512 by the spec).
MAX_TRACE_HEADER_CHARS = 512

#: The caller's trace headers for the request being served (set by the bridge's
#: middleware, read when the request's span starts: same task, so same context).
incoming: ContextVar[Mapping[str, str] | None] = ContextVar("inferd_trace_headers", default=None)
#: The trace headers of the request span being served (set by ObservedBackend while the
#: stream runs; read by :func:`outgoing_headers`).
outgoing: ContextVar[Mapping[str, str] | None] = ContextVar("inferd_trace_out", default=None)


def available() -> bool:
    """True when the OpenTelemetry API is importable."""
    return _trace is not None


def tracer() -> Any:
    """The inferd tracer, or ``None`` without the extra."""
    if _trace is None:
        return None
    return _trace.get_tracer(TRACER_NAME)


def trace_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The W3C trace headers of an incoming request (bounded), or ``None``."""
    out = {
        k: v
        for k in TRACE_HEADERS
        if (v := headers.get(k)) is not None and len(v) <= MAX_TRACE_HEADER_CHARS
    }
    return out or None


def parent_context(headers: Mapping[str, str] | None) -> Any:
    """The OpenTelemetry context a request's span starts in (its caller's trace)."""
    if _propagate is None or not headers:
        return None
    return _propagate.extract(dict(headers))


def outgoing_headers() -> dict[str, str]:
    """Trace headers for a request made to another service (an HTTP upstream, the
    daemon) while serving or making a request: the request span being served (set by
    ``ObservedBackend``), else the caller's current OpenTelemetry span (a program that
    calls ``Client`` or ``OpenAICompat`` inside its own span), else empty. The callee
    continues that trace (W3C ``traceparent``)."""
    served = outgoing.get()
    if served:
        return dict(served)
    if _propagate is None:
        return {}
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_HEADERS}


def headers_for(span: Any) -> dict[str, str]:
    """``span``'s W3C trace headers."""
    carrier: dict[str, str] = {}
    if _propagate is not None and span is not None:
        _propagate.inject(carrier, context=_trace.set_span_in_context(span))
    return carrier


def error_status(span: Any, exc: BaseException) -> None:
    """Mark ``span`` failed with the exception's type and inferd error code."""
    span.set_attribute("error.type", type(exc).__name__)
    code = getattr(exc, "code", None)
    if code:
        span.set_attribute("inferd.error_code", str(code))
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, type(exc).__name__))


def child(tracer: Any, name: str, parent: Any, start_ns: int, end_ns: int) -> None:
    """A finished child span of ``parent`` covering ``[start_ns, end_ns]``."""
    ctx = _trace.set_span_in_context(parent)
    tracer.start_span(name, context=ctx, start_time=start_ns).end(end_time=end_ns)


__all__ = [
    "MAX_TRACE_HEADER_CHARS",
    "TRACER_NAME",
    "TRACE_HEADERS",
    "available",
    "child",
    "error_status",
    "headers_for",
    "incoming",
    "outgoing",
    "outgoing_headers",
    "parent_context",
    "trace_headers",
    "tracer",
]
