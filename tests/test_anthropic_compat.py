"""AnthropicCompat: the Messages body it sends, and the streams it decodes, over real
HTTP on 127.0.0.1 against the scriptable upstream (tests/anthropic_upstream.py)."""

from __future__ import annotations

import logging

import orjson
import pytest

from inferd.anthropic_wire import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_THINKING_BUDGET,
    STOP_FROM_ANTHROPIC,
    request_to_anthropic,
)
from inferd.backends.anthropic_compat import AnthropicCompat
from inferd.backends.anthropic_compat.stream import (
    FRAGMENT_OVERHEAD,
    MAX_OPEN_BLOCKS,
    MAX_SIGNATURE_BYTES,
    MessagesStreamDecoder,
)
from inferd.errors import BackendUnavailable, EmbedUnsupported, InvalidRequest
from inferd.types import (
    Attachment,
    AudioBlock,
    Done,
    EmbedRequest,
    ImageBlock,
    Message,
    Request,
    Response,
    StopReason,
    Text,
    TextBlock,
    Thinking,
    ThinkingBlock,
    Tool,
    ToolUse,
    ToolUseBlock,
    Usage,
)

from .anthropic_upstream import (
    SIG,
    Status,
    Stream,
    Upstream,
    anthropic_error,
    ev,
    signed_reply,
    stream,
    text_block,
    thinking_block,
    tool_block,
)

KEY = "sk-ant-test-SECRET-0123456789"
WEATHER = Tool(
    "weather", "Weather for a city", {"type": "object", "properties": {"city": {"type": "string"}}}
)


@pytest.fixture
async def up():
    u = await Upstream().start()
    yield u
    await u.stop()


def _backend(url: str, **kw) -> AnthropicCompat:
    kw.setdefault("api_key", KEY)
    return AnthropicCompat(url, model="claude-test", backoff_base=0.01, **kw)


async def _events(backend: AnthropicCompat, request: Request) -> list:
    try:
        return [e async for e in backend.generate(request)]
    finally:
        await backend.aclose()


# --------------------------------------------------------------------------- the body


def test_system_hoisted_and_tool_results_in_user_turns() -> None:
    req = Request(
        (
            Message.system("Be brief."),
            Message.user("Weather in Paris?"),
            Message.assistant([TextBlock(""), ToolUseBlock("tu_1", "weather", {"city": "Paris"})]),
            Message.tool("tu_1", "18C, sunny"),
            Message.tool("tu_2", "boom", is_error=True),
            Message.user("And so?"),
        ),
        tools=(WEATHER,),
        tool_choice="weather",
        stop=("END",),
        temperature=0.5,
        top_k=40,
    )
    body = request_to_anthropic(req, model="m")
    assert body["system"] == "Be brief."
    assert [t["role"] for t in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "tu_1", "name": "weather", "input": {"city": "Paris"}}
    ]
    last = body["messages"][2]["content"]
    assert last[0] == {"type": "tool_result", "tool_use_id": "tu_1", "content": "18C, sunny"}
    assert last[1]["is_error"] is True
    assert last[2] == {"type": "text", "text": "And so?"}
    assert body["tools"][0]["input_schema"]["properties"]["city"] == {"type": "string"}
    assert body["tool_choice"] == {"type": "tool", "name": "weather"}
    assert body["stop_sequences"] == ["END"]
    assert (body["temperature"], body["top_k"]) == (0.5, 40)
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"})],
)
def test_tool_choice_kinds(ours: str, theirs: dict) -> None:
    body = request_to_anthropic(Request.chat("hi", tools=(WEATHER,), tool_choice=ours), model="m")
    assert body["tool_choice"] == theirs


def test_images_as_base64_and_url_sources() -> None:
    req = Request(
        (
            Message.user(
                [
                    TextBlock("what is this"),
                    ImageBlock(data=b"\x89PNG", media_type="image/png"),
                    ImageBlock(url="https://example.invalid/cat.jpg"),
                    ImageBlock(attachment="a1"),
                ]
            ),
        ),
        attachments=(Attachment("a1", "image", b"JPEGDATA", "image/jpeg"),),
    )
    content = request_to_anthropic(req, model="m")["messages"][0]["content"]
    assert content[1]["source"] == {"type": "base64", "media_type": "image/png", "data": "iVBORw=="}
    assert content[2]["source"] == {"type": "url", "url": "https://example.invalid/cat.jpg"}
    assert content[3]["source"]["media_type"] == "image/jpeg"


