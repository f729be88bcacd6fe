"""``functionary_v31`` and ``functionary_v32``: MeetKai functionary v3.x calls.

* v3.1 (Llama 3.1 based): ``<function=NAME>{json arguments}</function>``, any number
  of them, text before allowed.
* v3.2: the prompt ends with ``>>>``, so the reply starts with a *recipient*:
  ``all\\n`` then text for the user, or ``NAME\\n`` then JSON arguments; each
  further part starts with ``>>>``. Once a part is known to be ``all`` its text
  streams as it is written (held back only where a ``>>>`` may be starting).

See docs/adr/0024-tool-call-families.md.
"""

from __future__ import annotations

from inferd.chat._stream import (
    _END,
    MalformedCall,
    SentinelParser,
    arguments_to_tool_use,
    decode_json_objects,
    find_first,
    holdback,
)
from inferd.chat.grammar import SchemaConverter, gbnf_literal
from inferd.types import Event, Text, Tool, ToolUse

V31_OPENER = "<function="
V32_SEPARATOR = ">>>"
V32_TEXT = "all\n"


def _json_call(parser: SentinelParser, name: str, args_text: str) -> ToolUse:
    objs = decode_json_objects(args_text.strip())
    if len(objs) != 1:
        raise MalformedCall(f"functionary call {name.strip()[:40]!r}: expected one JSON object")
    if any(c in name for c in "<>\n") or not name.strip():
        raise MalformedCall(f"functionary call: bad function name {name[:40]!r}")
    return arguments_to_tool_use(parser.new_id(), name.strip(), objs[0])


class FunctionaryV31Parser(SentinelParser):
    """``<function=name>{json}</function>``."""

    name = "functionary_v31"
    call_open = V31_OPENER
    call_close = "</function>"
    end_sentinels = ("<|eom_id|>", "<|eot_id|>")

    def partial_call(self, opener: str, body: str) -> tuple[str | None, str | None]:
        """``name>{json`` so far, for streaming (ADR 0023)."""
        name, gt, args = body.partition(">")
        return (name.strip(), args.lstrip()) if gt and name.strip() else (None, None)

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        name, gt, args = body.partition(">")
        if not gt:
            raise MalformedCall("functionary call without '>' after the name")
        return [_json_call(self, name, args)]


class FunctionaryV32Parser(SentinelParser):
    """``>>>``-separated parts: ``all\\n`` text or ``name\\n{json}`` calls."""

    name = "functionary_v32"
    call_open = V32_SEPARATOR
    call_close = None
    end_sentinels = ("<|eom_id|>", "<|eot_id|>")

    def bare_call_start(self, buf: str, final: bool) -> bool | None:
        return True  # the prompt's '>>>' already opened the first part

    def partial_call(self, opener: str, body: str) -> tuple[str | None, str | None]:
        """A call part's ``name\\n{json`` so far (an ``all`` part is text, not streamed)."""
        if body.startswith(V32_TEXT) or V32_TEXT.startswith(body):
            return None, None
        name, nl, args = body.partition("\n")
        return (name.strip(), args.lstrip()) if nl and name.strip() else (None, None)

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        return [e for e in self._part(body) if isinstance(e, ToolUse)]

    def _part(self, body: str) -> list[Event]:
        if body.startswith(V32_TEXT):
            return [Text(body[len(V32_TEXT) :])]
        name, nl, args = body.partition("\n")
        if not nl:
            raise MalformedCall("functionary part without a recipient line")
        return [_json_call(self, name, args)]

    def _step_call(self, out: list[Event], final: bool) -> bool:
        if not self._buf.startswith(V32_TEXT):
            return super()._step_call(out, final)
        rest = self._buf[len(V32_TEXT) :]  # an ``all`` part: stream its text
        stops = (V32_SEPARATOR, *self.end_sentinels)
        i, s = find_first(rest, stops)
        if i < 0:
            keep = 0 if final else holdback(rest, stops)
            out.append(Text(rest[: len(rest) - keep]))
            self._buf = V32_TEXT + rest[len(rest) - keep :]
            return False
        out.append(Text(rest[:i]))
        if s == V32_SEPARATOR:
            self._buf, self._call_opener = rest[i + len(s) :], s
            return True
        self._buf, self._mode = "", _END
        return False

    def _end_call(self, out: list[Event], body: str, *, closed: bool, closer: str) -> bool:
        # Like the base, but an ``all`` part is text, not a call.
        try:
            events = self._part(body)
        except MalformedCall as e:
            self.malformed.append(str(e))
            out.append(Text(self._call_opener + body + closer))
            return False
        out.extend(events)
        return True


def v31_call_rule(conv: SchemaConverter, tool: Tool) -> str:
    """One v3.1 call of ``tool``."""
    args = conv.visit(dict(tool.parameters) or {"type": "object"}, f"{tool.name}-args")
    head = gbnf_literal(f"<function={tool.name}>")
    return conv.add(f"call-{tool.name}", f'{head} {args} "</function>"')


def v32_call_rule(conv: SchemaConverter, tool: Tool) -> str:
    """One v3.2 part calling ``tool`` (without the ``>>>`` that separates parts)."""
    args = conv.visit(dict(tool.parameters) or {"type": "object"}, f"{tool.name}-args")
    return conv.add(f"call-{tool.name}", f"{gbnf_literal(tool.name + chr(10))} {args}")
