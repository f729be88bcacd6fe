"""ChatStreamDecoder: raw response bytes to events, on both twins, at every split."""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import orjson
import pytest

from inferd._fast._stream_common import SSEError
from inferd.errors import BackendUnavailable
from inferd.types import Done, StopReason, Text, Thinking, ToolUse, Usage


def data(obj: Any, end: bytes = b"\n\n") -> bytes:
    return b"data: " + orjson.dumps(obj) + end


def ch(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    return data(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
            **extra,
        }
    )


def decode(mod: ModuleType, pieces: list[bytes], **kw: Any) -> list[Any]:
    dec = mod.ChatStreamDecoder(**kw)
    out: list[Any] = []
    for p in pieces:
        out += dec.feed(p)
    out += dec.close()
    return out


STREAM = b"".join(
    [
        ch({"role": "assistant", "content": ""}),
        b": keep-alive\n\n",
        ch({"reasoning_content": "think"}),
        ch({"content": "Hé"}),
        ch({"content": "llo €"}),
        ch(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ]
            }
        ),
        ch({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        ch({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        ch({}, "tool_calls"),
        data({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}}),
        b"data: [DONE]\n\n",
    ]
)
EXPECTED = [
    Thinking("think"),
    Text("Hé"),
    Text("llo €"),
    ToolUse("c1", "f", {"a": 1}, '{"a": 1}'),
    Done(StopReason.TOOL_USE, Usage(4, 6, 0)),
]


def test_whole_stream(chunks: ModuleType) -> None:
    assert decode(chunks, [STREAM]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_any_split_gives_the_same_events(chunks: ModuleType, size: int) -> None:
    pieces = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert decode(chunks, pieces) == EXPECTED


def test_crlf_bom_and_multiline_data(chunks: ModuleType) -> None:
    body = (
        b'\xef\xbb\xbfdata: {"choices": [{"index": 0,\r\ndata: "delta": '
        b'{"content": "x"}, "finish_reason": "stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n'
    )
    assert decode(chunks, [body]) == [Text("x"), Done(StopReason.END_TURN)]


def test_done_finishes_and_later_bytes_are_ignored(chunks: ModuleType) -> None:
    dec = chunks.ChatStreamDecoder(max_event_bytes=300)
    out = dec.feed(ch({"content": "a"}, "stop") + b"data: [DONE]\n\n" + b"x" * 500 + b"\n\n")
    assert out == [Text("a"), Done(StopReason.END_TURN)]
    assert dec.finished
    assert dec.feed(ch({"content": "late"})) == []
    assert dec.close() == []


def test_close_without_done_marker(chunks: ModuleType) -> None:
    assert decode(chunks, [ch({"content": "a"}, "length")]) == [
        Text("a"),
        Done(StopReason.MAX_TOKENS),
    ]


def test_truncated_stream_ends_with_error_stop_reason(chunks: ModuleType) -> None:
    dec = chunks.ChatStreamDecoder()
    assert dec.feed(ch({"content": "a"}) + b'data: {"choi') == [Text("a")]
    assert not dec.finished
    assert dec.close() == [Done(StopReason.ERROR)]
    assert dec.finished
    assert dec.close() == []


def test_malformed_json_is_logged_cut_and_skipped(
    chunks: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    bad = b"data: {not json " + b"y" * 1000 + b"\n\n"
    with caplog.at_level(logging.WARNING, logger="inferd.toolcalls"):
        dec = chunks.ChatStreamDecoder()
        out = dec.feed(ch({"content": "a"}) + bad + b"data: 42\n\n" + ch({"content": "b"}, "stop"))
        out += dec.close()
    assert out == [Text("a"), Text("b"), Done(StopReason.END_TURN)]
    assert dec.stats["malformed"] == 2
    assert "not a JSON object" in caplog.text
    assert "y" * 180 in caplog.text and "y" * 200 not in caplog.text


def test_invalid_utf8_in_payload_becomes_replacement_char(chunks: ModuleType) -> None:
    body = b'data: {"choices": [{"index": 0, "delta": {"content": "a\xffb"}}]}\n\n'
    assert decode(chunks, [body])[0] == Text("a\ufffdb")


def test_error_payload_raises_and_finishes(chunks: ModuleType) -> None:
    dec = chunks.ChatStreamDecoder()
    with pytest.raises(BackendUnavailable, match="in the stream: boom"):
        dec.feed(ch({"content": "a"}) + data({"error": {"message": "boom"}}))
    assert dec.finished
    assert dec.feed(ch({"content": "b"})) == []
    assert dec.close() == []


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"error": {"message": "quota", "code": "429"}}', "quota (code=429)"),
        (b"upstream overloaded", "upstream overloaded"),
        (b"", "no message given"),
    ],
)
def test_error_event_raises(chunks: ModuleType, payload: bytes, message: str) -> None:
    dec = chunks.ChatStreamDecoder()
    with pytest.raises(BackendUnavailable) as ei:
        dec.feed(b"event: error\ndata: " + payload + b"\n\n")
    assert ei.value.message == f"upstream reported an error in the stream: {message}"


def test_other_event_types_are_ignored(chunks: ModuleType) -> None:
    body = (
        b'event: ping\ndata: {"choices": [{"delta": {"content": "no"}}]}\n\n'
        b"event: message\n" + ch({"content": "yes"}, "stop")
    )
    assert decode(chunks, [body]) == [Text("yes"), Done(StopReason.END_TURN)]


def test_event_only_block_and_comments_do_not_break(chunks: ModuleType) -> None:
    body = b"event: x\n\n: hi\n\n" + ch({"content": "a"}, "stop")
    assert decode(chunks, [body]) == [Text("a"), Done(StopReason.END_TURN)]


def test_stats_count_bytes_and_events(chunks: ModuleType) -> None:
    dec = chunks.ChatStreamDecoder()
    for i in range(0, len(STREAM), 10):
        dec.feed(STREAM[i : i + 10])
    assert dec.stats == {"bytes": len(STREAM), "events": 10, "malformed": 0}


def test_event_over_limit_raises_sse_error(chunks: ModuleType) -> None:
    dec = chunks.ChatStreamDecoder(max_event_bytes=64)
    with pytest.raises(SSEError, match="max_event_bytes=64"):
        dec.feed(ch({"content": "x" * 100}))
    assert dec.finished


def test_accepts_bytes_like(chunks: ModuleType) -> None:
    dec = chunks.ChatStreamDecoder()
    assert dec.feed(bytearray(ch({"content": "a"}))) == [Text("a")]
    assert dec.feed(memoryview(ch({"content": "b"}))) == [Text("b")]


def test_public_faces_pick_a_twin() -> None:
    from inferd import sse, toolcalls

    assert sse.IMPLEMENTATION in ("c", "py")
    assert toolcalls.IMPLEMENTATION in ("c", "py")
    assert sse.SSEError is SSEError
    assert toolcalls.ChatStreamDecoder().feed(ch({"content": "z"})) == [Text("z")]
