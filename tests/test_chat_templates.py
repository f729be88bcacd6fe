"""Fingerprints and tool rendering on the real chat templates of each family.

llama.cpp's source tree (which the build fetches into ``vendor/llama.cpp``) carries
the published Jinja templates of many models under ``models/templates``. Here each
family's templates must be detected as that family, and a conversation with tools,
an assistant call and its result must render through our sandboxed renderer with
the tool, the call's arguments and the result all present in the prompt: the shapes
from ``inferd.chat.messages`` are the ones these templates read.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.chat import detect_format, detect_thinking
from inferd.chat.plan import plan_chat
from inferd.types import Message, Request, Tool, ToolUseBlock
from tests.conftest import missing

TEMPLATES = Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "models" / "templates"

#: template file -> (format, reasons?)
EXPECTED = {
    "google-gemma-4-31B-it.jinja": ("gemma4", True),
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": ("mistral", False),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("mistral", False),
    "mistralai-Ministral-3-14B-Reasoning-2512.jinja": ("mistral", True),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("llama3", False),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("llama3", False),
    "meta-llama-Llama-3.3-70B-Instruct.jinja": ("llama3", False),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": ("hermes", False),
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("hermes", False),
    "Qwen-Qwen3-0.6B.jinja": ("hermes", True),
    # R1 writes <｜tool▁calls▁begin｜> calls (ADR 0024); its template shows no tools.
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": ("deepseek", True),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("plain", False),
}

WEATHER = Tool(
    "get_weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def _template(name: str) -> str:
    path = TEMPLATES / name
    if not path.is_file():
        missing(f"llama.cpp's model templates ({path.parent} is fetched by the build)")
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fingerprints_on_real_templates(name: str) -> None:
    src = _template(name)
    fmt, thinks = EXPECTED[name]
    assert detect_format(src) == fmt
    assert detect_thinking(src) is thinks


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if "DeepSeek" not in n))
def test_tools_calls_and_results_render(name: str) -> None:
    from inferd.backends.llamacpp.chat_template import ChatTemplate

    src = _template(name)
    call_id = "abcDEF123"  # 9 alphanumerics: Mistral templates accept nothing else
    req = Request(
        (
            Message.system("Be brief."),
            Message.user("Weather in Zürich?"),
            Message.assistant([ToolUseBlock(call_id, "get_weather", {"city": "Zürich"})]),
            Message.tool(call_id, "14 degrees and sunny"),
            Message.assistant("It is 14 degrees and sunny in Zürich."),
            Message.user("Thanks. And tomorrow?"),
        ),
        tools=(WEATHER,),
    )
    plan = plan_chat(src, req)
    prompt = ChatTemplate(src, bos_token="<s>", eos_token="</s>").render(
        plan.messages, tools=plan.tools
    )
    assert "get_weather" in prompt
    assert "Zürich" in prompt  # the call's arguments (and the question)
    assert "14 degrees and sunny" in prompt
    assert "Thanks. And tomorrow?" in prompt
    if plan.folded:
        assert "<tool_call>" in prompt and "<tool_response>" in prompt


@pytest.mark.parametrize("thinking", [False, True])
def test_request_thinking_reaches_the_template(thinking: bool) -> None:
    from inferd.backends.llamacpp.chat_template import ChatTemplate
    from inferd.chat import prompt_opens_thinking

    src = _template("Qwen-Qwen3-0.6B.jinja")
    plan = plan_chat(src, Request((Message.user("2+2?"),), thinking=thinking))
    assert plan.template_kwargs == {"enable_thinking": thinking}
    prompt = ChatTemplate(src).render(plan.messages, **plan.template_kwargs)
    # Qwen 3 closes an empty reasoning block in the prompt when thinking is off.
    assert prompt.rstrip().endswith("</think>") is not thinking
    assert not prompt_opens_thinking(prompt)
    assert plan_chat("{{ messages }}", Request((Message.user("x"),))).template_kwargs == {}


LOOP = (
    "{% for m in messages %}[{{ m.role }}"
    "{% if m.tool_call_id %} {{ m.tool_call_id }}/{{ m.name }}{% endif %}]"
    "{{ m.content }}{% for c in m.tool_calls or [] %}<{{ c.id }}:{{ c.function.name }}>"
    "{% endfor %}\n{% endfor %}"
)


def test_several_tool_results_in_one_message_give_one_turn_each() -> None:
    """One mapper (``template_messages``): every result keeps its own call id.

    The renderer used to map messages itself and kept only the first result's id.
    """
    from inferd.backends.llamacpp.chat_template import ChatTemplate
    from inferd.chat.messages import template_messages
    from inferd.types import ToolResultBlock

    msgs = [
        Message.user("Weather in Oslo and Rome?"),
        Message.assistant(
            [
                ToolUseBlock("c1", "get_weather", {"city": "Oslo"}),
                ToolUseBlock("c2", "get_weather", {"city": "Rome"}),
            ]
        ),
        Message("tool", [ToolResultBlock("c1", "cold"), ToolResultBlock("c2", "warm")]),
        Message.user([ToolResultBlock("c2", "still warm"), *Message.user("and now?").content]),
    ]
    dicts = template_messages(msgs)
    tool_turns = [d for d in dicts if d["role"] == "tool"]
    assert [(d["tool_call_id"], d["name"], d["content"]) for d in tool_turns] == [
        ("c1", "get_weather", "cold"),
        ("c2", "get_weather", "warm"),
        ("c2", "get_weather", "still warm"),
    ]
    assert dicts[-1] == {"role": "user", "content": "and now?"}  # the text is kept too
    tpl = ChatTemplate(LOOP)
    prompt = tpl.render(msgs, add_generation_prompt=False)
    assert prompt == tpl.render(dicts, add_generation_prompt=False)
    assert "[tool c1/get_weather]cold" in prompt and "[tool c2/get_weather]warm" in prompt
    assert "<c1:get_weather><c2:get_weather>" in prompt


def test_template_mapper_refuses_media_and_mixed_tool_turns() -> None:
    from inferd.backends.llamacpp.chat_template import ChatTemplate
    from inferd.chat.messages import template_messages
    from inferd.errors import InvalidRequest
    from inferd.types import ImageBlock, TextBlock, ToolResultBlock

    with pytest.raises(InvalidRequest, match=r"messages\[0\] \(user\) carries ImageBlock"):
        template_messages([Message.user([ImageBlock(url="http://x/y.png")])])
    with pytest.raises(InvalidRequest, match="both tool results and text"):
        template_messages([Message("tool", [ToolResultBlock("c1", "x"), TextBlock("y")])])
    with pytest.raises(InvalidRequest, match="not a mix"):
        ChatTemplate(LOOP).render([Message.user("x"), {"role": "user", "content": "y"}])
