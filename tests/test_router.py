"""Router: priority order, breaker states on a fake clock, pre-stream-only failover."""

from __future__ import annotations

import pytest

from inferd.backend import Backend
from inferd.backends.mock import Mock
from inferd.errors import BackendUnavailable, EmbedUnsupported, InvalidRequest
from inferd.router import (
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_FAILURE_WINDOW_S,
    DEFAULT_OPEN_FOR_S,
    CircuitBreaker,
    Router,
)
from inferd.types import Capabilities, Done, EmbedRequest, Request, Text, Tool


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoToolsMock(Mock):
    def capabilities(self) -> Capabilities:
        return Capabilities(tools=False, embed=False)


async def collect(backend: Backend, request: Request) -> list:
    return [ev async for ev in backend.generate(request)]


def test_defaults_are_the_documented_ones() -> None:
    assert (DEFAULT_FAILURE_THRESHOLD, DEFAULT_FAILURE_WINDOW_S, DEFAULT_OPEN_FOR_S) == (3, 60, 30)


def test_breaker_walks_closed_open_half_open_closed() -> None:
    clock = FakeClock()
    br = CircuitBreaker(clock=clock)
    assert br.state == "closed"
    for _ in range(2):
        assert br.acquire() is None
        br.failure()
    assert br.state == "closed"
    br.failure()
    assert br.state == "open"
    assert "open" in (br.acquire() or "")
    clock.now += 29.9
    assert br.state == "open"
    clock.now += 0.2
    assert br.state == "half_open"
    assert br.acquire() is None  # the one trial
    assert "trial" in (br.acquire() or "")  # nobody else meanwhile
    br.success()
    assert br.state == "closed"
    assert br.acquire() is None


def test_breaker_failed_trial_reopens_and_old_failures_expire() -> None:
    clock = FakeClock()
    br = CircuitBreaker(clock=clock)
    br.failure()
    br.failure()
    clock.now += 61  # both fell out of the 60 s window
    br.failure()
    assert br.state == "closed"
    br.failure()
    br.failure()
    assert br.state == "open"
    clock.now += 30
    assert br.acquire() is None
    br.failure()
    assert br.state == "open"
    clock.now += 29
    assert br.state == "open"
    clock.now += 1
    assert br.state == "half_open"


async def test_first_ready_backend_serves_and_done_names_it() -> None:
    a, b = Mock(["a"], name="a"), Mock(["b"], name="b")
    events = await collect(Router([a, b]), Request.chat("hi"))
    assert events[0] == Text("a")
    assert isinstance(events[-1], Done) and events[-1].backend == "a"
    assert len(b.requests) == 0


async def test_pre_stream_failover_and_breaker_opens_then_recovers() -> None:
    clock = FakeClock()
    bad = Mock(["x"], name="bad", pre_stream_error="unavailable")
    good = Mock(["ok"], name="good")
    router = Router([bad, good], clock=clock)
    for _ in range(3):
        events = await collect(router, Request.chat("hi"))
        assert events[-1].backend == "good"
    assert router.breaker("bad").state == "open"
    await collect(router, Request.chat("hi"))
    assert len(bad.requests) == 0  # generate was called 3 times but never reached Done
    clock.now += DEFAULT_OPEN_FOR_S
    bad.pre_stream_error = None  # recovered
    events = await collect(router, Request.chat("hi"))
    assert events[-1].backend == "bad"  # the half-open trial succeeded
    assert router.breaker("bad").state == "closed"


@pytest.mark.parametrize("kind", ["not_ready", "unavailable"])
async def test_pre_stream_errors_count_as_failures(kind: str) -> None:
    bad = Mock(name="bad", pre_stream_error=kind)  # type: ignore[arg-type]
    router = Router([bad, Mock(name="good")], clock=FakeClock())
    for _ in range(3):
        await collect(router, Request.chat("hi"))
    assert router.breaker(0).state == "open"


