"""Property tests: the C and Python twins agree on random input at random splits, and
any split of an input gives the same result as the whole."""

from __future__ import annotations

import os
import re
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferd._fast import load_twin
from inferd.types import ToolUse
from tests.conftest import missing

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _twins(core: str) -> tuple[ModuleType, ModuleType]:
    try:
        c = load_twin(core, "c")
    except ImportError:
        missing(f"the compiled core inferd._fast._{core}_c")
    return c, load_twin(core, "py")


@pytest.fixture(scope="module")
def sse_twins() -> tuple[ModuleType, ModuleType]:
    return _twins("sse")


@pytest.fixture(scope="module")
def chunk_twins() -> tuple[ModuleType, ModuleType]:
    return _twins("chunks")


# --------------------------------------------------------------------------- strategies

VALUES = st.one_of(
    st.sampled_from(
        [
            b"",
            b" ",
            b"x",
            b"hello world",
            b"12",
            b"007",
            b"1a",
            "é€😀中".encode(),
            b"\xff\xfe",
            b"\xe2\x82",
            b"\xf0\x9f",
            b"a:b",
            b"\x00",
            b"1\x002",
            "\u2028\u2029\u0085".encode(),
            b"\xef\xbb\xbf",
            b"[DONE]",
            b'{"a": 1}',
        ]
    ),
    st.binary(max_size=12),
    st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
LINE = st.one_of(
    st.tuples(
        st.sampled_from(
            [b"data", b"data", b"event", b"id", b"retry", b"Data", b"foo", b"", b"dat"]
        ),
        st.sampled_from([b":", b": ", b"", b":  "]),
        VALUES,
    ).map(b"".join),
    st.just(b""),
    VALUES.map(lambda v: b":" + v),
)
EOL = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(LINE, EOL), max_size=25))
    prefix = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf", b"\xef\xbb", b"\xef"]))
    body = prefix + b"".join(line + eol for line, eol in lines)
    if draw(st.booleans()):
        body += draw(VALUES)  # an unterminated tail
    return body


@st.composite
def cut(draw: st.DrawFn, body: bytes) -> list[bytes]:
    if not body:
        return [body]
    mode = draw(st.sampled_from(["random", "random", "bytes", "whole"]))
    if mode == "whole":
        return [body]
    if mode == "bytes":
        return [body[i : i + 1] for i in range(len(body))]
    points = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
    pieces, last = [], 0
    for p in [*points, len(body)]:
        pieces.append(body[last:p])
        last = p
    return pieces


def feed_all(obj: Any, pieces: list[bytes]) -> list[Any]:
    """Per-feed outputs, ending with close()'s or with the error raised."""
    out: list[Any] = []
    try:
        for p in pieces:
            out.append(list(obj.feed(p)))
        out.append(list(obj.close()))
    except Exception as e:  # the error itself is compared
        out.append(("raised", type(e).__name__, str(e)))
    return out


def flat(per_feed: list[Any]) -> tuple[list[Any], Any]:
    events = [e for step in per_feed if isinstance(step, list) for e in step]
    err = per_feed[-1] if isinstance(per_feed[-1], tuple) else None
    return events, err


MAX = st.sampled_from([8, 16, 64, 64 * 1024 * 1024])


# --------------------------------------------------------------------------- SSE


@SETTINGS
@given(data=st.data(), body=sse_streams(), limit=MAX)
def test_sse_twins_agree(
    sse_twins: tuple[ModuleType, ModuleType], data: st.DataObject, body: bytes, limit: int
) -> None:
    c, py = sse_twins
    pieces = data.draw(cut(body))
    assert feed_all(c.SSEParser(limit), pieces) == feed_all(py.SSEParser(limit), pieces)


@SETTINGS
@given(data=st.data(), body=sse_streams(), limit=MAX)
def test_sse_split_invariance(
    sse_twins: tuple[ModuleType, ModuleType], data: st.DataObject, body: bytes, limit: int
) -> None:
    pieces = data.draw(cut(body))
    for mod in sse_twins:
        whole_events, whole_err = flat(feed_all(mod.SSEParser(limit), [body]))
        events, err = flat(feed_all(mod.SSEParser(limit), pieces))
        assert err == whole_err
        if whole_err is None:
            assert events == whole_events
        else:  # events before the error may come out in earlier feeds
            assert events[: len(whole_events)] == whole_events


