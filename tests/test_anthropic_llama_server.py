"""AnthropicCompat against llama.cpp's own ``llama-server`` ``/v1/messages`` (a real
third-party Messages API server, built from the vendored tree), and against our own
bridge's ``/v1/messages`` (both directions of ours, end to end).

The model is tiny, so the llama-server tests assert on the wire mechanics (streamed
text, usage, tool blocks accepted, a 400), never on answer quality.
"""

from __future__ import annotations

import pytest

from inferd.backends.anthropic_compat import AnthropicCompat
from inferd.backends.mock import Mock
from inferd.errors import InvalidRequest
from inferd.types import (
    Done,
    Message,
    Request,
    StopReason,
    Text,
    Thinking,
    Tool,
    ToolUse,
    ToolUseBlock,
)

from .serve_helpers import bridge_in_process
from .test_llama_server import CTX, llama_server, llama_server_bin  # noqa: F401 (fixtures)

WEATHER = Tool(
    "get_weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def _backend(url: str) -> AnthropicCompat:
    return AnthropicCompat(url, api_key="", model="smollm2", read_timeout=300, max_retries=0)


# --------------------------------------------------------------------------- llama-server


@pytest.mark.server
@pytest.mark.slow
async def test_llama_server_plain_and_streamed(llama_server: str) -> None:  # noqa: F811
    async with _backend(llama_server) as b:
        events = [
            e async for e in b.generate(Request.chat("Say hi.", max_tokens=8, temperature=0.0))
        ]
    assert isinstance(events[-1], Done)
    assert any(isinstance(e, Text) and e.text for e in events)
    done = events[-1]
    assert done.stop_reason in (StopReason.END_TURN, StopReason.MAX_TOKENS)
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0


@pytest.mark.server
@pytest.mark.slow
async def test_llama_server_tool_round_trip(llama_server: str) -> None:  # noqa: F811
    first = Request.chat(
        "What is the weather in Paris? Use the tool.",
        tools=(WEATHER,),
        max_tokens=64,
        temperature=0.0,
    )
    async with _backend(llama_server) as b:
        events = [e async for e in b.generate(first)]
        assert isinstance(events[-1], Done)
        calls = [e for e in events if isinstance(e, ToolUse)]
        call = calls[0] if calls else ToolUse("toolu_1", "get_weather", {"city": "Paris"}, "")
        follow = Request(
            (
                *first.messages,
                Message.assistant([ToolUseBlock(call.id, call.name, dict(call.input or {}))]),
                Message.tool(call.id, '{"temperature_c": 21}'),
            ),
            tools=(WEATHER,),
            max_tokens=24,
            temperature=0.0,
        )
        events = [e async for e in b.generate(follow)]
    assert isinstance(events[-1], Done) and events[-1].usage.input_tokens > 0
    assert len(events) >= 2, "a reply streamed after the tool result"


@pytest.mark.server
@pytest.mark.slow
async def test_llama_server_rejects_a_bad_request(llama_server: str) -> None:  # noqa: F811
    async with _backend(llama_server) as b:
        with pytest.raises(InvalidRequest, match="HTTP 400"):
            [e async for e in b.generate(Request.chat("word " * (CTX * 2), max_tokens=4))]


# --------------------------------------------------------------------------- our bridge


async def test_against_our_bridge_text_thinking_and_tools() -> None:
    mock = Mock(
        ["Hello", " there"], thinking=["mm"], tool_calls=[("get_weather", {"city": "Rome"})]
    )
    async with bridge_in_process(mock, api_key="k-1") as (url, _, _):
        async with AnthropicCompat(url, api_key="k-1", model="local", max_retries=0) as b:
            req = Request.chat("Weather?", system="terse", tools=(WEATHER,), thinking=True)
            events = [e async for e in b.generate(req)]
    assert [type(e) for e in events] == [Thinking, Text, Text, ToolUse, Done]
    assert events[3].name == "get_weather" and events[3].input == {"city": "Rome"}
    assert events[-1].stop_reason is StopReason.TOOL_USE
    sent = mock.requests[-1]
    assert sent.messages[0] == Message.system("terse") and sent.thinking is True
