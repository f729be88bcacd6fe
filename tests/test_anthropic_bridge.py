"""The bridge's /v1/messages and /v1/messages/count_tokens, driven by the official
``anthropic`` SDK (and raw HTTP for the error shapes), in front of the Mock backend and
the real SmolLM2 model."""

from __future__ import annotations

import asyncio

import aiohttp
import anthropic
import pytest

from inferd.backends.mock import Mock
from inferd.errors import QueueFull
from inferd.types import Message, Request, ToolChoice, ToolResultBlock

from .serve_helpers import bridge_in_process

WEATHER = {
    "name": "weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
USER = [{"role": "user", "content": "Weather in Paris?"}]
#: The SDK has no temperature argument any more; the Messages API still takes it.
GREEDY = {"temperature": 0.0}


def _client(url: str, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0, timeout=60)


class _Full(Mock):
    """A backend whose admission queue is full (QueueFull before the first event)."""

    async def generate(self, request: Request):  # type: ignore[override]
        raise QueueFull("admission queue is full (max_queue=0); try again later")
        yield  # pragma: no cover


# --------------------------------------------------------------------------- Mock


async def test_text_and_system_not_streamed() -> None:
    mock = Mock(["Hello", " world"])
    async with bridge_in_process(mock) as (url, _, _):
        msg = await _client(url).messages.create(
            model="local", max_tokens=64, system="Be brief.", messages=USER
        )
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello world"
    assert msg.stop_reason == "end_turn" and msg.model == "local"
    assert msg.id.startswith("msg_") and msg.usage.output_tokens >= 0
    sent = mock.requests[-1]
    assert sent.messages[0] == Message.system("Be brief.")
    assert sent.max_tokens == 64


async def test_text_streamed() -> None:
    async with bridge_in_process(Mock(["Hel", "lo", "!"])) as (url, _, _):
        async with _client(url).messages.stream(
            model="local", max_tokens=64, messages=USER
        ) as stream:
            pieces = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
    assert pieces == ["Hel", "lo", "!"]
    assert final.content[0].text == "Hello!" and final.stop_reason == "end_turn"


async def test_thinking_streamed_as_thinking_blocks() -> None:
    mock = Mock(["answer"], thinking=["hmm ", "ok"])
    async with bridge_in_process(mock) as (url, _, _):
        async with _client(url).messages.stream(
            model="local",
            max_tokens=2048,
            messages=USER,
            thinking={"type": "enabled", "budget_tokens": 1024},
        ) as stream:
            final = await stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "hmm ok"
    assert mock.requests[-1].thinking is True


@pytest.mark.parametrize("streamed", [False, True])
async def test_tool_round_trip(streamed: bool) -> None:
    mock = Mock(["Let me check."], tool_calls=[("weather", {"city": "Paris"})])
    async with bridge_in_process(mock) as (url, _, _):
        client = _client(url)
        kw = {"model": "local", "max_tokens": 64, "tools": [WEATHER], "messages": USER}
        if streamed:
            async with client.messages.stream(**kw) as stream:
                first = await stream.get_final_message()
        else:
            first = await client.messages.create(**kw)
        assert first.stop_reason == "tool_use"
        call = next(b for b in first.content if b.type == "tool_use")
        assert (call.name, call.input) == ("weather", {"city": "Paris"})
        follow = [
            *USER,
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}],
            },
        ]
        await client.messages.create(model="local", max_tokens=64, tools=[WEATHER], messages=follow)
    sent = mock.requests[-1]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[2].content == (ToolResultBlock(call.id, "18C"),)
    assert sent.messages[1].content[-1].input == {"city": "Paris"}


async def test_forced_tool_choice_reaches_the_backend() -> None:
    mock = Mock(tool_calls=[("weather", {"city": "Oslo"})])
    async with bridge_in_process(mock) as (url, _, _):
        msg = await _client(url).messages.create(
            model="local",
            max_tokens=64,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "weather"},
            messages=USER,
        )
    assert mock.requests[-1].tool_choice == ToolChoice("tool", "weather")
    assert msg.content[-1].type == "tool_use"