def test_sse_matches_a_reference_reading_on_simple_input(
    sse_twins: tuple[ModuleType, ModuleType],
) -> None:
    # Guards against both twins agreeing on something wrong.
    for mod in sse_twins:
        out = mod.SSEParser().feed(b"id: 1\nevent: e\ndata: a\ndata: b\nretry: 9\n\n")
        assert [tuple(e) for e in out] == [("e", "a\nb", "1", 9)]


# --------------------------------------------------------------------------- chat chunks

TEXT = st.one_of(st.none(), st.sampled_from(["", "a", "é€", "x y"]), st.text(max_size=5))
ARGS = st.one_of(
    st.sampled_from(['{"x":', " 1}", "", "{}", "bad", "[1]", "  ", '"s"']),
    st.dictionaries(st.text(max_size=3), st.integers(-(2**40), 2**40), max_size=2),
    st.none(),
)
TOOL = st.fixed_dictionaries(
    {},
    optional={
        "index": st.one_of(st.none(), st.integers(0, 3), st.just("0")),
        "id": st.sampled_from(["a", "b", "c", "", None]),
        "type": st.just("function"),
        "function": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {}, optional={"name": st.sampled_from(["f", "g", "", None]), "arguments": ARGS}
            ),
        ),
    },
)
DELTA = st.fixed_dictionaries(
    {},
    optional={
        "role": st.just("assistant"),
        "content": TEXT,
        "reasoning_content": TEXT,
        "reasoning": TEXT,
        "tool_calls": st.one_of(st.none(), st.lists(TOOL, max_size=3)),
        "function_call": st.fixed_dictionaries(
            {}, optional={"name": st.sampled_from(["f", "h"]), "arguments": ARGS}
        ),
    },
)
USAGE = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": st.integers(0, 10**6),
        "completion_tokens": st.integers(0, 10**6),
        "prompt_tokens_details": st.one_of(
            st.none(), st.fixed_dictionaries({"cached_tokens": st.integers(0, 100)})
        ),
    },
)
CHOICE = st.fixed_dictionaries(
    {"delta": DELTA},
    optional={
        "index": st.sampled_from([0, 0, 0, 1, None]),
        "finish_reason": st.sampled_from(
            [None, None, None, "stop", "length", "tool_calls", "content_filter", "eos"]
        ),
    },
)
CHUNK = st.fixed_dictionaries(
    {"choices": st.lists(CHOICE, max_size=2)},
    optional={"usage": st.one_of(st.none(), USAGE), "id": st.just("chatcmpl-1")},
)
RARE_ERROR = {"error": {"message": "boom", "type": "server_error"}}


@st.composite
def chat_streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(
            st.sampled_from(
                ["chunk"] * 12 + ["bad", "comment", "ping", "done", "error", "errevent", "crlf"]
            )
        )
        if kind == "chunk":
            parts.append(b"data: " + orjson.dumps(draw(CHUNK)) + b"\n\n")
        elif kind == "crlf":
            parts.append(b"data: " + orjson.dumps(draw(CHUNK)) + b"\r\n\r\n")
        elif kind == "bad":
            parts.append(b"data: {bad " + draw(VALUES) + b"\n\n")
        elif kind == "comment":
            parts.append(b": keep-alive\n\n")
        elif kind == "ping":
            parts.append(b"event: ping\ndata: " + draw(VALUES) + b"\n\n")
        elif kind == "done":
            parts.append(b"data: [DONE]\n\n")
        elif kind == "error":
            parts.append(b"data: " + orjson.dumps(RARE_ERROR) + b"\n\n")
        else:
            parts.append(b"event: error\ndata: " + draw(VALUES) + b"\n\n")
    if draw(st.booleans()):
        parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


_GEN = re.compile(r"call_[0-9a-f]{24}")


