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

:func:`tool_path` decides which path a template takes: the template's own tool
syntax when inferd recognises it (:mod:`inferd.chat.fingerprints`) and the template
renders tools; otherwise the built-in prompt. A template that renders tools in a
syntax inferd does not know must not be parsed as Hermes by accident: it gets this
prompt too, so the syntax is the one we asked for (and, with ``tool_choice``, the one
our grammar enforces). Each decision is logged at INFO with its reason, once per
template (ADR 0024).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inferd.chat.fingerprints import explain_format

logger = logging.getLogger(__name__)

#: How many (template, decision) pairs are remembered so each is logged only once.
MAX_LOGGED_DECISIONS = 64

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


@dataclass(frozen=True)
class ToolPath:
    """How a request's tools reach a model: the parse format, folded or not, and why."""

    format: str
    folded: bool
    reason: str


_logged: OrderedDict[tuple[str, str, bool], None] = OrderedDict()


def tool_path(
    chat_template: str | None, has_tools: bool, tool_format: str | None = None
) -> ToolPath:
    """Decide the tool format and whether tools are folded into the messages.

    ``tool_format`` (an operator's override) always names the parser; tools are then
    folded only when the template cannot render them, as before ADR 0024.
    """
    supports = template_supports_tools(chat_template)
    if tool_format:
        folded = has_tools and not supports
        path = ToolPath(tool_format, folded, f"tool_format={tool_format!r} was configured")
    else:
        detected, why = explain_format(chat_template)
        if not has_tools:
            return ToolPath(detected, False, why)
        if not supports:
            path = ToolPath(TOOL_PROMPT_FORMAT, True, f"the template does not render tools ({why})")
        elif detected == "plain":
            path = ToolPath(
                TOOL_PROMPT_FORMAT,
                True,
                f"the template renders tools in a syntax inferd does not recognise ({why}); "
                "using the built-in tool prompt",
            )
        else:
            path = ToolPath(detected, False, why)
    if has_tools:
        _log_once(chat_template, path)
    return path


def _log_once(chat_template: str | None, path: ToolPath) -> None:
    digest = hashlib.sha256((chat_template or "").encode()).hexdigest()[:16]
    key = (digest, path.format, path.folded)
    if key in _logged:
        _logged.move_to_end(key)
        return
    _logged[key] = None
    while len(_logged) > MAX_LOGGED_DECISIONS:
        _logged.popitem(last=False)
    how = "built-in tool prompt" if path.folded else "the template's own tool prompt"
    logger.info(
        "tool format %s (%s) for chat template %s: %s", path.format, how, digest, path.reason
    )


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