async def test_any_tool_choice_is_required() -> None:
    mock = Mock(tool_calls=[("weather", {"city": "Oslo"})])
    async with bridge_in_process(mock) as (url, _, _):
        await _client(url).messages.create(
            model="local",
            max_tokens=64,
            tools=[WEATHER],
            tool_choice={"type": "any"},
            messages=USER,
        )
    assert mock.requests[-1].tool_choice == ToolChoice("required")


async def test_image_reaches_a_vision_backend() -> None:
    mock = Mock(["a cat"])
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw=="},
    }
    async with bridge_in_process(mock) as (url, _, _):
        await _client(url).messages.create(
            model="local",
            max_tokens=8,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}],
        )
    img = mock.requests[-1].messages[0].content[0]
    assert img.data == b"\x89PNG" and img.media_type == "image/png"


async def test_400_shapes_from_the_sdk() -> None:
    async with bridge_in_process(Mock()) as (url, _, _):
        with pytest.raises(anthropic.BadRequestError) as ei:
            await _client(url).messages.create(
                model="local",
                max_tokens=8,
                tools=[WEATHER],
                tool_choice={"type": "tool", "name": "nope"},
                messages=USER,
            )
    assert ei.value.status_code == 400
    assert ei.value.body["type"] == "error"
    assert ei.value.body["error"]["type"] == "invalid_request_error"
    assert "nope" in ei.value.body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', "max_tokens"),
        (b'{"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}', "role"),
        (b'{"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "bogus": 1}', "bogus"),
        (
            b'{"max_tokens": 5, "messages": [{"role": "user", "content": "x"}],'
            b' "tools": [{"type": "web_search_20250305", "name": "w"}]}',
            "server tool",
        ),
        (
            b'{"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "stream": 1}',
            "stream",
        ),
    ],
)
async def test_400_shapes_raw(body: bytes, needle: str) -> None:
    async with bridge_in_process(Mock()) as (url, _, _), aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/messages", data=body) as r:
            got = await r.json()
    assert r.status == 400
    assert got["type"] == "error" and got["error"]["type"] == "invalid_request_error"
    assert needle in got["error"]["message"]


async def test_404_and_405_in_anthropic_shape() -> None:
    async with bridge_in_process(Mock()) as (url, _, _), aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/messages/nope", json={}) as r:
            got = await r.json()
        assert r.status == 404 and got["error"]["type"] == "not_found_error"
        async with http.get(f"{url}/v1/messages") as r:
            got = await r.json()
        assert r.status == 405 and got["type"] == "error"


async def test_401_and_both_key_headers() -> None:
    async with bridge_in_process(Mock(["ok"]), api_key="k-123") as (url, _, _):
        with pytest.raises(anthropic.AuthenticationError) as ei:
            await _client(url, "wrong").messages.create(model="m", max_tokens=8, messages=USER)
        assert ei.value.body["error"]["type"] == "authentication_error"
        msg = await _client(url, "k-123").messages.create(model="m", max_tokens=8, messages=USER)
        assert msg.content[0].text == "ok"
        bearer = anthropic.AsyncAnthropic(base_url=url, auth_token="k-123", max_retries=0)
        msg = await bearer.messages.create(model="m", max_tokens=8, messages=USER)
        assert msg.content[0].text == "ok"


@pytest.mark.parametrize("streamed", [False, True])
async def test_429_from_queue_full(streamed: bool) -> None:
    async with bridge_in_process(_Full()) as (url, _, _):
        client = _client(url)
        with pytest.raises(anthropic.RateLimitError) as ei:
            if streamed:
                async with client.messages.stream(model="m", max_tokens=8, messages=USER) as s:
                    await s.get_final_message()
            else:
                await client.messages.create(model="m", max_tokens=8, messages=USER)
    assert ei.value.status_code == 429
    assert ei.value.body["error"]["type"] == "rate_limit_error"


async def test_mid_stream_failure_is_an_sse_error_event() -> None:
    async with bridge_in_process(Mock(["a", "b", "c"], drop_after=1)) as (url, _, _):
        seen = []
        with pytest.raises(anthropic.APIError, match=r"mid-stream|injected|dropped"):
            async with _client(url).messages.stream(model="m", max_tokens=8, messages=USER) as s:
                async for t in s.text_stream:
                    seen.append(t)
    assert seen == ["a"]


