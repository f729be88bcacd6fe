"""Router: priority order, breaker states on a fake clock, pre-stream-only failover."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from inferd.backend import Backend, ended_without_done
from inferd.backends.mock import Mock
from inferd.errors import BackendUnavailable, EmbedUnsupported, InvalidRequest
from inferd.router import (
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_FAILURE_WINDOW_S,
    DEFAULT_OPEN_FOR_S,
    CircuitBreaker,
    Router,
)
from inferd.serve.client import Client
from inferd.types import (
    Capabilities,
    Done,
    EmbedRequest,
    Event,
    ImageBlock,
    Message,
    Request,
    Response,
    Text,
    TextBlock,
    Tool,
)

from .serve_helpers import short_tmpdir

#: Router settings that keep a breaker from opening.
NEVER_TRIP = {"failure_threshold": 1_000_000}


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


# --------------------------------------------------------------------------- issue 12 / 13


class _Buggy(Mock):
    """Fails with a non-inferd exception whose text must stay in the server log."""

    def __init__(self, *, after: int, **kw: Any) -> None:
        super().__init__(["a", "b"], **kw)
        self.after = after

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        for i, ev in enumerate([Text("a"), Text("b")]):
            if i == self.after:
                raise KeyError("api_key=sk-secret-123")
            yield ev


async def test_non_inferd_failures_are_logged_by_reference_not_sent(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="inferd.router")
    router = Router([_Buggy(after=0, name="buggy"), Mock(["ok"], name="good")], **NEVER_TRIP)
    events = await collect(router, Request.chat("hi"))
    assert events[-1].backend == "good"  # failed over
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "KeyError" in warning.getMessage() and "sk-secret" not in warning.getMessage()
    assert "sk-secret-123" in caplog.text  # the traceback, at DEBUG
    with pytest.raises(BackendUnavailable) as info:  # pre-stream, nobody left
        await collect(Router([_Buggy(after=0, name="buggy")]), Request.chat("hi"))
    assert "KeyError" in info.value.message and "sk-secret" not in info.value.message
    ref = info.value.message.split("ref ", 1)[1].rstrip(")")
    assert ref in caplog.text
    with pytest.raises(BackendUnavailable) as info:  # mid-stream: wrapped, not raw
        await collect(Router([_Buggy(after=1, name="buggy")]), Request.chat("hi"))
    assert "mid-stream" in info.value.message and "sk-secret" not in info.value.message


async def test_a_request_no_backend_can_serve_is_invalid_naming_the_capability() -> None:
    image = Message("user", (TextBlock("what is it?"), ImageBlock(b"\x89PNG", "image/png")))
    router = Router([NoToolsMock(name="a"), NoToolsMock(name="b", ready=False)])
    with pytest.raises(InvalidRequest, match="vision"):
        await collect(router, Request(messages=(image,)))
    with pytest.raises(InvalidRequest, match="tool"):
        await collect(router, Request.chat("hi", tools=(Tool("f"),)))
    # a capable backend that is down is an outage, not the caller's fault
    with pytest.raises(BackendUnavailable, match="not ready"):
        await collect(Router([Mock(name="m", ready=False)]), Request(messages=(image,)))


class _NoDone(Mock):
    def __init__(self, events: list[Event], **kw: Any) -> None:
        super().__init__(**kw)
        self.events = events

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        for ev in self.events:
            yield ev


async def test_stream_without_done_is_one_error_everywhere() -> None:
    want = ended_without_done("nodone").message
    with pytest.raises(BackendUnavailable) as info:  # pre-stream: skipped with that reason
        await collect(Router([_NoDone([], name="nodone")]), Request.chat("hi"))
    assert want in info.value.message
    with pytest.raises(BackendUnavailable) as info:  # mid-stream
        await collect(Router([_NoDone([Text("a")], name="nodone")]), Request.chat("hi"))
    assert info.value.message == want
    with pytest.raises(BackendUnavailable) as info:
        Response.collect([Text("a")])
    assert info.value.message == ended_without_done().message


#: The largest pause of the event loop tolerated while a Router asks a Client about a
#: daemon that never answers (it was 2 s: a blocking probe per request).
MAX_LOOP_GAP_S = 0.5


async def test_a_client_behind_a_router_never_blocks_the_loop() -> None:
    loop = asyncio.get_running_loop()
    with short_tmpdir() as d:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.bind(str(d / "silent.sock"))
        silent.listen(64)  # connections land in the backlog; nobody ever answers
        client = Client(d / "silent.sock")
        router = Router([client, Mock(["ok"], name="local")])
        gaps: list[float] = []
        running = True

        async def ticker() -> None:
            last = loop.time()
            while running:
                await asyncio.sleep(0.01)
                now = loop.time()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        try:
            async with asyncio.timeout(30):
                for _ in range(5):
                    events = await collect(router, Request.chat("hi"))
                    assert events[-1].backend == "local"
                    assert not client.ready()
                    client.capabilities()
                    await asyncio.sleep(0.3)  # let background refreshes start and stall
        finally:
            running = False
            await task
            await router.aclose()
            silent.close()
    assert len(gaps) > 50
    assert max(gaps) < MAX_LOOP_GAP_S, f"the loop stalled for {max(gaps):.2f}s"
