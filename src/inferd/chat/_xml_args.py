"""Shared pieces of the XML-style tool-call families (ADR 0024).

Qwen3-Coder / Qwen 3.5 / Nemotron 3, GLM 4.x and MiniMax M2 write each argument as
``<tag name>raw text</tag>`` instead of a JSON object, so the parser has to decide a
value's type. The rule is llama.cpp's (``tests/test-chat.cpp``): with the tool's
schema known, a parameter whose type is only ``string`` (or an enum of strings) keeps
its raw text (``null`` becomes JSON null when the type allows it); any other type is
read as JSON, and text that is not JSON stays a string. Without a schema every value
is tried as JSON first (the lenient choice: ``42`` becomes a number).

The parsers accept ``schemas={tool name: parameters schema}``; the chat plan passes
the request's tools (``accepts_schemas`` on the class says so).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from inferd.chat._stream import (
    _CALL,
    MalformedCall,
    SentinelParser,
    arguments_to_tool_use,
    holdback,
)
from inferd.chat.grammar import JSON, SchemaConverter, gbnf_literal
from inferd.types import Event, Tool, ToolUse

Schemas = Mapping[str, Mapping[str, Any]]


class CallEndsThinking(SentinelParser):
    """A call opener inside a reasoning block ends the block and opens the call.

    Prompts of these families often open ``<think>`` themselves (MiniMax M2 always),
    and a model may go straight to a call without ``</think>``; with ``tool_choice``
    required, our grammar even forces it to. llama.cpp reads such a call; so do we.
    The opener is held back while split, like every sentinel.
    """

    def _start_call(self, opener: str) -> bool:
        self._mode, self._call_opener, self._at_start = _CALL, opener, False
        return True

    def _step_think(self, out: list[Event], final: bool) -> bool:
        buf, opener = self._buf, self.call_open
        if not opener:
            return super()._step_think(out, final)
        i, j = buf.find(opener), buf.find(self.think_close)
        if i >= 0 and (j < 0 or i < j):
            self._emit_think(out, buf[:i], closing=True)
            self._buf = buf[i + len(opener) :]
            return self._start_call(opener)
        keep = 0 if final or j >= 0 else holdback(buf, (opener,))
        if not keep:
            return super()._step_think(out, final)
        self._buf = buf[:-keep]  # the rest may still become the opener: wait for it
        if self._buf:
            super()._step_think(out, final)
        self._buf += buf[-keep:]
        return False


def schemas_of(tools: Iterable[Tool]) -> dict[str, Mapping[str, Any]]:
    """``{name: parameters}`` for the ``schemas=`` option of the XML parsers."""
    return {t.name: t.parameters for t in tools}


def schema_types(schema: Mapping[str, Any] | None) -> set[str] | None:
    """The JSON types a property schema allows (None: unknown, anything goes)."""
    if not isinstance(schema, Mapping):
        return None
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list) and all(isinstance(x, str) for x in t):
        return set(t)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return {"string"}
    for key in ("anyOf", "oneOf"):
        alts = schema.get(key)
        if isinstance(alts, list):
            out: set[str] = set()
            for alt in alts:
                sub = schema_types(alt)
                if sub is None:
                    return None
                out |= sub
            return out
    return None


def property_schema(schemas: Schemas, tool: str, param: str) -> Mapping[str, Any] | None:
    """The schema of ``tool``'s parameter ``param``, if the request declared one."""
    props = (schemas.get(tool) or {}).get("properties")
    if isinstance(props, Mapping):
        sub = props.get(param)
        return sub if isinstance(sub, Mapping) else None
    return None


def typed_value(raw: str, schema: Mapping[str, Any] | None) -> Any:
    """One argument's raw text as the value its schema asks for (see module doc)."""
    types = schema_types(schema)
    if types is not None and types <= {"string", "null"}:
        return None if raw == "null" and "null" in types else raw
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if types is not None and "string" in types and isinstance(value, str):
        return raw  # a JSON string literal for a string/union: keep the text as written
    return value


