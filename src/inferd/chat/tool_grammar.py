"""Grammars that enforce ``tool_choice`` and ``response_format`` per family.

* ``required`` / a named tool: the reply *is* one call (``parallel=True``: one or
  more) in the family's syntax, its arguments matching that tool's schema. ``parallel``
  is ``Request.parallel_tool_calls`` (OpenAI's default true); a tool forced by *name*
  is always one call, as vLLM and OpenAI give it
  (docs/adr/0023-tool-call-streaming-and-stop-reasons.md).
* ``auto``: the same call grammar, made *lazy*: it engages only when the output
  reaches the family's opener (a trigger pattern, plus the opener as a trigger
  token where the vocabulary has it as one token), so free text stays free but a
  started call is well-formed. For Llama 3's marker-less calls the trigger is a
  reply that begins with ``{``.
* ``none``: the opener cannot be produced (for Llama 3 also a reply that starts
  with ``{``, its marker-less call). We use an exact *exclusion grammar*: a
  small automaton (one rule per character of the opener, built like a KMP failure
  table) matching any text that does not contain the opener. Why not a logit bias
  on the opener token: on models whose vocabulary has no such token (SmolLM2 spells
  ``<tool_call>`` with several ordinary tokens) a bias cannot forbid the text, and
  the grammar works the same everywhere. It costs a grammar check per token.
* ``response_format`` (json_schema / json_object): the reply is that JSON. Asking
  for it together with tools and any tool_choice but ``none`` is refused up front:
  a reply cannot be both a call and a JSON document.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferd.chat.family_grammar import FAMILY_GRAMMARS, family_grammar
from inferd.chat.grammar import (
    GEMMA4,
    JSON,
    Grammar,
    GrammarLimits,
    SchemaConverter,
    gbnf_literal,
    response_format_grammar,
)
from inferd.errors import InvalidRequest
from inferd.limits import echo
from inferd.types import Request, Tool, ToolChoice

#: The text that opens a call, per format (what ``none`` forbids, ``auto`` waits for).
OPENERS: dict[str, str] = {
    "hermes": "<tool_call>",
    "llama3": "<|python_tag|>",
    "mistral": "[TOOL_CALLS]",
    "gemma4": "<|tool_call>",
}


def _args_rule(conv: SchemaConverter, tool: Tool) -> str:
    return conv.visit(dict(tool.parameters) or {"type": "object"}, f"{tool.name}-args")


def _pick(tools: Sequence[Tool], choice: ToolChoice | None) -> list[Tool]:
    if choice is not None and choice.kind == "tool":
        return [t for t in tools if t.name == choice.name]
    return list(tools)


def _one_call(fmt: str, conv: SchemaConverter, tool: Tool, mistral_v11: bool) -> str:
    ws = "ws"
    name = JSON.literal(tool.name)
    args = _args_rule(conv, tool)
    if fmt == "hermes":
        body = (
            f'"{{" {ws} "\\"name\\"" {ws} ":" {ws} {name} "," {ws} '
            f'"\\"arguments\\"" {ws} ":" {ws} {args} {ws} "}}"'
        )
        return conv.add(f"call-{tool.name}", f'"<tool_call>" "\\n"? {body} "\\n"? "</tool_call>"')
    if fmt == "llama3":
        return conv.add(
            f"call-{tool.name}",
            f'"{{" {ws} "\\"name\\"" {ws} ":" {ws} {name} "," {ws} '
            f'"\\"parameters\\"" {ws} ":" {ws} {args} {ws} "}}"',
        )
    if fmt == "mistral":
        if mistral_v11:
            return conv.add(
                f"call-{tool.name}", f'"[TOOL_CALLS]" {gbnf_literal(tool.name)} "[ARGS]" {args}'
            )
        return conv.add(
            f"call-{tool.name}",
            f'"{{" {ws} "\\"name\\"" {ws} ":" {ws} {name} "," {ws} '
            f'"\\"arguments\\"" {ws} ":" {ws} {args} {ws} "}}"',
        )
    if fmt == "gemma4":
        return conv.add(
            f"call-{tool.name}",
            f'"<|tool_call>call:" {gbnf_literal(tool.name)} {args} "<tool_call|>"',
        )
    raise InvalidRequest(f"tool format {fmt!r} has no call grammar")


def tool_call_grammar(
    fmt: str,
    tools: Sequence[Tool],
    choice: ToolChoice | None,
    *,
    parallel: bool = False,
    mistral_v11: bool = True,
    limits: GrammarLimits | None = None,
) -> Grammar:
    """A grammar whose every sentence is a call (or ``parallel`` calls) in ``fmt``."""
    picked = _pick(tools, choice)
    if not picked:
        raise InvalidRequest("tool_call grammar: no tools to call")
    dialect = GEMMA4 if fmt == "gemma4" else JSON
    conv = SchemaConverter(dialect, limits, what="tool call grammar")
    calls = [_one_call(fmt, conv, t, mistral_v11) for t in picked]
    conv.count_alternatives(len(calls))
    call = conv.add("call", " | ".join(calls))
    if fmt == "mistral" and not mistral_v11:
        seq = f'{call} ("," ws {call})*' if parallel else call
        root = f'"[TOOL_CALLS]" "[" ws {seq} ws "]"'
    elif fmt == "llama3":
        root = f'{call} (";" ws {call})*' if parallel else call
    else:
        root = f'{call} ("\\n"? {call})*' if parallel else call
    return Grammar(conv.render(root))


def lazy_tool_call_grammar(
    fmt: str,
    tools: Sequence[Tool],
    *,
    parallel: bool = False,
    mistral_v11: bool = True,
    limits: GrammarLimits | None = None,
) -> Grammar:
    """``auto``: the call grammar, triggered when the output reaches the opener.

    ``parallel=False`` (the default, as for ``required``) ends the reply after one
    call: small models otherwise tend to repeat a call until ``max_tokens``.
    """
    g = tool_call_grammar(
        fmt, tools, None, parallel=parallel, mistral_v11=mistral_v11, limits=limits
    )
    if fmt == "llama3":
        # Marker-less calls: a reply that starts with '{' is a call.
        return Grammar(g.text, lazy=True, trigger_patterns=(r"\s*(\{[\s\S]*)",))
    opener = OPENERS[fmt]
    pattern = r"[\s\S]*?(" + _regex_escape(opener) + r"[\s\S]*)"
    return Grammar(g.text, lazy=True, trigger_patterns=(pattern,), trigger_tokens=(opener,))


def _regex_escape(s: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/-" else c for c in s)


def exclusion_grammar(forbidden: str, no_leading: str = "") -> Grammar:
    """Any text that does not contain ``forbidden`` (exact; one rule per character).

    State ``s{i}`` means "the last ``i`` characters are ``forbidden[:i]``". From
    each state a character either extends the match (never to the full string) or
    falls back to the longest prefix that is still a suffix (KMP), and every state
    may end the text. ``no_leading`` lists characters the text may not *start* with
    after optional whitespace (Llama 3's marker-less calls start with ``{``).
    """
    if not forbidden:
        raise InvalidRequest("exclusion grammar needs a non-empty string")
    n = len(forbidden)

    def step(i: int, c: str) -> int:
        s = forbidden[:i] + c
        for k in range(min(len(s), n - 1), -1, -1):
            if k == 0 or s.endswith(forbidden[:k]):
                return k
        return 0  # pragma: no cover

    chars = sorted(set(forbidden))
    escaped = "".join(_class_escape(c) for c in chars)
    lines = ["root ::= s0"]
    if no_leading:
        lead = sorted(set(no_leading) | set(" \t\r\n") | set(chars))
        first = ['""', "[ \\t\\r\\n] root", "[^" + "".join(_class_escape(c) for c in lead) + "] s0"]
        first += [
            f"{gbnf_literal(c)} s{step(0, c)}"
            for c in chars
            if c not in no_leading and c not in " \t\r\n"
        ]
        lines = ["root ::= " + " | ".join(first)]
    for i in range(n):
        alts = ['""', f"[^{escaped}] s0"]
        for c in chars:
            if c == forbidden[i] and i + 1 == n:
                continue  # completing the opener is the one thing not allowed
            alts.append(f"{gbnf_literal(c)} s{step(i, c)}")
        lines.append(f"s{i} ::= " + " | ".join(alts))
    return Grammar("\n".join(lines) + "\n")


def _class_escape(c: str) -> str:
    special = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
    if c in special:
        return special[c]
    return "\\" + c if c in "^-]\\[" else c


def request_grammar(
    request: Request,
    fmt: str,
    *,
    parallel: bool = False,
    mistral_v11: bool = True,
    limits: GrammarLimits | None = None,
) -> Grammar | None:
    """The grammar a request needs on a model of format ``fmt`` (None: unconstrained).

    Raises InvalidRequest, before anything is generated, for ``response_format``
    with tools whose choice is not ``none``, and for a schema a grammar cannot hold.
    """
    choice = request.tool_choice
    kind = choice.kind if choice is not None else ("auto" if request.tools else "none")
    parallel = parallel and kind != "tool"  # a tool forced by name: one call (ADR 0023)
    rf = request.response_format
    wants_json = bool(rf) and rf.get("type") != "text"  # type: ignore[union-attr]
    if wants_json and request.tools and kind != "none":
        raise InvalidRequest(
            f"response_format {echo(rf.get('type'))} cannot be combined with tools and "  # type: ignore[union-attr]
            f"tool_choice={kind!r}: a reply cannot be both a call and a JSON document; "
            "use tool_choice='none' or drop response_format"
        )
    if wants_json:
        return response_format_grammar(rf, limits)
    if request.tools and fmt in FAMILY_GRAMMARS:  # the families of ADR 0024
        return family_grammar(fmt, kind, request.tools, choice, parallel=parallel, limits=limits)
    if not request.tools or fmt not in OPENERS:
        return None
    if kind in ("required", "tool"):
        return tool_call_grammar(
            fmt, request.tools, choice, parallel=parallel, mistral_v11=mistral_v11, limits=limits
        )
    if kind == "none":
        return exclusion_grammar(OPENERS[fmt], "{" if fmt == "llama3" else "")
    return lazy_tool_call_grammar(
        fmt, request.tools, parallel=parallel, mistral_v11=mistral_v11, limits=limits
    )
