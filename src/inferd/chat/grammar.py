"""JSON schema -> GBNF (llama.cpp's grammar language), with named limits.

Why our own: the grammar must speak two notations (JSON, and Gemma 4's bare-key
``<|"|>`` notation inside its tool calls), must stay small enough to sample fast on
a CPU, and must refuse schemas it cannot enforce with an error that says so, instead
of silently constraining to something else.

What is enforced: ``type`` (one or a list), ``properties`` + ``required`` (required
keys first, then optional ones, each in declared order: JSON objects are unordered,
a fixed order keeps the grammar linear in size; ``response_format`` grammars write
every declared property, tool arguments only the required ones for sure),
``additionalProperties`` (extra keys are never generated where ``properties``
exist; a schema with only ``additionalProperties`` gives a free-form object whose
values match it), ``items``,
``minItems`` / ``maxItems``, ``minLength`` / ``maxLength``, ``enum``, ``const``,
``anyOf`` / ``oneOf`` (both as alternatives: exclusivity is not enforced), ``allOf``
with one member, ``$ref`` to ``#/$defs/...`` or ``#/definitions/...`` (recursion
allowed), nesting.

What is not enforced (the grammar allows a superset, documented rather than
refused, because real tool schemas carry them as hints): ``format``, ``pattern``,
``minimum`` / ``maximum`` / ``multipleOf``, ``uniqueItems``, repetition bounds above
:data:`MAX_REPEAT`. Refused with :class:`~inferd.errors.InvalidRequest`: ``not``,
``if`` / ``then`` / ``else``, ``allOf`` with several members, ``patternProperties``,
``prefixItems``, external ``$ref``.

Numbers are bounded (at most 16 integer digits, 16 fraction digits, 3 exponent
digits) and whitespace is at most one space, so a small model cannot wander off into
an endless number or indentation before ``max_tokens`` cuts it short.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferd.errors import InvalidRequest
from inferd.limits import echo

#: Largest grammar text accepted, in UTF-8 bytes (llama.cpp parses it per request).
MAX_GRAMMAR_BYTES = 64 * 1024
#: Most alternatives (``|`` branches, enum members) one grammar may contain.
MAX_ALTERNATIVES = 1024
#: Deepest schema nesting accepted (objects in arrays in objects ...).
MAX_SCHEMA_DEPTH = 32
#: ``maxItems`` / ``maxLength`` above this are not enforced (the rule would explode).
MAX_REPEAT = 256

_REFUSED = (
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "prefixItems",
    "dependentSchemas",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
)


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """The limits one conversion runs under (defaults: the module constants)."""

    max_bytes: int = MAX_GRAMMAR_BYTES
    max_alternatives: int = MAX_ALTERNATIVES
    max_depth: int = MAX_SCHEMA_DEPTH


@dataclass(frozen=True, slots=True)
class Grammar:
    """A GBNF grammar plus how to apply it.

    ``lazy`` grammars stay inactive until generation matches one of
    ``trigger_patterns`` (regexes matched from the start of the output; the grammar
    is fed from the first capture group) or produces a token in ``trigger_tokens``
    (the opener spelled as text, for the backend to look up: one token or none).
    """

    text: str
    root: str = "root"
    lazy: bool = False
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[str, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return len(self.text.encode())


def gbnf_literal(s: str) -> str:
    """``s`` as a GBNF string literal."""
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    out = out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{out}"'


def _rep(lo: int, hi: int | None) -> str:
    if hi is None or hi > MAX_REPEAT:
        return {0: "*", 1: "+"}.get(lo, f"{{{lo},}}")
    if lo == hi:
        return f"{{{lo}}}"
    if (lo, hi) == (0, 1):
        return "?"
    return f"{{{lo},{hi}}}"


# ----------------------------------------------------------------------- dialects


class JsonDialect:
    """Standard JSON, at most one space between tokens."""

    name = "json"
    ws = "ws"
    rules: dict[str, str] = {
        "ws": '" "?',
        "char": r'[^"\\\x00-\x1f] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
        "string": '"\\"" char* "\\""',
        "integer": '"-"? ("0" | [1-9] [0-9]{0,15})',
        "number": 'integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?',
        "boolean": '"true" | "false"',
        "null": '"null"',
        "value": "object | array | string | number | boolean | null",
        "object": '"{" ws (string ws ":" ws value ws ("," ws string ws ":" ws value ws)*)? "}"',
        "array": '"[" ws (value ws ("," ws value ws)*)? "]"',
    }
    deps: dict[str, tuple[str, ...]] = {
        "string": ("char",),
        "number": ("integer",),
        "value": ("object", "array", "string", "number", "boolean", "null"),
        "object": ("ws", "string", "value"),
        "array": ("ws", "value"),
    }

    def literal(self, value: Any) -> str:
        return gbnf_literal(json.dumps(value, ensure_ascii=False, separators=(",", ":")))

    def key(self, name: str) -> str:
        return gbnf_literal(json.dumps(name, ensure_ascii=False))

    def string(self, lo: int, hi: int | None) -> str:
        return f'"\\"" char{_rep(lo, hi)} "\\""'

    def any_key(self) -> str:
        return "string"


class Gemma4Dialect(JsonDialect):
    """Gemma 4's call notation: bare keys, ``<|"|>`` strings, no whitespace."""

    name = "gemma4"
    ws = ""
    Q = '<|"|>'
    rules = {
        "char": '[^<] | "<" [^|]',
        "bchar": "[^<]",
        "string": '"<|\\"|>" char* "<|\\"|>"',
        "integer": JsonDialect.rules["integer"],
        "number": JsonDialect.rules["number"],
        "boolean": JsonDialect.rules["boolean"],
        "null": JsonDialect.rules["null"],
        "key": "[a-zA-Z_] [a-zA-Z0-9_]*",
        "value": "object | array | string | number | boolean | null",
        "object": '"{" (key ":" value ("," key ":" value)*)? "}"',
        "array": '"[" (value ("," value)*)? "]"',
    }
    deps = {
        "string": ("char",),
        "number": ("integer",),
        "value": ("object", "array", "string", "number", "boolean", "null"),
        "object": ("key", "value"),
        "array": ("value",),
    }

    def literal(self, value: Any) -> str:
        return gbnf_literal(self.render(value))

    def render(self, value: Any) -> str:
        if isinstance(value, str):
            return self.Q + value + self.Q
        if isinstance(value, Mapping):
            return "{" + ",".join(f"{k}:{self.render(v)}" for k, v in value.items()) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(self.render(v) for v in value) + "]"
        return json.dumps(value)

    def key(self, name: str) -> str:
        return gbnf_literal(name)

    def string(self, lo: int, hi: int | None) -> str:
        # A length-bounded string uses one-character steps only, so it cannot hold '<'.
        return f'"<|\\"|>" bchar{_rep(lo, hi)} "<|\\"|>"'

    def any_key(self) -> str:
        return "key"


