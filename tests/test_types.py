"""Request validation, immutability, reprs and JSON round trips of the public types."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from inferd import (
    AcceleratorInfo,
    Attachment,
    AudioBlock,
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    ImageBlock,
    InvalidRequest,
    Message,
    Request,
    Response,
    StopReason,
    Text,
    TextBlock,
    Thinking,
    Timings,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUse,
    ToolUseBlock,
    Usage,
)
from inferd.types import event_from_dict

WEATHER = Tool(
    "get_weather",
    "Weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}},
)


def full_request() -> Request:
    return Request(
        messages=(
            Message.system("be brief"),
            Message.user([TextBlock("what is this?"), ImageBlock(attachment="img1")]),
            Message.assistant([ToolUseBlock("call_1", "get_weather", {"city": "Oslo"})]),
            Message.tool("call_1", "rainy"),
            Message.user([AudioBlock(data=b"RIFF....", format="wav")]),
        ),
        tools=(WEATHER,),
        tool_choice="auto",
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        max_tokens=64,
        stop=("\n\n",),
        seed=42,
        thinking=True,
        attachments=(Attachment("img1", "image", b"\x89PNG....", "image/png"),),
    )


def test_request_json_round_trip_is_lossless():
    req = full_request()
    again = Request.from_dict(orjson.loads(orjson.dumps(req.to_dict())))
    assert again == req


def test_types_are_immutable_and_slotted():
    req = full_request()
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.temperature = 1.0  # type: ignore[misc]
    for obj in (Text("x"), Usage(), Timings(), Done(StopReason.END_TURN), TextBlock("x")):
        assert not hasattr(obj, "__dict__")


def test_reprs_are_readable_and_do_not_dump_binary():
    att = Attachment("a", "image", b"x" * 100_000)
    assert "100000 bytes" in repr(att) and "xxxx" not in repr(att)
    assert repr(ImageBlock(data=b"abc")) == "ImageBlock(data=<3 bytes>, media_type='image/png')"
    assert repr(StopReason.TOOL_USE) == "StopReason.TOOL_USE"
    assert "Text(text='hi')" == repr(Text("hi"))


@pytest.mark.parametrize(
    "event",
    [
        Text("héllo"),
        Thinking("hmm"),
        Thinking("done.", signature="EqQBCkgIARABGAIiQL+sig/=="),
        ToolUse("call_1", "f", {"a": [1, 2]}, '{"a":[1,2]}'),
        ToolUse("call_2", "g", None, "{not json"),
        Done(StopReason.MAX_TOKENS, Usage(3, 4, 1), Timings(0.1, 0.5, 20.0), "mock"),
    ],
)
def test_event_json_round_trip(event):
    assert event_from_dict(orjson.loads(orjson.dumps(event.to_dict()))) == event


def test_done_accepts_plain_string_reason_and_replace():
    d = Done("tool_use")  # type: ignore[arg-type]
    assert d.stop_reason is StopReason.TOOL_USE
    d2 = d.replace(backend="x")
    assert d2.backend == "x" and d.backend is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"messages": ()}, "messages is empty"),
        ({"messages": (Message.user(""),)}, "empty text"),
        ({"messages": (Message("user", ()),)}, "has no content"),
        ({"tools": (WEATHER, WEATHER)}, "duplicate tool name 'get_weather'"),
        ({"tool_choice": "get_time", "tools": (WEATHER,)}, "'get_time', which is not among"),
        ({"tool_choice": "required"}, "without any tools"),
        ({"temperature": -0.1}, "temperature=-0.1 is out of range"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"top_k": -1}, "top_k=-1"),
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"stop": ("",)}, "stop sequences must be non-empty"),
        ({"stop": tuple(str(i) for i in range(17))}, "17 stop sequences"),
        ({"response_format": {"type": "yaml"}}, "response_format must be"),
        ({"messages": (Message.user([ImageBlock(attachment="nope")]),)}, "'nope', which is not"),
        (
            {
                "messages": (Message.user([ImageBlock(attachment="a")]),),
                "attachments": (Attachment("a", "audio", b"x"),),
            },
            "uses attachment 'a' as image",
        ),
        ({"messages": ("hi",)}, "messages[0] is a str"),
    ],
)
def test_invalid_requests_are_rejected_with_a_clear_message(kwargs, needle):
    base = {"messages": (Message.user("hi"),)}
    base.update(kwargs)
    with pytest.raises(InvalidRequest) as info:
        Request(**base)
    assert needle in str(info.value)


def test_unknown_block_type_and_role_are_rejected():
    with pytest.raises(InvalidRequest, match="unknown content block type 'video'"):
        Message.from_dict({"role": "user", "content": [{"type": "video"}]})
    with pytest.raises(InvalidRequest, match="unknown message role 'robot'"):
        Message("robot", "hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="unknown content block dict"):
        Message("user", [{"type": "text", "text": "x"}])  # type: ignore[list-item]
    with pytest.raises(InvalidRequest, match="unknown request field"):
        Request.from_dict({"messages": [], "temprature": 1})


def test_tool_choice_forms():
    assert ToolChoice.parse("none") == ToolChoice("none")
    assert ToolChoice.parse("get_weather") == ToolChoice("tool", "get_weather")
    fn = {"type": "function", "function": {"name": "get_weather"}}
    assert ToolChoice.parse(fn) == ToolChoice("tool", "get_weather")
    with pytest.raises(InvalidRequest):
        ToolChoice("tool")
    req = Request((Message.user("x"),), tools=(WEATHER,), tool_choice=fn)
    assert req.tool_choice == ToolChoice("tool", "get_weather")


def test_image_block_needs_exactly_one_source():
    with pytest.raises(InvalidRequest, match="exactly one"):
        ImageBlock()
    with pytest.raises(InvalidRequest, match="exactly one"):
        ImageBlock(data=b"x", url="http://x")


def test_capabilities_cover_requests():
    caps = Capabilities(tools=False, vision=False)
    assert caps.covers(Request.chat("hi")) is None
    assert caps.covers(Request((Message.user("x"),), tools=(WEATHER,))) == "no tool support"
    img = Request((Message.user([ImageBlock(url="http://x/y.png")]),))
    assert caps.covers(img) == "no vision support"
    full = Capabilities(tools=True, vision=True, accelerator=AcceleratorInfo("cuda", 33, "H200"))
    assert full.covers(img) is None
    assert full.to_dict()["accelerator"]["device_name"] == "H200"


def test_embed_types():
    assert EmbedRequest("one").input == ("one",)
    with pytest.raises(InvalidRequest, match="empty"):
        EmbedRequest(())
    with pytest.raises(InvalidRequest, match="dimensions=0"):
        EmbedRequest(("a",), dimensions=0)
    res = EmbedResult([[0.1, 0.2]], 2, "m", Usage(1))
    assert EmbedResult.from_dict(orjson.loads(orjson.dumps(res.to_dict()))) == res
    with pytest.raises(InvalidRequest, match=r"embeddings\[0\] must hold only numbers"):
        EmbedResult.from_dict({"embeddings": [["x"]], "dimensions": 1})
    with pytest.raises(InvalidRequest, match="embed result needs 'dimensions'"):
        EmbedResult.from_dict({"embeddings": []})
    assert "<1 x 2>" in repr(res)


def test_timings_measure_covers_decode_phase():
    t = Timings.measure(start=10.0, first=10.5, end=12.5, tokens=5)
    assert t.ttft_s == pytest.approx(0.5)
    assert t.total_s == pytest.approx(2.5)
    assert t.tokens_per_s == pytest.approx(2.0)
    assert Timings.measure(0.0, None, 1.0, 1).tokens_per_s is None


def test_timings_carry_draft_counts_only_when_drafted():
    plain = Timings(0.1, 0.5, 20.0)
    assert set(plain.to_dict()) == {"ttft_s", "total_s", "tokens_per_s"}
    spec = Timings(0.1, 0.5, 20.0, draft_tokens=12, draft_accepted=9)
    assert spec.to_dict()["draft_tokens"] == 12 and spec.to_dict()["draft_accepted"] == 9
    for t in (plain, spec):
        assert Timings.from_dict(orjson.loads(orjson.dumps(t.to_dict()))) == t
    with pytest.raises(InvalidRequest, match="draft_tokens"):
        Timings.from_dict({"total_s": 1.0, "draft_tokens": "many"})


def test_response_collect():
    r = Response.collect(
        [
            Thinking("a"),
            Text("b"),
            Text("c"),
            ToolUse("1", "f", {}, "{}"),
            Done(StopReason.TOOL_USE),
        ]
    )
    assert (r.text, r.thinking, len(r.tool_calls), r.stop_reason) == (
        "bc",
        "a",
        1,
        StopReason.TOOL_USE,
    )


def test_chat_helper_and_message_text():
    req = Request.chat("hi", system="sys", max_tokens=5)
    assert [m.role for m in req.messages] == ["system", "user"]
    assert req.messages[1].text == "hi"
    assert isinstance(req.messages[0].content[0], TextBlock)
    assert Message.tool("c1", "ok").content == (ToolResultBlock("c1", "ok"),)


# --------------------------------------------------------------------------- one error rule


def test_invalid_request_is_a_value_error_and_both_readers_follow_one_rule():
    """Bad input from a dict raises InvalidRequest (a ValueError) naming the field,
    whether it is a content block or a stream event."""
    from inferd.types import block_from_dict

    assert issubclass(InvalidRequest, ValueError)
    for reader, kind in ((block_from_dict, "content block"), (event_from_dict, "event")):
        with pytest.raises(InvalidRequest, match=f"unknown {kind} type 'nope'"):
            reader({"type": "nope"})
        with pytest.raises(InvalidRequest, match=r"x needs 'text'"):
            reader({"type": "text"}, "x")
        with pytest.raises(InvalidRequest, match=r"x\.text has the wrong type \(list\)"):
            reader({"type": "text", "text": ["a"]}, "x")
        with pytest.raises(InvalidRequest, match="must be a JSON object"):
            reader(["text"])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="stop_reason 'later' is not a stop reason"):
        event_from_dict({"type": "done", "stop_reason": "later"})
    with pytest.raises(InvalidRequest, match=r"usage\.input_tokens has the wrong type"):
        event_from_dict({"type": "done", "stop_reason": "end_turn", "usage": {"input_tokens": "x"}})
    with pytest.raises(InvalidRequest, match=r"timings\.total_s has the wrong type"):
        event_from_dict({"type": "done", "stop_reason": "end_turn", "timings": {"total_s": "1"}})
    with pytest.raises(ValueError, match=r"messages\[0\] needs 'role'"):
        Request.from_dict({"messages": [{"content": "hi"}]})


def test_attachment_data_must_be_strict_base64():
    """Issue 13, item 15: ``"!!!"`` used to decode to b"" and be accepted."""
    att = {"id": "a", "kind": "image", "data": "!!!"}
    body = {"messages": [{"role": "user", "content": "hi"}], "attachments": [att]}
    with pytest.raises(InvalidRequest, match=r"attachments\[0\]\.data is not valid base64"):
        Request.from_dict(body)
    with pytest.raises(InvalidRequest, match=r"content\[0\]\.data is not valid base64"):
        Message.from_dict({"role": "user", "content": [{"type": "image", "data": "a b"}]})
    good = {**att, "data": "iVBORw=="}
    req = Request.from_dict({**body, "attachments": [good]})
    assert req.attachments[0].data == b"\x89PNG"


def test_request_from_dict_reads_fields_without_coercing_them():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    assert Request.from_dict({**base, "stop": "END"}).stop == ("END",)  # not ("E", "N", "D")
    with pytest.raises(InvalidRequest, match="thinking must be true or false"):
        Request.from_dict({**base, "thinking": "yes"})
    with pytest.raises(InvalidRequest, match="stop must be a list"):
        Request.from_dict({**base, "stop": {"a": 1}})
    # Frame keys are the wire's business (serve.wire.frame_body strips them).
    with pytest.raises(InvalidRequest, match=r"unknown request field\(s\): \['id', 'type'\]"):
        Request.from_dict({**base, "id": 1, "type": "generate"})
    from inferd.serve import wire

    frame = {**base, "id": 1, "type": "generate"}
    assert Request.from_dict(wire.frame_body(frame)) == Request.chat("hi")


def test_event_frames_are_the_event_dicts_plus_framing_and_errors_are_the_daemons():
    from inferd.errors import InternalError
    from inferd.serve import wire

    done = Done(StopReason.END_TURN, Usage(1, 2), backend="m")
    assert wire.event_frame(7, done) == {"type": "done", "id": 7, "event": done.to_dict()}
    call = ToolUse("call_1", "f", {}, "{}")  # its own "id" must not meet the frame's
    assert wire.event_frame(7, call) == {"type": "tool_use", "id": 7, "event": call.to_dict()}
    for ev in (done, call, Text("x")):
        assert wire.event_from_frame(wire.event_frame(7, ev)) == ev
    frame = wire.event_frame(7, done)
    bad = {**frame, "event": {**frame["event"], "usage": {"input_tokens": "x"}}}
    with pytest.raises(InternalError, match=r"malformed done frame: .*input_tokens"):
        wire.event_from_frame(bad)


# --------------------------------------------------------------------------- size limits


def test_every_size_field_is_bounded_with_a_named_limit(monkeypatch):
    """Issue 13, item 4: sizes a client can send are refused past a named limit."""
    from inferd import types

    with pytest.raises(InvalidRequest, match="MAX_EMBED_DIMENSIONS"):
        EmbedRequest(("a",), dimensions=9_000_000)
    assert EmbedRequest(("a",), dimensions=types.MAX_EMBED_DIMENSIONS).dimensions
    with pytest.raises(InvalidRequest, match="MAX_EMBED_DIMENSIONS"):
        EmbedRequest.from_dict({"input": "a", "dimensions": True})
    with pytest.raises(InvalidRequest, match="MAX_STOP_CHARS"):
        Request.chat("hi", stop=("x" * (types.MAX_STOP_CHARS + 1),))
    with pytest.raises(InvalidRequest, match="MAX_TOKENS_LIMIT"):
        Request.chat("hi", max_tokens=types.MAX_TOKENS_LIMIT + 1)
    with pytest.raises(InvalidRequest, match="MAX_TOP_K"):
        Request.chat("hi", top_k=types.MAX_TOP_K + 1)
    monkeypatch.setattr(types, "MAX_MESSAGES", 2)
    monkeypatch.setattr(types, "MAX_EMBED_INPUTS", 2)
    monkeypatch.setattr(types, "MAX_ATTACHMENTS", 1)
    monkeypatch.setattr(types, "MAX_TOOLS", 1)
    user = {"role": "user", "content": "hi"}
    with pytest.raises(InvalidRequest, match=r"3 messages given; at most 2 \(MAX_MESSAGES\)"):
        Request.from_dict({"messages": [user] * 3})
    with pytest.raises(InvalidRequest, match="MAX_MESSAGES"):
        Request((Message.user("a"),) * 3)
    with pytest.raises(InvalidRequest, match=r"3 embed inputs given; at most 2"):
        EmbedRequest.from_dict({"input": ["a", "b", "c"]})
    att = {"id": "a", "kind": "image", "data": ""}
    with pytest.raises(InvalidRequest, match="MAX_ATTACHMENTS"):
        Request.from_dict({"messages": [user], "attachments": [att, {**att, "id": "b"}]})
    tools = [{"name": "a"}, {"name": "b"}]
    with pytest.raises(InvalidRequest, match="MAX_TOOLS"):
        Request.from_dict({"messages": [user], "tools": tools})


def test_readers_bound_depth_before_walking():
    """Issue 13, item 7: 1000-deep JSON is an InvalidRequest, not a RecursionError."""
    deep: object = "auto"
    for _ in range(1000):
        deep = {"kind": deep}
    body = {"messages": [{"role": "user", "content": "hi"}], "tool_choice": deep}
    for read in (Request.from_dict, Request.from_openai):
        with pytest.raises(InvalidRequest, match="MAX_JSON_DEPTH"):
            read(body)
    nested: object = "x"
    for _ in range(1000):
        nested = [nested]
    with pytest.raises(InvalidRequest, match="MAX_JSON_DEPTH"):
        EmbedRequest.from_dict({"input": nested})


def test_errors_echo_client_values_cut():
    """Issue 13, item 11: a huge bad value is cut in the message, not echoed whole."""
    from inferd.limits import MAX_ECHO_CHARS

    huge = "v" * 1_000_000
    for call in (
        lambda: Message.from_dict({"role": "user", "content": [{"type": huge}]}),
        lambda: Message(huge, "hi"),  # type: ignore[arg-type]
        lambda: ToolChoice.parse({"kind": huge}),
        lambda: EmbedRequest.from_dict({"input": "a", huge: 1}),
    ):
        with pytest.raises(InvalidRequest) as info:
            call()
        assert len(info.value.message) < 300 + MAX_ECHO_CHARS
        assert "cut" in info.value.message


def test_embed_request_from_dict_refuses_unknown_keys_like_request():
    """Issue 13, item 15: one rule for unknown keys in every request kind."""
    with pytest.raises(InvalidRequest, match=r"unknown embed request field\(s\): \['dims'\]"):
        EmbedRequest.from_dict({"input": "a", "dims": 3})
    req = EmbedRequest(("a", "b"), 4, "query")
    assert EmbedRequest.from_dict(orjson.loads(orjson.dumps(req.to_dict()))) == req


def test_capabilities_from_dict_round_trip_and_tolerance():
    caps = Capabilities(tools=True, embed=True, accelerator=AcceleratorInfo("cuda", 9, "g", 1))
    assert Capabilities.from_dict(orjson.loads(orjson.dumps(caps.to_dict()))) == caps
    assert Capabilities.from_dict({}) == Capabilities()
    assert Capabilities.from_dict({"vision": True, "new_flag": 1}) == Capabilities(vision=True)


# --------------------------------------------------------------------------- thinking signatures


def test_thinking_block_round_trips_and_lives_in_assistant_turns_only():
    from inferd import ThinkingBlock

    sig = "EqQBCkgIARABGAIiQL+" + "s" * 400
    msg = Message.assistant([ThinkingBlock("Let me check.", sig), TextBlock("ok")])
    req = Request((Message.user("hi"), msg, Message.user("go on")))
    back = Request.from_dict(orjson.loads(orjson.dumps(req.to_dict())))
    assert back == req and back.messages[1].content[0].signature == sig
    assert msg.text == "ok"  # reasoning is not the message's text
    assert Message.from_dict({"role": "assistant", "content": [{"type": "thinking", "text": "t"}]})
    # the opaque signature is shown by length, not dumped
    assert repr(ThinkingBlock("t", sig)) == f"ThinkingBlock(text='t', signature=<{len(sig)} chars>)"
    assert repr(Thinking("t")) == "Thinking(text='t')"
    assert "sss" not in repr(Thinking("", sig))
    with pytest.raises(InvalidRequest, match="only assistant messages"):
        Message.user([ThinkingBlock("t")])
    with pytest.raises(InvalidRequest, match=r"ThinkingBlock\.signature must be a string"):
        ThinkingBlock("t", 5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="signature has the wrong type"):
        event_from_dict({"type": "thinking", "text": "", "signature": 5})


def test_response_collect_keeps_signed_thinking_blocks_for_the_next_turn():
    from inferd import ThinkingBlock

    r = Response.collect(
        [
            Thinking("a"),
            Thinking("b"),
            Thinking("", signature="S1"),
            Text("c"),
            ToolUse("1", "f", {"x": 1}, '{"x":1}'),
            Thinking("late"),
            Done(StopReason.TOOL_USE),
        ]
    )
    assert r.thinking == "ablate"  # callers that ignore signatures see no change
    assert r.thinking_blocks == (ThinkingBlock("ab", "S1"), ThinkingBlock("late"))
    msg = r.message()
    assert msg.role == "assistant"
    assert msg.content == (
        ThinkingBlock("ab", "S1"),
        ThinkingBlock("late"),
        TextBlock("c"),
        ToolUseBlock("1", "f", {"x": 1}),
    )
    plain = Response.collect([Text("hi"), Done(StopReason.END_TURN)])
    assert plain.thinking_blocks == () and plain.message().content == (TextBlock("hi"),)


def test_compiled_decoder_events_read_signature_as_none():
    """_fast/_chunks_c.pyx builds Thinking without __init__, setting only ``text``."""
    ev = object.__new__(Thinking)
    object.__setattr__(ev, "text", "hm")
    assert (
        ev.signature is None and ev == Thinking("hm") and ev.to_dict() == Thinking("hm").to_dict()
    )
