"""``reasoning_effort`` and assistant reasoning in history (issue 15,
docs/adr/0025-raw-completions-and-reasoning.md).

The real templates from ``vendor/llama.cpp/models/templates`` are rendered through
``LlamaCpp``'s own prompt path (SmolLM2 loaded with the template as an override): the
level reaches Qwen3's ``enable_thinking`` and GPT-OSS's ``Reasoning:`` line, a template
without a switch refuses what it cannot do, and earlier reasoning is rendered back where
the template keeps it. ``OpenAICompat`` sends both upstream (checked on what the test
upstream received), and the bridge reads them from an OpenAI body.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from inferd.backends.mock import Mock
from inferd.backends.openai_compat import OpenAICompat
from inferd.errors import InvalidRequest
from inferd.openai_wire import request_from_openai
from inferd.types import REASONING_EFFORTS, Request, TextBlock, ThinkingBlock

from .serve_helpers import bridge_in_process
from .upstream import Stream, Upstream, text_stream

TEMPLATES = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "models" / "templates"
#: Qwen3's template writes an empty reasoning block when thinking is off.
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
#: An OpenAI conversation whose assistant turn kept its reasoning (DeepSeek's
#: thinking-with-tools mode needs it sent back).
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Need the weather tool for Paris.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]


def _template(name: str) -> str:
    path = TEMPLATES / name
    if not path.is_file():
        from tests.conftest import missing

        missing(f"llama.cpp's template {name} (vendor/llama.cpp is not checked out)")
    return path.read_text()


@pytest.fixture(scope="module")
def with_template(smollm2_path):
    """``LlamaCpp`` on SmolLM2 with one of llama.cpp's real templates as an override."""
    from tests.conftest import require_llama_core

    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    opened: list[LlamaCpp] = []

    def make(name: str | None) -> LlamaCpp:
        kw = {} if name is None else {"chat_template": _template(name)}
        b = LlamaCpp(smollm2_path, n_ctx=512, n_threads=1, parallel=1, **kw)
        opened.append(b)
        return b

    yield make
    for b in opened:
        b.close()


# --------------------------------------------------------------------------- Request


def test_effort_decides_thinking_and_contradictions_are_refused() -> None:
    for effort in REASONING_EFFORTS:
        req = Request.chat("hi", reasoning_effort=effort)
        assert req.thinking is (effort in ("low", "medium", "high"))
        assert Request.from_dict(req.to_dict()) == req
    assert Request.chat("hi", thinking=True).reasoning_effort is None
    with pytest.raises(InvalidRequest, match="contradicts reasoning_effort='none'"):
        Request.chat("hi", thinking=True, reasoning_effort="none")
    with pytest.raises(InvalidRequest, match="reasoning_effort"):
        Request.chat("hi", reasoning_effort="max")


def test_openai_body_reads_effort_and_history_reasoning() -> None:
    req = request_from_openai({"messages": HISTORY, "reasoning_effort": "low", "tools": []})
    assert req.reasoning_effort == "low" and req.thinking is True
    assistant = req.messages[1]
    assert assistant.content[0] == ThinkingBlock("Need the weather tool for Paris.")
    alt = request_from_openai(
        {"messages": [{"role": "assistant", "reasoning": "vLLM's name", "content": "ok"}]}
    )
    assert alt.messages[0].content == (ThinkingBlock("vLLM's name"), TextBlock("ok"))
    off = request_from_openai({"messages": HISTORY[:1], "reasoning": {"effort": "none"}})
    assert off.thinking is False and off.reasoning_effort == "none"
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.reasoning_content"):
        request_from_openai({"messages": [{"role": "assistant", "reasoning_content": 3}]})


# --------------------------------------------------------------------------- templates


def test_qwen3_enable_thinking_follows_the_effort(with_template) -> None:
    b = with_template("Qwen-Qwen3-0.6B.jinja")
    for effort in REASONING_EFFORTS:
        prompt = b.render(Request.chat("hi", reasoning_effort=effort))
        assert prompt.endswith(EMPTY_THINK) is (effort in ("none", "minimal")), effort
    # Without a level, ``thinking`` decides, as before.
    assert b.render(Request.chat("hi")).endswith(EMPTY_THINK)
    assert not b.render(Request.chat("hi", thinking=True)).endswith(EMPTY_THINK)


def test_gemma4_thinking_token_follows_the_effort(with_template) -> None:
    """Gemma 4 has one switch (``enable_thinking``): its ``<|think|>`` system token."""
    b = with_template("google-gemma-4-31B-it.jinja")
    for effort in REASONING_EFFORTS:
        prompt = b.render(Request.chat("hi", reasoning_effort=effort))
        assert ("<|think|>" in prompt) is (effort in ("low", "medium", "high")), effort


