"""Recognise a model's tool-call and thinking format from its chat template.

Each rule is a set of substrings that must all appear in the Jinja source; the
first matching rule wins, so more specific families come first. The substrings were
recorded from the published templates of each family, as llama.cpp keeps them under
``models/templates`` (Gemma 4 31B-it, Mistral Nemo 2407 / Small 3.2 / Devstral /
Ministral 3, Llama 3.1 / 3.2 / 3.3 Instruct, Hermes 2 Pro / 3, Qwen 2.5 / QwQ /
Qwen 3, SmolLM2; and for ADR 0024: Qwen3-Coder, Qwen 3.5, Nemotron 3 Nano and Nano
v2, StepFun 3.5, GLM 4.6 / 4.7, Spark 2.5, Ling 3, Laguna, MiniMax M2, DeepSeek
V3.1 / R1 and its distills, DeepSeek V3.2 / V4 (DSML), functionary v3.1 / v3.2);
the tests render each one.

A template that matches no rule is ``plain``. Some templates write ``<tool_call>``
around a syntax that is *not* Hermes JSON and that inferd does not parse (MiniMax
M3's namespaced XML): an explicit rule marks them ``plain`` too, so they get the
built-in tool prompt (:mod:`inferd.chat.tool_prompt`) instead of a Hermes parser
that would return their calls as text.
"""

from __future__ import annotations

#: (format name, substrings that must all be present), most specific first.
FORMAT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gemma4", ("<|tool_call>", "<tool_call|>")),
    ("mistral", ("[TOOL_CALLS]",)),
    ("deepseek_v32", ("｜DSML｜", "function_calls>")),
    ("deepseek_v4", ("｜DSML｜", "tool_calls>")),
    ("deepseek", ("<｜tool▁calls▁begin｜>",)),
    ("minimax", ("<minimax:tool_call>", "<invoke name=")),
    ("plain", ("]<]minimax[>[",)),  # MiniMax M3: <tool_call> that is not Hermes JSON
    ("nemotron", ("<TOOLCALL>",)),
    ("qwen3_coder", ("<tool_call>", "<function=", "<parameter=")),
    ("glm4", ("<tool_call>", "<arg_key>", "<arg_value>")),
    ("functionary_v31", ("<|start_header_id|>", "<function=")),
    ("functionary_v32", ("<|start_header_id|>", ">>>all")),
    ("llama3", ("<|start_header_id|>", "<|python_tag|>")),
    ("llama3", ("<|start_header_id|>", '"parameters"')),
    ("hermes", ("<tool_call>",)),
)

#: (opener, closer) pairs whose presence in a template means the model reasons.
THINKING_MARKERS: tuple[str, ...] = ("<think>", "[THINK]", "<|channel>")


def explain_format(chat_template: str | None) -> tuple[str, str]:
    """``(format, why)``: the format ``chat_template`` uses and the rule that said so."""
    if not chat_template:
        return "plain", "no chat template"
    for name, needles in FORMAT_RULES:
        if all(n in chat_template for n in needles):
            return name, "the template contains " + " and ".join(repr(n) for n in needles)
    return "plain", "the template matches no known tool-call syntax"


def detect_format(chat_template: str | None) -> str:
    """Name of the tool-call format ``chat_template`` uses (``plain`` if none)."""
    return explain_format(chat_template)[0]


def detect_thinking(chat_template: str | None) -> bool:
    """True when the template knows a reasoning block (so the parser should too)."""
    if not chat_template:
        return False
    return any(m in chat_template for m in THINKING_MARKERS)


def prompt_opens_thinking(prompt: str, opener: str = "<think>", closer: str = "</think>") -> bool:
    """True when the rendered prompt ends inside an open reasoning block.

    DeepSeek R1 templates (and Qwen 3 with some settings) end the generation prompt
    with ``<think>\\n``: the reply then starts in the middle of the reasoning and
    only the closer is ever generated.
    """
    i = prompt.rfind(opener)
    return i >= 0 and prompt.rfind(closer) < i and not prompt[i + len(opener) :].strip()
