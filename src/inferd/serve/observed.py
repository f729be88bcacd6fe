"""A Backend wrapper that counts each request (Prometheus) and traces it (OpenTelemetry).

Why a wrapper: every route of the bridge (chat, Messages, Responses) and the daemon's
request loop call ``backend.generate``; wrapping the backend once instruments all of
them without touching their code (docs/adr/0016-metrics-traces-cors.md). Per event
the wrapper does one
``is None`` check (the first-event mark) and one type check (``Done``); everything
else happens once, when the stream ends.

Everything a route reads beyond the Backend interface (``render``,
``tokenize_prompt``, ``connect``, ``backends``...) is forwarded to the wrapped backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from inferd import tracing
from inferd.backend import Backend
from inferd.errors import InferdError
from inferd.serve.prometheus import CANCELLED, CONTENT_TYPE_LATEST, INCOMPLETE, OK, Telemetry
from inferd.types import Capabilities, Done, EmbedRequest, EmbedResult, Event, Request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ObservedBackend(Backend):
    """``inner`` with metrics in ``telemetry`` and, with ``inferd[otel]``, spans."""

    def __init__(self, inner: Backend, telemetry: Telemetry, *, tracer: Any = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.telemetry = telemetry
        self._tracer = tracer if tracer is not None else tracing.tracer()
        telemetry.watch(inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def ready(self) -> bool:
        return self.inner.ready()

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    async def refresh_state(self) -> None:
        await self.inner.refresh_state()

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return await self.inner.embed(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def generate(self, request: Request) -> AsyncIterator[Event]:  # type: ignore[override]
        span, start_ns = None, 0
        if self._tracer is not None:
            start_ns = time.time_ns()
            span = _start_span(self._tracer, self.inner.name, request, start_ns)
        start = time.perf_counter()
        first: float | None = None
        done: Done | None = None
        outcome = CANCELLED
        error: BaseException | None = None
        stream = self.inner.generate(request)
        self.telemetry.in_flight.inc()
        out = None if span is None else tracing.outgoing.set(tracing.headers_for(span))
        try:
            async for event in stream:
                if first is None:
                    first = time.perf_counter()
                if type(event) is Done:  # complete, even if the consumer stops here
                    done, outcome = event, OK
                yield event
            if done is None:
                outcome = INCOMPLETE
        except InferdError as e:
            outcome, error = e.code, e
            raise
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as e:
            outcome, error = "internal", e
            raise
        finally:
            if out is not None:
                with contextlib.suppress(ValueError):  # closed from another context
                    tracing.outgoing.reset(out)
            self.telemetry.in_flight.dec()
            self.telemetry.finish(
                self.inner.name, request.model, outcome, start=start, first=first, done=done
            )
            if span is not None:
                _end_span(self._tracer, span, (start, start_ns), first, done, outcome, error)
            await stream.aclose()  # type: ignore[attr-defined]


def _start_span(tracer: Any, backend: str, request: Request, start_ns: int) -> Any:
    """The request's span, a child of the caller's trace when it sent ``traceparent``."""
    parent = tracing.parent_context(tracing.incoming.get())
    span = tracer.start_span("inferd.request", context=parent, start_time=start_ns)
    span.set_attribute("inferd.backend", backend)
    if request.model:
        span.set_attribute("gen_ai.request.model", request.model)
    return span


def _end_span(
    tracer: Any,
    span: Any,
    marks: tuple[float, int],
    first: float | None,
    done: Done | None,
    outcome: str,
    error: BaseException | None,
) -> None:
    """Attributes, the first-token and decode children, then the end of the span."""
    now = time.perf_counter()
    start, start_ns = marks
    end_ns = start_ns + int((now - start) * 1e9)
    span.set_attribute("inferd.outcome", outcome)
    if first is not None:
        first_ns = start_ns + int((first - start) * 1e9)
        span.set_attribute("inferd.ttft_s", first - start)
        tracing.child(tracer, "inferd.first_token", span, start_ns, first_ns)
        tracing.child(tracer, "inferd.decode", span, first_ns, end_ns)
    if done is not None:
        u = done.usage
        span.set_attribute("inferd.stop_reason", done.stop_reason.value)
        span.set_attribute("gen_ai.usage.input_tokens", u.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", u.output_tokens)
        span.set_attribute("inferd.usage.cached_tokens", u.cached_tokens)
        if done.backend:
            span.set_attribute("inferd.backend", done.backend)
    if error is not None:
        tracing.error_status(span, error)
    span.end(end_time=end_ns)


# --------------------------------------------------------------------------- the bridge

TELEMETRY_KEY = web.AppKey("telemetry", Telemetry)


@web.middleware
async def _trace_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Make the caller's ``traceparent`` visible to the request's span (same task)."""
    token = tracing.incoming.set(tracing.trace_headers(request.headers))
    try:
        return await handler(request)
    finally:
        tracing.incoming.reset(token)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text exposition, rendered in a worker thread (a
    scrape may wait up to one decode step for a scheduler's KV query; streams don't)."""
    body = await asyncio.to_thread(request.app[TELEMETRY_KEY].render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def instrument(app: web.Application, backend: Backend, *, tracer: Any = None) -> ObservedBackend:
    """Serve ``/metrics`` on ``app``, read ``traceparent``; returns the backend to serve."""
    telemetry = Telemetry()
    app[TELEMETRY_KEY] = telemetry
    app.router.add_get("/metrics", metrics)
    if tracing.available() or tracer is not None:
        app.middlewares.append(_trace_headers)
    return ObservedBackend(backend, telemetry, tracer=tracer)