async def test_count_tokens_without_a_tokenizer_is_a_clear_400() -> None:
    async with bridge_in_process(Mock()) as (url, _, _):
        with pytest.raises(anthropic.BadRequestError, match="local tokenizer"):
            await _client(url).messages.count_tokens(model="m", messages=USER)


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from tests.conftest import require_llama_core

    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=2048, n_threads=1)
    yield b
    b.close()


async def test_smollm2_text_stream_and_count_tokens(smol) -> None:
    async with bridge_in_process(smol) as (url, _, _):
        client = _client(url)
        kw = {"model": "smol", "max_tokens": 12, "system": "You are terse.", "messages": USER}
        msg = await client.messages.create(extra_body=GREEDY, **kw)
        async with client.messages.stream(extra_body=GREEDY, **kw) as stream:
            streamed = await stream.get_final_message()
        counted = await client.messages.count_tokens(
            model="smol", system="You are terse.", messages=USER
        )
        longer = await client.messages.count_tokens(
            model="smol",
            system="You are terse.",
            messages=[{"role": "user", "content": "Weather in Paris? " * 5}],
        )
    assert msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert streamed.content[0].text == msg.content[0].text  # greedy: same text both ways
    assert counted.input_tokens == msg.usage.input_tokens > 0
    assert longer.input_tokens > counted.input_tokens


async def test_smollm2_forced_tool_and_round_trip(smol) -> None:
    async with bridge_in_process(smol) as (url, _, _):
        client = _client(url)
        first = await client.messages.create(
            model="smol",
            max_tokens=64,
            extra_body=GREEDY,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "weather"},
            messages=USER,
        )
        call = next(b for b in first.content if b.type == "tool_use")
        assert call.name == "weather" and isinstance(call.input.get("city"), str)
        assert first.stop_reason == "tool_use"
        follow = [
            *USER,
            {"role": "assistant", "content": [call.model_dump()]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "18C and sunny"}
                ],
            },
        ]
        reply = await client.messages.create(
            model="smol",
            max_tokens=24,
            extra_body=GREEDY,
            tools=[WEATHER],
            tool_choice={"type": "none"},
            messages=follow,
        )
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.content and reply.content[0].type == "text" and reply.content[0].text.strip()


async def test_413_in_anthropic_shape() -> None:
    async with bridge_in_process(Mock(), max_body_bytes=4096) as (url, _, _):
        async with aiohttp.ClientSession() as http:
            big = {"max_tokens": 5, "messages": [{"role": "user", "content": "x" * 10_000}]}
            async with http.post(f"{url}/v1/messages", json=big) as r:
                got = await r.json()
    assert r.status == 413
    assert got["type"] == "error" and got["error"]["type"] == "request_too_large"


async def test_client_leaving_a_stream_stops_the_generation() -> None:
    mock = Mock([f"t{i} " for i in range(1000)], delay=0.01)
    async with bridge_in_process(mock) as (url, _, _):
        async with aiohttp.ClientSession() as http:
            body = {"max_tokens": 5, "stream": True, "messages": USER}
            async with http.post(f"{url}/v1/messages", json=body) as r:
                assert b"content_block_delta" in await r.content.readuntil(b"content_block_delta")
        deadline = asyncio.get_running_loop().time() + 10  # generous: the stream needs 10 s
        while mock.active:
            assert asyncio.get_running_loop().time() < deadline, "generation still running"
            await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- the reader


