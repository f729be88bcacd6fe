"""``deepseek``: DeepSeek V3 / V3.1 and R1 tool calls.

Calls sit in ``<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>``, one
``<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>`` each, in one of two shapes:

* V3.1: ``NAME<｜tool▁sep｜>{json arguments}``;
* V3 and R1 (and the R1 distills): ``function<｜tool▁sep｜>NAME`` then the arguments
  in a fenced block, ```` ```json\\n{...}\\n``` ````.

Reasoning is ``<think>...</think>``; R1 and V3.1 thinking prompts open it, so the
reply may start inside it. (V3.2's DSML markup is a different syntax, not handled.)

Why these rules and where they come from: docs/adr/0024-tool-call-families.md.
"""

from __future__ import annotations

import re

from inferd.chat._stream import (
    MalformedCall,
    SentinelParser,
    arguments_to_tool_use,
    decode_json_objects,
)
from inferd.chat._xml_args import CallEndsThinking, only_space_between
from inferd.chat.grammar import SchemaConverter, gbnf_literal
from inferd.types import Tool, ToolUse

OPENER = "<｜tool▁calls▁begin｜>"
CLOSER = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

_CALL = re.compile(re.escape(CALL_BEGIN) + "(.*?)" + re.escape(CALL_END), re.S)
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def _one(parser: SentinelParser, inner: str) -> ToolUse:
    head, sep, rest = inner.partition(SEP)
    if not sep:
        raise MalformedCall("deepseek call without <｜tool▁sep｜>")
    head = head.strip()
    if head == "function" and not rest.lstrip().startswith("{"):
        name, _, rest = rest.partition("\n")  # V3 / R1: type, then name and a fence
        fenced = _FENCE.match(rest)
        rest = fenced.group(1) if fenced else rest
    else:
        name = head
    objs = decode_json_objects(rest.strip())
    if len(objs) != 1:
        raise MalformedCall(f"deepseek call {name.strip()[:40]!r}: expected one JSON object")
    return arguments_to_tool_use(parser.new_id(), name.strip(), objs[0])


class DeepSeekParser(CallEndsThinking):
    """``<｜tool▁calls▁begin｜>`` blocks (V3.1 and R1 shapes), ``<think>`` reasoning."""

    name = "deepseek"
    call_open = OPENER
    call_close = CLOSER
    end_sentinels = ("<｜end▁of▁sentence｜>",)
    thinking_default = True

    def partial_call(self, opener: str, body: str) -> tuple[str | None, str | None]:
        """The first call's name and JSON arguments so far, for streaming (ADR 0023)."""
        t = body.lstrip()
        if not t.startswith(CALL_BEGIN):
            return None, None
        head, sep, rest = t[len(CALL_BEGIN) :].partition(SEP)
        if not sep or not rest.strip():
            return None, None
        name = head.strip()
        if name == "function" and not rest.lstrip().startswith("{"):
            name, nl, rest = rest.partition("\n")  # V3 / R1: the arguments are fenced
            i = rest.find("{")
            if not nl or i < 0:
                return None, None
            rest = rest[i:]
        return name.strip(), rest.split(CALL_END, 1)[0].split("```", 1)[0].lstrip()

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        calls = list(_CALL.finditer(body))
        if not calls:
            raise MalformedCall("deepseek call block without <｜tool▁call▁begin｜>")
        only_space_between(body, [m.span() for m in calls], "deepseek call block")
        return [_one(self, m.group(1)) for m in calls]


def call_rule(conv: SchemaConverter, tool: Tool) -> str:
    """One V3.1-shaped call of ``tool`` (the block markers wrap the calls)."""
    args = conv.visit(dict(tool.parameters) or {"type": "object"}, f"{tool.name}-args")
    head = gbnf_literal(CALL_BEGIN + tool.name + SEP)
    return conv.add(f"call-{tool.name}", f"{head} {args} {gbnf_literal(CALL_END)}")
