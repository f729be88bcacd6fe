"""OpenTelemetry spans per request (docs/adr/0016-metrics-traces-cors.md), recorded with
the SDK's in-memory exporter; the caller's W3C ``traceparent`` is honoured."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

try:  # the test extra installs the SDK; CI fails here rather than skip (conftest.missing)
    import opentelemetry.sdk  # noqa: F401
except ImportError:
    from tests.conftest import missing

    missing("the opentelemetry SDK (the inferd[otel] extra)")

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from inferd import tracing
from inferd.backends.mock import Mock
from inferd.serve.bridge import make_app
from inferd.serve.observed import ObservedBackend
from inferd.serve.prometheus import Telemetry
from inferd.types import Request

from .otel_spans import memory_spans

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TOKENS = ["a ", "b ", "c"]


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """The process's one exporter (tests/otel_spans.py), cleared per test."""
    return memory_spans()


def body(stream: bool) -> dict:
    return {"model": "m1", "stream": stream, "messages": [{"role": "user", "content": "x y z"}]}


@pytest.mark.parametrize("stream", [False, True])
async def test_request_span_joins_the_callers_trace(spans, stream):
    app = make_app(Mock(TOKENS))
    async with TestClient(TestServer(app)) as tc:
        r = await tc.post(
            "/v1/chat/completions", json=body(stream), headers={"traceparent": TRACEPARENT}
        )
        assert r.status == 200
        await r.read()
    got = {s.name: s for s in spans.get_finished_spans()}
    assert set(got) == {"inferd.request", "inferd.first_token", "inferd.decode"}
    req = got["inferd.request"]
    assert format(req.context.trace_id, "032x") == TRACE_ID
    assert req.parent is not None and format(req.parent.span_id, "016x") == PARENT_ID
    a = req.attributes
    assert a["inferd.backend"] == "mock" and a["gen_ai.request.model"] == "m1"
    assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 3
    assert a["inferd.stop_reason"] == "end_turn" and a["inferd.outcome"] == "ok"
    assert a["inferd.ttft_s"] >= 0
    for child in ("inferd.first_token", "inferd.decode"):
        assert got[child].parent.span_id == req.context.span_id
        assert req.start_time <= got[child].start_time <= got[child].end_time <= req.end_time
    assert got["inferd.first_token"].end_time == got["inferd.decode"].start_time


async def test_without_traceparent_a_new_trace(spans):
    app = make_app(Mock(TOKENS))
    async with TestClient(TestServer(app)) as tc:
        r = await tc.post("/v1/chat/completions", json=body(False))
        assert r.status == 200
    (req,) = [s for s in spans.get_finished_spans() if s.name == "inferd.request"]
    assert req.parent is None


async def test_error_span(spans):
    app = make_app(Mock(pre_stream_error="unavailable"))
    async with TestClient(TestServer(app)) as tc:
        r = await tc.post("/v1/chat/completions", json=body(False))
        assert r.status >= 500
    (req,) = [s for s in spans.get_finished_spans() if s.name == "inferd.request"]
    assert req.status.status_code == trace.StatusCode.ERROR
    assert req.attributes["inferd.error_code"] == "backend_unavailable"
    assert req.attributes["inferd.outcome"] == "backend_unavailable"


def test_trace_headers_are_bounded():
    long = "00-" + "a" * tracing.MAX_TRACE_HEADER_CHARS
    assert tracing.trace_headers({"traceparent": long}) is None
    assert tracing.trace_headers({"traceparent": TRACEPARENT}) == {"traceparent": TRACEPARENT}
    assert tracing.trace_headers({"x-other": "1"}) is None


async def test_no_spans_without_the_extra(spans, monkeypatch):
    """Where the API is not importable, ``tracer()`` is None and nothing is recorded."""
    monkeypatch.setattr(tracing, "_trace", None)
    monkeypatch.setattr(tracing, "_propagate", None)
    assert tracing.tracer() is None and not tracing.available()
    b = ObservedBackend(Mock(TOKENS), Telemetry())
    req = Request.from_dict({"messages": [{"role": "user", "content": "hi"}]})
    events = [e async for e in b.generate(req)]
    assert events and spans.get_finished_spans() == ()


class _Recording(Mock):
    """A Mock that records the trace headers an HTTP backend would send upstream."""

    seen: list[dict[str, str]]

    async def generate(self, request):  # type: ignore[override]
        self.seen.append(tracing.outgoing_headers())
        async for ev in super().generate(request):
            yield ev


async def test_outgoing_headers_carry_the_request_span(spans):
    inner = _Recording(TOKENS)
    inner.seen = []
    app = make_app(inner)
    async with TestClient(TestServer(app)) as tc:
        r = await tc.post(
            "/v1/chat/completions", json=body(True), headers={"traceparent": TRACEPARENT}
        )
        assert r.status == 200
        await r.read()
    (req,) = [s for s in spans.get_finished_spans() if s.name == "inferd.request"]
    span_id = format(req.context.span_id, "016x")
    assert inner.seen == [{"traceparent": f"00-{TRACE_ID}-{span_id}-01"}]
    assert tracing.outgoing_headers() == {}  # nothing leaks past the request


async def test_openai_compat_sends_the_request_spans_traceparent_upstream(spans):
    """Bridge (caller's traceparent) -> OpenAICompat -> a real HTTP upstream: the upstream
    receives the inferd.request span's traceparent, so its spans join the caller's trace."""
    from inferd.backends.openai_compat import OpenAICompat

    from .upstream import QUIRKS, Stream, Upstream

    up = await Upstream().start()
    try:
        base = up.script("trace", Stream(QUIRKS["plain"].pieces))
        backend = OpenAICompat(base_url=base, model="m", api_key="k")
        async with TestClient(TestServer(make_app(backend))) as tc:
            r = await tc.post(
                "/v1/chat/completions", json=body(True), headers={"traceparent": TRACEPARENT}
            )
            assert r.status == 200
            await r.read()
        await backend.aclose()
    finally:
        await up.stop()
    (req,) = [s for s in spans.get_finished_spans() if s.name == "inferd.request"]
    span_id = format(req.context.span_id, "016x")
    (received,) = up.requests("trace")
    sent = {k.lower(): v for k, v in received.headers.items()}
    assert sent["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"
