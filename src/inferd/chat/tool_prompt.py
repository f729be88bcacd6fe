"""The built-in tool prompt for chat templates that know nothing about tools.

Many small models (SmolLM2, Gemma 2/3, Phi 3.5, plain ChatML fine-tunes) ship a
template that ignores ``tools`` and drops ``tool_calls``. For them inferd writes the
tool definitions into the system message itself, in the Hermes convention (the most
widely trained one, and the format small instruct models imitate best), and parses
the reply with the ``hermes`` parser:

* the system message gains :data:`TOOL_PROMPT` with one JSON line per tool;
* earlier calls become assistant text ``<tool_call>{"name":..., "arguments":...}
  </tool_call>`` (one block per call);
* tool results become a *user* turn of ``<tool_response>...</tool_response>``
  blocks, because such templates often refuse (or mis-render) a ``tool`` role and
  expect user/assistant alternation.

:func:`template_supports_tools` decides which path a template takes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

#: Placed before the tool list; ``{tools}`` is one JSON object per line.
TOOL_PROMPT = (
    "You can call functions. The available functions, as JSON signatures:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with only this, once per call:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <arguments-object>}}\n'
    "</tool_call>\n"
    "Function results come back inside <tool_response></tool_response>."
)

#: The format name whose parser reads replies to :data:`TOOL_PROMPT`.
TOOL_PROMPT_FORMAT = "hermes"


def template_supports_tools(chat_template: str | None) -> bool:
    """True when the template renders ``tools`` itself (it mentions the variable)."""
    return bool(chat_template) and "tools" in chat_template  # type: ignore[operator]


def tool_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The system text that describes ``tools`` (OpenAI function form)."""
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return TOOL_PROMPT.format(tools="\n".join(lines))


def fold_tools_into_messages(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Rewrite template messages so a tool-less template still shows tools and calls.

    Takes and returns the dicts of :func:`inferd.chat.messages.template_messages`.
    """
    out: list[dict[str, Any]] = []
    prompt = tool_prompt(tools) if tools else ""
    if prompt:
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0])
            first["content"] = f"{first.get('content', '')}\n\n{prompt}".lstrip()
            out.append(first)
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    pending: list[str] = []
    for m in messages:
        if m.get("role") == "tool":
            pending.append(f"<tool_response>\n{m.get('content', '')}\n</tool_response>")
            continue
        if pending:
            out.append({"role": "user", "content": "\n".join(pending)})
            pending = []
        if m.get("tool_calls"):
            blocks = [
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "\n</tool_call>"
                for c in m["tool_calls"]
            ]
            text = m.get("content") or ""
            out.append({"role": m["role"], "content": "\n".join(([text] if text else []) + blocks)})
            continue
        out.append(dict(m))
    if pending:
        out.append({"role": "user", "content": "\n".join(pending)})
    return out
