"""``glm4``: GLM 4.5 / 4.6 / 4.7 tool calls (also Spark 2.5, Ling 3, Laguna).

A call is ``<tool_call>NAME`` then ``<arg_key>k</arg_key><arg_value>v</arg_value>``
pairs (newlines between them optional) and ``</tool_call>``; a tool without
arguments is just ``<tool_call>NAME</tool_call>``. Values are raw text typed by the
tool's schema (:mod:`inferd.chat._xml_args`). GLM reasons in ``<think>``; 4.7's
prompt opens it, so the reply may start inside it. ``<|user|>`` and
``<|observation|>`` end the turn.

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

_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)

OPENER = "<tool_call>"
VALUE_CLOSER = "</arg_value>"
_KEY_OPEN = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>", re.S)


class Glm4Parser(CallEndsThinking):
    """``<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>``."""

    name = "glm4"
    call_open = OPENER
    call_close = "</tool_call>"
    end_sentinels = ("<|user|>", "<|observation|>")
    thinking_default = True
    accepts_schemas = True

    def __init__(self, *, schemas: Schemas | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.schemas: Schemas = schemas or {}

    def partial_call(self, opener: str, body: str) -> tuple[str | None, str | None]:
        """The name (final at the first ``<arg_key>``) and arguments so far (ADR 0023)."""
        cut = body.find("<arg_key>")
        if cut < 0 or not body[:cut].strip():
            return None, None
        name = body[:cut].strip()
        return name, partial_arguments(self.schemas, name, body[cut:], _KEY_OPEN, VALUE_CLOSER)

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        cut = body.find("<arg_key>")
        name = body if cut < 0 else body[:cut]
        rest = "" if cut < 0 else body[cut:]
        if not name.strip():
            raise MalformedCall("glm4 call without a function name")
        pairs = list(_PAIR.finditer(rest))
        only_space_between(rest, [m.span() for m in pairs], f"glm4 call {name.strip()[:40]!r}")
        return [build_call(self.new_id, self.schemas, name, [m.groups() for m in pairs])]


def call_rule(conv: SchemaConverter, tool: Tool) -> str:
    """One call of ``tool`` in this syntax (grammar for ``tool_choice``)."""

    def render(key: str, value: str) -> str:
        return f'{gbnf_literal(f"<arg_key>{key}</arg_key><arg_value>")} {value} "</arg_value>"'

    params = params_rule(conv, tool, render, VALUE_CLOSER)
    return conv.add(
        f"call-{tool.name}", f'{gbnf_literal("<tool_call>" + tool.name)} {params} "</tool_call>"'
    )
