"""OpenAICompat against a real HTTP upstream on 127.0.0.1 (tests/upstream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import socket
import time

import pytest

from inferd.backends.openai_compat import OpenAICompat
from inferd.backends.openai_compat import client as client_mod
from inferd.backends.openai_compat.client import (
    DEFAULT_BASE_URL,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_AFTER_S,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    RetryPolicy,
    Secret,
    endpoint_url,
    parse_retry_after,
)
from inferd.errors import MAX_ERROR_BODY_BYTES, BackendUnavailable, InvalidRequest, NotReady
from inferd.types import (
    AcceleratorInfo,
    Done,
    EmbedRequest,
    ImageBlock,
    Message,
    Request,
    StopReason,
    Text,
    TextBlock,
    Tool,
)

from .conftest import missing
from .upstream import (
    ERROR_MIDSTREAM,
    QUIRKS,
    Json,
    Status,
    Stream,
    Upstream,
    text_stream,
)

KEY = "sk-test-0123456789abcdef-SECRET"


@pytest.fixture
async def up():
    u = await Upstream().start()
    yield u
    await u.stop()


def make(url: str, **kw) -> OpenAICompat:
    kw.setdefault("api_key", KEY)
    kw.setdefault("model", "test-model")
    kw.setdefault("backoff_base", 0.01)
    return OpenAICompat(url, **kw)


async def collect(backend: OpenAICompat, request: Request | None = None) -> list:
    return [ev async for ev in backend.generate(request or Request.chat("hi"))]


# =========================================================================== config


def test_defaults_are_named():
    b = OpenAICompat(api_key="")
    assert b.base_url == DEFAULT_BASE_URL == "https://api.openai.com"
    assert b.chat_url == "https://api.openai.com/v1/chat/completions"
    assert b.model == "gpt-4o-mini"
    t = b._client.timeout
    assert (t.total, t.connect, t.sock_read) == (
        DEFAULT_TIMEOUT_S,
        DEFAULT_CONNECT_TIMEOUT_S,
        DEFAULT_READ_TIMEOUT_S,
    )
    assert DEFAULT_TIMEOUT_S == 300
    assert b._client.retry.max_retries == DEFAULT_MAX_RETRIES == 2
    assert b._client.max_connections == DEFAULT_MAX_CONNECTIONS
    caps = b.capabilities()
    assert (caps.v2, caps.tools, caps.thinking, caps.embed, caps.vision) == (
        True,
        True,
        True,
        True,
        False,
    )
    assert caps.accelerator == AcceleratorInfo(kind="remote")
    assert OpenAICompat(api_key="", vision=True).capabilities().vision is True


@pytest.mark.parametrize(
    "base",
    [
        "http://h:1",
        "http://h:1/",
        "http://h:1/v1",
        "http://h:1/v1/",
        "http://h:1/v1/chat/completions",
    ],
)
def test_url_building(base):
    assert endpoint_url(base, "chat/completions") == "http://h:1/v1/chat/completions"
    assert endpoint_url(base.replace("/chat/completions", ""), "embeddings") == (
        "http://h:1/v1/embeddings"
    )


def test_url_building_keeps_prefix_and_query():
    assert endpoint_url("https://h/openai/v1?api-version=2", "chat/completions") == (
        "https://h/openai/v1/chat/completions?api-version=2"
    )
    with pytest.raises(InvalidRequest):
        endpoint_url("ftp://h", "chat/completions")


@pytest.mark.parametrize(
    ("kw", "what"),
    [
        ({"timeout": 0}, "timeout"),
        ({"read_timeout": -1}, "read_timeout"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_event_bytes": 10}, "max_event_bytes"),
    ],
)
def test_bad_limits_rejected(kw, what):
    # the error rule (docs/architecture.md): a bad constructor argument is InvalidRequest
    with pytest.raises(InvalidRequest, match=what):
        OpenAICompat(api_key="", **kw)


def test_retry_policy_backoff_is_exponential_with_jitter():
    p = RetryPolicy(max_retries=5, backoff_base_s=1.0, backoff_max_s=4.0)
    for attempt, step in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 4.0)]:
        delays = {p.backoff(attempt) for _ in range(50)}
        assert all(step / 2 <= d <= step for d in delays)
        assert len(delays) > 1  # jittered
    with pytest.raises(InvalidRequest):
        RetryPolicy(max_retries=-1)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after(date, now=now) <= 31  # type: ignore[operator]


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-env")
    monkeypatch.delenv("INFERD_OPENAI_API_KEY", raising=False)
    assert OpenAICompat()._api_key.get() == "sk-from-openai-env"
    monkeypatch.setenv("INFERD_OPENAI_API_KEY", "sk-from-inferd-env")
    assert OpenAICompat()._api_key.get() == "sk-from-inferd-env"
    assert OpenAICompat(api_key="explicit")._api_key.get() == "explicit"


def test_secret_never_prints():
    s = Secret(KEY)
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % (s,)):  # noqa: UP031
        assert KEY not in text
    b = make("http://127.0.0.1:9")
    assert KEY not in repr(b) and "api_key=set" in repr(b)
    assert KEY not in repr(b._client)
    assert KEY not in repr(vars(b))


# =========================================================================== streaming


async def test_plain_stream_and_what_the_upstream_received(up):
    b = make(
        up.script("plain", Stream(QUIRKS["plain"].pieces)),
        headers={"X-Extra": "1"},
        extra_body={"top_k": 3, "temperature": 1.5},
    )
    r = Request.chat("hi", system="sys", temperature=0.2, max_tokens=9, tools=(Tool("f"),))
    async with b:
        events = await collect(b, r)
    assert events[:-1] == [Text("Hel"), Text("lo")]
    done = events[-1]
    assert isinstance(done, Done) and done.stop_reason is StopReason.END_TURN
    assert (done.usage.input_tokens, done.usage.output_tokens) == (5, 3)
    assert done.backend == "openai_compat"
    assert done.timings.total_s > 0 and done.timings.ttft_s is not None
    [rec] = up.requests("plain")
    assert rec.method == "POST" and rec.path == "/s/plain/v1/chat/completions"
    assert rec.headers["Authorization"] == f"Bearer {KEY}"
    assert rec.headers["Content-Type"] == "application/json"
    assert rec.headers["X-Extra"] == "1"
    assert rec.body["model"] == "test-model"
    assert rec.body["stream"] is True and rec.body["stream_options"] == {"include_usage": True}
    assert rec.body["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]
    assert rec.body["top_k"] == 3  # from extra_body
    assert rec.body["temperature"] == 0.2  # the request's own value wins
    assert rec.body["max_tokens"] == 9 and rec.body["tools"][0]["function"]["name"] == "f"


async def test_request_model_overrides_backend_model(up):
    async with make(up.url("m")) as b:
        await collect(b, Request.chat("hi", model="other"))
    assert up.requests("m")[0].body["model"] == "other"


async def test_empty_key_sends_no_authorization(up):
    async with make(up.url("nokey"), api_key="") as b:
        await collect(b)
    assert "Authorization" not in up.requests("nokey")[0].headers


@pytest.fixture(params=["c", "py"])
def twin(request, monkeypatch):
    """Run a test over both decoder twins (the compiled core and the Python one)."""
    from inferd._fast import load_twin
    from inferd.backends.openai_compat import adapter

    try:
        mod = load_twin("chunks", request.param)
    except ImportError as e:
        missing(f"the compiled streaming core ({e})")
    monkeypatch.setattr(adapter, "ChatStreamDecoder", mod.ChatStreamDecoder)
    return request.param


@pytest.mark.parametrize("bytewise", [False, True], ids=["recorded", "bytewise"])
@pytest.mark.parametrize("name", sorted(QUIRKS))
async def test_recorded_quirks_decode(up, twin, name, bytewise):
    quirk = QUIRKS[name]
    pieces = quirk.pieces
    if bytewise:  # every byte its own write: events split at every possible point
        raw = b"".join(pieces)
        pieces = [raw[i : i + 1] for i in range(len(raw))]
    async with make(up.script(name, Stream(pieces))) as b:
        events = await collect(b)
    assert events[:-1] == quirk.events[:-1]
    done = events[-1]
    assert isinstance(done, Done)
    assert done.stop_reason == quirk.events[-1].stop_reason
    assert done.usage == quirk.events[-1].usage
    assert sum(isinstance(e, Done) for e in events) == 1


async def test_images_need_vision(up):
    r = Request((Message.user([TextBlock("what"), ImageBlock(data=b"png")]),))
    async with make(up.url("img")) as b:
        with pytest.raises(InvalidRequest, match="vision"):
            await collect(b, r)
    assert up.requests("img") == []
    async with make(up.url("img2"), vision=True) as b:
        await collect(b, r)
    parts = up.requests("img2")[0].body["messages"][0]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


# =========================================================================== errors


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_request_faults_are_invalid_request_without_retry(up, status):
    url = up.script("bad", Status(status, '{"error": {"message": "model xyz not found"}}'))
    async with make(url) as b:
        with pytest.raises(InvalidRequest, match=rf"HTTP {status}.*model xyz not found"):
            await collect(b)
    assert len(up.requests("bad")) == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_refusal_names_the_key_but_never_prints_it(up, status, caplog):
    caplog.set_level(logging.DEBUG)
    body = f'{{"error": {{"message": "Incorrect API key provided: {KEY}"}}}}'
    async with make(up.script("auth", Status(status, body))) as b:
        with pytest.raises(BackendUnavailable, match="refused the API key") as info:
            await collect(b)
    err = info.value
    assert err.status == status
    assert KEY not in str(err) and KEY not in repr(err) and KEY not in (err.body or "")
    assert "***" in (err.body or "")
    assert KEY not in caplog.text
    assert len(up.requests("auth")) == 1  # not retried


async def test_error_body_is_cut_to_4k_on_a_character_boundary(up):
    big = "\u00e9" * 10_000  # 2 bytes each
    async with make(up.script("big", Status(500, big)), max_retries=0) as b:
        with pytest.raises(BackendUnavailable) as info:
            await collect(b)
    body = info.value.body or ""
    assert len(body.rstrip("…").encode()) <= MAX_ERROR_BODY_BYTES
    assert set(body.rstrip("…")) == {"\u00e9"}
    assert info.value.status == 500


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_retryable_statuses_are_retried_then_succeed(up, status):
    url = up.script("retry", Status(status), Status(status), Stream(QUIRKS["plain"].pieces))
    async with make(url, max_retries=2) as b:
        events = await collect(b)
    assert isinstance(events[-1], Done)
    assert len(up.requests("retry")) == 3


async def test_retries_give_up_after_max_retries(up):
    async with make(up.script("down", Status(503)), max_retries=2) as b:
        with pytest.raises(BackendUnavailable, match="gave up after 3 attempts") as info:
            await collect(b)
    assert info.value.status == 503
    assert len(up.requests("down")) == 3


async def test_max_retries_zero_means_one_attempt(up):
    async with make(up.script("once", Status(503)), max_retries=0) as b:
        with pytest.raises(BackendUnavailable):
            await collect(b)
    assert len(up.requests("once")) == 1


async def test_retry_after_seconds_is_honoured(up):
    url = up.script(
        "ra", Status(429, headers={"Retry-After": "0.4"}), Stream(QUIRKS["plain"].pieces)
    )
    async with make(url, backoff_base=0.0) as b:
        t0 = time.perf_counter()
        events = await collect(b)
        elapsed = time.perf_counter() - t0
    assert isinstance(events[-1], Done)
    assert 0.35 <= elapsed < 3


async def test_retry_after_http_date_is_honoured(up):
    when = email.utils.formatdate(time.time() + 1.5, usegmt=True)  # whole seconds
    url = up.script(
        "rad", Status(503, headers={"Retry-After": when}), Stream(QUIRKS["plain"].pieces)
    )
    async with make(url, backoff_base=0.0) as b:
        t0 = time.perf_counter()
        await collect(b)
        elapsed = time.perf_counter() - t0
    assert 0.4 <= elapsed < 3


async def test_retry_after_over_the_limit_fails_at_once(up):
    url = up.script(
        "long", Status(429, headers={"Retry-After": "3600"}), Stream(QUIRKS["plain"].pieces)
    )
    async with make(url, max_retry_after=5) as b:
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable, match="max_retry_after"):
            await collect(b)
        assert time.perf_counter() - t0 < 1
    assert len(up.requests("long")) == 1
    assert DEFAULT_MAX_RETRY_AFTER_S == 60


async def test_no_retry_after_the_first_event(up):
    pieces = text_stream(["a", "b", "c"])
    url = up.script("mid", Stream(pieces, drop_after=3), Stream(pieces))
    async with make(url) as b:
        seen = []
        with pytest.raises(BackendUnavailable, match="mid-stream"):
            async for ev in b.generate(Request.chat("hi")):
                seen.append(ev)
    assert seen == [Text("a"), Text("b")]
    assert len(up.requests("mid")) == 1  # never retried once output was shown


async def test_drop_before_the_first_event_is_retried(up):
    pieces = text_stream(["a"])
    url = up.script("early", Stream(pieces, drop_after=0), Stream(pieces))
    async with make(url) as b:
        events = await collect(b)
    assert events[0] == Text("a") and isinstance(events[-1], Done)
    assert len(up.requests("early")) == 2


async def test_connection_refused_names_cause_and_url(caplog):
    caplog.set_level(logging.DEBUG)
    async with make(f"http://user:{KEY}@127.0.0.1:9/v1?key={KEY}", max_retries=1) as b:
        with pytest.raises(BackendUnavailable) as info:
            await collect(b)
    msg = str(info.value)
    assert "connection failed" in msg and "127.0.0.1:9/v1/chat/completions" in msg
    assert "gave up after 2 attempts" in msg
    assert KEY not in msg and KEY not in caplog.text and KEY not in repr(b)


async def test_connect_timeout():
    # A listening socket whose accept queue is full: SYNs go unanswered, connect hangs.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    try:
        await asyncio.sleep(0.05)
        async with make(f"http://127.0.0.1:{port}", connect_timeout=0.3, max_retries=0) as b:
            t0 = time.perf_counter()
            with pytest.raises(BackendUnavailable, match=r"connect timed out after 0\.3s"):
                await collect(b)
            assert time.perf_counter() - t0 < 3
    finally:
        for c in fillers:
            c.close()
        srv.close()


def test_wire_error_messages_never_echo_the_query_string():
    import aiohttp

    url = f"http://127.0.0.1:1/v1/chat/completions?key={KEY}"
    exc = aiohttp.ClientOSError(None, f"Can not write request body for {url}")
    err = client_mod.connection_error(exc, url, timeouts=aiohttp.ClientTimeout(total=1))
    assert KEY not in str(err) and "127.0.0.1:1/v1/chat/completions" in str(err)


async def test_read_timeout_before_first_byte(up):
    url = up.script("stall0", Stream(QUIRKS["plain"].pieces, stall_after=0, stall_s=5))
    async with make(url, read_timeout=0.3, max_retries=0) as b:
        with pytest.raises(BackendUnavailable, match="read timed out"):
            await collect(b)


async def test_read_timeout_mid_stream(up):
    url = up.script("stall", Stream(QUIRKS["plain"].pieces, stall_after=2, stall_s=5))
    async with make(url, read_timeout=0.3) as b:
        seen = []
        with pytest.raises(BackendUnavailable, match=r"read timed out.*mid-stream"):
            async for ev in b.generate(Request.chat("hi")):
                seen.append(ev)
    assert seen == [Text("Hel")]
    assert len(up.requests("stall")) == 1


async def test_total_timeout(up):
    url = up.script("slow", Stream(text_stream(["x"] * 50), delay=0.05))
    async with make(url, timeout=0.5) as b:
        with pytest.raises(BackendUnavailable, match="timed out"):
            await collect(b)


async def test_error_object_mid_stream(up):
    async with make(up.script("err", Stream(ERROR_MIDSTREAM, delay=0.05))) as b:
        seen = []
        with pytest.raises(BackendUnavailable, match="upstream overloaded"):
            async for ev in b.generate(Request.chat("hi")):
                seen.append(ev)
    assert seen == [Text("partial")]


async def test_truncated_stream_without_finish_is_an_error(up):
    pieces = text_stream(["a", "b"], usage=None, done=False)[:-1]  # no finish chunk
    async with make(up.script("trunc", Stream(pieces))) as b:
        with pytest.raises(BackendUnavailable, match="ended before"):
            await collect(b)


async def test_oversized_event_is_backend_unavailable(up):
    huge = b"data: " + b"x" * 5000  # no event boundary
    async with make(up.script("huge", Stream([huge])), max_event_bytes=2048) as b:
        with pytest.raises(BackendUnavailable, match="max_event_bytes"):
            await collect(b)


# =========================================================================== leaving early


async def until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def test_aclose_closes_the_connection_at_once(up):
    url = up.script("acl", Stream(text_stream([f"t{i}" for i in range(500)]), delay=0.01))
    async with make(url) as b:
        gen = b.generate(Request.chat("hi"))
        assert isinstance(await gen.__anext__(), Text)
        assert b.active == 1
        await gen.aclose()
        assert b.active == 0  # closed synchronously inside aclose()
        assert await up.wait_disconnect("acl")
        assert "acl" not in up.completed


async def test_break_closes_the_connection(up):
    url = up.script("brk", Stream(text_stream([f"t{i}" for i in range(500)]), delay=0.01))
    async with make(url) as b:
        async for ev in b.generate(Request.chat("hi")):
            assert isinstance(ev, Text)
            break
        # a bare break leaves closing to the event loop's async-generator finaliser
        assert await until(lambda: b.active == 0)
        assert await up.wait_disconnect("brk")


async def test_cancellation_closes_the_connection(up):
    url = up.script("cancel", Stream(text_stream([f"t{i}" for i in range(500)]), delay=0.01))
    async with make(url) as b:
        got = asyncio.Event()

        async def consume():
            async for _ in b.generate(Request.chat("hi")):
                got.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b.active == 0
        assert await up.wait_disconnect("cancel")
        assert "cancel" not in up.completed
        # the backend still serves afterwards
        up.script("cancel", Stream(QUIRKS["plain"].pieces))
        assert isinstance((await collect(b))[-1], Done)


async def test_completed_streams_reuse_the_connection(up):
    async with make(up.url("reuse")) as b:
        for _ in range(3):
            assert isinstance((await collect(b))[-1], Done)
            assert b.active == 0
    peers = {r.peer for r in up.requests("reuse")}
    assert len(peers) == 1, f"each request opened a new connection: {peers}"


async def test_silently_closed_pooled_connection_is_resent(up):
    url = up.script("closer", Stream(QUIRKS["plain"].pieces, close_after=True))
    async with make(url, max_retries=0) as b:
        for _ in range(5):  # back to back: the next request races the server's FIN
            assert isinstance((await collect(b))[-1], Done)
    assert len(up.requests("closer")) == 5


async def test_a_connection_left_mid_stream_is_not_reused(up):
    long = Stream(text_stream([f"t{i}" for i in range(200)]), delay=0.005)
    up.script("half", long)
    async with make(up.url("half")) as b:
        gen = b.generate(Request.chat("hi"))
        await gen.__anext__()
        await gen.aclose()
        up.script("half", Stream(QUIRKS["plain"].pieces))
        await collect(b)
    first, second = up.requests("half")
    assert first.peer != second.peer


async def test_trailing_garbage_after_done_closes_instead_of_pooling(up):
    pieces = [*QUIRKS["plain"].pieces, b": trailing\n\n"]
    url = up.script("trail", Stream(pieces, stall_after=len(pieces) - 1, stall_s=2))
    async with make(url) as b:
        t0 = time.perf_counter()
        events = await collect(b)
        assert time.perf_counter() - t0 < 1.5  # waited at most POOL_DRAIN_TIMEOUT_S
        assert isinstance(events[-1], Done) and b.active == 0
        up.script("trail", Stream(QUIRKS["plain"].pieces))
        await collect(b)
    first, second = up.requests("trail")
    assert first.peer != second.peer


async def test_closed_backend_is_not_ready(up):
    b = make(up.url())
    await b.aclose()
    await b.aclose()
    assert b.ready() is False
    with pytest.raises(NotReady, match="closed"):
        await collect(b)
    with pytest.raises(NotReady, match="closed"):
        await b.embed(EmbedRequest(("a",)))


async def test_max_connections_limits_concurrency(up):
    url = up.script("conc", Stream(text_stream(["a", "b"]), delay=0.1))
    async with make(url, max_connections=1) as b:
        t0 = time.perf_counter()
        await asyncio.gather(collect(b), collect(b), collect(b))
        elapsed = time.perf_counter() - t0
    # each stream takes ~0.6 s; one connection serialises them
    assert elapsed > 1.5


# =========================================================================== embeddings


async def test_embeddings_order_usage_and_request(up):
    reply = {
        "object": "list",
        "model": "emb",
        "data": [
            {"index": 2, "embedding": [0.0, 0.0, 1.0]},
            {"index": 0, "embedding": [1.0, 0.0, 0.0]},
            {"index": 1, "embedding": [0.0, 1.0, 0.0]},
        ],
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }
    url = up.script("emb", Json(reply))
    async with make(url, embed_model="emb") as b:
        res = await b.embed(EmbedRequest(("a", "b", "c"), dimensions=3))
    assert res.embeddings == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    assert res.dimensions == 3 and res.usage.input_tokens == 6 and res.model == "emb"
    [rec] = up.requests("emb")
    assert rec.path == "/s/emb/v1/embeddings"
    assert rec.body == {
        "input": ["a", "b", "c"],
        "dimensions": 3,
        "model": "emb",
        "encoding_format": "float",
    }
    assert rec.headers["Authorization"] == f"Bearer {KEY}"


async def test_embeddings_errors_and_retries(up):
    ok = Json({"data": [{"index": 0, "embedding": [1.0]}]})
    async with make(up.script("e1", Status(503), ok)) as b:
        assert (await b.embed(EmbedRequest(("a",)))).embeddings == ((1.0,),)
    async with make(up.script("e2", Status(400, "bad input"))) as b:
        with pytest.raises(InvalidRequest, match="bad input"):
            await b.embed(EmbedRequest(("a",)))
    async with make(up.script("e3", Json({"data": []}))) as b:
        with pytest.raises(BackendUnavailable, match="0 vectors for 1"):
            await b.embed(EmbedRequest(("a",)))
    async with make(up.script("e4", Status(200, "<html>"))) as b:
        with pytest.raises(BackendUnavailable, match="not JSON"):
            await b.embed(EmbedRequest(("a",)))


async def test_embeddings_response_size_limit(up, monkeypatch):
    monkeypatch.setattr(client_mod, "MAX_RESPONSE_BYTES", 100)
    big = Json({"data": [{"index": 0, "embedding": [0.5] * 100}]})
    async with make(up.script("ebig", big)) as b:
        with pytest.raises(BackendUnavailable, match="more than 100 bytes"):
            await b.embed(EmbedRequest(("a",)))
    assert client_mod.MAX_RESPONSE_BYTES == 100  # patched; the default is 256 MiB
