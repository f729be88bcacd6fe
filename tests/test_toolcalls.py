"""ChunkAccumulator rules and the quirks of real upstreams, on both twins."""

from __future__ import annotations

import logging
import re
import time
from types import ModuleType
from typing import Any

import orjson
import pytest

from inferd.errors import BackendUnavailable, InternalError
from inferd.types import Done, StopReason, Text, Thinking, ToolUse, Usage


def ch(
    delta: dict[str, Any] | None = None, finish: str | None = None, *, index: Any = 0, **extra: Any
) -> dict[str, Any]:
    choice: dict[str, Any] = {"delta": delta or {}, "finish_reason": finish}
    if index is not ...:
        choice["index"] = index
    return {"object": "chat.completion.chunk", "choices": [choice], **extra}


def tc(
    index: Any = ...,
    id: str | None = None,
    name: str | None = None,
    args: Any = None,
    type: str | None = None,
) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if index is not ...:
        d["index"] = index
    if id is not None:
        d["id"] = id
    if type is not None:
        d["type"] = type
    fn: dict[str, Any] = {}
    if name is not None:
        fn["name"] = name
    if args is not None:
        fn["arguments"] = args
    if fn:
        d["function"] = fn
    return d


def calls(*tcs: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return ch({"tool_calls": list(tcs)}, finish)


def run(mod: ModuleType, items: list[dict[str, Any]]) -> list[Any]:
    acc = mod.ChunkAccumulator()
    out: list[Any] = []
    for c in items:
        out += acc.ingest(c)
    out += acc.finalize()
    return out


def tools(events: list[Any]) -> list[tuple[str, str, Any, str]]:
    return [(e.id, e.name, e.input, e.raw_arguments) for e in events if isinstance(e, ToolUse)]


def done(events: list[Any]) -> Done:
    assert isinstance(events[-1], Done)
    assert sum(isinstance(e, Done) for e in events) == 1
    return events[-1]


# --------------------------------------------------------------------------- text


def test_content_and_reasoning_come_at_once(chunks: ModuleType) -> None:
    acc = chunks.ChunkAccumulator()
    assert acc.ingest(ch({"role": "assistant", "content": ""})) == []
    assert acc.ingest(ch({"content": "Hel"})) == [Text("Hel")]
    assert acc.ingest(ch({"reasoning_content": "hmm"})) == [Thinking("hmm")]
    assert acc.ingest(ch({"reasoning": "so"})) == [Thinking("so")]
    assert acc.ingest(ch({"content": None})) == []
    # reasoning first, then text; reasoning_content wins over a duplicate reasoning
    assert acc.ingest(ch({"content": "lo", "reasoning_content": "r", "reasoning": "r"})) == [
        Thinking("r"),
        Text("lo"),
    ]
    assert acc.finalize() == [Done(StopReason.ERROR)]


def test_events_are_the_public_types(chunks: ModuleType) -> None:
    t = chunks.ChunkAccumulator().ingest(ch({"content": "x"}))[0]
    assert type(t) is Text and t.text == "x" and t == Text("x") and hash(t) == hash(Text("x"))
    with pytest.raises(AttributeError):
        t.text = "y"  # type: ignore[misc]


# --------------------------------------------------------------------------- tool calls


def test_openai_style_streamed_call(chunks: ModuleType) -> None:
    acc = chunks.ChunkAccumulator()
    assert acc.ingest(calls(tc(0, "call_1", "get_weather", "", "function"))) == []
    assert acc.ingest(calls(tc(0, args='{"city": '))) == []
    assert acc.ingest(calls(tc(0, args='"Paris"}'))) == []
    at_finish = acc.ingest(ch({}, "tool_calls"))
    assert at_finish == [ToolUse("call_1", "get_weather", {"city": "Paris"}, '{"city": "Paris"}')]
    assert acc.finalize() == [Done(StopReason.TOOL_USE)]


def test_repeated_id_and_name_are_not_concatenated(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [
            calls(tc(0, "c1", "f", '{"a"', "function")),
            calls(tc(0, "c1", "f", ": 1}", "function")),
            ch({}, "tool_calls"),
        ],
    )
    assert tools(ev) == [("c1", "f", {"a": 1}, '{"a": 1}')]


def test_missing_index_continues_open_call_gemini(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [
            calls(tc(id="g1", name="f", args='{"x"')),
            calls(tc(args=": 1}")),
            ch({}, "stop"),
        ],
    )
    assert tools(ev) == [("g1", "f", {"x": 1}, '{"x": 1}')]
    assert done(ev).stop_reason is StopReason.TOOL_USE


@pytest.mark.parametrize("index", [..., None], ids=["missing", "null"])
def test_missing_or_null_index_new_id_opens_new_call_gemini(chunks: ModuleType, index: Any) -> None:
    ev = run(
        chunks,
        [
            calls(tc(index, "g1", "f", '{"x": 1}')),
            calls(tc(index, "g2", "g", '{"y": 2}')),
            ch({}, "stop"),
        ],
    )
    assert tools(ev) == [("g1", "f", {"x": 1}, '{"x": 1}'), ("g2", "g", {"y": 2}, '{"y": 2}')]


def test_null_index_new_name_without_ids_opens_new_call(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [
            calls(tc(None, name="f", args="{}")),
            calls(tc(None, name="g", args="{}")),
            ch({}, "tool_calls"),
        ],
    )
    assert [t[1] for t in tools(ev)] == ["f", "g"]


def test_ollama_two_calls_share_index_zero(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [
            calls(tc(0, "call_a", "f", '{"n": 1}', "function")),
            calls(tc(0, "call_b", "f", '{"n": 2}', "function")),
            ch({}, "tool_calls"),
        ],
    )
    assert tools(ev) == [
        ("call_a", "f", {"n": 1}, '{"n": 1}'),
        ("call_b", "f", {"n": 2}, '{"n": 2}'),
    ]


def test_index_is_a_key_not_a_list_position(chunks: ModuleType) -> None:
    ev = run(chunks, [calls(tc(5, "c5", "f", "{}")), ch({}, "tool_calls")])
    assert tools(ev) == [("c5", "f", {}, "{}")]


def test_emitted_in_index_order(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [
            calls(tc(1, "b", "g", "{}")),
            calls(tc(0, "a", "f", '{"k":')),
            calls(tc(1, args="")),
            calls(tc(0, args="0}")),
            ch({}, "tool_calls"),
        ],
    )
    assert [t[0] for t in tools(ev)] == ["a", "b"]
    assert tools(ev)[0][2] == {"k": 0}


def test_several_whole_calls_in_one_chunk(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [calls(tc(0, "a", "f", '{"i": 0}'), tc(1, "b", "g", '{"i": 1}'), finish="tool_calls")],
    )
    assert tools(ev) == [("a", "f", {"i": 0}, '{"i": 0}'), ("b", "g", {"i": 1}, '{"i": 1}')]
    assert done(ev).stop_reason is StopReason.TOOL_USE


def test_arguments_as_json_object(chunks: ModuleType) -> None:
    ev = run(chunks, [calls(tc(0, "a", "f", {"city": "Oslo", "n": [1, 2]})), ch({}, "tool_calls")])
    ((_, _, inp, raw),) = tools(ev)
    assert inp == {"city": "Oslo", "n": [1, 2]}
    assert orjson.loads(raw) == inp


@pytest.mark.parametrize("args", ["", "  \n"])
def test_empty_arguments_mean_empty_object(chunks: ModuleType, args: str) -> None:
    ev = run(chunks, [calls(tc(0, "a", "f", args)), ch({}, "tool_calls")])
    assert tools(ev) == [("a", "f", {}, args)]


@pytest.mark.parametrize("args", ['{"a": 1', "[1, 2]", "nope", '"str"'])
def test_arguments_not_a_json_object_keep_raw(
    chunks: ModuleType, args: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.toolcalls"):
        ev = run(chunks, [calls(tc(0, "a", "f", args)), ch({}, "tool_calls")])
    assert tools(ev) == [("a", "f", None, args)]
    assert "not a JSON object" in caplog.text


def test_call_without_name_is_reported_and_logged(
    chunks: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="inferd.toolcalls"):
        ev = run(chunks, [calls(tc(0, "a", args="{}")), ch({}, "tool_calls")])
    assert tools(ev) == [("a", "", {}, "{}")]
    assert "never got a function name" in caplog.text


def test_call_without_id_gets_unique_generated_ids(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [calls(tc(0, name="f", args="{}"), tc(1, name="g", args="{}")), ch({}, "tool_calls")],
    )
    ids = [t[0] for t in tools(ev)]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    assert ids[0] != ids[1]


def test_name_or_id_after_arguments_began_starts_new_call(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [calls(tc(None, args='{"a": 1}')), calls(tc(None, "x", "f", "{}")), ch({}, "tool_calls")],
    )
    assert [(t[0], t[1], t[2]) for t in tools(ev)][1] == ("x", "f", {})
    assert tools(ev)[0][1:3] == ("", {"a": 1})


def test_legacy_function_call_delta(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [
            ch({"function_call": {"name": "f", "arguments": '{"q"'}}),
            ch({"function_call": {"arguments": ": 2}"}}),
            ch({}, "function_call"),
        ],
    )
    ((_, name, inp, _),) = tools(ev)
    assert (name, inp) == ("f", {"q": 2})
    assert done(ev).stop_reason is StopReason.TOOL_USE


def test_tool_calls_come_at_finish_reason_and_finalize_adds_only_done(chunks: ModuleType) -> None:
    acc = chunks.ChunkAccumulator()
    acc.ingest(calls(tc(0, "a", "f", "{}")))
    assert [type(e) for e in acc.ingest(ch({"content": "t"}, "tool_calls"))] == [Text, ToolUse]
    assert acc.finish_reason == "tool_calls"
    assert acc.finalize() == [Done(StopReason.TOOL_USE)]


def test_calls_without_finish_reason_come_at_finalize(chunks: ModuleType) -> None:
    acc = chunks.ChunkAccumulator()
    acc.ingest(calls(tc(0, "a", "f", "{}")))
    out = acc.finalize()
    assert out == [ToolUse("a", "f", {}, "{}"), Done(StopReason.ERROR)]


# --------------------------------------------------------------------------- finish, usage


@pytest.mark.parametrize(
    ("finish", "with_call", "expected"),
    [
        ("stop", False, StopReason.END_TURN),
        ("stop", True, StopReason.TOOL_USE),
        ("length", False, StopReason.MAX_TOKENS),
        ("tool_calls", True, StopReason.TOOL_USE),
        ("function_call", True, StopReason.TOOL_USE),
        ("content_filter", False, StopReason.END_TURN),
        ("eos", False, StopReason.END_TURN),
        (None, False, StopReason.ERROR),
    ],
)
def test_finish_reason_mapping(
    chunks: ModuleType, finish: str | None, with_call: bool, expected: StopReason
) -> None:
    items = [ch({"content": "x"})]
    if with_call:
        items.append(calls(tc(0, "a", "f", "{}")))
    items.append(ch({}, finish))
    assert done(run(chunks, items)).stop_reason is expected


def test_usage_from_empty_choices_chunk(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [
            ch({"content": "x"}, "stop"),
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 11,
                    "completion_tokens": 7,
                    "prompt_tokens_details": {"cached_tokens": 3},
                },
            },
        ],
    )
    assert done(ev) == Done(StopReason.END_TURN, Usage(11, 7, 3))


