"""OpenAICompat against misbehaving upstreams (issue 13, items 1, 9, 10) and its
configurable capabilities (issue 12): real aiohttp servers on 127.0.0.1, real clients.

Each server here is written for one fault: endless tool-call argument deltas, an error
event with a huge message, a reply that is finished but never closed, redirects to
another origin. Memory is measured with ``tracemalloc`` against a generous bound.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from aiohttp import web

from inferd.backends.openai_compat import OpenAICompat
from inferd.backends.openai_compat.adapter import (
    DEFAULT_DONE_GRACE_S,
    DEFAULT_USAGE_GRACE_S,
    StreamLimits,
)
from inferd.backends.openai_compat.client import DEFAULT_FOLLOW_REDIRECTS, MAX_REDIRECTS
from inferd.errors import (
    MAX_ERROR_BODY_BYTES,
    BackendUnavailable,
    EmbedUnsupported,
    InvalidRequest,
)
from inferd.router import Router
from inferd.types import Done, EmbedRequest, Request, StopReason, Text, Tool

from .upstream import DONE, chunk, sse, usage_obj

KEY = "sk-hostile-test-key-0123456789"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """One aiohttp server on 127.0.0.1 with a single catch-all handler; records requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((request.path, dict(request.headers), body))
        return await self.handler(request)

    async def __aenter__(self) -> Server:
        app = web.Application()
        app.router.add_route("*", "/{rest:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _sse_response(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    return resp


def streaming(pieces: Callable[[], AsyncIterator[bytes]], *, hang: bool = False) -> Handler:
    """A handler writing ``pieces()``; with ``hang`` it then keeps the body open."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = await _sse_response(request)
        try:
            async for piece in pieces():
                await resp.write(piece)
            if hang:
                await asyncio.sleep(3600)  # never [DONE], never EOF (until cancelled)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return resp

    return handler


def make(url: str, **kw: object) -> OpenAICompat:
    kw.setdefault("api_key", KEY)
    kw.setdefault("model", "m")
    kw.setdefault("max_retries", 0)
    return OpenAICompat(url, **kw)  # type: ignore[arg-type]


async def collect(b: OpenAICompat, request: Request | None = None) -> list:
    return [ev async for ev in b.generate(request or Request.chat("hi"))]


# =========================================================================== item 1


ARG_PIECE = "x" * 65536  # 64 KiB of arguments per delta, as in the issue
#: The hostile upstream stops after this many deltas (4 GiB would be "forever").
FLOOD_DELTAS = 4096


def _arg_delta(index: int, text: str, **extra: object) -> bytes:
    fn: dict[str, object] = {"arguments": text, **extra}
    call: dict[str, object] = {"index": index, "function": fn}
    if extra:
        call["id"] = f"call_{index}"
    return sse(chunk({"tool_calls": [call]}))


async def test_endless_tool_argument_deltas_are_cut_with_bounded_memory():
    async def flood() -> AsyncIterator[bytes]:
        yield _arg_delta(0, "", name="f")
        for _ in range(FLOOD_DELTAS):  # 256 MiB if nothing stops it
            yield _arg_delta(0, ARG_PIECE)

    async with Server(streaming(flood)) as up:
        tracemalloc.start()
        try:
            async with make(up.url, max_call_args=4 * 1024 * 1024) as b:
                with pytest.raises(BackendUnavailable, match=r"max_call_args=4194304") as ei:
                    await collect(b)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert "one call" in ei.value.message
    assert peak < 64 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB while refusing the flood"


async def test_many_calls_are_cut_by_the_per_stream_limit():
    async def many_calls() -> AsyncIterator[bytes]:
        for i in range(FLOOD_DELTAS):  # each call stays under the per-call limit
            yield _arg_delta(i, ARG_PIECE, name="f")

    async with Server(streaming(many_calls)) as up:
        async with make(up.url, max_stream_args=2 * 1024 * 1024) as b:
            with pytest.raises(BackendUnavailable, match=r"one stream exceed max_stream_args"):
                await collect(b)


def test_limits_count_fragments_in_both_twins(chunks):
    # A flood of one-character deltas costs memory per fragment, not per character.
    dec = chunks.ChatStreamDecoder(max_call_args=1 << 20, max_stream_args=1 << 30)
    dec.feed(_arg_delta(0, "", name="f"))
    delta = _arg_delta(0, "x")
    with pytest.raises(BackendUnavailable, match=r"max_call_args=1048576") as ei:
        for _ in range(1 << 20):
            dec.feed(delta)
    assert "one call" in str(ei.value)
    assert dec.stats["events"] < (1 << 20) // 32  # cut long before a million fragments
    acc = chunks.ChunkAccumulator(max_call_args=1 << 30, max_stream_args=4096)
    with pytest.raises(BackendUnavailable, match=r"max_stream_args=4096"):
        for i in range(1000):  # many calls, no arguments at all
            acc.ingest(chunk({"tool_calls": [{"index": i, "id": f"c{i}", "function": {}}]}))


def test_limits_are_named_and_checked():
    lim = OpenAICompat(api_key="").limits
    assert lim == StreamLimits()
    assert lim.max_call_args == 16 * 1024 * 1024 and lim.max_stream_args == 64 * 1024 * 1024
    assert (lim.done_grace, lim.usage_grace) == (DEFAULT_DONE_GRACE_S, DEFAULT_USAGE_GRACE_S)
    with pytest.raises(InvalidRequest, match="max_call_args=10 must be >= 1024"):
        OpenAICompat(api_key="", max_call_args=10)
    with pytest.raises(InvalidRequest, match="done_grace=0"):
        OpenAICompat(api_key="", done_grace=0)


async def test_error_event_text_is_cut():
    async def error_event() -> AsyncIterator[bytes]:
        yield sse({"error": {"message": "E" * (1 << 20), "type": "server_error"}})

    async with Server(streaming(error_event)) as up:
        async with make(up.url) as b:
            with pytest.raises(BackendUnavailable, match="upstream reported an error") as ei:
                await collect(b)
    assert len(ei.value.message.encode()) <= MAX_ERROR_BODY_BYTES + 200


# =========================================================================== item 9


def _finished_reply(*, usage: bool) -> Callable[[], AsyncIterator[bytes]]:
    async def pieces() -> AsyncIterator[bytes]:
        yield sse(chunk({"role": "assistant", "content": "Hello"}))
        yield sse(chunk({}, "stop"))
        if usage:
            yield sse(chunk(usage=usage_obj(3, 1), choices=False))

    return pieces


@pytest.mark.parametrize("usage", [True, False])
async def test_finished_reply_that_never_closes_ends_with_done(usage):
    # Before the fix this waited read_timeout and raised BackendUnavailable.
    async with Server(streaming(_finished_reply(usage=usage), hang=True)) as up:
        async with make(up.url, read_timeout=60, usage_grace=1.0) as b:
            events = await asyncio.wait_for(collect(b), timeout=50)
    assert events[0] == Text("Hello")
    done = events[-1]
    assert isinstance(done, Done) and done.stop_reason is StopReason.END_TURN
    assert done.usage.input_tokens == (3 if usage else 0)
    assert b.active == 0


async def test_keep_alive_comments_do_not_extend_the_grace():
    sent: list[int] = []

    async def pinging() -> AsyncIterator[bytes]:
        async for piece in _finished_reply(usage=True)():
            yield piece
        for i in range(600):  # a minute of pings, then it would close
            sent.append(i)
            yield b": ping\n\n"
            await asyncio.sleep(0.1)

    async with Server(streaming(pinging)) as up:
        async with make(up.url, read_timeout=60) as b:
            events = await asyncio.wait_for(collect(b), timeout=50)
    assert isinstance(events[-1], Done) and events[-1].usage.output_tokens == 1
    assert len(sent) < 600  # the reply ended while the upstream was still pinging


async def test_a_stall_before_the_finish_reason_is_still_a_timeout():
    async def unfinished() -> AsyncIterator[bytes]:
        yield sse(chunk({"content": "Hel"}))

    async with Server(streaming(unfinished, hang=True)) as up:
        async with make(up.url, read_timeout=1.0, done_grace=0.1, usage_grace=0.1) as b:
            with pytest.raises(BackendUnavailable, match="read timed out"):
                await collect(b)


async def test_done_after_finish_is_not_cut_by_the_grace():
    async def slow_done() -> AsyncIterator[bytes]:
        async for piece in _finished_reply(usage=True)():
            yield piece
        yield DONE

    async with Server(streaming(slow_done)) as up:
        async with make(up.url) as b:
            events = await collect(b)
    assert events[-1].stop_reason is StopReason.END_TURN and events[-1].usage.output_tokens == 1


# =========================================================================== item 10


def _ok_stream() -> Handler:
    async def pieces() -> AsyncIterator[bytes]:
        yield sse(chunk({"content": "ok"}, "stop"))
        yield DONE

    return streaming(pieces)


def _redirect_to(target: Callable[[], str], status: int = 307) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": target()})

    return handler


async def test_cross_origin_redirect_is_not_followed_by_default():
    assert DEFAULT_FOLLOW_REDIRECTS is False
    async with Server(_ok_stream()) as other:
        target = lambda: other.url + "/v1/chat/completions"  # noqa: E731
        async with Server(_redirect_to(target)) as up:
            async with make(up.url, headers={"X-Api-Key": "custom-secret"}) as b:
                with pytest.raises(BackendUnavailable, match="another origin") as ei:
                    await collect(b)
    assert other.received == []  # neither the headers nor the prompt went there
    assert "custom-secret" not in ei.value.message and KEY not in ei.value.message


async def test_cross_origin_redirect_when_allowed_goes_without_credentials():
    async with Server(_ok_stream()) as other:
        target = lambda: other.url + "/v1/chat/completions"  # noqa: E731
        async with Server(_redirect_to(target)) as up:
            b = make(up.url, headers={"X-Api-Key": "custom-secret"}, follow_redirects=True)
            async with b:
                events = await collect(b)
            [(_, first_headers, _)] = up.received
    assert events[0] == Text("ok")
    [(path, headers, body)] = other.received
    assert path == "/v1/chat/completions" and orjson.loads(body)["messages"]
    lowered = {k.lower() for k in headers}
    assert "authorization" not in lowered and "x-api-key" not in lowered
    assert first_headers["X-Api-Key"] == "custom-secret"  # the configured origin had them


async def test_same_origin_redirect_keeps_credentials():
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/old/"):
            return web.Response(status=308, headers={"Location": "/new/v1/chat/completions"})
        return await _ok_stream()(request)

    async with Server(handler) as up:
        async with make(up.url + "/old", headers={"X-Api-Key": "k2"}) as b:
            events = await collect(b)
    assert events[0] == Text("ok")
    [_, (path, headers, _)] = up.received
    assert path == "/new/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {KEY}" and headers["X-Api-Key"] == "k2"


async def test_redirect_loops_and_method_changing_redirects_fail():
    async with Server(_redirect_to(lambda: "/v1/chat/completions")) as loop_up:
        async with make(loop_up.url) as b:
            with pytest.raises(BackendUnavailable, match=f"more than {MAX_REDIRECTS} times"):
                await collect(b)
    assert len(loop_up.received) == MAX_REDIRECTS + 1
    async with Server(_redirect_to(lambda: "/elsewhere", status=302)) as up:
        async with make(up.url) as b:
            with pytest.raises(BackendUnavailable, match=r"HTTP 302.*cannot follow"):
                await collect(b)


# =========================================================================== issue 12


def test_capabilities_are_configurable():
    caps = OpenAICompat(api_key="").capabilities()
    assert (caps.tools, caps.vision, caps.thinking, caps.embed) == (True, False, True, True)
    caps = OpenAICompat(
        api_key="", tools=False, vision=True, thinking=False, embed=False
    ).capabilities()
    assert (caps.tools, caps.vision, caps.thinking, caps.embed) == (False, True, False, False)


async def test_router_never_sends_embeddings_to_an_upstream_without_them():
    vectors = {"data": [{"index": 0, "embedding": [1.0, 0.0]}], "usage": {"prompt_tokens": 1}}

    async def embeddings(request: web.Request) -> web.StreamResponse:
        return web.json_response(vectors)

    async with Server(embeddings) as chat_only, Server(embeddings) as full:
        no_embed = make(chat_only.url, embed=False, name="chat-only")
        with_embed = make(full.url, name="full")
        async with Router([no_embed, with_embed]) as router:
            res = await router.embed(EmbedRequest(("a",)))
            with pytest.raises(EmbedUnsupported, match="embed=False"):
                await no_embed.embed(EmbedRequest(("a",)))
    assert res.embeddings == ((1.0, 0.0),)
    assert chat_only.received == []
    assert [p for p, _, _ in full.received] == ["/v1/embeddings"]


async def test_a_request_needing_a_missing_capability_is_refused_before_sending():
    async with Server(_ok_stream()) as up:
        async with make(up.url, tools=False) as b:
            with pytest.raises(InvalidRequest, match="no tool support"):
                await collect(b, Request.chat("hi", tools=(Tool("f"),)))
    assert up.received == []
