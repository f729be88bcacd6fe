"""Tool calls streamed as they are written, stop reasons that tell the truth, and
``parallel_tool_calls`` (issue 15; docs/adr/0023-tool-call-streaming-and-stop-reasons.md).

From the parts (the partial-JSON reader, the parser engine at every split, the chunk
twins, the wire writers) to the whole: real SmolLM2 through ``LlamaCpp`` and the
bridge with openai-python, OpenAICompat and AnthropicCompat against scripted upstreams
on 127.0.0.1, and the bridge's ``/v1/messages`` stream.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferd.anthropic_wire import MessageStreamWriter
from inferd.backends.anthropic_compat import AnthropicCompat
from inferd.backends.mock import Mock
from inferd.backends.openai_compat import OpenAICompat
from inferd.call_stop import stop_after_calls
from inferd.chat import get_parser, merge_events
from inferd.chat.partial_json import (
    MAX_STREAMED_CALL_CHARS,
    ArgumentStream,
    call_arguments,
    stable_prefix,
)
from inferd.chat.plan import plan_chat
from inferd.openai_wire import ChunkWriter, request_from_openai, request_to_openai
from inferd.serve.wire import event_frame, event_from_frame
from inferd.types import (
    Done,
    Event,
    Message,
    Request,
    Response,
    StopReason,
    Text,
    Tool,
    ToolChoice,
    ToolUse,
    ToolUseDelta,
)

from .anthropic_upstream import stream as anthropic_stream
from .anthropic_upstream import text_block, tool_block
from .serve_helpers import BridgeProc, DaemonProc, bridge_in_process, short_tmpdir, write_config
from .upstream import DONE, Stream, Upstream, chunk, sse

WEATHER = Tool(
    "get_weather",
    "Current weather for a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 16}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
WEATHER_OPENAI = {
    "type": "function",
    "function": {
        "name": WEATHER.name,
        "description": WEATHER.description,
        "parameters": dict(WEATHER.parameters),
    },
}
ASK = "What is the weather in Paris right now? Use the tool."
TWO_CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]


def counter_ids() -> Any:
    n = itertools.count()
    return lambda: f"call_{next(n)}"


def joined(events: list[Event], call_id: str) -> str:
    return "".join(
        e.arguments_fragment for e in events if isinstance(e, ToolUseDelta) and e.id == call_id
    )


def deltas_match_calls(events: list[Event]) -> list[ToolUse]:
    """Every call's deltas join to its raw_arguments; returns the calls."""
    calls = [e for e in events if isinstance(e, ToolUse)]
    for c in calls:
        assert joined(events, c.id) == c.raw_arguments, (c, events)
    return calls


# --------------------------------------------------------------------------- partial JSON

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    value=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    spaced=st.booleans(),
    ascii_=st.booleans(),
)
def test_stable_prefix_only_grows_and_ends_canonical(value, spaced, ascii_) -> None:
    text = json.dumps(value, ensure_ascii=ascii_, indent=1 if spaced else None)
    canonical = json.dumps(json.loads(text), ensure_ascii=False)
    seen = ""
    for i in range(len(text) + 1):
        out, done = stable_prefix(text[:i])
        assert out.startswith(seen) and canonical.startswith(out), (text[:i], out)
        seen = out
    assert done and seen == canonical


@settings(max_examples=100, deadline=None)
@given(value=st.dictionaries(st.text(max_size=6), json_values, max_size=4), data=st.data())
def test_the_resumable_reader_equals_reading_each_prefix_whole(value, data) -> None:
    text = "xx" + json.dumps(value, indent=1)  # the value starts at offset 2
    cuts = sorted(data.draw(st.lists(st.integers(2, len(text)), max_size=8)))
    reader, written = ArgumentStream(2), ""
    for cut in [*cuts, len(text)]:
        written += reader.advance(text[:cut])
        assert written == stable_prefix(text[2:cut])[0]
    assert reader.done and written == json.dumps(value, ensure_ascii=False)


def test_stable_prefix_holds_what_may_still_change() -> None:
    assert stable_prefix('{"n": 12') == ('{"n": ', False)  # 12 may become 123
    assert stable_prefix('{"ok": tr') == ('{"ok": ', False)
    assert stable_prefix('{"s": "a\\') == ('{"s": "a', False)  # half an escape
    assert stable_prefix('{"s": "\\ud83d') == ('{"s": "', False)  # half a surrogate pair
    assert stable_prefix('{"s": "\\ud83d\\ude00"}') == ('{"s": "\U0001f600"}', True)
    assert stable_prefix('{"a": 1,, }')[1] is False  # not JSON: streaming stops there