def test_usage_in_last_content_chunk_and_null_usage(chunks: ModuleType) -> None:
    ev = run(
        chunks,
        [
            ch({"content": "x"}, usage=None),
            ch({}, "length", usage={"prompt_tokens": 2, "completion_tokens": 9}),
        ],
    )
    assert done(ev).usage == Usage(2, 9, 0)
    assert done(run(chunks, [ch({}, "stop", usage=None)])).usage == Usage()


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ({"message": "overloaded", "type": "server_error"}, "overloaded (type=server_error)"),
        ("rate limited", "rate limited"),
        ({"code": 500}, "no message given (code=500)"),
    ],
)
def test_error_payload_raises(chunks: ModuleType, error: Any, message: str) -> None:
    acc = chunks.ChunkAccumulator()
    with pytest.raises(BackendUnavailable) as ei:
        acc.ingest({"error": error})
    assert ei.value.message == f"upstream reported an error in the stream: {message}"


def test_only_choice_zero(chunks: ModuleType) -> None:
    c = {
        "choices": [
            {"index": 1, "delta": {"content": "other"}, "finish_reason": "length"},
            {"index": 0, "delta": {"content": "mine"}, "finish_reason": None},
        ]
    }
    ev = run(chunks, [c, ch({}, "stop")])
    assert ev[0] == Text("mine") and len(ev) == 2
    assert done(ev).stop_reason is StopReason.END_TURN


