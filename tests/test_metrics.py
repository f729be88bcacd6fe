"""Prometheus metrics (ADR 0016): ``/metrics`` parsed as a scraper parses it, after a
known workload, on the Mock backend and on SmolLM2, and the daemon's metrics port."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from inferd.backends.mock import Mock
from inferd.openai_wire import request_from_openai
from inferd.router import Router
from inferd.serve import prometheus
from inferd.serve.bridge import make_app
from inferd.serve.observed import ObservedBackend
from inferd.serve.prometheus import Telemetry
from inferd.types import Done, Request

#: Words of each of the 8 prompts (Mock counts prompt tokens as words).
PROMPTS = ["one", "one two", "a b c", "w x y z", "1 2 3 4 5", "s", "s t", "s t u"]
TOKENS = ["alpha ", "beta ", "gamma"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition: (name, sorted labels) -> value."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    got = samples(text)
    key = (name, tuple(sorted(labels.items())))
    assert key in got, f"{name}{labels} not in /metrics"
    return got[key]


def body(prompt: str, stream: bool, model: str = "m1") -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}


async def _scrape(tc: TestClient) -> str:
    r = await tc.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return await r.text()


async def test_mock_workload_counts_exactly():
    app = make_app(Mock(TOKENS))
    async with TestClient(TestServer(app)) as tc:
        for i, prompt in enumerate(PROMPTS):  # 8 requests, half of them streamed
            r = await tc.post("/v1/chat/completions", json=body(prompt, stream=i % 2 == 1))
            assert r.status == 200
            await r.read()
        text = await _scrape(tc)
    lab = {"backend": "mock", "model": "m1"}
    words = sum(len(p.split()) for p in PROMPTS)
    assert value(text, "inferd_requests_total", outcome="ok", **lab) == 8
    assert value(text, "inferd_prompt_tokens_total", **lab) == words
    assert value(text, "inferd_generated_tokens_total", **lab) == 8 * len(TOKENS)
    assert value(text, "inferd_prompt_cached_tokens_total", **lab) == 0
    assert value(text, "inferd_time_to_first_token_seconds_count", **lab) == 8
    assert value(text, "inferd_request_duration_seconds_count", **lab) == 8
    assert value(text, "inferd_time_per_output_token_seconds_count", **lab) == 8
    assert value(text, "inferd_requests_in_flight") == 0
    assert value(text, "llamacpp:prompt_tokens_total") == words
    assert value(text, "llamacpp:tokens_predicted_total") == 8 * len(TOKENS)


async def test_every_route_is_counted_and_errors_by_code():
    """The Messages route goes through the same wrapper; a refused request is counted
    under its error code."""
    app = make_app(Mock(TOKENS))
    async with TestClient(TestServer(app)) as tc:
        msg = {"model": "m2", "max_tokens": 8, "messages": [{"role": "user", "content": "x y"}]}
        r = await tc.post("/v1/messages", json=msg)
        assert r.status == 200
        text = await _scrape(tc)
    assert value(text, "inferd_requests_total", backend="mock", model="m2", outcome="ok") == 1
    assert value(text, "inferd_prompt_tokens_total", backend="mock", model="m2") == 2

    bad = make_app(Mock(pre_stream_error="invalid_request"))
    async with TestClient(TestServer(bad)) as tc:
        for _ in range(3):
            r = await tc.post("/v1/chat/completions", json=body("x", stream=False))
            assert r.status == 400
        text = await _scrape(tc)
    assert value(text, "inferd_errors_total", code="invalid_request") == 3
    lab = {"backend": "mock", "model": "m1", "outcome": "invalid_request"}
    assert value(text, "inferd_requests_total", **lab) == 3


async def test_breaker_state_per_backend_is_read_at_scrape():
    bad = Mock(pre_stream_error="unavailable", name="bad")
    router = Router([bad, Mock(TOKENS, name="good")], failure_threshold=2, open_for_s=3600)
    app = make_app(router)
    async with TestClient(TestServer(app)) as tc:
        before = await _scrape(tc)
        for _ in range(2):  # both served by "good" after "bad" fails pre-stream
            r = await tc.post("/v1/chat/completions", json=body("x", stream=False))
            assert r.status == 200
        after = await _scrape(tc)
    key = {"router": "router", "backend": "bad"}
    assert value(before, "inferd_circuit_breaker_state", state="closed", **key) == 1
    assert value(after, "inferd_circuit_breaker_state", state="open", **key) == 1
    assert value(after, "inferd_circuit_breaker_state", state="closed", **key) == 0
    good = {"router": "router", "backend": "good", "state": "closed"}
    assert value(after, "inferd_circuit_breaker_state", **good) == 1
    assert value(after, "inferd_requests_total", backend="good", model="m1", outcome="ok") == 2


async def test_cancelled_and_in_flight():
    """A stream left early counts as cancelled; in-flight is 1 while it runs, then 0."""
    t = Telemetry()
    b = ObservedBackend(Mock(["x"] * 50, delay=0.001), t)
    stream = b.generate(Request.from_dict({"messages": [{"role": "user", "content": "hi"}]}))
    await stream.__anext__()
    assert value(t.render().decode(), "inferd_requests_in_flight") == 1
    await stream.aclose()  # type: ignore[attr-defined]
    text = t.render().decode()
    assert value(text, "inferd_requests_in_flight") == 0
    assert value(text, "inferd_requests_total", backend="mock", model="", outcome="cancelled") == 1


def test_label_sets_are_bounded(monkeypatch):
    """Clients choose the model string: past MAX_LABEL_SETS pairs, one overflow series."""
    monkeypatch.setattr(prometheus, "MAX_LABEL_SETS", 4)
    t = Telemetry()
    for i in range(10):
        t.finish("mock", f"model-{i}" + "x" * 500, "ok", start=0.0, first=None, done=None)
    text = t.render().decode()
    series = [k for k in samples(text) if k[0] == "inferd_requests_total"]
    assert len(series) == 5  # 4 pairs kept + the overflow pair
    other = prometheus.OVERFLOW_LABEL
    assert value(text, "inferd_requests_total", backend=other, model=other, outcome="ok") == 6
    assert all(len(dict(k[1])["model"]) <= prometheus.MAX_LABEL_CHARS for k in series)


def test_two_apps_have_separate_registries():
    a, b = make_app(Mock()), make_app(Mock())
    from inferd.serve.observed import TELEMETRY_KEY

    assert a[TELEMETRY_KEY].registry is not b[TELEMETRY_KEY].registry


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.llama
async def test_smollm2_workload_counts_exactly(smollm2_path):
    from tests.conftest import require_llama_core

    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=1024, n_threads=1, parallel=4, max_queued=16)
    app = make_app(b)
    try:
        async with TestClient(TestServer(app)) as tc:
            text0 = await _scrape(tc)
            assert value(text0, "inferd_llamacpp_kv_cells_total", backend=b.name) == b.n_ctx

            async def one(i: int) -> dict[str, Any]:
                req = {**body(PROMPTS[i], stream=False), "max_tokens": 3 + i, "seed": i}
                r = await tc.post("/v1/chat/completions", json=req)
                assert r.status == 200
                return await r.json()

            replies = await asyncio.gather(*(one(i) for i in range(8)))
            await asyncio.to_thread(b._idle.wait, 30)
            text = await _scrape(tc)
        prompt = sum(r["usage"]["prompt_tokens"] for r in replies)
        gen = sum(r["usage"]["completion_tokens"] for r in replies)
        expected_prompt = sum(
            len(b.tokenize_prompt(b.render(request_from_openai(body(p, False))))) for p in PROMPTS
        )
        stats = b.batching_stats()
    finally:
        await b.aclose()
    assert prompt == expected_prompt and 0 < gen <= sum(3 + i for i in range(8))
    lab = {"backend": b.name, "model": "m1"}
    assert value(text, "inferd_requests_total", outcome="ok", **lab) == 8
    assert value(text, "inferd_prompt_tokens_total", **lab) == expected_prompt
    assert value(text, "inferd_generated_tokens_total", **lab) == gen
    assert value(text, "llamacpp:tokens_predicted_total") == gen
    assert value(text, "inferd_llamacpp_decode_steps_total", backend=b.name) == stats["steps"]
    assert value(text, "llamacpp:n_decode_total") == stats["steps"]
    assert (
        value(text, "inferd_llamacpp_batch_tokens_total", backend=b.name) == stats["batch_tokens"]
    )
    assert value(text, "inferd_llamacpp_kv_cells_used", backend=b.name) == 0  # all ended
    assert value(text, "llamacpp:requests_processing") == 0
    # cache events: the scheduler's counters under their (cache, event) pairs
    events = {(c, e): n for c, e, n in prometheus.cache_events(stats)}
    assert {c for c, _ in events} == {"host_ram", "slot", "burst"}  # no projector: no media
    assert events["host_ram", "saved"] == stats["ram_saved"]
    for (cache, event), n in events.items():
        name = "inferd_llamacpp_cache_events_total"
        assert value(text, name, backend=b.name, cache=cache, event=event) == n


#: A prompt whose greedy reply repeats what it quotes, so n-gram drafts are taken.
REPEAT = "Repeat exactly, changing nothing:\n" + "\n".join(
    f"def f{i}(x):\n    return x * {i}" for i in range(6)
)


@pytest.mark.llama
async def test_speculative_decoding_counts_under_both_names(smollm2_path):
    """Draft tokens by outcome and verifications, per backend, and llama-server's
    ``spec_decode_*`` names: each equal to the scheduler's own counters."""
    from tests.conftest import require_llama_core

    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=1024, n_threads=1, parallel=2, draft="ngram")
    try:
        async with TestClient(TestServer(make_app(b))) as tc:
            req = {**body(REPEAT, stream=False), "max_tokens": 48, "temperature": 0}
            r = await tc.post("/v1/chat/completions", json=req)
            assert r.status == 200
            await asyncio.to_thread(b._idle.wait, 30)
            text = await _scrape(tc)
        stats = b.batching_stats()
    finally:
        await b.aclose()
    drafted, accepted = stats["spec_drafted"], stats["spec_accepted"]
    assert drafted > 0 and 0 < accepted <= drafted
    name = "inferd_llamacpp_draft_tokens_total"
    assert value(text, name, backend=b.name, outcome="accepted") == accepted
    assert value(text, name, backend=b.name, outcome="rejected") == drafted - accepted
    verified = value(text, "inferd_llamacpp_draft_verifications_total", backend=b.name)
    assert verified == stats["spec_steps"] > 0
    assert value(text, "llamacpp:spec_decode_num_draft_tokens_total") == drafted
    assert value(text, "llamacpp:spec_decode_num_accepted_tokens_total") == accepted
    assert value(text, "llamacpp:spec_decode_num_drafts_total") == stats["spec_steps"]