def test_call_arguments_finds_the_arguments_in_the_common_shape() -> None:
    body = '{"name": "f", "parameters": {"x": [1, 2'
    assert call_arguments(body) == ("f", '{"x": [1, 2')
    name, args = call_arguments('[{"name": "g", "arguments": {}}]')  # runs to the end
    assert name == "g" and stable_prefix(args or "") == ("{}", True)
    assert call_arguments('{"arguments": {"x": 1}, "name": "late"}')[0] is None  # no name yet
    assert call_arguments('{"name": "f", "arguments": "{\\"x\\": 1}"}') == ("f", None)
    assert call_arguments("get_weather[ARGS]{}") == (None, None)


# --------------------------------------------------------------------------- the parser engine

HERMES_REPLY = (
    "Let me look.<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Par\\u00eds", "days": [1, 2]}}\n'
    "</tool_call>\n<tool_call>"
    '{"name": "add", "parameters": {"a": 1, "b": 22}}</tool_call>'
)


def _run(fmt: str, pieces: list[str], **kw: Any) -> tuple[list[Event], Any]:
    p = get_parser(fmt, id_factory=counter_ids(), **kw)
    events: list[Event] = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    return events, p


def _splits(text: str) -> Iterator[list[str]]:
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def test_hermes_deltas_join_to_each_call_at_every_split() -> None:
    plain, _ = _run("hermes", [HERMES_REPLY])
    assert not any(isinstance(e, ToolUseDelta) for e in plain)
    for pieces in _splits(HERMES_REPLY):
        events, parser = _run("hermes", pieces, stream_arguments=True)
        calls = deltas_match_calls(events)
        assert merge_events([e for e in events if not isinstance(e, ToolUseDelta)]) == plain
        assert [c.input for c in calls] == [{"city": "París", "days": [1, 2]}, {"a": 1, "b": 22}]
        indexes = [e.call_index for e in events if isinstance(e, ToolUseDelta)]
        assert indexes == sorted(indexes) and set(indexes) == {0, 1}
        assert parser.ended_in_call is True
    # token by token the first call's arguments really stream: many pieces, not one
    events, _ = _run("hermes", list(HERMES_REPLY), stream_arguments=True)
    assert sum(isinstance(e, ToolUseDelta) and e.call_index == 0 for e in events) > 5


def test_every_delta_comes_before_its_call_and_after_the_text() -> None:
    events, _ = _run("hermes", list(HERMES_REPLY), stream_arguments=True)
    kinds = [type(e).__name__ for e in events]
    first_delta = kinds.index("ToolUseDelta")
    assert all(k == "Text" for k in kinds[:first_delta])
    first_call = kinds.index("ToolUse")
    assert all(k == "ToolUseDelta" for k in kinds[first_delta:first_call])


def test_a_family_of_another_shape_still_gets_one_delta_per_call() -> None:
    reply = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    events, _ = _run("gemma4", list(reply), stream_arguments=True)
    (call,) = deltas_match_calls(events)
    deltas = [e for e in events if isinstance(e, ToolUseDelta)]
    assert len(deltas) == 1 and call.input == {"city": "Paris"}


