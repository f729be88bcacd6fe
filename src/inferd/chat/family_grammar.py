"""``tool_choice`` grammars for the families of ADR 0024 (XML, DeepSeek, functionary...).

The same three shapes as :mod:`inferd.chat.tool_grammar` (ADR 0006), built from each
family module's ``call_rule``:

* ``required`` / a named tool: the reply is one call (``parallel``: one or more);
* ``auto``: that grammar, lazy, triggered by the family's opener;
* ``none``: any text without the opener (an exact exclusion automaton); for
  Qwen3-Coder, whose calls may omit ``<tool_call>``, without ``<function=``.

Functionary v3.2 has no opener for its first call (the prompt's ``>>>`` opened it),
so its grammars are not lazy: the reply is an ``all\\n`` text part, calls, or both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from inferd.chat import deepseek, deepseek_dsml, functionary, glm4, minimax, nemotron, qwen3_coder
from inferd.chat._xml_args import exclusion_rule
from inferd.chat.grammar import JSON, Grammar, GrammarLimits, SchemaConverter, gbnf_literal
from inferd.errors import InvalidRequest
from inferd.types import Tool, ToolChoice

CallRule = Callable[[SchemaConverter, Tool], str]


def _blocks(sep: str) -> Callable[[str, bool], str]:
    """Calls that each carry their own markers, ``sep`` between parallel ones."""
    return lambda call, parallel: f"{call} ({sep} {call})*" if parallel else call


def _wrapped(head: str, tail: str, sep: str = "") -> Callable[[str, bool], str]:
    """Calls inside one block: ``head call (sep call)* tail``."""

    def wrap(call: str, parallel: bool) -> str:
        more = f" ({sep} {call})*" if parallel and sep else (f" {call}*" if parallel else "")
        return f"{gbnf_literal(head)} {call}{more} {gbnf_literal(tail)}"

    return wrap


@dataclass(frozen=True)
class FamilyGrammar:
    """How one family's calls look to a grammar."""

    opener: str
    call: CallRule
    wrap: Callable[[str, bool], str]
    #: what ``none`` forbids when it is not the opener (a text every call contains)
    forbid: str | None = None


FAMILY_GRAMMARS: dict[str, FamilyGrammar] = {
    # Qwen3-Coder calls may omit <tool_call>, never <function=: ``none`` forbids that.
    "qwen3_coder": FamilyGrammar(
        qwen3_coder.OPENER, qwen3_coder.call_rule, _blocks('"\\n"'), forbid="<function="
    ),
    "glm4": FamilyGrammar(glm4.OPENER, glm4.call_rule, _blocks('"\\n"?')),
    "minimax": FamilyGrammar(
        minimax.OPENER, minimax.call_rule, _wrapped(minimax.OPENER + "\n", "</minimax:tool_call>")
    ),
    "nemotron": FamilyGrammar(
        nemotron.OPENER, nemotron.call_rule, _wrapped("<TOOLCALL>[", "]</TOOLCALL>", '"," ws')
    ),
    "deepseek": FamilyGrammar(
        deepseek.OPENER, deepseek.call_rule, _wrapped(deepseek.OPENER, deepseek.CLOSER)
    ),
    "deepseek_v32": FamilyGrammar(
        deepseek_dsml.DeepSeekV32Parser.call_open,
        deepseek_dsml.call_rule,
        _wrapped(
            deepseek_dsml.DeepSeekV32Parser.call_open + "\n",
            deepseek_dsml.DeepSeekV32Parser.call_close,
        ),
    ),
    "deepseek_v4": FamilyGrammar(
        deepseek_dsml.DeepSeekV4Parser.call_open,
        deepseek_dsml.call_rule,
        _wrapped(
            deepseek_dsml.DeepSeekV4Parser.call_open + "\n",
            deepseek_dsml.DeepSeekV4Parser.call_close,
        ),
    ),
    "functionary_v31": FamilyGrammar(
        functionary.V31_OPENER, functionary.v31_call_rule, _blocks('"\\n"?')
    ),
    "functionary_v32": FamilyGrammar(
        functionary.V32_SEPARATOR,
        functionary.v32_call_rule,
        _blocks(gbnf_literal(functionary.V32_SEPARATOR)),
    ),
}


def _pick(tools: Sequence[Tool], choice: ToolChoice | None) -> list[Tool]:
    if choice is not None and choice.kind == "tool":
        return [t for t in tools if t.name == choice.name]
    return list(tools)


def _calls(fam: FamilyGrammar, conv: SchemaConverter, tools: Sequence[Tool], parallel: bool) -> str:
    if not tools:
        raise InvalidRequest("tool_call grammar: no tools to call")
    rules = [fam.call(conv, t) for t in tools]
    conv.count_alternatives(len(rules))
    return fam.wrap(conv.add("call", " | ".join(rules)), parallel)


def _regex_escape(s: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/-" else c for c in s)


def family_grammar(
    fmt: str,
    kind: str,
    tools: Sequence[Tool],
    choice: ToolChoice | None,
    *,
    parallel: bool = False,
    limits: GrammarLimits | None = None,
) -> Grammar:
    """The grammar for ``tool_choice`` ``kind`` on a model of family ``fmt``."""
    fam = FAMILY_GRAMMARS[fmt]
    conv = SchemaConverter(JSON, limits, what="tool call grammar")
    if fmt == "functionary_v32":
        return _functionary_v32(fam, conv, kind, _pick(tools, choice), parallel)
    if kind == "none":
        return Grammar(conv.render(exclusion_rule(conv, "free", fam.forbid or fam.opener)))
    root = _calls(fam, conv, _pick(tools, choice), parallel)
    if kind in ("required", "tool"):
        return Grammar(conv.render(root))
    pattern = r"[\s\S]*?(" + _regex_escape(fam.opener) + r"[\s\S]*)"
    return Grammar(
        conv.render(root), lazy=True, trigger_patterns=(pattern,), trigger_tokens=(fam.opener,)
    )


def _functionary_v32(
    fam: FamilyGrammar, conv: SchemaConverter, kind: str, tools: list[Tool], parallel: bool
) -> Grammar:
    text = f"{gbnf_literal(functionary.V32_TEXT)} {exclusion_rule(conv, 'free', fam.opener)}"
    if kind == "none":
        return Grammar(conv.render(text))
    calls = _calls(fam, conv, tools, parallel)
    if kind in ("required", "tool"):
        return Grammar(conv.render(calls))
    return Grammar(conv.render(f"{text} | ({text} {gbnf_literal(fam.opener)})? {calls}"))
