"""``response_format`` -> GBNF grammar, so libllama's grammar sampler enforces JSON.

llama.cpp's own JSON-schema converter lives in its ``common`` library, which we do not
build (it drags in much more than the model runtime). This is a small converter of our
own for the schema subset structured output uses in practice: objects with
``properties`` (emitted in declared order, every declared property present -- that is
always valid against the schema), arrays with ``items``, strings (``enum``/``const``),
numbers, integers, booleans, null, ``anyOf``/``oneOf`` and type lists. Anything else
(``$ref``, patterns, formats) falls back to "any JSON value", which keeps output valid
JSON without claiming more than we enforce.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from inferd.errors import InvalidRequest

_BASE = r'''
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" hex hex hex hex) )* "\"" ws
hex    ::= [0-9a-fA-F]
number ::= "-"? ([0-9] | [1-9] [0-9]*) ("." [0-9]+)? ([eE] [-+]? [0-9]+)? ws
integer ::= "-"? ([0-9] | [1-9] [0-9]*) ws
boolean ::= ("true" | "false") ws
null   ::= "null" ws
ws     ::= | " " | "\n" [ \t]{0,20}
'''.strip()

#: Any JSON object (what ``{"type": "json_object"}`` asks for).
JSON_OBJECT_GRAMMAR = "root ::= object\n" + _BASE


def _literal(value: Any) -> str:
    """A GBNF string literal matching the JSON text of ``value``."""
    text = json.dumps(value, ensure_ascii=False)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Converter:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self.n = 0

    def rule(self, body: str) -> str:
        self.n += 1
        name = f"r{self.n}"
        self.rules[name] = body
        return name

    def visit(self, schema: Any, depth: int = 0) -> str:
        if depth > 32 or not isinstance(schema, Mapping):
            return "value"
        if "const" in schema:
            return self.rule(_literal(schema["const"]) + " ws")
        if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
            alts = " | ".join(_literal(v) for v in schema["enum"])
            return self.rule(f"({alts}) ws")
        for key in ("anyOf", "oneOf"):
            subs = schema.get(key)
            if isinstance(subs, list) and subs:
                return self.rule(" | ".join(self.visit(s, depth + 1) for s in subs))
        t = schema.get("type")
        if isinstance(t, list):
            return self.rule(" | ".join(self.visit({**schema, "type": x}, depth + 1) for x in t))
        if t == "object" or (t is None and "properties" in schema):
            props = schema.get("properties")
            if not isinstance(props, Mapping) or not props:
                return "object"
            parts = []
            for i, (name, sub) in enumerate(props.items()):
                sep = '"," ws ' if i else ""
                parts.append(f"{sep}{_literal(str(name))} ws \":\" ws {self.visit(sub, depth + 1)}")
            return self.rule('"{" ws ' + " ".join(parts) + ' "}" ws')
        if t == "array":
            item = self.visit(schema.get("items", {}), depth + 1)
            return self.rule(f'"[" ws ( {item} ("," ws {item})* )? "]" ws')
        if t in ("string", "number", "integer", "boolean", "null"):
            return t
        return "value"


def grammar_for(response_format: Mapping[str, Any] | None) -> str | None:
    """The GBNF grammar for a request's ``response_format`` (``None`` for plain text)."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec) if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidRequest("response_format json_schema needs a 'schema' object")
        conv = _Converter()
        root = conv.visit(schema)
        lines = [f"root ::= {root}"]
        lines += [f"{k} ::= {v}" for k, v in conv.rules.items()]
        return "\n".join(lines) + "\n" + _BASE
    raise InvalidRequest(f"response_format type {kind!r} is not supported")