def strip_one_newline(value: str) -> str:
    """Drop one leading and one trailing newline: the layout around a value, not content."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def build_call(
    new_id: Any, schemas: Schemas, name: str, pairs: Sequence[tuple[str, str]]
) -> ToolUse:
    """A ToolUse from a name and its ``(parameter, raw text)`` pairs, in order."""
    name = name.strip()
    if not name or any(c in name for c in "<>\n"):
        raise MalformedCall(f"bad function name {name[:40]!r}")
    args: dict[str, Any] = {}
    for key, raw in pairs:
        key = key.strip()
        if not key:
            raise MalformedCall(f"{name}: empty parameter name")
        args[key] = typed_value(raw, property_schema(schemas, name, key))
    return arguments_to_tool_use(new_id(), name, args)


def held_back(raw: str, closers: Sequence[str]) -> int:
    """Length of the longest suffix of ``raw`` that may still start one of ``closers``."""
    keep = 0
    for c in closers:
        for n in range(min(len(c) - 1, len(raw)), keep, -1):
            if raw.endswith(c[:n]):
                keep = n
                break
    return keep


def partial_arguments(
    schemas: Schemas,
    name: str,
    region: str,
    param_open: re.Pattern[str],
    closer: str,
    *,
    newline_layout: bool = False,
) -> str:
    """The arguments written so far in ``region``, as the start of ``json.dumps`` text.

    For streaming (ADR 0023): complete parameters are typed and encoded as the final
    call will be; a parameter being written streams only when its schema says
    ``string`` (other types are known at their closer), holding back what may still
    be its closer (and, with ``newline_layout``, the layout newline before it).
    """
    parts: list[str] = []
    pos = 0
    while (m := param_open.search(region, pos)) is not None:
        key, start = m.group(1).strip(), m.end()
        head = json.dumps(key, ensure_ascii=False) + ": "
        end = region.find(closer, start)
        schema = property_schema(schemas, name, key)
        if end >= 0:
            raw = region[start:end]
            raw = strip_one_newline(raw) if newline_layout else raw
            parts.append(head + json.dumps(typed_value(raw, schema), ensure_ascii=False))
            pos = end + len(closer)
            continue
        if schema_types(schema) != {"string"}:
            return "{" + ", ".join([*parts, head])
        raw = region[start:]
        if newline_layout and raw.startswith("\n"):
            raw = raw[1:]
        closers = ("\n" + closer, closer) if newline_layout else (closer,)
        raw = raw[: len(raw) - held_back(raw, closers)]
        return "{" + ", ".join([*parts, head + json.dumps(raw, ensure_ascii=False)[:-1]])
    return "{" + ", ".join(parts)


def only_space_between(text: str, spans: Sequence[tuple[int, int]], what: str) -> None:
    """Raise MalformedCall when ``text`` holds anything but whitespace outside ``spans``."""
    pos = 0
    for a, b in [*spans, (len(text), len(text))]:
        if text[pos:a].strip():
            raise MalformedCall(f"{what}: unexpected text {text[pos:a].strip()[:40]!r}")
        pos = b


# ----------------------------------------------------------------------- grammar


def exclusion_rule(conv: SchemaConverter, hint: str, forbidden: str) -> str:
    """A rule matching any text that does not contain ``forbidden``; returns its name.

    The same KMP automaton as :func:`inferd.chat.tool_grammar.exclusion_grammar`, as
    rules inside a larger grammar: state ``i`` means the text ends with
    ``forbidden[:i]``, and every state may end the text (so a value may end in a
    prefix of its closer, e.g. a file content ending in a newline).
    """
    n = len(forbidden)
    base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-").lower() or "x"
    k = 1
    while f"{base}-s0" in conv.rules:
        k += 1
        base = f"{base}{k}"

    def step(i: int, c: str) -> int:
        s = forbidden[:i] + c
        for m in range(min(len(s), n - 1), 0, -1):
            if s.endswith(forbidden[:m]):
                return m
        return 0

    chars = sorted(set(forbidden))
    escaped = "".join(_class_escape(c) for c in chars)
    for i in range(n):
        alts = ['""', f"[^{escaped}] {base}-s0"]
        for c in chars:
            if c == forbidden[i] and i + 1 == n:
                continue
            alts.append(f"{gbnf_literal(c)} {base}-s{step(i, c)}")
        conv.rules[f"{base}-s{i}"] = " | ".join(alts)
    return f"{base}-s0"


def _class_escape(c: str) -> str:
    special = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
    if c in special:
        return special[c]
    return "\\" + c if c in "^-]\\[" else c


def value_rule(conv: SchemaConverter, hint: str, schema: Any, closer: str) -> str:
    """Grammar for one raw argument value: free text for strings, JSON otherwise."""
    types = schema_types(schema if isinstance(schema, Mapping) else None)
    if types == {"string"} and isinstance(schema, Mapping):
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            conv.count_alternatives(len(enum))
            return conv.add(hint, " | ".join(gbnf_literal(str(v)) for v in enum))
        return exclusion_rule(conv, hint, closer)
    if types is not None and "string" in types:
        return exclusion_rule(conv, hint, closer)  # unions with string: any text reads
    return conv.visit(schema if isinstance(schema, Mapping) else {}, hint, 1)


def params_rule(conv: SchemaConverter, tool: Tool, render: Any, closer: str) -> str:
    """The parameters of ``tool`` in schema order (optional ones may be left out).

    ``render(name_literal, value_rule) -> GBNF expression`` writes one parameter in
    the family's markup; ``closer`` is what ends a raw value.
    """
    schema = dict(tool.parameters) or {"type": "object"}
    props = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
    required = set(schema.get("required") or ())
    parts = []
    for key, sub in props.items():
        value = value_rule(conv, f"{tool.name}-{key}", sub, closer)
        one = render(key, value)
        parts.append(one if key in required else f"({one})?")
    return " ".join(parts) if parts else '""'


def json_call_rule(conv: SchemaConverter, tool: Tool, key: str = "arguments") -> str:
    """``{"name": NAME, "arguments": {...}}`` for ``tool`` (JSON families)."""
    args = conv.visit(dict(tool.parameters) or {"type": "object"}, f"{tool.name}-args")
    return conv.add(
        f"jcall-{tool.name}",
        f'"{{" ws "\\"name\\"" ws ":" ws {JSON.literal(tool.name)} "," ws '
        f'"\\"{key}\\"" ws ":" ws {args} ws "}}"',
    )
