"""``mistral``: Mistral / Mixtral / Nemo / Small / Devstral / Magistral tool calls.

Two generations of the syntax, both accepted by one parser:

* v3 (Nemo, 7B v0.3): ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]``;
* v11+ (Small 3.2, Devstral, Ministral 3): ``[TOOL_CALLS]name[ARGS]{...}``, one
  ``[TOOL_CALLS]`` per call, optionally ``name[CALL_ID]id[ARGS]{...}``.

A call has no closing marker (the end-of-sequence token ends it), so each call is
complete at the next ``[TOOL_CALLS]`` or when generation ends. Reasoning models write
``[THINK]...[/THINK]``. Ids are 9 alphanumerics, because Mistral templates refuse
any other shape when the call is sent back in the next turn (the model's own ``id``
is not reused: it is not guaranteed unique). Text after the arguments object of a
v11 call is kept as Text.
"""

from __future__ import annotations

import json
import secrets
import string

from inferd.chat._stream import (
    MalformedCall,
    SentinelParser,
    arguments_to_tool_use,
    decode_json_objects,
)
from inferd.chat.hermes import calls_from_objects
from inferd.types import Event, Text, ToolUse

_ALNUM = string.ascii_letters + string.digits


def mistral_call_id() -> str:
    """Nine random alphanumerics: the only id shape Mistral templates accept."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


class MistralParser(SentinelParser):
    """``[TOOL_CALLS]`` calls (both syntaxes), ``[THINK]`` reasoning."""

    name = "mistral"
    think_open = "[THINK]"
    think_close = "[/THINK]"
    call_open = "[TOOL_CALLS]"
    call_close = None
    thinking_default = True

    @staticmethod
    def default_id() -> str:
        return mistral_call_id()

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        return [e for e in self._parse(body) if isinstance(e, ToolUse)]

    def _parse(self, body: str) -> list[Event]:
        text = body.strip()
        if text.startswith("[") or text.startswith("{"):
            objs = decode_json_objects(text)
            flat: list[object] = []
            for o in objs:
                flat.extend(o if isinstance(o, list) else [o])
            return list(calls_from_objects(self, flat, "arguments"))
        if "[ARGS]" not in text:
            raise MalformedCall("[TOOL_CALLS] without a JSON list or name[ARGS]{...}")
        name, _, args = text.partition("[ARGS]")
        name = name.partition("[CALL_ID]")[0].strip()
        try:
            value, end = json.JSONDecoder().raw_decode(args.lstrip())
        except ValueError as e:
            raise MalformedCall(f"[ARGS] of {name!r} is not JSON: {e}") from None
        out: list[Event] = [arguments_to_tool_use(self.new_id(), name, value)]
        rest = args.lstrip()[end:]
        if rest.strip():
            out.append(Text(rest))
        return out

    def _end_call(self, out: list[Event], body: str, *, closed: bool, closer: str) -> bool:
        # Like the base, but keeps trailing text after a v11 call's arguments.
        try:
            events = self._parse(body)
            if not events:
                raise MalformedCall("empty tool call")
        except MalformedCall as e:
            self.malformed.append(str(e))
            out.append(Text(self._call_opener + body + closer))
            return False
        out.extend(events)
        return True