JSON = JsonDialect()
GEMMA4 = Gemma4Dialect()


# ----------------------------------------------------------------------- converter


class SchemaConverter:
    """Collects GBNF rules for one or more schemas in one dialect.

    Call :meth:`visit` for each schema (it returns a GBNF expression, usually a rule
    name), add your own rules with :meth:`add`, then :meth:`render` with a root.
    """

    def __init__(
        self,
        dialect: JsonDialect = JSON,
        limits: GrammarLimits | None = None,
        *,
        what: str = "schema",
        all_properties: bool = False,
    ) -> None:
        self.d = dialect
        self.all_properties = all_properties
        self.limits = limits or GrammarLimits()
        self.what = what
        self.rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._alternatives = 0
        self._root_schema: Any = None

    # -- bookkeeping ----------------------------------------------------------

    def fail(self, msg: str) -> InvalidRequest:
        return InvalidRequest(f"{self.what}: {msg}")

    def count_alternatives(self, n: int) -> None:
        self._alternatives += n
        if self._alternatives > self.limits.max_alternatives:
            raise self.fail(
                f"the grammar needs more than {self.limits.max_alternatives} alternatives "
                "(MAX_ALTERNATIVES: enums, anyOf and types together); simplify the schema"
            )

    def prim(self, name: str) -> str:
        """Make sure primitive rule ``name`` (and what it uses) exists; return its name."""
        if name not in self.rules:
            self.rules[name] = self.d.rules[name]
            for dep in self.d.deps.get(name, ()):
                self.prim(dep)
        return name

    def add(self, hint: str, body: str) -> str:
        """Add a rule (reusing an identical one); return its name."""
        if body in self._by_body:
            return self._by_body[body]
        base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-").lower() or "r"
        name, n = base, 1
        while name in self.rules or name in self.d.rules or name == "root":
            n += 1
            name = f"{base}-{n}"
        self.rules[name] = body
        self._by_body[body] = name
        return name

    def render(self, root_expr: str, root: str = "root") -> str:
        if self.d.ws and any(self.d.ws in b.split() for b in self.rules.values()):
            self.prim(self.d.ws)
        lines = [f"{root} ::= {root_expr}"]
        lines += [f"{k} ::= {v}" for k, v in self.rules.items() if k != root]
        text = "\n".join(lines) + "\n"
        size = len(text.encode())
        if size > self.limits.max_bytes:
            raise self.fail(
                f"the grammar would be {size} bytes, over the {self.limits.max_bytes}-byte "
                "limit (MAX_GRAMMAR_BYTES); use fewer or smaller schemas"
            )
        return text

    # -- schema walk ----------------------------------------------------------

    def visit(self, schema: Any, hint: str = "root", depth: int = 0) -> str:
        if depth == 0 and self._root_schema is None:
            self._root_schema = schema
        if depth > self.limits.max_depth:
            raise self.fail(
                f"the schema nests deeper than {self.limits.max_depth} levels (MAX_SCHEMA_DEPTH)"
            )
        if schema is True or schema == {}:
            return self.prim("value")
        if schema is False:
            raise self.fail(f"schema at {echo(hint)} is false: nothing can match it")
        if not isinstance(schema, Mapping):
            raise self.fail(f"schema at {echo(hint)} must be an object, got {echo(schema)}")
        for key in _REFUSED:
            if key in schema:
                raise self.fail(f"'{key}' (at {echo(hint)}) cannot be enforced by a grammar")
        if "$ref" in schema:
            return self._ref(schema["$ref"], depth)
        combined = self._combinator(schema, hint, depth)
        return combined if combined is not None else self._typed(schema, hint, depth)

    def _combinator(self, schema: Mapping[str, Any], hint: str, depth: int) -> str | None:
        """``allOf`` (one member), ``const``, ``enum``, ``anyOf`` / ``oneOf``; else None."""
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise self.fail(f"'allOf' with several members (at {echo(hint)}) is not supported")
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            if isinstance(parts[0], Mapping):
                merged.update(parts[0])
            return self.visit(merged, hint, depth + 1)
        if "const" in schema:
            return self.d.literal(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(f"'enum' at {echo(hint)} must be a non-empty list")
            self.count_alternatives(len(values))
            return self.add(hint, " | ".join(self.d.literal(v) for v in values))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise self.fail(f"'{key}' at {echo(hint)} must be a non-empty list")
                self.count_alternatives(len(subs))
                exprs = [self.visit(s, f"{hint}-{i}", depth + 1) for i, s in enumerate(subs)]
                return self.add(hint, " | ".join(exprs))
        return None

    def _typed(self, schema: Mapping[str, Any], hint: str, depth: int) -> str:
        """A schema by its ``type`` (a list of types is an alternative)."""
        typ = schema.get("type")
        if isinstance(typ, list):
            if not typ:
                raise self.fail(f"'type' at {echo(hint)} is an empty list")
            self.count_alternatives(len(typ))
            exprs = [self.visit({**schema, "type": t}, f"{hint}-{t}", depth + 1) for t in typ]
            return self.add(hint, " | ".join(exprs))
        if typ == "object" or (
            typ is None and ("properties" in schema or "additionalProperties" in schema)
        ):
            return self._object(schema, hint, depth)
        if typ == "array" or (typ is None and "items" in schema):
            return self._array(schema, hint, depth)
        if typ == "string":
            lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
            if lo == 0 and hi is None:
                return self.prim("string")
            self.prim("bchar" if isinstance(self.d, Gemma4Dialect) else "char")
            return self.add(hint, self.d.string(lo, None if hi is None else int(hi)))
        if typ in ("integer", "number", "boolean", "null"):
            return self.prim(typ)
        if typ is None:
            return self.prim("value")
        raise self.fail(f"unknown type {echo(typ)} at {echo(hint)}")

    def _ref(self, ref: Any, depth: int) -> str:
        m = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if not m:
            raise self.fail(f"$ref {echo(ref)} is not supported (only #/$defs/NAME)")
        name = "ref-" + re.sub(r"[^a-zA-Z0-9]+", "-", m.group(2)).lower()
        if name in self.rules:
            return name
        root = self._root_schema if isinstance(self._root_schema, Mapping) else {}
        target = (root.get(m.group(1)) or {}).get(m.group(2))
        if target is None:
            raise self.fail(f"$ref {echo(ref)} points at nothing")
        self.rules[name] = ""  # reserve: recursive refs resolve to the name
        body = self.visit(target, name + "-body", depth + 1)
        self.rules[name] = body
        return name

    def _member(self, key: str, value: str) -> str:
        """``key ":" value`` in the dialect's spacing; ``key`` is already a grammar term."""
        ws = self.d.ws
        if ws:
            return f'{key} {ws} ":" {ws} {value} {ws}'
        return f'{key} ":" {value}'

    def _object(self, schema: Mapping[str, Any], hint: str, depth: int) -> str:
        ws = self.d.ws
        sep = f'"," {ws}' if ws else '","'
        open_ = f'"{{" {ws}' if ws else '"{"'
        props = schema.get("properties") or {}
        if not isinstance(props, Mapping):
            raise self.fail(f"'properties' at {echo(hint)} must be an object")
        required = list(schema.get("required") or [])
        for r in required:
            if not isinstance(r, str):
                raise self.fail(f"'required' at {echo(hint)} must list strings")
        extra = schema.get("additionalProperties", None)
        if not props and not required:
            if extra is False:
                return self.add(hint, f'{open_} "}}"')
            value = (
                self.prim("value")
                if extra in (None, True)
                else self.visit(extra, hint + "-value", depth + 1)
            )
            key = self.prim(self.d.any_key())
            member = self._member(key, value)
            return self.add(hint, f'{open_} ({member} ({sep} {member})*)? "}}"')
        names = list(props) + [r for r in required if r not in props]
        if self.all_properties:
            req, opt = names, []
        else:
            req = [n for n in names if n in required]
            opt = [n for n in names if n not in required]
        members = {
            n: self._member(self.d.key(n), self.visit(props.get(n, {}), f"{hint}-{n}", depth + 1))
            for n in names
        }
        parts = [members[n] for n in req]
        body = f" {sep} ".join(parts)
        if opt:
            tail = ""
            for n in reversed(opt):  # tail_i ::= m_i ("," tail_{i+1})? | tail_{i+1}
                if not tail:
                    tail = self.add(f"{hint}-{n}-tail", members[n])
                else:
                    self.count_alternatives(2)
                    tail = self.add(f"{hint}-{n}-tail", f"{members[n]} ({sep} {tail})? | {tail}")
            body = f"{body} ({sep} {tail})?" if body else f"({tail})?"
        return self.add(hint, f'{open_} {body} "}}"')

    def _array(self, schema: Mapping[str, Any], hint: str, depth: int) -> str:
        ws = self.d.ws
        sep = f'"," {ws}' if ws else '","'
        open_ = f'"[" {ws}' if ws else '"["'
        item = self.visit(schema.get("items", {}), hint + "-item", depth + 1)
        item_ws = f"{item} {ws}" if ws else item
        lo = int(schema.get("minItems", 0))
        hi = schema.get("maxItems")
        hi = None if hi is None else int(hi)
        if hi is not None and hi < lo:
            raise self.fail(f"maxItems < minItems at {echo(hint)}")
        if hi == 0:
            return self.add(hint, f'{open_} "]"')
        more = f"({sep} {item_ws}){_rep(max(lo - 1, 0), None if hi is None else hi - 1)}"
        seq = f"{item_ws} {more}"
        body = seq if lo >= 1 else f"({seq})?"
        return self.add(hint, f'{open_} {body} "]"')


def schema_to_gbnf(
    schema: Any,
    *,
    dialect: JsonDialect = JSON,
    limits: GrammarLimits | None = None,
    what: str = "schema",
    all_properties: bool = False,
) -> str:
    """GBNF text whose ``root`` matches JSON values valid under ``schema``.

    ``all_properties=True`` writes every declared property, required or not (what
    structured output wants: OpenAI's strict mode requires them all, and a small
    model left free to stop early often returns ``{}``).
    """
    conv = SchemaConverter(dialect, limits, what=what, all_properties=all_properties)
    expr = conv.visit(schema)
    return conv.render(expr)


def response_format_grammar(
    response_format: Mapping[str, Any] | None, limits: GrammarLimits | None = None
) -> Grammar | None:
    """The grammar for a request's ``response_format`` (None for text / absent)."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        conv = SchemaConverter(JSON, limits, what="response_format")
        return Grammar(conv.render(conv.prim("object")))
    if kind != "json_schema":
        raise InvalidRequest(f"response_format type {echo(kind)} is not supported")
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if schema is None:
        schema = response_format.get("schema")
    if schema is None:
        raise InvalidRequest("response_format json_schema needs {'json_schema': {'schema': ...}}")
    return Grammar(
        schema_to_gbnf(schema, limits=limits, what="response_format", all_properties=True)
    )


def json_literals(values: Sequence[Any]) -> list[str]:
    """GBNF literals of JSON values (for tool names and the like)."""
    return [JSON.literal(v) for v in values]
