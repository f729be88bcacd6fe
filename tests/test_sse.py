"""WHATWG event-stream rules for both SSE twins, at every split of each input."""

from __future__ import annotations

import time
from types import ModuleType

import pytest

from inferd.errors import BackendUnavailable, InternalError, InvalidRequest


def E(data: str, event: str = "message", id: str = "", retry: int | None = None) -> tuple:
    return (event, data, id, retry)


def run(mod: ModuleType, chunks: list[bytes], **kw: int) -> list[tuple]:
    p = mod.SSEParser(**kw)
    out = []
    for c in chunks:
        out += p.feed(c)
    out += p.close()
    return [tuple(e) for e in out]


def splits(raw: bytes) -> list[list[bytes]]:
    """The whole input, one byte at a time, and every split into two pieces."""
    ways = [[raw], [raw[i : i + 1] for i in range(len(raw))]]
    ways += [[raw[:i], raw[i:]] for i in range(1, len(raw))]
    return ways


CASES: list[tuple[str, bytes, list[tuple]]] = [
    ("simple", b"data: hello\n\n", [E("hello")]),
    ("data lines joined with LF", b"data: a\ndata: b\n\n", [E("a\nb")]),
    ("CRLF", b"data: a\r\n\r\ndata: b\r\n\r\n", [E("a"), E("b")]),
    ("CR only", b"data: a\r\rdata: b\r\r", [E("a"), E("b")]),
    ("mixed line ends", b"data: a\r\ndata: b\rdata: c\n\r\n", [E("a\nb\nc")]),
    ("CRLF then LF is a blank line", b"data: a\r\n\n", [E("a")]),
    ("LF then CR is a blank line", b"data: a\n\r", [E("a")]),
    (
        "leading BOM stripped (openai-python drops this event)",
        b"\xef\xbb\xbfdata: first\n\ndata: second\n\n",
        [E("first"), E("second")],
    ),
    (
        "only one BOM stripped: the second is part of the field name",
        b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n",
        [],
    ),
    ("BOM-like prefix that is not a BOM", b"\xef\xbbdata: a\n\ndata: b\n\n", [E("b")]),
    ("BOM later in the stream is data", b"data: \xef\xbb\xbfx\n\n", [E("\ufeffx")]),
    ("comments ignored", b": keep-alive\n:\ndata: a\n: mid\n\n", [E("a")]),
    (
        "event:-only block dispatches nothing (openai-python raises)",
        b"event: ping\n\ndata: a\n\n",
        [E("a")],
    ),
    ("event type", b"event: update\ndata: x\n\n", [E("x", "update")]),
    ("empty event type means message", b"event:\ndata: x\n\n", [E("x")]),
    (
        "event type does not leak into the next event",
        b"event: a\ndata: 1\n\ndata: 2\n\n",
        [E("1", "a"), E("2")],
    ),
    ("no colon: field with empty value", b"data\n\n", [E("")]),
    ("two bare data lines", b"data\ndata\n\n", [E("\n")]),
    ("trailing empty data line keeps its LF", b"data: a\ndata:\n\n", [E("a\n")]),
    ("no space after colon", b"data:a\n\n", [E("a")]),
    ("only one leading space removed", b"data:  a \n\n", [E(" a ")]),
    ("value may contain colons", b"data: a:b: c\n\n", [E("a:b: c")]),
    ("field names are case-sensitive", b"Data: x\nDATA: y\nEvent: z\ndata: ok\n\n", [E("ok")]),
    ("unknown fields ignored", b"foo: bar\ndata: a\nidx: 3\n\n", [E("a")]),
    (
        "id persists across events",
        b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n",
        [E("a", id="1"), E("b", id="1"), E("c")],
    ),
    ("id set in a block without data persists", b"id: 7\n\ndata: a\n\n", [E("a", id="7")]),
    (
        "id containing NUL ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [E("a", id="1"), E("b", id="1")],
    ),
    ("retry all digits", b"retry: 1000\ndata: a\n\n", [E("a", retry=1000)]),
    ("retry with a letter ignored", b"retry: 10a\ndata: a\n\n", [E("a")]),
    ("retry negative ignored", b"retry: -5\ndata: a\n\n", [E("a")]),
    ("retry empty ignored", b"retry:\ndata: a\n\n", [E("a")]),
    ("retry non-ASCII digits ignored", "retry: ١٢\ndata: a\n\n".encode(), [E("a")]),
    (
        "retry from a data-less block goes with the next event only",
        b"retry: 5\n\ndata: a\n\ndata: b\n\n",
        [E("a", retry=5), E("b")],
    ),
    ("blank lines alone dispatch nothing", b"\n\n\r\n\r\r", []),
    ("incomplete event at end of stream discarded", b"data: a\n\ndata: b\n", [E("a")]),
    ("unterminated last line discarded", b"data: a\n\ndata: b", [E("a")]),
    ("invalid UTF-8 becomes U+FFFD", b"data: \xff\xfeok\n\n", [E("\ufffd\ufffdok")]),
    ("truncated sequence before the line end is one U+FFFD", b"data: \xe2\x82\n\n", [E("\ufffd")]),
    ("multi-byte characters intact at every split", "data: €😀中\n\n".encode(), [E("€😀中")]),
    (
        "invalid UTF-8 in event type and id",
        b"event: \xffx\nid: \xfe\ndata: a\n\n",
        [E("a", "\ufffdx", "\ufffd")],
    ),
    (
        "U+2028, U+2029, U+0085, VT and FF are not line breaks",
        "data: a\u2028b\u2029c\u0085d\x0be\x0cf\n\n".encode(),
        [E("a\u2028b\u2029c\u0085d\x0be\x0cf")],
    ),
    ("space-only value is empty", b"data: \n\n", [E("")]),
    ("JSON payload untouched", b'data: {"a": [1, 2]}\n\n', [E('{"a": [1, 2]}')]),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rules_at_every_split(sse: ModuleType, raw: bytes, expected: list[tuple]) -> None:
    for chunks in splits(raw):
        assert run(sse, chunks) == expected, chunks


def test_retry_too_long_for_int_is_ignored(sse: ModuleType) -> None:
    raw = b"retry: " + b"9" * 5000 + b"\ndata: a\n\nretry: 3\ndata: b\n\n"
    assert run(sse, [raw]) == [E("a"), E("b", retry=3)]


def test_event_type_and_defaults(sse: ModuleType) -> None:
    ev = sse.SSEParser().feed(b"data: x\n\n")[0]
    assert isinstance(ev, sse.SSEEvent)
    assert (ev.event, ev.data, ev.id, ev.retry) == ("message", "x", "", None)
    assert sse.SSEEvent(data="y").event == "message"


def test_cr_cr_dispatches_without_more_input(sse: ModuleType) -> None:
    p = sse.SSEParser()
    assert [e.data for e in p.feed(b"data: a\r\r")] == ["a"]
    assert [e.data for e in p.feed(b"data: b\n\n")] == ["b"]
    # a CR at the end of a feed ends the line; a following LF in the next feed is
    # the same line end, not a blank line
    assert p.feed(b"data: c\r") == []
    assert p.feed(b"\ndata: d\r\n") == []
    assert [e.data for e in p.feed(b"\r\n")] == ["c\nd"]


def test_bom_split_across_three_feeds(sse: ModuleType) -> None:
    p = sse.SSEParser()
    assert p.feed(b"\xef") == []
    assert p.feed(b"\xbb") == []
    assert [e.data for e in p.feed(b"\xbfdata: a\n\n")] == ["a"]


def test_last_event_id_property(sse: ModuleType) -> None:
    p = sse.SSEParser()
    assert p.last_event_id == ""
    p.feed(b"id: 42\n\n")
    assert p.last_event_id == "42"


def test_accepts_bytes_like(sse: ModuleType) -> None:
    p = sse.SSEParser()
    assert [e.data for e in p.feed(bytearray(b"data: a\n\n"))] == ["a"]
    assert [e.data for e in p.feed(memoryview(b"data: b\n\n"))] == ["b"]


def test_close_discards_and_feed_after_close_is_an_error(sse: ModuleType) -> None:
    p = sse.SSEParser()
    assert p.feed(b"data: pending\n") == []
    assert p.close() == []
    assert p.close() == []
    with pytest.raises(InternalError, match="after close"):
        p.feed(b"\n")


# --------------------------------------------------------------------------- limits


def test_line_over_limit_raises(sse: ModuleType) -> None:
    with pytest.raises(sse.SSEError, match="max_event_bytes=10"):
        run(sse, [b"data: 0123456789\n\n"], max_event_bytes=10)


def test_exact_limit_is_fine(sse: ModuleType) -> None:
    assert run(sse, [b"data:12345\n\n"], max_event_bytes=10) == [E("12345")]


def test_event_over_limit_raises_even_with_short_lines(sse: ModuleType) -> None:
    with pytest.raises(sse.SSEError, match="event exceeds max_event_bytes=10"):
        run(sse, [b"data:12345\ndata:12345\n\n"], max_event_bytes=10)


def test_partial_line_is_bounded_while_it_arrives(sse: ModuleType) -> None:
    p = sse.SSEParser(max_event_bytes=10)
    for _ in range(10):
        assert p.feed(b"x") == []
    with pytest.raises(sse.SSEError, match="line exceeds"):
        p.feed(b"x")


def test_error_is_backend_unavailable_and_value_error(sse: ModuleType) -> None:
    assert issubclass(sse.SSEError, BackendUnavailable)
    assert issubclass(sse.SSEError, ValueError)
    with pytest.raises(InvalidRequest, match="positive integer"):  # also a ValueError
        sse.SSEParser(max_event_bytes=0)


# --------------------------------------------------------------------------- linear time


def test_long_line_in_small_feeds_is_linear(sse: ModuleType) -> None:
    # 8 MiB in 1 KiB feeds: re-copying the partial line per feed would move ~32 GB.
    payload = b"x" * (8 << 20)
    p = sse.SSEParser()
    t0 = time.perf_counter()
    p.feed(b"data: ")
    for i in range(0, len(payload), 1024):
        assert p.feed(payload[i : i + 1024]) == []
    (ev,) = p.feed(b"\n\n")
    assert len(ev.data) == len(payload)
    assert time.perf_counter() - t0 < 5.0


def test_many_cr_lines_in_one_feed_is_linear(sse: ModuleType) -> None:
    # CR-only line ends: searching for LF from every line start would be quadratic.
    n = 100_000
    t0 = time.perf_counter()
    out = sse.SSEParser().feed(b"data: x\r\r" * n)
    assert len(out) == n
    assert time.perf_counter() - t0 < 5.0
