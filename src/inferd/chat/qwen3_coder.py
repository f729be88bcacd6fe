"""``qwen3_coder``: Qwen3-Coder, Qwen 3.5, Nemotron 3 Nano and StepFun 3.5 XML calls.

A call is::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Zürich
    </parameter>
    </function>
    </tool_call>

One ``<function=...>`` per block (several blocks for parallel calls). A value is raw
text between the newline after ``<parameter=NAME>`` and the one before
``</parameter>``, typed by the tool's schema (:mod:`inferd.chat._xml_args`), so code
and HTML pass untouched. Qwen 3.5 and Nemotron reason in ``<think>``.

Two slips llama.cpp accepts, and so do we (ADR 0024): a model may skip the first
``<tool_call>`` and write ``<function=`` directly (at the start of the reply or
after some text; the ``</tool_call>`` still closes it), and a call may end a
reasoning block that the prompt opened without the model ever writing ``</think>``.
"""

from __future__ import annotations

import re
from typing import Any

from inferd.chat._stream import MalformedCall, find_first
from inferd.chat._xml_args import (
    CallEndsThinking,
    Schemas,
    build_call,
    only_space_between,
    params_rule,
    partial_arguments,
    strip_one_newline,
)
from inferd.chat.grammar import SchemaConverter, gbnf_literal
from inferd.types import Event, Tool, ToolUse

_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)</parameter>", re.S)
_BARE = "<function="
_HEAD = re.compile(r"\s*<function=([^>\n]*)>")
_PARAM_OPEN = re.compile(r"<parameter=([^>\n]*)>")

OPENER = "<tool_call>"
VALUE_CLOSER = "\n</parameter>"


class Qwen3CoderParser(CallEndsThinking):
    """``<tool_call><function=name><parameter=p>v</parameter></function></tool_call>``."""

    name = "qwen3_coder"
    call_open = OPENER
    call_close = "</tool_call>"
    end_sentinels = ("<|im_end|>",)
    thinking_default = True
    accepts_schemas = True

    def __init__(self, *, schemas: Schemas | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.schemas: Schemas = schemas or {}
        self._text_sentinels = (*self._text_sentinels, _BARE)  # held back when split

    def _step_text(self, out: list[Event], final: bool) -> bool:
        i, s = find_first(self._buf, self._text_sentinels)
        if s == _BARE:  # a call without its <tool_call>: the body keeps '<function='
            self._emit_text(out, self._buf[:i])
            self._buf = self._buf[i:]
            return self._start_call("")
        return super()._step_text(out, final)

    def partial_call(self, opener: str, body: str) -> tuple[str | None, str | None]:
        """The first function's name and arguments so far, for streaming (ADR 0023)."""
        m = _HEAD.match(body)
        if m is None:
            return None, None
        region = body[m.end() :].split("</function>", 1)[0]
        name = m.group(1).strip()
        args = partial_arguments(
            self.schemas, name, region, _PARAM_OPEN, "</parameter>", newline_layout=True
        )
        return name, args

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        funcs = list(_FUNCTION.finditer(body))
        if not funcs:
            raise MalformedCall("qwen3_coder call without <function=name>...</function>")
        only_space_between(body, [m.span() for m in funcs], "qwen3_coder call")
        return [self._one(m.group(1), m.group(2)) for m in funcs]

    def _one(self, name: str, inner: str) -> ToolUse:
        params = list(_PARAMETER.finditer(inner))
        only_space_between(inner, [m.span() for m in params], f"function {name!r}")
        pairs = [(m.group(1), strip_one_newline(m.group(2))) for m in params]
        return build_call(self.new_id, self.schemas, name, pairs)


def call_rule(conv: SchemaConverter, tool: Tool) -> str:
    """One call of ``tool`` in this syntax (grammar for ``tool_choice``)."""

    def render(key: str, value: str) -> str:
        return f'{gbnf_literal(f"<parameter={key}>" + chr(10))} {value} "\\n</parameter>\\n"'

    params = params_rule(conv, tool, render, VALUE_CLOSER)
    head = gbnf_literal(f"<tool_call>\n<function={tool.name}>\n")
    return conv.add(f"call-{tool.name}", f'{head} {params} "</function>\\n</tool_call>"')
