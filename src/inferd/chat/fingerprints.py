"""Recognise a model's tool-call and thinking format from its chat template.

Each rule is a set of substrings that must all appear in the Jinja source; the
first matching rule wins, so more specific families come first. The substrings were
recorded from the published templates of each family (Gemma 4 31B-it, Mistral Nemo
2407 / Small 3.2 / Devstral / Ministral 3, Llama 3.1 / 3.2 / 3.3 Instruct, Hermes 2
Pro / 3, Qwen 2.5 / QwQ / Qwen 3 / 3.5, SmolLM2, DeepSeek R1 distills); the test
suite keeps a short excerpt of each. A template that matches nothing is ``plain``.
"""

from __future__ import annotations

#: (format name, substrings that must all be present), most specific first.
FORMAT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gemma4", ("<|tool_call>", "<tool_call|>")),
    ("mistral", ("[TOOL_CALLS]",)),
    ("llama3", ("<|start_header_id|>", "<|python_tag|>")),
    ("llama3", ("<|start_header_id|>", '"parameters"')),
    ("hermes", ("<tool_call>",)),
)

#: (opener, closer) pairs whose presence in a template means the model reasons.
THINKING_MARKERS: tuple[str, ...] = ("<think>", "[THINK]", "<|channel>")


def detect_format(chat_template: str | None) -> str:
    """Name of the tool-call format ``chat_template`` uses (``plain`` if none)."""
    if not chat_template:
        return "plain"
    for name, needles in FORMAT_RULES:
        if all(n in chat_template for n in needles):
            return name
    return "plain"


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
