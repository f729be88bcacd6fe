"""JSON schema -> GBNF, tool-call grammars, limits, and the built-in tool prompt.

Three kinds of check: structure (the GBNF text), meaning (random sentences of each
grammar, drawn by ``tests/gbnf_sample.py``, must be valid JSON matching the schema and
read back by the family parser as the right call), and acceptance by llama.cpp's own
grammar parser through the compiled binding (skipped locally, failed in CI, when the
binding or the model is missing).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferd.chat import get_parser, merge_events
from inferd.chat.grammar import (
    MAX_ALTERNATIVES,
    GrammarLimits,
    response_format_grammar,
    schema_to_gbnf,
)
from inferd.chat.messages import template_messages, template_tools
from inferd.chat.tool_grammar import (
    OPENERS,
    exclusion_grammar,
    lazy_tool_call_grammar,
    request_grammar,
    tool_call_grammar,
)
from inferd.chat.tool_prompt import fold_tools_into_messages, template_supports_tools
from inferd.errors import InvalidRequest
from inferd.types import Message, Request, Text, Tool, ToolChoice, ToolUse, ToolUseBlock
from tests.conftest import missing
from tests.gbnf_sample import Sampler, parse_gbnf

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "hourly": {"type": "boolean"},
    },
    "required": ["city"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, Any] = {
    "weather": WEATHER,
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": ["integer", "null"]},
                },
                "required": ["name", "age"],
            },
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 5},
                "minItems": 1,
                "maxItems": 3,
            },
            "score": {"type": "number"},
            "mode": {"const": "fast"},
        },
        "required": ["user", "tags", "mode"],
    },
    "all-optional": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "null"}},
    },
    "any-of": {
        "anyOf": [
            {"type": "integer"},
            {"type": "array", "items": {"type": "boolean"}},
            {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]},
        ]
    },
    "refs": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v"],
            }
        },
        "$ref": "#/$defs/node",
    },
    "free-object": {"type": "object", "additionalProperties": {"type": "integer"}},
    "anything": {},
    "enum-mixed": {"enum": ['a"b', 1, True, None, {"x": [1]}]},
    "array-exact": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
    "empty-object": {"type": "object", "properties": {}, "additionalProperties": False},
    "unicode": {
        "type": "object",
        "properties": {"名前": {"enum": ["東京", "Zoë"]}},
        "required": ["名前"],
    },
}


# ------------------------------------------------------------------ structure


def test_structure_of_an_object_rule() -> None:
    g = schema_to_gbnf(WEATHER)
    rules = parse_gbnf(g)
    assert "root" in rules and "ws" in rules
    assert '"\\"city\\""' in g  # required key written as a literal
    assert "char{1,12}" in g
    assert '"\\"celsius\\"" | "\\"fahrenheit\\""' in g


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_grammar_sentences_validate(name: str) -> None:
    schema = SCHEMAS[name]
    sampler = Sampler(schema_to_gbnf(schema), seed=len(name))
    for _ in range(150):
        text = sampler.sentence()
        value = json.loads(text)
        jsonschema.validate(value, schema)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(sorted(SCHEMAS)))
def test_schema_grammar_property(seed: int, name: str) -> None:
    text = Sampler(schema_to_gbnf(SCHEMAS[name]), seed=seed).sentence()
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_all_properties_mode_writes_every_property() -> None:
    schema = SCHEMAS["all-optional"]
    sampler = Sampler(schema_to_gbnf(schema, all_properties=True), seed=3)
    for _ in range(30):
        value = json.loads(sampler.sentence())
        assert list(value) == ["a", "b", "c"]
        jsonschema.validate(value, schema)


def test_response_format_forms() -> None:
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    g = response_format_grammar({"type": "json_object"})
    assert g is not None
    for i in range(50):
        assert isinstance(json.loads(Sampler(g.text, seed=i).sentence()), dict)
    g = response_format_grammar(
        {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    )
    assert g is not None and not g.lazy
    with pytest.raises(InvalidRequest, match="needs"):
        response_format_grammar({"type": "json_schema", "json_schema": {}})


# ------------------------------------------------------------------ limits and refusals


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        ({"not": {"type": "string"}}, "'not'"),
        ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
        ({"type": "object", "patternProperties": {"x": {}}}, "patternProperties"),
        ({"$ref": "https://example.invalid/s.json"}, r"\$ref"),
        ({"$ref": "#/$defs/missing"}, "points at nothing"),
        ({"type": "tuple"}, "unknown type"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "maxItems < minItems"),
        (False, "nothing can match"),
        ({"enum": []}, "non-empty"),
    ],
)
def test_refused_schemas(schema: Any, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        schema_to_gbnf(schema)


def test_alternative_limit() -> None:
    big = {"enum": list(range(MAX_ALTERNATIVES + 1))}
    with pytest.raises(InvalidRequest, match="MAX_ALTERNATIVES"):
        schema_to_gbnf(big)
    schema_to_gbnf({"enum": list(range(10))}, limits=GrammarLimits(max_alternatives=10))


def test_depth_limit() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidRequest, match="MAX_SCHEMA_DEPTH"):
        schema_to_gbnf(schema)


def test_size_limit() -> None:
    schema = {
        "type": "object",
        "properties": {f"p{i}" * 20: {"type": "string"} for i in range(100)},
    }
    with pytest.raises(InvalidRequest, match="MAX_GRAMMAR_BYTES"):
        schema_to_gbnf(schema, limits=GrammarLimits(max_bytes=2000))


def test_recursive_ref_allowed() -> None:
    g = schema_to_gbnf(SCHEMAS["refs"])
    assert "ref-node ::=" in g


# ------------------------------------------------------------------ tool calls


TOOLS = (
    Tool("get_weather", "Weather for a city", WEATHER),
    Tool(
        "add",
        "Add two numbers",
        {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    ),
    Tool("ping", "No arguments"),
)
SCHEMA_BY_NAME = {t.name: dict(t.parameters) for t in TOOLS}


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral", "mistral-v3", "gemma4"])
@pytest.mark.parametrize("parallel", [False, True])
def test_tool_call_grammar_sentences_parse_as_valid_calls(fmt: str, parallel: bool) -> None:
    family = fmt.split("-")[0]
    g = tool_call_grammar(
        family, TOOLS, ToolChoice("required"), parallel=parallel, mistral_v11=fmt != "mistral-v3"
    )
    sampler = Sampler(g.text, seed=7)
    for _ in range(100):
        text = sampler.sentence()
        p = get_parser(family)
        events = merge_events(p.feed(text) + p.finish())
        assert events, text
        assert p.malformed == [], (text, p.malformed)
        assert all(isinstance(e, ToolUse) for e in events), (text, events)
        if not parallel:
            assert len(events) == 1
        for e in events:
            assert isinstance(e, ToolUse) and e.input is not None
            jsonschema.validate(dict(e.input), SCHEMA_BY_NAME[e.name])


def test_named_tool_choice_only_that_tool() -> None:
    g = tool_call_grammar("hermes", TOOLS, ToolChoice("tool", "add"))
    sampler = Sampler(g.text, seed=1)
    for _ in range(30):
        p = get_parser("hermes")
        (ev,) = p.feed(sampler.sentence()) + p.finish()
        assert isinstance(ev, ToolUse) and ev.name == "add"


def test_lazy_grammar_triggers() -> None:
    g = lazy_tool_call_grammar("hermes", TOOLS)
    assert g.lazy and g.trigger_tokens == ("<tool_call>",)
    import re

    m = re.fullmatch(g.trigger_patterns[0], 'Sure. <tool_call>{"name"', re.S)
    assert m and m.group(1).startswith("<tool_call>")
    g3 = lazy_tool_call_grammar("llama3", TOOLS)
    assert re.fullmatch(g3.trigger_patterns[0], ' {"name": "add"}').group(1).startswith("{")
    assert g3.trigger_tokens == ()


@pytest.mark.parametrize("opener", [*sorted(set(OPENERS.values())), "aab", "abab", "x"])
def test_exclusion_grammar_is_exact(opener: str) -> None:
    g = exclusion_grammar(opener).text
    rules = parse_gbnf(g)
    assert len(rules) == len(opener) + 1
    # Run the automaton the grammar spells out: state i --c--> state j.
    trans: dict[int, dict[str, int]] = {}
    default: dict[int, int] = {}
    for line in g.splitlines()[1:]:
        name, _, body = line.partition(" ::= ")
        i = int(name[1:])
        trans[i] = {}
        for alt in body.split(" | ")[1:]:
            lit, _, target = alt.rpartition(" s")
            if lit.startswith("[^"):
                default[i] = int(target)
            else:
                trans[i][json.loads(lit)] = int(target)

    def accepts(text: str) -> bool:
        state = 0
        for c in text:
            if c in trans[state]:
                state = trans[state][c]
            elif c in set(opener):
                return False  # the one forbidden completion has no transition
            else:
                state = default[state]
        return True

    import itertools
    import random

    alphabet = [*sorted(set(opener)), "z"]
    for n in range(min(len(opener) + 2, 5)):
        for chars in itertools.product(alphabet, repeat=n):
            text = "".join(chars)
            assert accepts(text) == (opener not in text), text
    rng = random.Random(0)
    for _ in range(3000):  # texts stitched from slices of the opener: near-misses
        parts = []
        for _ in range(rng.randint(1, 4)):
            a = rng.randint(0, len(opener))
            parts.append(opener[a : rng.randint(a, len(opener))] + rng.choice(["", "z", opener[0]]))
        text = "".join(parts)
        assert accepts(text) == (opener not in text), text


def test_llama3_none_also_forbids_a_leading_brace() -> None:
    g = exclusion_grammar("<|python_tag|>", "{").text
    sampler = Sampler(g, seed=5, soft_depth=40)
    seen_lead_ws = False
    for _ in range(400):
        text = sampler.sentence()
        assert "<|python_tag|>" not in text
        assert not text.lstrip().startswith("{"), text
        seen_lead_ws |= text[:1].isspace()
    assert seen_lead_ws  # leading whitespace is still allowed
    req = Request((Message.user("hi"),), tools=TOOLS, tool_choice="none")
    assert request_grammar(req, "llama3").text.startswith('root ::= "" | [ \\t\\r\\n] root')


def test_request_grammar_choices() -> None:
    msgs = (Message.user("hi"),)
    assert request_grammar(Request(msgs), "hermes") is None
    g = request_grammar(Request(msgs, tools=TOOLS), "hermes")
    assert g is not None and g.lazy  # no tool_choice with tools means auto
    g = request_grammar(Request(msgs, tools=TOOLS, tool_choice="required"), "hermes")
    assert g is not None and not g.lazy and "call-add" in g.text
    g = request_grammar(Request(msgs, tools=TOOLS, tool_choice="none"), "gemma4")
    assert g is not None and g.text.startswith("root ::= s0")
    rf = {"type": "json_schema", "json_schema": {"schema": WEATHER}}
    assert request_grammar(Request(msgs, response_format=rf), "plain") is not None
    g = request_grammar(
        Request(msgs, tools=TOOLS, tool_choice="none", response_format=rf), "hermes"
    )
    assert g is not None and "celsius" in g.text
    for choice in (None, "auto", "required", "add"):
        with pytest.raises(InvalidRequest, match="cannot be combined"):
            request_grammar(
                Request(msgs, tools=TOOLS, tool_choice=choice, response_format=rf), "hermes"
            )
    assert request_grammar(Request(msgs, tools=TOOLS), "plain") is None


def test_bad_tool_schema_is_invalid_request() -> None:
    bad = Tool("f", "", {"type": "object", "properties": {"x": {"not": {}}}})
    with pytest.raises(InvalidRequest, match="tool call grammar"):
        request_grammar(
            Request((Message.user("hi"),), tools=(bad,), tool_choice="required"), "hermes"
        )


# ------------------------------------------------------------------ llama.cpp parses them


def _llama_model() -> Any:
    try:
        from inferd._fast import _llama
    except ImportError as e:
        missing(f"the compiled llama binding ({e})")
    from inferd import models

    try:
        path = models.resolve("smollm2-135m", pull=True, progress=False)
    except Exception as e:
        missing(f"the smollm2-135m model ({e})")
    return _llama, _llama.Model(str(path))


def test_llama_cpp_accepts_every_grammar() -> None:
    _llama, model = _llama_model()
    texts = [schema_to_gbnf(s) for s in SCHEMAS.values()]
    for fmt in ("hermes", "llama3", "mistral", "gemma4"):
        for parallel in (False, True):
            texts.append(
                tool_call_grammar(fmt, TOOLS, ToolChoice("required"), parallel=parallel).text
            )
        texts.append(exclusion_grammar(OPENERS[fmt]).text)
    texts.append(exclusion_grammar(OPENERS["llama3"], "{").text)
    texts.append(tool_call_grammar("mistral", TOOLS, None, mistral_v11=False).text)
    for text in texts:
        _llama.Sampler(model, temperature=0.0, grammar=text).close()
    model.close()


# ------------------------------------------------------------------ tools in the prompt


def test_template_messages_shapes() -> None:
    msgs = [
        Message.system("be brief"),
        Message.user("weather in Paris?"),
        Message.assistant([ToolUseBlock("c1", "get_weather", {"city": "Paris"})]),
        Message.tool("c1", '{"temp": 21}'),
        Message.assistant("It is 21 degrees."),
    ]
    d = template_messages(msgs)
    assert d[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert d[3] == {
        "role": "tool",
        "tool_call_id": "c1",
        "name": "get_weather",
        "content": '{"temp": 21}',
    }
    assert template_tools(TOOLS[:1])[0]["function"]["name"] == "get_weather"


def test_fold_tools_for_tool_less_templates() -> None:
    msgs = template_messages(
        [
            Message.user("weather?"),
            Message.assistant([ToolUseBlock("c1", "get_weather", {"city": "Oslo"})]),
            Message.tool("c1", "cold"),
        ]
    )
    out = fold_tools_into_messages(msgs, template_tools(TOOLS))
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
        "\n</tool_call>",
    }
    assert out[3] == {"role": "user", "content": "<tool_response>\ncold\n</tool_response>"}
    # the reply format the prompt asks for is what the hermes parser reads
    p = get_parser("hermes")
    (ev,) = p.feed(out[2]["content"]) + p.finish()
    assert isinstance(ev, ToolUse) and ev.input == {"city": "Oslo"}
    assert not isinstance(ev, Text)


def test_template_supports_tools() -> None:
    assert template_supports_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_supports_tools("{{ messages[0]['content'] }}")
    assert not template_supports_tools(None)


def test_llama_cpp_accepts_lazy_grammars() -> None:
    _llama, model = _llama_model()
    if not getattr(_llama, "LAZY_GRAMMAR", False):
        missing("lazy grammar support in the compiled binding")
    for fmt in ("hermes", "llama3", "mistral", "gemma4"):
        g = lazy_tool_call_grammar(fmt, TOOLS)
        _llama.Sampler(
            model,
            grammar=g.text,
            grammar_trigger_patterns=list(g.trigger_patterns),
            grammar_trigger_tokens=[],
        ).close()
    model.close()