def test_choice_without_index_counts_as_zero(chunks: ModuleType) -> None:
    assert run(chunks, [ch({"content": "a"}, "stop", index=...)])[0] == Text("a")


def test_not_a_dict_is_ignored_with_warning(
    chunks: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    acc = chunks.ChunkAccumulator()
    with caplog.at_level(logging.WARNING, logger="inferd.toolcalls"):
        assert acc.ingest([1, 2]) == []  # type: ignore[arg-type]
    assert "not a JSON object" in caplog.text


def test_ingest_after_finalize_and_double_finalize_are_errors(chunks: ModuleType) -> None:
    acc = chunks.ChunkAccumulator()
    acc.finalize()
    with pytest.raises(InternalError, match="after finalize"):
        acc.ingest(ch({"content": "x"}))
    with pytest.raises(InternalError, match="twice"):
        acc.finalize()


def test_one_mib_argument_in_20_byte_deltas_is_linear(chunks: ModuleType) -> None:
    arg = orjson.dumps({"blob": "x" * (1 << 20)}).decode()
    items = [calls(tc(0, "big", "store", ""))]
    items += [calls(tc(0, args=arg[i : i + 20])) for i in range(0, len(arg), 20)]
    items.append(ch({}, "tool_calls"))
    t0 = time.perf_counter()
    ev = run(chunks, items)
    elapsed = time.perf_counter() - t0
    ((cid, name, inp, raw),) = tools(ev)
    assert (cid, name) == ("big", "store")
    assert raw == arg and inp == {"blob": "x" * (1 << 20)}
    assert elapsed < 10.0  # re-parsing the buffer per delta would take minutes
