"""inferd messages and tools -> the dicts chat templates expect (as transformers passes them).

Hugging Face chat templates are written against transformers'
``apply_chat_template(conversation, tools=...)``: tools in OpenAI function form
(``{"type": "function", "function": {name, description, parameters}}``), an
assistant turn's calls under ``tool_calls`` (``{"id", "type": "function", "function":
{"name", "arguments"}}`` with ``arguments`` a *dict*, which templates then ``tojson``;
Qwen's and Mistral's also accept a string), and each result as a ``tool`` message
with ``tool_call_id``, ``name`` and string ``content``. Rendering through the model's
own template with exactly these shapes is what makes its tool prompt the one the
model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from inferd.errors import InvalidRequest
from inferd.types import Message, TextBlock, ThinkingBlock, Tool, ToolResultBlock, ToolUseBlock

#: The keys an assistant turn's reasoning is passed under, each holding the same text:
#: templates disagree on the name (Qwen3, DeepSeek, Gemma 4, GLM: ``reasoning_content``;
#: GPT-OSS, LFM2.5: ``thinking``; Solar, Laguna, Hy3: ``reasoning``, vLLM's field) and
#: the ones that read several take the first they find
#: (docs/adr/0025-raw-completions-and-reasoning.md).
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def template_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Tools in the OpenAI function form templates iterate over."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": dict(t.parameters),
            },
        }
        for t in tools
    ]


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as template dicts: text ``content``, ``tool_calls``, ``tool`` turns.

    The one mapper from inferd messages to template dicts (the llama.cpp backend's
    renderer uses it too). Every tool result becomes its own ``tool`` turn (the shape
    templates loop over), named after the call it answers when an earlier assistant
    turn made that call; results come before the rest of their message, since they
    must follow the assistant turn that made the calls. Images and audio cannot be
    written into a text template: they raise :class:`InvalidRequest` rather than
    being dropped.
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        text, calls, results = _split(m, i)
        out.extend(_tool_turn(r, names) for r in results)
        if m.role == "tool":
            if text and results:
                raise InvalidRequest(
                    f"messages[{i}] (tool) holds both tool results and text; send the "
                    "text in a user or assistant message"
                )
            if text:
                out.append({"role": "tool", "content": text})
            continue
        if results and not calls and not text:
            continue
        d: dict[str, Any] = {"role": m.role, "content": text}
        reasoning = "".join(b.text for b in m.content if isinstance(b, ThinkingBlock))
        if reasoning:
            d.update(dict.fromkeys(REASONING_KEYS, reasoning))
        if calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": dict(c.input)},
                }
                for c in calls
            ]
            names.update((c.id, c.name) for c in calls)
        out.append(d)
    return out


def _split(m: Message, i: int) -> tuple[str, list[ToolUseBlock], list[ToolResultBlock]]:
    """A message's text, tool calls and tool results; media is refused."""
    texts: list[str] = []
    calls: list[ToolUseBlock] = []
    results: list[ToolResultBlock] = []
    for b in m.content:
        if isinstance(b, TextBlock):
            texts.append(b.text)
        elif isinstance(b, ToolUseBlock):
            calls.append(b)
        elif isinstance(b, ToolResultBlock):
            results.append(b)
        elif isinstance(b, ThinkingBlock):
            continue  # read by template_messages as reasoning_content
        else:
            raise InvalidRequest(
                f"messages[{i}] ({m.role}) carries {type(b).__name__}: a chat template "
                "takes text only, and this local model has no vision/audio support"
            )
    return "".join(texts), calls, results


def _tool_turn(r: ToolResultBlock, names: dict[str, str]) -> dict[str, Any]:
    return {
        "role": "tool",
        "tool_call_id": r.tool_use_id,
        "name": names.get(r.tool_use_id, ""),
        "content": r.content,
    }
