"""``nemotron``: NVIDIA Nemotron Nano v2 tool calls.

A reply's calls are one JSON list in ``<TOOLCALL>[{"name": ..., "arguments":
{...}}, ...]</TOOLCALL>``; reasoning is ``<think>``, which the prompt opens when
thinking is on. (Nemotron 3 Nano switched to the Qwen3-Coder XML syntax and is
detected as ``qwen3_coder``.)

Why these rules and where they come from: docs/adr/0024-tool-call-families.md.
"""

from __future__ import annotations

from inferd.chat._stream import decode_json_objects
from inferd.chat._xml_args import CallEndsThinking, json_call_rule
from inferd.chat.grammar import SchemaConverter
from inferd.chat.hermes import calls_from_objects
from inferd.types import Tool, ToolUse

OPENER = "<TOOLCALL>"


class NemotronParser(CallEndsThinking):
    """``<TOOLCALL>[json calls]</TOOLCALL>``, ``<think>`` reasoning."""

    name = "nemotron"
    call_open = OPENER
    call_close = "</TOOLCALL>"
    end_sentinels = ("<SPECIAL_12>",)
    thinking_default = True

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        flat: list[object] = []
        for obj in decode_json_objects(body):
            flat.extend(obj if isinstance(obj, list) else [obj])
        return calls_from_objects(self, flat, "arguments")


def call_rule(conv: SchemaConverter, tool: Tool) -> str:
    """One JSON call object of ``tool`` (the list and markers wrap the calls)."""
    return json_call_rule(conv, tool)