def test_a_malformed_call_after_deltas_keeps_its_index_and_shows_its_text() -> None:
    reply = (
        '<tool_call>{"name": "f", "arguments": {"a": 1}, oops</tool_call>'
        '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    )
    events, parser = _run("hermes", list(reply), stream_arguments=True)
    bad = [e for e in events if isinstance(e, ToolUseDelta) and e.name == "f"]
    assert bad and all(d.call_index == 0 for d in bad)
    assert "oops" in "".join(e.text for e in events if isinstance(e, Text))
    (call,) = deltas_match_calls(events)
    assert call.name == "g"
    assert {e.call_index for e in events if isinstance(e, ToolUseDelta) and e.name == "g"} == {1}
    assert parser.malformed


def test_text_after_a_call_means_the_reply_did_not_end_in_one() -> None:
    _, parser = _run("hermes", ['<tool_call>{"name": "f", "arguments": {}}</tool_call> done'])
    assert parser.ended_in_call is False


def test_a_runaway_call_body_is_not_reread_per_token() -> None:
    body = '{"name": "f", "arguments": {"s": "' + "x" * MAX_STREAMED_CALL_CHARS
    events, _ = _run("hermes", ["<tool_call>", body[:100], body[100:], '"}}</tool_call>'],
                     stream_arguments=True)  # fmt: skip
    (call,) = deltas_match_calls(events)
    assert call.input == {"s": "x" * MAX_STREAMED_CALL_CHARS}


# --------------------------------------------------------------------------- stop reasons


@pytest.mark.parametrize(
    ("choice", "reason", "called", "last", "want"),
    [
        (None, StopReason.END_TURN, True, True, StopReason.TOOL_USE),
        ("required", StopReason.END_TURN, True, True, StopReason.TOOL_USE),
        (ToolChoice("tool", "get_weather"), StopReason.TOOL_USE, True, True, StopReason.END_TURN),
        (None, StopReason.END_TURN, True, False, StopReason.END_TURN),  # text after the call
        (None, StopReason.TOOL_USE, True, False, StopReason.TOOL_USE),  # the upstream's word
        (None, StopReason.MAX_TOKENS, True, True, StopReason.MAX_TOKENS),  # cut off
        (None, StopReason.STOP_SEQUENCE, True, True, StopReason.STOP_SEQUENCE),
        (None, StopReason.END_TURN, False, False, StopReason.END_TURN),
    ],
)
def test_the_one_stop_rule(choice, reason, called, last, want) -> None:
    req = Request.chat(ASK, tools=(WEATHER,), tool_choice=choice)
    assert stop_after_calls(req, reason, called=called, last=last) is want


# --------------------------------------------------------------------------- grammars


def test_parallel_tool_calls_decides_how_many_calls_the_grammar_allows() -> None:
    msgs = (Message.user(ASK),)

    def root(**kw: Any) -> str:
        plan = plan_chat(None, Request(msgs, tools=(WEATHER,), **kw), tool_format="hermes")
        assert plan.grammar is not None
        return plan.grammar.text.splitlines()[0]

    assert ")*" in root(tool_choice="required")  # one or more (OpenAI's default)
    assert ")*" not in root(tool_choice="required", parallel_tool_calls=False)
    assert ")*" in root(tool_choice="auto")
    assert ")*" not in root(tool_choice="auto", parallel_tool_calls=False)
    assert ")*" not in root(tool_choice=ToolChoice("tool", "get_weather"))  # one call


# --------------------------------------------------------------------------- wire writers


def _calls_of(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls", [])]


def test_chunk_writer_streams_calls_as_openai_does() -> None:
    w = ChunkWriter("m", "c1")
    out: list[dict[str, Any]] = []
    events: list[Event] = [
        Text("Checking."),
        ToolUseDelta(0, "a", "get_weather", '{"city": '),
        ToolUseDelta(0, "a", "get_weather", '"Paris"'),
        ToolUse("a", "get_weather", {"city": "Paris"}, '{"city": "Paris"}'),
        ToolUse("b", "add", {"a": 1}, '{"a": 1}'),  # no deltas: one whole delta
        Done(StopReason.TOOL_USE),
    ]
    for ev in events:
        out += w.write(ev)
    calls = _calls_of(out)
    assert calls[0] == {
        "index": 0,
        "id": "a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": '},
    }
    assert calls[1] == {"index": 0, "function": {"arguments": '"Paris"'}}
    assert calls[2] == {"index": 0, "function": {"arguments": "}"}}  # what the deltas lacked
    assert calls[3]["index"] == 1 and calls[3]["id"] == "b"
    assert calls[3]["function"]["arguments"] == '{"a": 1}'
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_writer_streams_input_json_delta() -> None:
    w = MessageStreamWriter("m")
    raw = b"".join(
        w.write(ev)
        for ev in (
            ToolUseDelta(0, "toolu_1", "get_weather", '{"ci'),
            ToolUseDelta(0, "toolu_1", "get_weather", 'ty": "Paris"}'),
            ToolUse("toolu_1", "get_weather", {"city": "Paris"}, '{"city": "Paris"}'),
            Done(StopReason.TOOL_USE),
        )
    )
    datas = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data:")]
    starts = [d for d in datas if d["type"] == "content_block_start"]
    assert len(starts) == 1 and starts[0]["content_block"]["id"] == "toolu_1"
    pieces = [d["delta"]["partial_json"] for d in datas if d["type"] == "content_block_delta"]
    assert pieces == ['{"ci', 'ty": "Paris"}']
    assert datas[-2]["delta"]["stop_reason"] == "tool_use"


def test_tool_use_delta_round_trips_the_daemon_wire() -> None:
    ev = ToolUseDelta(3, "call_1", "f", '{"a": ', index=2)
    assert event_from_frame(event_frame(7, ev)) == ev
    assert event_from_frame(event_frame(7, ToolUseDelta(0, "c", "f"))) == ToolUseDelta(0, "c", "f")
    bad = event_frame(7, ev)
    bad["event"]["call_index"] = -1
    with pytest.raises(Exception, match="call_index"):
        event_from_frame(bad)


def test_collect_ignores_deltas() -> None:
    call = ToolUse("a", "f", {}, "{}")
    events = [Text("x"), ToolUseDelta(0, "a", "f", "{}"), call, Done(StopReason.TOOL_USE)]
    r = Response.collect(events)
    assert r.tool_calls == (call,) and r.text == "x"


def test_parallel_tool_calls_maps_in_and_out() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_OPENAI]}
    assert request_from_openai(body).parallel_tool_calls is True
    off = request_from_openai({**body, "parallel_tool_calls": False})
    assert off.parallel_tool_calls is False
    assert request_to_openai(off)["parallel_tool_calls"] is False
    assert "parallel_tool_calls" not in request_to_openai(request_from_openai(body))
    with pytest.raises(ValueError, match="parallel_tool_calls"):
        request_from_openai({**body, "parallel_tool_calls": "no"})