def normalize(per_feed: list[Any]) -> list[Any]:
    def fix(e: Any) -> Any:
        if isinstance(e, ToolUse) and _GEN.fullmatch(e.id):
            return ToolUse("<generated>", e.name, e.input, e.raw_arguments)
        return e

    return [[fix(e) for e in step] if isinstance(step, list) else step for step in per_feed]


@SETTINGS
@given(data=st.data(), body=chat_streams(), limit=st.sampled_from([64, 4096, 1 << 26]))
def test_chat_decoder_twins_agree(
    chunk_twins: tuple[ModuleType, ModuleType], data: st.DataObject, body: bytes, limit: int
) -> None:
    c, py = chunk_twins
    pieces = data.draw(cut(body))
    out_c = normalize(feed_all(c.ChatStreamDecoder(limit), pieces))
    out_py = normalize(feed_all(py.ChatStreamDecoder(limit), pieces))
    assert out_c == out_py
    events, err = flat(out_c)
    if err is None:  # a completed stream ends with exactly one Done
        assert type(events[-1]).__name__ == "Done"
        assert sum(type(e).__name__ == "Done" for e in events) == 1


@SETTINGS
@given(data=st.data(), body=chat_streams())
def test_chat_decoder_split_invariance(
    chunk_twins: tuple[ModuleType, ModuleType], data: st.DataObject, body: bytes
) -> None:
    pieces = data.draw(cut(body))
    for mod in chunk_twins:
        whole = flat(normalize(feed_all(mod.ChatStreamDecoder(), [body])))
        split = flat(normalize(feed_all(mod.ChatStreamDecoder(), pieces)))
        assert split[1] == whole[1]
        if whole[1] is None:
            assert split[0] == whole[0]


@SETTINGS
@given(items=st.lists(CHUNK, max_size=12))
def test_accumulator_twins_agree(
    chunk_twins: tuple[ModuleType, ModuleType], items: list[dict[str, Any]]
) -> None:
    outs = []
    for mod in chunk_twins:
        acc = mod.ChunkAccumulator()
        # fresh copies: the accumulator must not depend on sharing input objects
        outs.append(
            normalize([acc.ingest(orjson.loads(orjson.dumps(c))) for c in items] + [acc.finalize()])
        )
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "reason", ["stop", "length", "tool_calls", "function_call", "content_filter", "eos", None]
)
def test_twins_read_finish_reasons_from_the_one_table(chunk_twins, reason) -> None:
    """Both cores map ``finish_reason`` through ``openai_wire.STOP_REASONS`` (one table)."""
    from inferd.openai_wire import stop_reason_from_finish
    from inferd.types import StopReason

    chunk: dict[str, Any] = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    chunk["choices"][0]["finish_reason"] = reason
    got = []
    for twin in chunk_twins:
        acc = twin.ChunkAccumulator()
        acc.ingest(chunk)
        got.append(acc.finalize()[-1].stop_reason)
    want = StopReason.ERROR if reason is None else stop_reason_from_finish(reason)
    assert got == [want, want]


def test_about_reports_the_twin_each_core_loaded() -> None:
    """``about()`` reports every core as the facades loaded it (not ``_sse_c`` alone)."""
    import inferd
    import inferd.sse
    import inferd.toolcalls

    info = inferd.about()
    assert info["cores"] == {
        "sse": inferd.sse.IMPLEMENTATION,
        "chunks": inferd.toolcalls.IMPLEMENTATION,
    }
    assert set(info["compiled_cores"]) == {"sse", "chunks"}
    kinds = set(info["cores"].values())
    assert info["cores_in_use"] == (kinds.pop() if len(kinds) == 1 else "mixed")


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI only: a local tree may run pure Python")
def test_ci_runs_the_compiled_cores() -> None:
    """CI measures and tests what users get: the compiled cores, not their twins."""
    import inferd
    from inferd import _fast

    assert not _fast.NO_EXTENSIONS, "CI must not set INFERD_NO_EXTENSIONS"
    info = inferd.about()
    assert info["compiled_cores"] == {"sse": True, "chunks": True}
    assert info["cores"] == {"sse": "c", "chunks": "c"}
    assert info["cores_in_use"] == "c"
