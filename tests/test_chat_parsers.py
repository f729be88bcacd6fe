"""Table and property tests of every chat-format parser (inferd.chat).

Each case is a reply as the family's models write it, with the events it must give.
Every case is fed whole, token-like pieces, one character at a time, split in two at
every position, and (hypothesis) split at random points: all must give the same
events once adjacent Text / Thinking are merged.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferd.chat import (
    available_formats,
    detect_format,
    detect_thinking,
    get_parser,
    merge_events,
    parser_for,
    prompt_opens_thinking,
)
from inferd.chat.gemma4 import parse_arguments
from inferd.chat.mistral import mistral_call_id
from inferd.errors import InternalError, InvalidRequest
from inferd.types import Event, Text, Thinking, ToolUse


def counter_ids() -> Callable[[], str]:
    it = itertools.count(1)
    return lambda: f"id{next(it)}"


def call(n: int, name: str, args: dict[str, Any] | None, raw: str | None = None) -> ToolUse:
    import json

    return ToolUse(
        f"id{n}", name, args, raw if raw is not None else json.dumps(args, ensure_ascii=False)
    )


@dataclass
class Case:
    id: str
    fmt: str
    text: str
    expected: list[Event]
    options: dict[str, Any] = field(default_factory=dict)
    malformed: int = 0


Q = '<|"|>'

CASES = [
    # ---------------------------------------------------------------- plain
    Case(
        "plain-text",
        "plain",
        "Hello, world! <b>not a sentinel</b> <think>x</think>",
        [Text("Hello, world! <b>not a sentinel</b> <think>x</think>")],
    ),
    Case(
        "plain-r1-thinking",
        "plain",
        "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?",
        [Thinking("The user greets me."), Text("Hello! How can I help?")],
        {"thinking": True},
    ),
    Case(
        "plain-r1-opened-by-prompt",
        "plain",
        "Okay, 2+2 is 4.\n</think>\n\n**4**",
        [Thinking("Okay, 2+2 is 4."), Text("**4**")],
        {"thinking": True, "in_thinking": True},
    ),
    Case(
        "plain-thinking-cut-off",
        "plain",
        "<think>still going",
        [Thinking("still going")],
        {"thinking": True},
    ),
    Case("plain-lt-at-end", "plain", "a < b and c <", [Text("a < b and c <")], {"thinking": True}),
    # ---------------------------------------------------------------- hermes
    Case(
        "hermes-one-call",
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        [call(1, "get_weather", {"city": "Paris"})],
    ),
    Case(
        "hermes-text-then-parallel",
        "hermes",
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        "</tool_call>\n<tool_call>\n"
        '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        [
            Text("Let me check both.\n"),
            call(1, "get_weather", {"city": "Paris", "unit": "celsius"}),
            call(2, "get_time", {"tz": "Europe/Paris"}),
        ],
    ),
    Case(
        "hermes-qwen3-think-then-call",
        "hermes",
        "<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>',
        [Thinking("I need the weather tool."), call(1, "get_weather", {"city": "東京"})],
    ),
    Case(
        "hermes-qwen3-empty-think",
        "hermes",
        "<think>\n\n</think>\n\nHi there.",
        [Text("Hi there.")],
    ),
    Case(
        "hermes-smollm2-string-arguments",
        "hermes",
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>',
        [ToolUse("id1", "add", {"a": 1, "b": 2}, '{"a": 1, "b": 2}')],
    ),
    Case(
        "hermes-parameters-key",
        "hermes",
        '<tool_call>{"name": "f", "parameters": {"x": [1, 2]}}</tool_call>',
        [call(1, "f", {"x": [1, 2]})],
    ),
    Case(
        "hermes-no-arguments",
        "hermes",
        '<tool_call>{"name": "ping"}</tool_call>',
        [call(1, "ping", {})],
    ),
    Case(
        "hermes-unterminated-but-complete",
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {"a": true}}\n',
        [call(1, "f", {"a": True})],
    ),
    Case(
        "hermes-ended-by-im-end",
        "hermes",
        '<tool_call>{"name": "f", "arguments": {}}<|im_end|>ignored',
        [call(1, "f", {})],
    ),
    Case(
        "hermes-malformed-json",
        "hermes",
        "Sure <tool_call>{name: f}</tool_call> done",
        [Text("Sure <tool_call>{name: f}</tool_call> done")],
        malformed=1,
    ),
    Case(
        "hermes-malformed-cut-off",
        "hermes",
        '<tool_call>{"name": "f", "argu',
        [Text('<tool_call>{"name": "f", "argu')],
        malformed=1,
    ),
    Case(
        "hermes-args-not-object",
        "hermes",
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [Text('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')],
        malformed=1,
    ),
    Case(
        "hermes-partial-sentinel-text",
        "hermes",
        "1 <tool 2 </tool_call> 3 <thin",
        [Text("1 <tool 2 </tool_call> 3 <thin")],
    ),
    Case(
        "hermes-thinking-off",
        "hermes",
        "<think>x</think>y",
        [Text("<think>x</think>y")],
        {"thinking": False},
    ),
    # ---------------------------------------------------------------- llama3
    Case(
        "llama3-bare-call",
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "San Francisco"}}',
        [call(1, "get_weather", {"city": "San Francisco"})],
    ),
    Case(
        "llama3-python-tag",
        "llama3",
        '<|python_tag|>{"name": "search", "parameters": {"q": "llama"}}<|eom_id|>',
        [call(1, "search", {"q": "llama"})],
    ),
    Case(
        "llama3-parallel-semicolon",
        "llama3",
        '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "z"}}',
        [call(1, "a", {"x": 1}), call(2, "b", {"y": "z"})],
    ),
    Case(
        "llama3-leading-space",
        "llama3",
        ' \n{"type": "function", "name": "f", "parameters": {}}',
        [call(1, "f", {})],
    ),
    Case(
        "llama3-plain-text",
        "llama3",
        "The capital of France is Paris.",
        [Text("The capital of France is Paris.")],
    ),
    Case(
        "llama3-json-answer-not-call",
        "llama3",
        '{"name": "Bob", "age": 3}',
        [Text('{"name": "Bob", "age": 3}')],
        malformed=1,
    ),
    Case("llama3-brace-text", "llama3", '{ "answer": 4 }', [Text('{ "answer": 4 }')]),
    Case(
        "llama3-builtin-python",
        "llama3",
        '<|python_tag|>brave_search.call(query="weather")',
        [Text('<|python_tag|>brave_search.call(query="weather")')],
        malformed=1,
    ),
    Case(
        "llama3-text-then-tag",
        "llama3",
        'Searching.<|python_tag|>{"name": "s", "parameters": {}}',
        [Text("Searching."), call(1, "s", {})],
    ),
    # ---------------------------------------------------------------- mistral
    Case(
        "mistral-v3-list",
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}, '
        '"id": "a1b2c3d4e"}, {"name": "get_time", "arguments": {}}]',
        [call(1, "get_weather", {"city": "Lyon"}), call(2, "get_time", {})],
    ),
    Case(
        "mistral-v11",
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}[TOOL_CALLS]get_time[ARGS]{}',
        [call(1, "get_weather", {"city": "Nice"}), call(2, "get_time", {})],
    ),
    Case(
        "mistral-v11-call-id",
        "mistral",
        '[TOOL_CALLS]f[CALL_ID]abc123xyz[ARGS]{"n": 2.5}',
        [call(1, "f", {"n": 2.5})],
    ),
    Case(
        "mistral-text-then-call",
        "mistral",
        'Checking.[TOOL_CALLS]f[ARGS]{"a": "b"}',
        [Text("Checking."), call(1, "f", {"a": "b"})],
    ),
    Case(
        "mistral-think",
        "mistral",
        "[THINK]Easy.[/THINK]The answer is 4.",
        [Thinking("Easy."), Text("The answer is 4.")],
    ),
    Case(
        "mistral-malformed",
        "mistral",
        "[TOOL_CALLS]oops no args",
        [Text("[TOOL_CALLS]oops no args")],
        malformed=1,
    ),
    Case(
        "mistral-text-after-args",
        "mistral",
        "[TOOL_CALLS]f[ARGS]{} trailing",
        [call(1, "f", {}), Text(" trailing")],
    ),
    # ---------------------------------------------------------------- gemma4
    Case(
        "gemma4-call",
        "gemma4",
        f"<|tool_call>call:get_weather{{location:{Q}Zürich{Q}}}<tool_call|><|tool_response>",
        [call(1, "get_weather", {"location": "Zürich"})],
    ),
    Case(
        "gemma4-types",
        "gemma4",
        f"<|tool_call>call:book{{count:3,price:-12.5,ok:true,none:null,"
        f'who:{{name:{Q}Zoë "Z" — 東京{Q},tags:[{Q}a{Q},{Q}b, c{Q}]}},exp:1e3}}<tool_call|>',
        [
            call(
                1,
                "book",
                {
                    "count": 3,
                    "price": -12.5,
                    "ok": True,
                    "none": None,
                    "who": {"name": 'Zoë "Z" — 東京', "tags": ["a", "b, c"]},
                    "exp": 1000.0,
                },
            )
        ],
    ),
    Case(
        "gemma4-thinking-text-parallel",
        "gemma4",
        "<|channel>thought\nTwo cities.<channel|>Looking up.<|tool_call>call:w{city:"
        f"{Q}Oslo{Q}}}<tool_call|><|tool_call>call:w{{city:{Q}Rome{Q}}}<tool_call|>"
        "<|tool_response>",
        [
            Thinking("Two cities."),
            Text("Looking up."),
            call(1, "w", {"city": "Oslo"}),
            call(2, "w", {"city": "Rome"}),
        ],
    ),
    Case("gemma4-empty-args", "gemma4", "<|tool_call>call:now{}<tool_call|>", [call(1, "now", {})]),
    Case("gemma4-text-turn-end", "gemma4", "Hello!<turn|>\nleftover", [Text("Hello!")]),
    Case(
        "gemma4-malformed",
        "gemma4",
        '<|tool_call>call:f{a:<|"|>open}<tool_call|>x',
        [Text('<|tool_call>call:f{a:<|"|>open}<tool_call|>x')],
        malformed=1,
    ),
    Case(
        "gemma4-thought-word",
        "gemma4",
        "<|channel>thoughtful<channel|>ok",
        [Thinking("ful"), Text("ok")],
    ),
]


def normalise(events: list[Event]) -> list[Event]:
    return merge_events(events)


def run(case: Case, pieces: list[str]) -> tuple[list[Event], int]:
    p = get_parser(case.fmt, id_factory=counter_ids(), **case.options)
    out: list[Event] = []
    for piece in pieces:
        out.extend(p.feed(piece))
    out.extend(p.finish())
    return normalise(out), len(p.malformed)


_TOKEN = re.compile(r"<\|[^|]*\|>|\[[A-Z_/]+\]|</?\w+>|\w+|\s+|.", re.S)


def tokenish(text: str) -> list[str]:
    """Pieces shaped like a tokenizer's: sentinels, words, spaces, punctuation."""
    return _TOKEN.findall(text)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_whole(case: Case) -> None:
    got, bad = run(case, [case.text])
    assert got == case.expected
    assert bad == case.malformed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_token_by_token_and_chars(case: Case) -> None:
    assert run(case, tokenish(case.text)) == (case.expected, case.malformed)
    assert run(case, list(case.text)) == (case.expected, case.malformed)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_split_point(case: Case) -> None:
    t = case.text
    for i in range(len(t) + 1):
        assert run(case, [t[:i], t[i:]]) == (case.expected, case.malformed), i
    # and at every byte position: the backend may cut text between UTF-8 bytes and
    # decode the parts with errors='ignore'-free incremental decoding; every valid
    # split of the bytes is a split of the characters, which the loop above covers.
    raw = t.encode()
    import codecs

    for i in range(len(raw) + 1):
        dec = codecs.getincrementaldecoder("utf-8")()
        pieces = [dec.decode(raw[:i]), dec.decode(raw[i:], final=True)]
        assert run(case, pieces) == (case.expected, case.malformed), i


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_split_same_events(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CASES))
    n = len(case.text)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=12)))
    pieces = [case.text[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    assert run(case, pieces) == (case.expected, case.malformed)


_SENTINEL_SOUP = st.lists(
    st.sampled_from(
        [
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<|python_tag|>",
            "[TOOL_CALLS]",
            "[ARGS]",
            "<|tool_call>",
            "<tool_call|>",
            "<|channel>",
            "<channel|>",
            '<|"|>',
            "{",
            "}",
            '"name"',
            ":",
            "<",
            "|",
            "a",
            " ",
            "\n",
            '{"name": "f", "arguments": {}}',
            "call:f{a:1}",
            "é",
        ]
    ),
    max_size=25,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    text=_SENTINEL_SOUP,
    fmt=st.sampled_from(["plain", "hermes", "llama3", "mistral", "gemma4"]),
    data=st.data(),
)
def test_random_soup_split_invariant_and_no_crash(text: str, fmt: str, data: st.DataObject) -> None:
    case = Case("soup", fmt, text, [])
    whole, bad = run(case, [text])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(case, pieces) == (whole, bad)
    # nothing silently dropped: every non-space character of a malformed call or
    # plain text is in Text, Thinking or a ToolUse, or the reply was ended by a marker
    for ev in whole:
        assert isinstance(ev, (Text, Thinking, ToolUse))


def test_never_leaks_partial_sentinel() -> None:
    p = get_parser("hermes")
    assert p.feed("Hi <tool_") == [Text("Hi ")]
    assert p.feed("ca") == []
    assert p.feed("ll>") == []
    assert p.feed('{"name": "f", "arguments": {}}</tool') == []
    evs = p.feed("_call>")
    assert len(evs) == 1 and isinstance(evs[0], ToolUse)
    assert p.finish() == []


def test_ids_unique_by_default() -> None:
    p = get_parser("hermes")
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>' * 50
    evs = p.feed(text) + p.finish()
    ids = [e.id for e in evs if isinstance(e, ToolUse)]
    assert len(ids) == 50 and len(set(ids)) == 50
    assert all(i.startswith("call_") for i in ids)


def test_mistral_ids_have_template_shape() -> None:
    assert re.fullmatch(r"[A-Za-z0-9]{9}", mistral_call_id())
    p = get_parser("mistral")
    evs = p.feed("[TOOL_CALLS]f[ARGS]{}") + p.finish()
    assert re.fullmatch(r"[A-Za-z0-9]{9}", evs[0].id)  # type: ignore[union-attr]


def test_feed_after_finish_and_double_finish() -> None:
    p = get_parser("plain")
    p.finish()
    assert p.finish() == []
    with pytest.raises(InternalError, match="feed\\(\\) after finish\\(\\)"):
        p.feed("x")  # misuse of the parser, not a bad request


def test_unknown_format() -> None:
    with pytest.raises(InvalidRequest, match="unknown tool format 'nope'"):
        get_parser("nope")
    assert set(available_formats()) >= {"plain", "hermes", "llama3", "mistral", "gemma4"}


def test_gemma4_argument_reader_errors() -> None:
    assert parse_arguments("{}") == {}
    assert parse_arguments(f"{{{Q}quoted key{Q}:1}}") == {"quoted key": 1}
    assert parse_arguments("{w:hello}") == {"w": "hello"}
    for bad in ("{a:1", "{a 1}", "{:1}", "{a:[1,}", "{a:1} x"):
        with pytest.raises(ValueError):
            parse_arguments(bad)


# ------------------------------------------------------------------- detection

#: Short excerpts recorded from each family's published chat template.
TEMPLATE_EXCERPTS = {
    "gemma4": "{{- '<|tool_call>call:' + function['name'] + '{' -}} ... {{- '}<tool_call|>' -}}"
    " {{- '<|channel>thought\\n' + thinking_text + '\\n<channel|>' -}}",
    "mistral": '{{- "[TOOL_CALLS][" }} ... {{- "[AVAILABLE_TOOLS] [" }}',
    "mistral-v11": "{{- '[TOOL_CALLS]' + tool_call.function.name }} {{- '[ARGS]' }}",
    "llama3": '<|start_header_id|>ipython<|end_header_id|> {{- "<|python_tag|>" }}',
    "llama3.2": "{{- '\"parameters\": ' }} <|start_header_id|>assistant<|end_header_id|>",
    "hermes": '<|im_start|>assistant\\n<tool_call>\\n{"name": <function-name>}</tool_call>',
    "qwen3": "<tool_call>\\n {%- if enable_thinking %} <think>\\n\\n</think>\\n\\n",
    "r1-distill": "<｜Assistant｜><think>\\n",
    "chatml": "<|im_start|>{{ message['role'] }}\\n{{ message['content'] }}<|im_end|>",
}


@pytest.mark.parametrize(
    ("key", "fmt", "thinks"),
    [
        ("gemma4", "gemma4", True),
        ("mistral", "mistral", False),
        ("mistral-v11", "mistral", False),
        ("llama3", "llama3", False),
        ("llama3.2", "llama3", False),
        ("hermes", "hermes", False),
        ("qwen3", "hermes", True),
        ("r1-distill", "plain", True),
        ("chatml", "plain", False),
    ],
)
def test_detect(key: str, fmt: str, thinks: bool) -> None:
    assert detect_format(TEMPLATE_EXCERPTS[key]) == fmt
    assert detect_thinking(TEMPLATE_EXCERPTS[key]) is thinks


def test_detect_empty_and_prompt_thinking() -> None:
    assert detect_format(None) == "plain" and detect_format("") == "plain"
    assert prompt_opens_thinking("<｜Assistant｜><think>\n")
    assert not prompt_opens_thinking("<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("no thinking")


def test_parser_for_opens_thinking_from_prompt() -> None:
    p = parser_for(TEMPLATE_EXCERPTS["r1-distill"], "<｜Assistant｜><think>\n")
    assert merge_events(p.feed("hm</think>ok") + p.finish()) == [Thinking("hm"), Text("ok")]
    p = parser_for(TEMPLATE_EXCERPTS["chatml"], "<|im_start|>assistant\n", tool_format="hermes")
    assert p.name == "hermes"


def test_merge_events_keeps_a_signed_thinking_and_never_merges_into_it() -> None:
    """An Anthropic signature closes its thinking block (ADR 0014): merging must keep it."""
    signed = Thinking("", signature="sig")
    events = [Thinking("a"), Thinking("b"), signed, Thinking("c"), Text("x"), Text("")]
    assert merge_events(events) == [Thinking("ab"), signed, Thinking("c"), Text("x")]
    assert merge_events([Thinking("a", signature="s1"), Thinking("b")]) == [
        Thinking("a", signature="s1"),
        Thinking("b"),
    ]