# --------------------------------------------------------------------------- chunk twins


def test_chunk_twins_forward_upstream_fragments(chunks) -> None:
    acc = chunks.ChunkAccumulator(stream_args=True)
    out: list[Event] = []
    # the id before the name (some upstreams): nothing until the call has both
    head = {"index": 0, "id": "x", "type": "function", "function": {"arguments": ""}}
    out += acc.ingest(chunk({"tool_calls": [head]}))
    assert out == []
    out += acc.ingest(chunk({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}))
    for frag in ('{"a', '": 1}'):
        out += acc.ingest(chunk({"tool_calls": [{"index": 0, "function": {"arguments": frag}}]}))
    out += acc.ingest(chunk({}, "tool_calls"))
    out += acc.finalize()
    frags = [e.arguments_fragment for e in out if isinstance(e, ToolUseDelta)]
    assert frags == ["", '{"a', '": 1}']
    deltas_match_calls(out)
    plain = chunks.ChunkAccumulator()
    assert not any(isinstance(e, ToolUseDelta) for e in plain.ingest(chunk({"tool_calls": [head]})))


# --------------------------------------------------------------------------- OpenAICompat


def _two_call_stream(finish: str = "tool_calls") -> list[bytes]:
    def call(i: int, cid: str, city: str) -> list[bytes]:
        head = {"index": i, "id": cid, "type": "function", "function": {"name": "get_weather"}}
        frags = ['{"ci', 'ty": ', f'"{city}"}}']
        return [sse(chunk({"tool_calls": [head]}))] + [
            sse(chunk({"tool_calls": [{"index": i, "function": {"arguments": f}}]})) for f in frags
        ]

    return [
        sse(chunk({"role": "assistant", "content": ""})),
        *call(0, "call_a", "Paris"),
        *call(1, "call_b", "Rome"),
        sse(chunk({}, finish)),
        DONE,
    ]


@pytest.fixture
async def up():
    u = await Upstream().start()
    yield u
    await u.stop()


