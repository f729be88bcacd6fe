"""``deepseek_v32`` and ``deepseek_v4``: DeepSeek's DSML tool calls (V3.2, V4).

A reply's calls sit in one block (``function_calls`` in V3.2, ``tool_calls`` in V4)::

    <｜DSML｜function_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Zürich</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

``string="true"`` values are raw text, ``string="false"`` ones JSON (text that is not
JSON stays a string); without the attribute the tool's schema decides
(:mod:`inferd.chat._xml_args`). Reasoning is ``<think>``, which thinking prompts
open. See docs/adr/0024-tool-call-families.md.
"""

from __future__ import annotations

import json
import re
from typing import Any

from inferd.chat._stream import MalformedCall, arguments_to_tool_use
from inferd.chat._xml_args import (
    CallEndsThinking,
    Schemas,
    held_back,
    only_space_between,
    property_schema,
    schema_types,
    typed_value,
    value_rule,
)
from inferd.chat.grammar import SchemaConverter, gbnf_literal
from inferd.types import Tool, ToolUse

DSML = "｜DSML｜"
_INVOKE = re.compile(f'<{DSML}invoke name="([^"]*)">(.*?)</{DSML}invoke>', re.S)
_INVOKE_HEAD = re.compile(f'\\s*<{DSML}invoke name="([^"]*)">')
_PARAM_OPEN = re.compile(f'<{DSML}parameter name="([^"]*)"(?: string="(true|false)")?>')
VALUE_CLOSER = f"</{DSML}parameter>"


def _value(raw: str, flag: str | None, schema: Any) -> Any:
    if flag == "true":
        return raw
    if flag == "false":
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return typed_value(raw, schema)


class DeepSeekV32Parser(CallEndsThinking):
    """``<｜DSML｜function_calls>`` blocks of ``<｜DSML｜invoke>`` calls."""

    name = "deepseek_v32"
    block = "function_calls"
    call_open = f"<{DSML}function_calls>"
    call_close = f"</{DSML}function_calls>"
    end_sentinels = ("<｜end▁of▁sentence｜>",)
    thinking_default = True
    accepts_schemas = True

    def __init__(self, *, schemas: Schemas | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.schemas: Schemas = schemas or {}

    def _pairs(self, name: str, inner: str) -> list[tuple[str, Any]]:
        params = list(_PARAM_OPEN.finditer(inner))
        out, spans, pos = [], [], 0
        for m in params:
            if m.start() < pos:
                continue
            end = inner.find(VALUE_CLOSER, m.end())
            if end < 0:
                raise MalformedCall(f"{self.name}: parameter {m.group(1)!r} is not closed")
            schema = property_schema(self.schemas, name, m.group(1))
            out.append((m.group(1), _value(inner[m.end() : end], m.group(2), schema)))
            spans.append((m.start(), end + len(VALUE_CLOSER)))
            pos = end + len(VALUE_CLOSER)
        only_space_between(inner, spans, f"{self.name} invoke {name!r}")
        return out

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        invokes = list(_INVOKE.finditer(body))
        if not invokes:
            raise MalformedCall(f'{self.name} call without <{DSML}invoke name="...">')
        only_space_between(body, [m.span() for m in invokes], f"{self.name} call")
        out = []
        for m in invokes:
            name = m.group(1).strip()
            if not name or any(c in name for c in "<>\n"):
                raise MalformedCall(f"{self.name}: bad function name {name[:40]!r}")
            args = dict(self._pairs(name, m.group(2)))
            out.append(arguments_to_tool_use(self.new_id(), name, args))
        return out

    def partial_call(self, opener: str, body: str) -> tuple[str | None, str | None]:
        """The first invoke's name and arguments so far, for streaming (ADR 0023)."""
        m = _INVOKE_HEAD.match(body)
        if m is None:
            return None, None
        name, region = m.group(1).strip(), body[m.end() :].split(f"</{DSML}invoke>", 1)[0]
        parts: list[str] = []
        for p in _PARAM_OPEN.finditer(region):
            head = json.dumps(p.group(1), ensure_ascii=False) + ": "
            end = region.find(VALUE_CLOSER, p.end())
            schema = property_schema(self.schemas, name, p.group(1))
            if end >= 0:
                value = _value(region[p.end() : end], p.group(2), schema)
                parts.append(head + json.dumps(value, ensure_ascii=False))
                continue
            if p.group(2) != "true" and (p.group(2) or schema_types(schema) != {"string"}):
                return name, "{" + ", ".join([*parts, head])
            raw = region[p.end() :]
            raw = raw[: len(raw) - held_back(raw, (VALUE_CLOSER,))]
            return name, "{" + ", ".join([*parts, head + json.dumps(raw, ensure_ascii=False)[:-1]])
        return name, "{" + ", ".join(parts)


class DeepSeekV4Parser(DeepSeekV32Parser):
    """V4: the same markup in a ``<｜DSML｜tool_calls>`` block."""

    name = "deepseek_v4"
    block = "tool_calls"
    call_open = f"<{DSML}tool_calls>"
    call_close = f"</{DSML}tool_calls>"


def call_rule(conv: SchemaConverter, tool: Tool) -> str:
    """One ``<｜DSML｜invoke>`` of ``tool`` (the block's markers wrap the calls)."""
    schema = dict(tool.parameters) or {"type": "object"}
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = set(schema.get("required") or ())
    parts = []
    for key, sub in props.items():
        is_str = schema_types(sub if isinstance(sub, dict) else None) == {"string"}
        flag = "true" if is_str else "false"
        value = value_rule(conv, f"{tool.name}-{key}", sub, VALUE_CLOSER)
        head = gbnf_literal(f'<{DSML}parameter name="{key}" string="{flag}">')
        one = f"{head} {value} {gbnf_literal(VALUE_CLOSER + chr(10))}"
        parts.append(one if key in required else f"({one})?")
    params = " ".join(parts) if parts else '""'
    head = gbnf_literal(f'<{DSML}invoke name="{tool.name}">\n')
    tail = gbnf_literal(f"</{DSML}invoke>\n")
    return conv.add(f"call-{tool.name}", f"{head} {params} {tail}")
