"""``minimax``: MiniMax M2 tool calls.

A reply's calls sit in one block::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Zürich</parameter>
    </invoke>
    </minimax:tool_call>

with one ``<invoke>`` per call (several for parallel calls). Values are raw text
typed by the tool's schema (:mod:`inferd.chat._xml_args`). M2 reasons in
``<think>``, which its prompt opens; ``[e~[`` ends the turn.

Why these rules and where they come from: docs/adr/0024-tool-call-families.md.
"""

from __future__ import annotations

import re
from typing import Any

from inferd.chat._stream import MalformedCall
from inferd.chat._xml_args import (
    CallEndsThinking,
    Schemas,
    build_call,
    only_space_between,
    params_rule,
    partial_arguments,
)
from inferd.chat.grammar import SchemaConverter, gbnf_literal
from inferd.types import Tool, ToolUse

_INVOKE = re.compile(r'<invoke name="([^"]*)">(.*?)</invoke>', re.S)
_PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)</parameter>', re.S)

_INVOKE_HEAD = re.compile(r'\s*<invoke name="([^"]*)">')
_PARAM_OPEN = re.compile(r'<parameter name="([^"]*)">')

OPENER = "<minimax:tool_call>"
VALUE_CLOSER = "</parameter>"


class MiniMaxParser(CallEndsThinking):
    """``<minimax:tool_call><invoke name=..><parameter name=..>v</parameter>...``."""

    name = "minimax"
    call_open = OPENER
    call_close = "</minimax:tool_call>"
    end_sentinels = ("[e~[",)
    thinking_default = True
    accepts_schemas = True

    def __init__(self, *, schemas: Schemas | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.schemas: Schemas = schemas or {}

    def partial_call(self, opener: str, body: str) -> tuple[str | None, str | None]:
        """The first invoke's name and arguments so far, for streaming (ADR 0023)."""
        m = _INVOKE_HEAD.match(body)
        if m is None:
            return None, None
        region = body[m.end() :].split("</invoke>", 1)[0]
        name = m.group(1)
        return name, partial_arguments(self.schemas, name, region, _PARAM_OPEN, VALUE_CLOSER)

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        invokes = list(_INVOKE.finditer(body))
        if not invokes:
            raise MalformedCall('minimax call without <invoke name="...">...</invoke>')
        only_space_between(body, [m.span() for m in invokes], "minimax call")
        out = []
        for m in invokes:
            params = list(_PARAMETER.finditer(m.group(2)))
            only_space_between(m.group(2), [p.span() for p in params], f"invoke {m.group(1)!r}")
            pairs = [p.groups() for p in params]
            out.append(build_call(self.new_id, self.schemas, m.group(1), pairs))
        return out


def call_rule(conv: SchemaConverter, tool: Tool) -> str:
    """One ``<invoke>`` of ``tool`` (the block's opener and closer wrap the calls)."""

    def render(key: str, value: str) -> str:
        head = gbnf_literal(f'<parameter name="{key}">')
        return f'{head} {value} "</parameter>\\n"'

    params = params_rule(conv, tool, render, VALUE_CLOSER)
    head = gbnf_literal(f'<invoke name="{tool.name}">\n')
    return conv.add(f"call-{tool.name}", f'{head} {params} "</invoke>\\n"')