async def test_openai_compat_forwards_upstream_fragments_and_sends_parallel(up) -> None:
    url = up.script("two", Stream(_two_call_stream(), delay=0.001), Stream(_two_call_stream()))
    async with OpenAICompat(url, api_key="", model="m") as b:
        req = Request.chat(ASK, tools=(WEATHER,), stream_tool_arguments=True)
        events = [e async for e in b.generate(req)]
        off = replace(req, parallel_tool_calls=False, stream_tool_arguments=False)
        plain = [e async for e in b.generate(off)]
    calls = deltas_match_calls(events)
    assert [c.input for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    frags = [e.arguments_fragment for e in events if isinstance(e, ToolUseDelta)]
    assert frags == ["", '{"ci', 'ty": ', '"Paris"}', "", '{"ci', 'ty": ', '"Rome"}']
    assert events[-1].stop_reason is StopReason.TOOL_USE
    assert not any(isinstance(e, ToolUseDelta) for e in plain)
    sent = [r.body for r in up.requests("two")]
    assert "parallel_tool_calls" not in sent[0] and sent[1]["parallel_tool_calls"] is False


async def test_openai_compat_named_call_ends_with_stop(up) -> None:
    url = up.script("named", Stream(_two_call_stream("tool_calls")))
    async with OpenAICompat(url, api_key="", model="m") as b:
        req = Request.chat(ASK, tools=(WEATHER,), tool_choice=ToolChoice("tool", "get_weather"))
        events = [e async for e in b.generate(req)]
    assert events[-1].stop_reason is StopReason.END_TURN  # OpenAI's "stop" for a named call


async def test_anthropic_compat_sends_disable_parallel_tool_use(up) -> None:
    reply = anthropic_stream(
        text_block(0, ["ok"]),
        tool_block(1, "toolu_1", "get_weather", ['{"city": "Paris"}']),
        stop_reason="tool_use",
    )
    url = up.script("anth", Stream(reply))
    async with AnthropicCompat(url, api_key="sk-ant-x", model="m") as b:
        req = Request.chat(ASK, tools=(WEATHER,), parallel_tool_calls=False)
        events = [e async for e in b.generate(replace(req, stream_tool_arguments=True))]
    (sent,) = [r.body for r in up.requests("anth")]
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert deltas_match_calls(events)[0].input == {"city": "Paris"}
    assert events[-1].stop_reason is StopReason.TOOL_USE


# --------------------------------------------------------------------------- the bridge (Mock)


def _oa(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def _stream_calls(client: openai.AsyncOpenAI, **kw: Any) -> tuple[list[Any], str | None]:
    stream = await client.chat.completions.create(model="m", stream=True, **kw)
    calls, finish = [], None
    async for c in stream:
        for ch in c.choices:
            calls += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    return calls, finish


def _by_index(calls: list[Any]) -> dict[int, tuple[str, str, str]]:
    """index -> (id, name, arguments joined), from the first delta's id and name."""
    out: dict[int, list[str]] = {}
    for tc in calls:
        if tc.index not in out:
            assert tc.id and tc.function.name, tc  # the first delta names the call
            out[tc.index] = [tc.id, tc.function.name, ""]
        else:
            assert tc.id is None and not tc.function.name  # later ones: arguments only
        out[tc.index][2] += tc.function.arguments or ""
    return {i: (v[0], v[1], v[2]) for i, v in out.items()}


async def test_bridge_streams_two_parallel_calls_as_index_0_and_1() -> None:
    mock = Mock(["Checking."], tool_calls=TWO_CALLS)
    msgs = [{"role": "user", "content": ASK}]
    async with bridge_in_process(mock) as (url, _, _):
        c = _oa(url)
        calls, finish = await _stream_calls(c, messages=msgs, tools=[WEATHER_OPENAI])
        one, finish_one = await _stream_calls(
            c, messages=msgs, tools=[WEATHER_OPENAI], parallel_tool_calls=False
        )
        named, finish_named = await _stream_calls(
            c,
            messages=msgs,
            tools=[WEATHER_OPENAI],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    got = _by_index(calls)
    assert sorted(got) == [0, 1] and len(calls) > 2  # streamed in pieces
    assert [json.loads(got[i][2]) for i in (0, 1)] == [{"city": "Paris"}, {"city": "Rome"}]
    assert finish == "tool_calls"
    assert len(_by_index(one)) == 1 and finish_one == "tool_calls"  # at most one call
    assert not mock.requests[1].parallel_tool_calls
    assert finish_named == "stop" and _by_index(named)  # OpenAI's answer for a named call


async def test_bridge_messages_stream_input_json_delta() -> None:
    mock = Mock(["Checking."], tool_calls=[("get_weather", {"city": "Paris, France"})])
    body = {
        "model": "m",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": ASK}],
        "tools": [
            {"name": "get_weather", "input_schema": dict(WEATHER.parameters)},
        ],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }
    async with bridge_in_process(mock) as (url, _, _), aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/messages", json=body) as r:
            assert r.status == 200
            text = await r.text()
    datas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data:")]
    pieces = [
        d["delta"]["partial_json"]
        for d in datas
        if d["type"] == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    ]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Paris, France"}
    assert datas[-2]["delta"]["stop_reason"] == "tool_use"
    assert mock.requests[0].parallel_tool_calls is False


# --------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from tests.conftest import require_llama_core

    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=2048, n_threads=1)
    yield b
    b.close()


def _smol_request(**kw: Any) -> Request:
    base: dict[str, Any] = {"tools": (WEATHER,), "max_tokens": 96, "temperature": 0.0}
    return Request.chat(ASK, **{**base, **kw})


@pytest.mark.llama
async def test_smollm2_streams_a_required_call_and_says_tool_use(smol) -> None:
    req = _smol_request(tool_choice="required", parallel_tool_calls=False)
    plain = [e async for e in smol.generate(req)]
    events = [e async for e in smol.generate(replace(req, stream_tool_arguments=True))]
    (call,) = deltas_match_calls(events)
    assert call.name == "get_weather" and isinstance((call.input or {}).get("city"), str)
    assert sum(isinstance(e, ToolUseDelta) for e in events) > 2  # written, not at the end
    assert [e for e in events[:-1] if not isinstance(e, ToolUseDelta)] == [
        replace(e, id=call.id) if isinstance(e, ToolUse) else e for e in plain[:-1]
    ]
    assert plain[-1].stop_reason is events[-1].stop_reason is StopReason.TOOL_USE
    named = [
        e async for e in smol.generate(replace(req, tool_choice=ToolChoice("tool", WEATHER.name)))
    ]
    assert any(isinstance(e, ToolUse) for e in named)
    assert named[-1].stop_reason is StopReason.END_TURN


@pytest.mark.llama
async def test_smollm2_parallel_false_makes_at_most_one_call(smol) -> None:
    for seed in range(3):
        for choice in ("required", "auto"):
            req = _smol_request(
                tool_choice=choice, parallel_tool_calls=False, temperature=1.0, seed=seed
            )
            events = [e async for e in smol.generate(req)]
            calls = [e for e in events if isinstance(e, ToolUse)]
            assert len(calls) <= 1, (seed, choice, events)
            done = events[-1]
            assert isinstance(done, Done)
            if calls and done.stop_reason is not StopReason.MAX_TOKENS:
                assert done.stop_reason is StopReason.TOOL_USE  # a call is the last act


@pytest.mark.llama
async def test_smollm2_through_the_bridge_with_openai_python(smol) -> None:
    msgs = [{"role": "user", "content": ASK}]
    kw: dict[str, Any] = {
        "messages": msgs,
        "tools": [WEATHER_OPENAI],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 96,
        "temperature": 0.0,
    }
    async with bridge_in_process(smol) as (url, _, _):
        c = _oa(url)
        whole = await c.chat.completions.create(model="smol", **kw)
        calls, finish = await _stream_calls(c, **kw)
    (call,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls"
    got = _by_index(calls)
    assert list(got) == [0] and len(calls) > 2 and finish == "tool_calls"
    _, name, args = got[0]
    assert name == call.function.name and args == call.function.arguments  # greedy: same call
    assert json.loads(args) == json.loads(call.function.arguments)


@pytest.fixture(scope="module")
def served(smollm2_path) -> Iterator[tuple[DaemonProc, BridgeProc]]:
    """``inferd serve`` on SmolLM2 and a bridge subprocess in front of it."""
    from tests.conftest import require_llama_core

    require_llama_core()
    with short_tmpdir() as d:
        smol = {"type": "llamacpp", "model": str(smollm2_path), "name": "smol"}
        cfg = write_config(d / "c.toml", [{**smol, "n_ctx": 2048, "n_threads": 1}])
        daemon = DaemonProc.start(cfg, d / "infer.sock")
        try:
            bridge = BridgeProc.start("--socket", str(daemon.sock))
            try:
                yield daemon, bridge
            finally:
                bridge.stop()
        finally:
            daemon.stop()


@pytest.mark.llama
async def test_smollm2_through_the_daemon_and_a_bridge_before_it(served) -> None:
    from inferd.serve.client import Client

    daemon, bridge = served
    req = _smol_request(tool_choice="required", parallel_tool_calls=False)
    client = Client(daemon.sock)
    try:
        events = [e async for e in client.generate(replace(req, stream_tool_arguments=True))]
    finally:
        await client.aclose()
    (call,) = deltas_match_calls(events)  # the deltas crossed the daemon wire
    assert sum(isinstance(e, ToolUseDelta) for e in events) > 2
    assert events[-1].stop_reason is StopReason.TOOL_USE
    kw: dict[str, Any] = {
        "messages": [{"role": "user", "content": ASK}],
        "tools": [WEATHER_OPENAI],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 96,
        "temperature": 0.0,
    }
    calls, finish = await _stream_calls(_oa(bridge.url), **kw)
    got = _by_index(calls)
    assert list(got) == [0] and finish == "tool_calls" and len(calls) > 2
    assert got[0][1] == call.name and got[0][2] == call.raw_arguments  # greedy: same call