async def test_daemon_metrics_port(tmp_path):
    """``Daemon(metrics_port=0)`` serves the same exposition over HTTP on 127.0.0.1."""
    from inferd.serve.client import Client
    from inferd.serve.daemon import Daemon
    from tests.serve_helpers import short_tmpdir

    with short_tmpdir() as d:
        daemon = Daemon(Mock(TOKENS), d / "s.sock", metrics_port=0)
        await daemon.start()
        try:
            async with Client(d / "s.sock") as c:
                for p in PROMPTS:
                    req = request_from_openai(body(p, False))
                    events = [e async for e in c.generate(req)]
                    assert isinstance(events[-1], Done)
            host, port = daemon.metrics_address
            assert host == "127.0.0.1"
            async with ClientSession() as s, s.get(f"http://{host}:{port}/metrics") as r:
                text = await r.text()
        finally:
            await daemon.close()
    lab = {"backend": "mock", "model": "m1"}
    assert value(text, "inferd_requests_total", outcome="ok", **lab) == 8
    assert value(text, "inferd_generated_tokens_total", **lab) == 8 * len(TOKENS)
    assert value(text, "inferd_requests_queued") == 0
    assert value(text, "inferd_queue_wait_seconds_count") == 8


async def test_daemon_counts_model_loads():
    from inferd.serve.daemon import Daemon
    from tests.serve_helpers import short_tmpdir

    with short_tmpdir() as d:
        daemon = Daemon(None, d / "s.sock")
        assert await daemon._load(lambda progress: Mock(), 2, asyncio.Event())
        text = daemon.telemetry.render().decode()
        await daemon.close()
    assert value(text, "inferd_model_loads_total") == 2
    assert value(text, "inferd_model_load_seconds_count") == 1


async def test_metrics_port_taken_is_a_clear_error():
    import argparse
    import socket

    from inferd.serve.daemon import Daemon, DaemonError, add_arguments
    from tests.serve_helpers import short_tmpdir

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--metrics-port", "9464"])
    assert args.metrics_port == 9464 and args.metrics_host == "127.0.0.1"
    with socket.socket() as taken, short_tmpdir() as d:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(Mock(), d / "s.sock", metrics_port=port)
        with pytest.raises(DaemonError, match=f"metrics on port {port}"):
            await daemon.start()
        await daemon.close()