def test_gpt_oss_gets_its_own_levels(with_template) -> None:
    b = with_template("openai-gpt-oss-120b.jinja")
    for effort, line in [
        ("high", "Reasoning: high"),
        ("medium", "Reasoning: medium"),
        ("low", "Reasoning: low"),
        ("minimal", "Reasoning: low"),
        (None, "Reasoning: medium"),  # the template's own default
    ]:
        assert line in b.render(Request.chat("hi", reasoning_effort=effort)), effort
    with pytest.raises(InvalidRequest, match=r"reasoning_effort='none'.*always reasons"):
        b.render(Request.chat("hi", reasoning_effort="none"))


def test_a_template_that_reads_the_level_refuses_one_it_does_not_know(with_template) -> None:
    """Hy3 knows no_think/low/high only; anything else raises in the template itself."""
    b = with_template("tencent-Hy3.jinja")
    assert "reasoning_effort:high" in b.render(Request.chat("hi", reasoning_effort="high"))
    with pytest.raises(InvalidRequest, match="reasoning_effort error"):
        b.render(Request.chat("hi", reasoning_effort="medium"))


async def test_smollm2_has_no_reasoning_switch(with_template) -> None:
    b = with_template(None)
    plain = b.render(Request.chat("hi"))
    assert b.render(Request.chat("hi", reasoning_effort="none")) == plain
    with pytest.raises(InvalidRequest, match=r"reasoning_effort='high'.*has no reasoning"):
        b.render(Request.chat("hi", reasoning_effort="high"))
    with pytest.raises(InvalidRequest, match="reasoning_effort"):  # pre-stream, from generate
        await anext(aiter(b.generate(Request.chat("hi", reasoning_effort="low", max_tokens=2))))
    events = [
        e async for e in b.generate(Request.chat("hi", reasoning_effort="none", max_tokens=2))
    ]
    assert events[-1].usage.output_tokens >= 1


def test_history_reasoning_is_rendered_where_the_template_keeps_it(with_template) -> None:
    req = request_from_openai({"messages": HISTORY, "tools": [WEATHER_TOOL]})
    qwen = with_template("Qwen-Qwen3-0.6B.jinja").render(req)
    assert "<think>\nNeed the weather tool for Paris.\n</think>" in qwen
    # GPT-OSS keeps the reasoning of a turn that made a call (its ``thinking`` key); the
    # follow-up here sends no tools, so the calls are rendered in GPT-OSS's own syntax.
    oss = with_template("openai-gpt-oss-120b.jinja").render(
        request_from_openai({"messages": HISTORY})
    )
    assert "<|channel|>analysis<|message|>Need the weather tool for Paris.<|end|>" in oss
    assert "to=functions.weather" in oss
    smol = with_template(None).render(req)  # SmolLM2's template has no place for it
    assert "Need the weather tool" not in smol


# --------------------------------------------------------------------------- upstream, bridge


@pytest.fixture
async def up():
    u = await Upstream().start()
    yield u
    await u.stop()


async def test_openai_compat_sends_effort_and_reasoning_content(up) -> None:
    base = up.script("r", Stream(text_stream(["It is 18C."])))
    b = OpenAICompat(base, api_key="", model="m", max_retries=0)
    try:
        req = request_from_openai(
            {"messages": HISTORY, "tools": [WEATHER_TOOL], "reasoning_effort": "high"}
        )
        events = [e async for e in b.generate(req)]
    finally:
        await b.aclose()
    assert events[0].text == "It is 18C."
    sent = up.requests("r")[-1].body
    assert sent["reasoning_effort"] == "high"
    assistant = sent["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["reasoning_content"] == "Need the weather tool for Paris."
    assert assistant["tool_calls"][0]["function"]["name"] == "weather"


async def test_bridge_passes_effort_and_history_to_the_backend() -> None:
    mock = Mock(["ok"])
    async with bridge_in_process(mock) as (url, _, _):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        await client.chat.completions.create(
            model="m", messages=HISTORY, tools=[WEATHER_TOOL], reasoning_effort="minimal"
        )
        with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
            await client.chat.completions.create(
                model="m", messages=HISTORY[:1], extra_body={"reasoning_effort": "extreme"}
            )
    got = mock.requests[-1]
    assert got.reasoning_effort == "minimal" and got.thinking is False
    assert got.messages[1].content[0] == ThinkingBlock("Need the weather tool for Paris.")
