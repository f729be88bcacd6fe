"""W3C trace context over the daemon's wire (issue 19, docs/adr/0016-metrics-traces-cors.md).

One trace from a program's span, through ``inferd.Client``'s request frame, the
daemon's ``inferd.request`` span, to the ``traceparent`` header an ``OpenAICompat``
upstream receives. The daemon runs in-process (the SDK's in-memory exporter sees its
spans) on a real Unix socket; the upstream is a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import pytest

try:  # the test extra installs the SDK; CI fails here rather than skip (conftest.missing)
    import opentelemetry.sdk  # noqa: F401
except ImportError:
    from tests.conftest import missing

    missing("the opentelemetry SDK (the inferd[otel] extra)")

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inferd.backends.mock import Mock
from inferd.backends.openai_compat import OpenAICompat
from inferd.serve import wire
from inferd.serve.client import Client
from inferd.serve.daemon import Daemon
from inferd.tracing import MAX_TRACE_HEADER_CHARS
from inferd.types import Request

from .otel_spans import memory_spans
from .serve_helpers import RawConn, gen_frame, short_tmpdir
from .upstream import Stream, Upstream, text_stream

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """The process's one exporter (tests/otel_spans.py), cleared per test."""
    return memory_spans()


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def _request_span(spans: InMemorySpanExporter):  # type: ignore[no-untyped-def]
    found = [s for s in spans.get_finished_spans() if s.name == "inferd.request"]
    assert len(found) == 1, [s.name for s in spans.get_finished_spans()]
    return found[0]


async def test_one_trace_from_client_span_through_daemon_to_upstream(spans) -> None:
    up = await Upstream().start()
    try:
        url = up.script("t", Stream(text_stream(["he", "llo"])))
        with short_tmpdir() as d:
            daemon = Daemon(OpenAICompat(url, api_key=""), d / "infer.sock")
            await daemon.start()
            try:
                async with Client(d / "infer.sock") as client:
                    tracer = trace.get_tracer("test-program")
                    with tracer.start_as_current_span("program") as mine:
                        text = [e async for e in client.generate(Request.chat("hi"))]
            finally:
                await daemon.drain()
                await daemon.close()
        assert text, "the reply streamed"
        received = up.requests("t")
    finally:
        await up.stop()
    req = _request_span(spans)
    want = mine.get_span_context()
    # the daemon's request span is a child of the program's span: one trace
    assert req.context.trace_id == want.trace_id
    assert req.parent is not None and req.parent.span_id == want.span_id
    # the upstream got the daemon's request span as its parent, in the same trace
    (got,) = received
    version, trace_id, parent_id, _flags = got.headers["traceparent"].split("-")
    assert version == "00" and trace_id == _hex(want.trace_id, 32)
    assert parent_id == _hex(req.context.span_id, 16)


async def test_without_a_client_span_the_daemon_starts_a_new_trace(spans) -> None:
    """The control: no span, no ``trace`` in the frame, the daemon's span is a root."""
    with short_tmpdir() as d:
        daemon = Daemon(Mock(["a", "b"]), d / "infer.sock")
        await daemon.start()
        try:
            async with Client(d / "infer.sock") as client:
                assert [e async for e in client.generate(Request.chat("hi"))]
        finally:
            await daemon.drain()
            await daemon.close()
    req = _request_span(spans)
    assert req.parent is None


async def test_raw_frame_traceparent_is_the_parent(spans) -> None:
    """Any client speaking NDJSON (not only ``Client``) continues its trace."""
    with short_tmpdir() as d:
        daemon = Daemon(Mock(["a"]), d / "infer.sock")
        await daemon.start()
        try:
            conn = await RawConn.open(d / "infer.sock")
            await conn.send({**gen_frame(1), "trace": {"traceparent": TRACEPARENT}})
            got = await conn.until_terminal({1})
            assert got[1][-1]["type"] == "done"
            await conn.close()
        finally:
            await daemon.drain()
            await daemon.close()
    req = _request_span(spans)
    assert _hex(req.context.trace_id, 32) == TRACE_ID
    assert _hex(req.parent.span_id, 16) == "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("trace_value", "named"),
    [
        ("00-abc", "trace must be an object"),
        ({"traceparent": 7}, "trace must be an object"),
        ({"baggage": "x=1"}, "trace must be an object"),
        ({"traceparent": "0" * (MAX_TRACE_HEADER_CHARS + 1)}, "MAX_TRACE_HEADER_CHARS"),
    ],
)
async def test_bad_trace_field_is_refused_by_name_and_the_connection_goes_on(
    trace_value, named
) -> None:
    with short_tmpdir() as d:
        daemon = Daemon(Mock(["a"]), d / "infer.sock")
        await daemon.start()
        try:
            conn = await RawConn.open(d / "infer.sock")
            await conn.send({**gen_frame(1), "trace": trace_value})
            (err,) = (await conn.until_terminal({1}))[1]
            assert err["type"] == "error" and err["code"] == wire.INVALID_REQUEST
            assert named in err["message"]
            await conn.send(gen_frame(2))
            assert (await conn.until_terminal({2}))[2][-1]["type"] == "done"
            await conn.close()
        finally:
            await daemon.drain()
            await daemon.close()


async def test_bridge_in_front_of_a_daemon_keeps_the_http_callers_trace(spans) -> None:
    """HTTP ``traceparent`` -> the bridge's span -> ``Client``'s frame -> the daemon's
    span: both ``inferd.request`` spans are in the caller's trace, the daemon's a child
    of the bridge's."""
    from aiohttp.test_utils import TestClient, TestServer

    from inferd.serve.bridge import make_app

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with short_tmpdir() as d:
        daemon = Daemon(Mock(["a", "b"]), d / "infer.sock")
        await daemon.start()
        try:
            async with (
                Client(d / "infer.sock") as client,
                TestClient(TestServer(make_app(client), host="127.0.0.1")) as tc,
            ):
                r = await tc.post(
                    "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}
                )
                assert r.status == 200, await r.text()
        finally:
            await daemon.drain()
            await daemon.close()
    reqs = [s for s in spans.get_finished_spans() if s.name == "inferd.request"]
    assert len(reqs) == 2
    assert {_hex(s.context.trace_id, 32) for s in reqs} == {TRACE_ID}
    (bridge,) = [s for s in reqs if _hex(s.parent.span_id, 16) == "00f067aa0ba902b7"]
    (inner,) = [s for s in reqs if s is not bridge]
    assert inner.parent.span_id == bridge.context.span_id