def test_reader_takes_system_blocks_tool_result_lists_and_keeps_signed_thinking() -> None:
    from inferd.anthropic_wire import request_from_anthropic
    from inferd.types import ImageBlock, ThinkingBlock, ToolUseBlock

    req = request_from_anthropic(
        {
            "max_tokens": 10,
            "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://x.invalid/a.png"},
                        },
                        {"type": "text", "text": "?"},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {
                            "type": "tool_use",
                            "id": "t1",
                            "name": "weather",
                            "input": {"city": "Rome"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [{"type": "text", "text": "9C"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
            "tools": [WEATHER],
            "stop_sequences": ["END"],
        }
    )
    assert req.messages[0] == Message.system("Be brief.")
    assert req.messages[1].content[0] == ImageBlock(url="https://x.invalid/a.png")
    assert req.messages[2].content == (
        ThinkingBlock("hmm", "s"),  # kept for a backend that sends it back (AnthropicCompat)
        ToolUseBlock("t1", "weather", {"city": "Rome"}),
    )
    assert req.messages[3] == Message.tool("t1", "9C", is_error=True)
    assert req.messages[4] == Message.user("thanks")
    assert req.stop == ("END",)


def test_usage_merges_message_delta_into_message_start() -> None:
    from inferd.anthropic_wire import usage_from_anthropic
    from inferd.types import Usage

    start = usage_from_anthropic(
        {"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 1}
    )
    assert start == Usage(100, 1, 90)
    assert usage_from_anthropic({"output_tokens": 40}, start) == Usage(100, 40, 90)
    full = {
        "input_tokens": 10,
        "cache_read_input_tokens": 90,
        "cache_creation_input_tokens": 5,
        "output_tokens": 41,
    }
    assert usage_from_anthropic(full, start) == Usage(105, 41, 90)


@pytest.mark.parametrize("streamed", [False, True])
async def test_max_tokens_stop_reason(streamed: bool) -> None:
    async with bridge_in_process(Mock(["a", "b", "c", "d"])) as (url, _, _):
        client = _client(url)
        if streamed:
            async with client.messages.stream(model="m", max_tokens=2, messages=USER) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(model="m", max_tokens=2, messages=USER)
    assert msg.stop_reason == "max_tokens" and msg.content[0].text == "ab"


# --------------------------------------------------------------------------- signatures


def test_writer_emits_signature_delta_and_a_new_block_after_it() -> None:
    import orjson

    from inferd.anthropic_wire import MessageStreamWriter
    from inferd.types import Done, StopReason, Text, Thinking

    w = MessageStreamWriter("m")
    raw = w.start() + b"".join(
        w.write(e)
        for e in (
            Thinking("a"),
            Thinking("", signature="S1"),
            Thinking("b"),
            Text("t"),
            Done(StopReason.END_TURN),
        )
    )
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]
    deltas = [(e["index"], e["delta"]) for e in events if e["type"] == "content_block_delta"]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "a"}),
        (0, {"type": "signature_delta", "signature": "S1"}),
        (1, {"type": "thinking_delta", "thinking": "b"}),
        (2, {"type": "text_delta", "text": "t"}),
    ]
    starts = [e["index"] for e in events if e["type"] == "content_block_start"]
    stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert starts == stops == [0, 1, 2]


async def test_signed_thinking_passes_through_the_bridge_both_ways() -> None:
    """A Claude client -> the bridge -> AnthropicCompat -> a Messages upstream: the
    signature reaches the client (streamed and not), and the client's follow-up turn
    reaches the upstream with the block unchanged."""
    from inferd.backends.anthropic_compat import AnthropicCompat

    from .anthropic_upstream import SIG, Stream, Upstream, signed_reply, stream, text_block

    up = await Upstream().start()
    last = Stream(stream(text_block(0, ["18C in Paris."])))
    up.script("p", Stream(signed_reply()), Stream(signed_reply()), last)
    backend = AnthropicCompat(up.url("p"), api_key="k", model="claude-test")
    kw = {
        "model": "claude-test",
        "max_tokens": 2048,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [WEATHER],
    }
    try:
        async with bridge_in_process(backend) as (url, _, _):
            client = _client(url)
            whole = await client.messages.create(messages=USER, **kw)
            async with client.messages.stream(messages=USER, **kw) as s:
                final = await s.get_final_message()
            result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}
            turns = [
                *USER,
                {"role": "assistant", "content": final.content},
                {"role": "user", "content": [result]},
            ]
            follow = await client.messages.create(messages=turns, **kw)
    finally:
        await backend.aclose()
        await up.stop()
    for msg in (whole, final):
        assert [b.type for b in msg.content] == ["thinking", "tool_use"]
        assert (msg.content[0].thinking, msg.content[0].signature) == ("Let me check.", SIG)
    assert follow.content[0].text == "18C in Paris."
    sent = up.requests("p")[-1].body["messages"][1]["content"]
    assert sent[0] == {"type": "thinking", "thinking": "Let me check.", "signature": SIG}
    assert sent[1]["type"] == "tool_use" and sent[1]["id"] == "toolu_1"