async def test_invalid_request_is_not_a_failure_and_does_not_fail_over() -> None:
    bad = Mock(name="bad", pre_stream_error="invalid_request")
    good = Mock(name="good")
    router = Router([bad, good], clock=FakeClock())
    for _ in range(5):
        with pytest.raises(InvalidRequest):
            await collect(router, Request.chat("hi"))
    assert router.breaker("bad").state == "closed"
    assert good.requests == []


async def test_no_failover_after_the_first_event() -> None:
    flaky = Mock(["a", "b", "c"], name="flaky", drop_after=1)
    good = Mock(["ok"], name="good")
    router = Router([flaky, good], clock=FakeClock())
    seen = []
    with pytest.raises(BackendUnavailable):
        async for ev in router.generate(Request.chat("hi")):
            seen.append(ev)
    assert seen == [Text("a")]
    assert good.requests == []
    assert flaky.active == 0


async def test_mid_stream_failures_trip_the_breaker() -> None:
    flaky = Mock(["a", "b"], name="flaky", drop_after=1)
    router = Router([flaky, Mock(name="good")], clock=FakeClock())
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            await collect(router, Request.chat("hi"))
    assert router.breaker("flaky").state == "open"
    events = await collect(router, Request.chat("hi"))
    assert events[-1].backend == "good"


async def test_capability_matching_skips_backends_that_cannot_serve() -> None:
    plain = NoToolsMock(["plain"], name="plain")
    tooled = Mock(["tooled"], name="tooled")
    router = Router([plain, tooled])
    req = Request.chat("hi", tools=(Tool("f"),))
    events = await collect(router, req)
    assert events[-1].backend == "tooled"
    events = await collect(router, Request.chat("hi"))
    assert events[-1].backend == "plain"


async def test_no_backend_lists_why_each_was_skipped() -> None:
    clock = FakeClock()
    down = Mock(name="down", ready=False)
    plain = NoToolsMock(name="plain")
    broken = Mock(name="broken", pre_stream_error="unavailable")
    tripped = Mock(name="tripped")
    router = Router([down, plain, broken, tripped], clock=clock)
    for _ in range(3):
        router.breaker("tripped").failure()
    with pytest.raises(BackendUnavailable) as info:
        await collect(router, Request.chat("hi", tools=(Tool("f"),)))
    msg = str(info.value)
    assert "down: not ready" in msg
    assert "plain: lacks capability (no tool support)" in msg
    assert "broken: failed with BackendUnavailable" in msg
    assert "tripped: circuit breaker open" in msg


async def test_leaving_early_releases_the_trial_slot_and_the_stream() -> None:
    clock = FakeClock()
    m = Mock(["a", "b", "c"], name="m")
    router = Router([m], clock=clock)
    for _ in range(3):
        router.breaker(0).failure()
    clock.now += DEFAULT_OPEN_FOR_S
    gen = router.generate(Request.chat("hi"))
    assert await gen.__anext__() == Text("a")
    await gen.aclose()
    assert m.active == 0
    assert router.breaker(0).state == "half_open"
    assert router.breaker(0).acquire() is None  # the slot was released


async def test_embed_routes_to_embedding_backends() -> None:
    router = Router([NoToolsMock(name="plain"), Mock(name="emb")])
    res = await router.embed(EmbedRequest(("a", "bb")))
    assert res.model == "emb" and len(res.embeddings) == 2
    with pytest.raises(EmbedUnsupported):
        await Router([NoToolsMock(name="plain")]).embed(EmbedRequest(("a",)))
    with pytest.raises(BackendUnavailable, match="down: not ready"):
        await Router([Mock(name="down", ready=False)]).embed(EmbedRequest(("a",)))


async def test_capabilities_union_ready_and_close() -> None:
    a, b = NoToolsMock(name="a"), Mock(name="b", ready=False)
    router = Router([a, b])
    caps = router.capabilities()
    assert caps.tools and caps.embed
    assert router.ready()
    assert [s["name"] for s in router.status()] == ["a", "b"]
    await router.aclose()
    await router.aclose()
    assert not router.ready() and not a.ready()
    with pytest.raises(BackendUnavailable, match="closed"):
        await collect(router, Request.chat("hi"))