def test_thinking_budget() -> None:
    plain = request_to_anthropic(Request.chat("hi", thinking=True), model="m")
    assert plain["thinking"] == {"type": "enabled", "budget_tokens": DEFAULT_THINKING_BUDGET}
    assert plain["max_tokens"] > DEFAULT_THINKING_BUDGET
    small = request_to_anthropic(Request.chat("hi", thinking=True, max_tokens=1500), model="m")
    assert small["thinking"]["budget_tokens"] == 1499 and small["max_tokens"] == 1500
    with pytest.raises(InvalidRequest, match="thinking needs max_tokens"):
        request_to_anthropic(Request.chat("hi", thinking=True, max_tokens=100), model="m")


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"min_p": 0.1}, "min_p"),
        ({"seed": 1}, "seed"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_fields_the_api_cannot_carry_are_refused(kw: dict, field: str) -> None:
    with pytest.raises(InvalidRequest, match=field):
        request_to_anthropic(Request.chat("hi", **kw), model="m")


def test_audio_is_refused() -> None:
    req = Request((Message.user([TextBlock("x"), AudioBlock(data=b"RIFF")]),))
    with pytest.raises(InvalidRequest, match="audio"):
        request_to_anthropic(req, model="m")


def test_extra_body_under_mapped_fields_and_model_override() -> None:
    b = AnthropicCompat(
        "http://127.0.0.1:9", api_key="", extra_body={"top_k": 3, "metadata": {"user_id": "u"}}
    )
    body = b.messages_body(Request.chat("hi", top_k=7, model="claude-x"))
    assert body["top_k"] == 7 and body["metadata"] == {"user_id": "u"}
    assert body["model"] == "claude-x" and body["stream"] is True


def test_constructor_limits_are_checked() -> None:
    with pytest.raises(InvalidRequest, match="thinking_budget"):
        AnthropicCompat(api_key="", thinking_budget=10)
    with pytest.raises(InvalidRequest, match="max_call_args"):
        AnthropicCompat(api_key="", max_call_args=10)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        AnthropicCompat(api_key="", max_tokens=0)


# --------------------------------------------------------------------------- the wire


async def test_headers_key_and_secret_handling(up, caplog) -> None:
    up.script("h", Stream(stream(text_block(0, ["hi"]))))
    b = _backend(up.url("h"), headers={"anthropic-beta": "x-1"})
    assert KEY not in repr(b)
    caplog.set_level(logging.DEBUG)
    events = await _events(b, Request.chat("hi"))
    assert isinstance(events[-1], Done)
    got = up.requests("h")[0]
    assert got.path == "/s/h/v1/messages"
    assert got.headers["x-api-key"] == KEY
    assert got.headers["anthropic-version"] == "2023-06-01"
    assert got.headers["anthropic-beta"] == "x-1"
    assert "Authorization" not in got.headers
    assert got.body["stream"] is True and got.body["model"] == "claude-test"
    assert KEY not in caplog.text


async def test_key_from_environment(up, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "from-anthropic-env")
    monkeypatch.setenv("INFERD_ANTHROPIC_API_KEY", "from-inferd-env")
    up.script("env", Stream(stream(text_block(0, ["hi"]))))
    await _events(AnthropicCompat(up.url("env"), backoff_base=0.01), Request.chat("hi"))
    assert up.requests("env")[0].headers["x-api-key"] == "from-inferd-env"


async def test_401_names_the_env_vars_and_hides_the_key(up) -> None:
    up.script("auth", anthropic_error(401, "authentication_error", f"bad key {KEY}"))
    with pytest.raises(BackendUnavailable) as ei:
        await _events(_backend(up.url("auth")), Request.chat("hi"))
    assert "ANTHROPIC_API_KEY" in str(ei.value) and KEY not in str(ei.value)
    assert KEY not in repr(ei.value.body)


async def test_400_is_invalid_request_not_retried(up) -> None:
    up.script("bad", anthropic_error(400, "invalid_request_error", "max_tokens: too big"))
    with pytest.raises(InvalidRequest, match="max_tokens: too big"):
        await _events(_backend(up.url("bad")), Request.chat("hi"))
    assert len(up.requests("bad")) == 1


async def test_529_overloaded_is_retried(up) -> None:
    up.script(
        "busy",
        anthropic_error(529, "overloaded_error"),
        Stream(stream(text_block(0, ["after ", "retry"]))),
    )
    events = await _events(_backend(up.url("busy")), Request.chat("hi"))
    assert "".join(e.text for e in events if isinstance(e, Text)) == "after retry"
    assert len(up.requests("busy")) == 2


async def test_error_event_before_any_output_is_retried(up) -> None:
    overloaded = ev("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
    first = [*stream(text_block(0, ["x"]))[:2], overloaded]
    up.script("ovl", Stream(first), Stream(stream(text_block(0, ["fine"]))))
    events = await _events(_backend(up.url("ovl")), Request.chat("hi"))
    assert [e.text for e in events if isinstance(e, Text)] == ["fine"]
    assert len(up.requests("ovl")) == 2


async def test_error_event_mid_stream_is_backend_unavailable(up) -> None:
    overloaded = ev("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}})
    body = [*stream(text_block(0, ["partial"]))[:-3], overloaded]
    up.script("mid", Stream(body))
    seen = []
    with pytest.raises(BackendUnavailable, match="overloaded_error"):
        async for e in _backend(up.url("mid")).generate(Request.chat("hi")):
            seen.append(e)
    assert seen == [Text("partial")]
    assert len(up.requests("mid")) == 1  # output was shown: never retried


async def test_text_thinking_and_tool_call_from_one_byte_fragments(up) -> None:
    args = orjson.dumps({"city": "Paris", "units": "metric", "note": "é" * 50}).decode()
    body = stream(
        thinking_block(0, ["Let me ", "check."]),
        text_block(1, ["Checking ", "now."]),
        tool_block(2, "toolu_1", "weather", list(args)),
        stop_reason="tool_use",
        input_tokens=10,
        output_tokens=42,
        cache_read=100,
        cache_write=5,
    )
    up.script("t", Stream(body))
    events = await _events(_backend(up.url("t")), Request.chat("hi", tools=(WEATHER,)))
    assert [type(e) for e in events] == [Thinking, Thinking, Thinking, Text, Text, ToolUse, Done]
    assert events[2] == Thinking("", signature="sig-abc")  # the block's end, signed
    call = events[5]
    assert (call.id, call.name, call.raw_arguments) == ("toolu_1", "weather", args)
    assert call.input == orjson.loads(args)
    done = events[-1]
    assert done.stop_reason is StopReason.TOOL_USE
    assert done.usage == Usage(input_tokens=115, output_tokens=42, cached_tokens=100)
    assert done.backend == "anthropic_compat"


async def test_unknown_events_and_block_kinds_are_skipped(up) -> None:
    server_tool = [
        ev(
            "content_block_start",
            {"index": 1, "content_block": {"type": "server_tool_use", "id": "s", "name": "web"}},
        ),
        ev(
            "content_block_delta",
            {"index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        ),
        ev("content_block_delta", {"index": 1, "delta": {"type": "future_delta", "x": 1}}),
        ev("content_block_stop", {"index": 1}),
    ]
    body = stream(
        text_block(0, ["a"]), server_tool, [ev("future_event", {"n": 1})], text_block(2, ["b"])
    )
    up.script("u", Stream(body))
    events = await _events(_backend(up.url("u")), Request.chat("hi"))
    assert events[:-1] == [Text("a"), Text("b")]


async def test_delta_for_a_block_never_started_is_an_error(up) -> None:
    body = stream(text_block(0, ["a"]))
    body.insert(
        -2, ev("content_block_delta", {"index": 5, "delta": {"type": "text_delta", "text": "?"}})
    )
    up.script("ns", Stream(body))
    with pytest.raises(BackendUnavailable, match="block 5, which never started"):
        await _events(_backend(up.url("ns")), Request.chat("hi"))


async def test_stream_cut_before_message_delta(up) -> None:
    up.script("cut", Stream(stream(text_block(0, ["a", "b"]))[:-2]))
    with pytest.raises(BackendUnavailable, match="ended before"):
        await _events(_backend(up.url("cut")), Request.chat("hi"))


async def test_tool_input_over_the_cap(up) -> None:
    body = stream(tool_block(0, "t", "weather", ["{", '"a":"' + "x" * 3000 + '"', "}"]))
    up.script("cap", Stream(body))
    with pytest.raises(BackendUnavailable, match="max_call_args"):
        await _events(
            _backend(up.url("cap"), max_call_args=2048), Request.chat("hi", tools=(WEATHER,))
        )


@pytest.mark.parametrize(("theirs", "ours"), sorted(STOP_FROM_ANTHROPIC.items()))
async def test_stop_reasons(up, theirs: str, ours: StopReason) -> None:
    up.script("s", Stream(stream(text_block(0, ["x"]), stop_reason=theirs)))
    events = await _events(_backend(up.url("s")), Request.chat("hi"))
    assert events[-1].stop_reason is ours


def test_decoder_gives_the_same_events_at_any_split() -> None:
    body = b"".join(
        stream(
            thinking_block(0, ["t"]),
            text_block(1, ["h\u00e9llo"]),
            tool_block(2, "i", "n", ['{"a"', ":1}"]),
        )
    )
    whole = MessagesStreamDecoder().feed(body)
    dec = MessagesStreamDecoder()
    split = [e for i in range(len(body)) for e in dec.feed(body[i : i + 1])]
    assert split == whole and isinstance(whole[-1], Done)


async def test_embed_is_unsupported_and_capabilities_say_so() -> None:
    b = AnthropicCompat("http://127.0.0.1:9", api_key="")
    assert b.capabilities().embed is False
    with pytest.raises(EmbedUnsupported, match="no embeddings"):
        await b.embed(EmbedRequest(("x",)))
    await b.aclose()


async def test_vision_off_is_refused_before_sending(up) -> None:
    req = Request((Message.user([TextBlock("x"), ImageBlock(data=b"1")]),))
    with pytest.raises(InvalidRequest, match="vision"):
        await _events(_backend(up.url("v"), vision=False), req)
    assert up.requests("v") == []


async def test_status_503_then_stream(up) -> None:
    up.script("r", Status(503), Stream(stream(text_block(0, ["ok"]))))
    events = await _events(_backend(up.url("r")), Request.chat("hi"))
    assert events[0] == Text("ok")


def test_a_flood_of_one_byte_fragments_is_bounded_by_their_count() -> None:
    limit = 64 * 1024
    dec = MessagesStreamDecoder(max_call_args=limit, max_stream_args=limit * 4)
    dec.feed(b"".join(stream(text_block(0, []))[:1]))
    start = tool_block(0, "t", "n", [])[0]
    frag = ev(
        "content_block_delta",
        {"index": 0, "delta": {"type": "input_json_delta", "partial_json": "1"}},
    )
    dec.feed(start)
    fits = limit // (1 + FRAGMENT_OVERHEAD)
    dec.feed(frag * fits)
    with pytest.raises(BackendUnavailable, match="max_call_args"):
        dec.feed(frag)


def test_too_many_open_blocks() -> None:
    dec = MessagesStreamDecoder()
    starts = b"".join(
        ev("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}})
        for i in range(MAX_OPEN_BLOCKS + 1)
    )
    with pytest.raises(BackendUnavailable, match="MAX_OPEN_BLOCKS"):
        dec.feed(starts)


# --------------------------------------------------------------------------- thinking signatures


def test_decoder_keeps_the_signature_across_one_byte_splits() -> None:
    body = b"".join(signed_reply())
    dec = MessagesStreamDecoder()
    events = [e for i in range(len(body)) for e in dec.feed(body[i : i + 1])] + dec.close()
    thinking = [e for e in events if isinstance(e, Thinking)]
    assert thinking[-1] == Thinking("", signature=SIG)  # emitted at content_block_stop
    assert [e.signature for e in thinking[:-1]] == [None] * (len(thinking) - 1)
    assert "".join(e.text for e in thinking) == "Let me check."
    assert isinstance(events[-1], Done)
    # a thinking block that carried no signature ends with no extra event
    plain = MessagesStreamDecoder().feed(b"".join(stream(text_block(0, ["x"]))))
    assert [type(e) for e in plain] == [Text, Done]


async def test_follow_up_sends_the_signed_block_back_unchanged(up) -> None:
    up.script("sig", Stream(signed_reply()), Stream(stream(text_block(0, ["18C"]))))
    backend = _backend(up.url("sig"))
    first = Request((Message.user("Weather in Paris?"),), tools=(WEATHER,), thinking=True)
    try:
        reply = Response.collect([e async for e in backend.generate(first)])
        assert reply.thinking == "Let me check."
        assert reply.thinking_blocks == (ThinkingBlock("Let me check.", SIG),)
        follow = Request(
            (*first.messages, reply.message(), Message.tool("toolu_1", "18C")),
            tools=(WEATHER,),
            thinking=True,
        )
        again = [e async for e in backend.generate(follow)]
        assert again[0] == Text("18C")
    finally:
        await backend.aclose()
    sent = up.requests("sig")[1]
    assistant = sent.body["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["content"][0] == {
        "type": "thinking",
        "thinking": "Let me check.",
        "signature": SIG,
    }
    assert assistant["content"][1]["type"] == "tool_use"


def test_unsigned_reasoning_is_not_sent_to_the_messages_api() -> None:
    turn = Message.assistant([ThinkingBlock("local model's musing"), TextBlock("hi")])
    body = request_to_anthropic(Request((Message.user("a"), turn, Message.user("b"))), model="m")
    assert body["messages"][1]["content"] == [{"type": "text", "text": "hi"}]


def test_a_signature_over_the_cap_is_refused() -> None:
    dec = MessagesStreamDecoder()
    dec.feed(b"".join(stream(text_block(0, []))[:1]) + thinking_block(0, [])[0])
    part = "s" * (MAX_SIGNATURE_BYTES // 4)
    delta = {"index": 0, "delta": {"type": "signature_delta", "signature": part}}
    dec.feed(ev("content_block_delta", delta) * 4)  # exactly at the cap: kept
    with pytest.raises(BackendUnavailable, match="MAX_SIGNATURE_BYTES"):
        dec.feed(
            ev("content_block_delta", {**delta, "delta": {**delta["delta"], "signature": "x"}})
        )
