"""``hermes``: Hermes 2/3, Qwen 2.5 / Qwen 3, SmolLM2 and their many fine-tunes.

A call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one JSON
object per block, several blocks for parallel calls. Qwen 3 adds
``<think>...</think>``, so thinking is on by default (Qwen 2.5 never writes it, so
recognising it costs nothing there).

Leniency, on purpose: ``"parameters"`` is accepted for ``"arguments"`` (several
fine-tunes write it), arguments given as a JSON *string* are decoded, and a block
cut off by the end of generation (no ``</tool_call>``) is still a call when its JSON
is complete. Anything else falls back to Text (see :mod:`inferd.chat._stream`).
"""

from __future__ import annotations

from inferd.chat._stream import (
    MalformedCall,
    SentinelParser,
    arguments_to_tool_use,
    decode_json_objects,
)
from inferd.types import ToolUse


def calls_from_objects(parser: SentinelParser, objs: list[object], key: str) -> list[ToolUse]:
    """``[{"name":..., key: {...}}, ...]`` -> ToolUse events (``arguments`` or ``parameters``)."""
    calls = []
    for obj in objs:
        if not isinstance(obj, dict):
            raise MalformedCall(f"a tool call must be a JSON object, got {obj!r}")
        args = obj.get(key, obj.get("arguments", obj.get("parameters")))
        calls.append(arguments_to_tool_use(parser.new_id(), obj.get("name"), args))
    return calls


class HermesParser(SentinelParser):
    """``<tool_call>{json}</tool_call>`` calls, ``<think>`` reasoning."""

    name = "hermes"
    call_open = "<tool_call>"
    call_close = "</tool_call>"
    end_sentinels = ("<|im_end|>",)
    thinking_default = True

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        return calls_from_objects(self, decode_json_objects(body), "arguments")
