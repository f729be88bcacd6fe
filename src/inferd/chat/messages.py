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

from inferd.types import Message, TextBlock, Tool, ToolResultBlock, ToolUseBlock


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

    A tool message carries every one of its results as its own ``tool`` turn (the
    shape templates loop over), named after the call it answers when an earlier
    assistant turn made that call.
    """
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
        calls = [b for b in m.content if isinstance(b, ToolUseBlock)]
        results = [b for b in m.content if isinstance(b, ToolResultBlock)]
        if m.role == "tool" or (results and not calls and not text):
            for r in results:
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": r.tool_use_id,
                        "name": names.get(r.tool_use_id, ""),
                        "content": r.content,
                    }
                )
            if m.role == "tool" and not results and text:
                out.append({"role": "tool", "content": text})
            continue
        d: dict[str, Any] = {"role": m.role, "content": text}
        if calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": dict(c.input)},
                }
                for c in calls
            ]
            for c in calls:
                names[c.id] = c.name
        out.append(d)
    return out
