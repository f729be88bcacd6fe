"""The bridge's stateless /v1/responses, driven by the official ``openai`` SDK
(``client.responses.create``, streamed and not) in front of Mock and SmolLM2."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from inferd.backends.mock import Mock
from inferd.errors import QueueFull
from inferd.types import Message, Request, ToolChoice, ToolResultBlock

from .serve_helpers import bridge_in_process

WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def _client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


class _Full(Mock):
    async def generate(self, request: Request):  # type: ignore[override]
        raise QueueFull("admission queue is full (max_queue=0); try again later")
        yield  # pragma: no cover


async def test_string_input_and_instructions() -> None:
    mock = Mock(["Hello", " there"])
    async with bridge_in_process(mock) as (url, _, _):
        r = await _client(url).responses.create(
            model="local", input="Hi!", instructions="Be brief.", max_output_tokens=32
        )
    assert r.output_text == "Hello there"
    assert r.status == "completed" and r.model == "local" and r.id.startswith("resp_")
    assert (
        r.usage is not None and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    )
    sent = mock.requests[-1]
    assert sent.messages == (Message.system("Be brief."), Message.user("Hi!"))
    assert sent.max_tokens == 32


async def test_streamed_text_and_reasoning_events() -> None:
    mock = Mock(["Hel", "lo"], thinking=["hmm"])
    async with bridge_in_process(mock) as (url, _, _):
        stream = await _client(url).responses.create(
            model="local", input="Hi", reasoning={"effort": "medium"}, stream=True
        )
        events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hel", "lo"]
    assert [e.delta for e in events if e.type == "response.reasoning_summary_text.delta"] == ["hmm"]
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    final = events[-1].response
    assert final.output_text == "Hello"
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert mock.requests[-1].thinking is True


async def test_reasoning_effort_none_turns_thinking_off_and_bad_effort_is_400() -> None:
    mock = Mock(["x"])
    async with bridge_in_process(mock) as (url, _, _):
        await _client(url).responses.create(model="m", input="Hi", reasoning={"effort": "none"})
        assert mock.requests[-1].thinking is False
        with pytest.raises(openai.BadRequestError, match=r"reasoning\.effort"):
            await _client(url).responses.create(
                model="m", input="Hi", reasoning={"effort": "extreme"}
            )


@pytest.mark.parametrize("streamed", [False, True])
async def test_function_call_round_trip(streamed: bool) -> None:
    mock = Mock(tool_calls=[("weather", {"city": "Paris"})])
    async with bridge_in_process(mock) as (url, _, _):
        client = _client(url)
        kw = {"model": "m", "input": "Weather in Paris?", "tools": [WEATHER]}
        if streamed:
            stream = await client.responses.create(stream=True, **kw)
            events = [e async for e in stream]
            deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
            done = [e for e in events if e.type == "response.function_call_arguments.done"]
            assert json.loads("".join(deltas)) == {"city": "Paris"}
            assert done[0].arguments == "".join(deltas)
            r = events[-1].response
        else:
            r = await client.responses.create(**kw)
        call = next(o for o in r.output if o.type == "function_call")
        assert call.name == "weather" and json.loads(call.arguments) == {"city": "Paris"}
        follow = [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C"},
        ]
        await client.responses.create(model="m", input=follow, tools=[WEATHER])
    sent = mock.requests[-1]
    assert [m.role for m in sent.messages] == ["user", "assistant", "tool"]
    assert sent.messages[2].content == (ToolResultBlock(call.call_id, "18C"),)


async def test_forced_tool_choice_and_json_schema_reach_the_backend() -> None:
    mock = Mock(tool_calls=[("weather", {"city": "Oslo"})])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    async with bridge_in_process(mock) as (url, _, _):
        client = _client(url)
        await client.responses.create(
            model="m",
            input="x",
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "weather"},
        )
        assert mock.requests[-1].tool_choice == ToolChoice("tool", "weather")
        await client.responses.create(
            model="m",
            input="x",
            text={
                "format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
            },
        )
    rf = mock.requests[-1].response_format
    assert rf == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"previous_response_id": "resp_1"}, "stateless"),
        ({"store": True}, "stateless"),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"input": [{"type": "file_search_call"}]}, "file_search_call"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format"),
    ],
)
async def test_400_shapes(kw: dict, needle: str) -> None:
    async with bridge_in_process(Mock()) as (url, _, _):
        body = {"model": "m", "input": "hi", **kw}
        with pytest.raises(openai.BadRequestError, match=needle) as ei:
            await _client(url).responses.create(**body)
    assert ei.value.status_code == 400
    assert ei.value.body["type"] == "invalid_request_error"


async def test_401_and_429() -> None:
    async with bridge_in_process(Mock(["ok"]), api_key="k-9") as (url, _, _):
        with pytest.raises(openai.AuthenticationError):
            await _client(url, "bad").responses.create(model="m", input="hi")
        r = await _client(url, "k-9").responses.create(model="m", input="hi")
        assert r.output_text == "ok"
    async with bridge_in_process(_Full()) as (url, _, _):
        with pytest.raises(openai.RateLimitError):
            await _client(url).responses.create(model="m", input="hi", stream=True)


async def test_mid_stream_failure_is_an_error_event() -> None:
    async with bridge_in_process(Mock(["a", "b", "c"], drop_after=1)) as (url, _, _):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/responses", json={"input": "hi", "stream": True}) as r:
                raw = (await r.read()).decode()
    assert r.status == 200
    assert "event: response.output_text.delta" in raw
    assert "event: error" in raw and "response.completed" not in raw


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from tests.conftest import require_llama_core

    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=2048, n_threads=1)
    yield b
    b.close()


async def test_smollm2_text_both_ways_and_forced_call(smol) -> None:
    async with bridge_in_process(smol) as (url, _, _):
        client = _client(url)
        kw = {
            "model": "smol",
            "input": "Name a colour.",
            "max_output_tokens": 12,
            "temperature": 0.0,
        }
        r = await client.responses.create(**kw)
        stream = await client.responses.create(stream=True, **kw)
        events = [e async for e in stream]
        forced = await client.responses.create(
            model="smol",
            input="Weather in Paris?",
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "weather"},
            temperature=0.0,
        )
    assert r.output_text.strip()
    assert events[-1].response.output_text == r.output_text
    call = next(o for o in forced.output if o.type == "function_call")
    assert call.name == "weather" and isinstance(json.loads(call.arguments), dict)


@pytest.mark.parametrize("streamed", [False, True])
async def test_max_output_tokens_gives_an_incomplete_response(streamed: bool) -> None:
    async with bridge_in_process(Mock(["a", "b", "c", "d"])) as (url, _, _):
        client = _client(url)
        if streamed:
            events = [
                e
                async for e in await client.responses.create(
                    model="m", input="hi", max_output_tokens=2, stream=True
                )
            ]
            assert events[-1].type == "response.incomplete"
            r = events[-1].response
        else:
            r = await client.responses.create(model="m", input="hi", max_output_tokens=2)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "ab"


def test_a_thinking_signature_alone_writes_no_responses_event() -> None:
    """Anthropic's signature arrives as Thinking("", signature=...): the Responses API
    has no field for it, and an empty reasoning delta would be noise."""
    from inferd.responses_wire import ResponsesStreamWriter
    from inferd.types import Done, StopReason, Text, Thinking

    w = ResponsesStreamWriter({"input": "hi"}, "m")
    w.start()
    assert w.write(Thinking("", signature="S1")) == b""
    reasoning = w.write(Thinking("hmm"))
    assert b"response.reasoning_summary_text.delta" in reasoning
    assert w.write(Thinking("", signature="S1")) == b""
    w.write(Text("ok"))
    final = w.write(Done(StopReason.END_TURN))
    done = json.loads(final.split(b"data: ")[-1])
    kinds = [item["type"] for item in done["response"]["output"]]
    assert kinds == ["reasoning", "message"]
