"""The OpenAI Chat Completions mapping, both directions, as pure functions."""

from __future__ import annotations

import base64

import orjson
import pytest

from inferd.errors import (
    BackendUnavailable,
    EmbedUnsupported,
    InternalError,
    InvalidRequest,
    NotReady,
    QueueFull,
)
from inferd.openai_wire import (
    SSE_DONE,
    STOP_REASONS,
    ChunkWriter,
    embed_request_from_openai,
    embed_request_to_openai,
    embed_result_from_openai,
    embed_result_to_openai,
    error_object,
    finish_reason,
    http_status,
    request_from_openai,
    request_to_openai,
    response_to_completion,
    sse_encode,
    stop_reason_from_finish,
    usage_from_openai,
    usage_to_openai,
)
from inferd.types import (
    Attachment,
    AudioBlock,
    Done,
    EmbedRequest,
    EmbedResult,
    ImageBlock,
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

WEATHER = Tool(
    "get_weather",
    "Weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}},
)


def tool_round_trip_request() -> Request:
    return Request(
        (
            Message.system("be brief"),
            Message.user("Weather in Paris?"),
            Message.assistant(
                [TextBlock("Checking. "), ToolUseBlock("call_1", "get_weather", {"city": "Paris"})]
            ),
            Message.tool("call_1", '{"temp": 21}'),
        ),
        tools=(WEATHER,),
        tool_choice="auto",
        temperature=0.2,
        top_p=0.9,
        max_tokens=64,
        stop=("END", "STOP"),
        seed=7,
        response_format={"type": "json_object"},
    )


# =========================================================================== out


def test_minimal_request_omits_unset_fields():
    body = request_to_openai(Request.chat("hi"))
    assert body == {"messages": [{"role": "user", "content": "hi"}]}
    assert "stream" not in body and "stream_options" not in body


def test_model_argument_overrides_request_model():
    r = Request.chat("hi", model="from-request")
    assert request_to_openai(r)["model"] == "from-request"
    assert request_to_openai(r, model="override")["model"] == "override"


def test_full_request_maps_every_field():
    body = request_to_openai(tool_round_trip_request(), model="m")
    assert body["model"] == "m"
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking. ",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    assert body["tool_choice"] == "auto"
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
        0.2,
        0.9,
        64,
        7,
    )
    assert body["stop"] == ["END", "STOP"]
    assert body["response_format"] == {"type": "json_object"}
    orjson.dumps(body)  # JSON-serialisable as is


def test_text_blocks_are_joined():
    r = Request((Message.user([TextBlock("a"), TextBlock("b")]),))
    assert request_to_openai(r)["messages"] == [{"role": "user", "content": "ab"}]


def test_assistant_tool_call_without_text_has_null_content():
    r = Request(
        (
            Message.user("q"),
            Message.assistant([ToolUseBlock("c", "f", {})]),
            Message.tool("c", "r"),
        ),
        tools=(Tool("f"),),
    )
    msg = request_to_openai(r)["messages"][1]
    assert msg["content"] is None and msg["tool_calls"][0]["function"]["arguments"] == "{}"
    assert "reasoning_content" not in msg


def test_assistant_reasoning_goes_back_as_reasoning_content():
    from inferd.chat.messages import template_messages
    from inferd.types import ThinkingBlock

    turn = Message.assistant(
        [ThinkingBlock("Need ", "sig"), ThinkingBlock("weather."), ToolUseBlock("c", "f", {})]
    )
    r = Request((Message.user("q"), turn, Message.tool("c", "r")), tools=(Tool("f"),))
    msg = request_to_openai(r)["messages"][1]
    assert msg["reasoning_content"] == "Need weather." and '"sig"' not in orjson.dumps(msg).decode()
    assert msg["content"] is None and msg["tool_calls"][0]["id"] == "c"
    # the chat templates get the same key (Qwen3's renders it), the text stays apart
    dicts = template_messages(r.messages)
    assert dicts[1]["reasoning_content"] == "Need weather." and dicts[1]["content"] == ""
    assert "reasoning_content" not in dicts[0]
    # rendered through a template that reads it (Qwen3's form), and one that does not
    from inferd.backends.llamacpp.chat_template import ChatTemplate

    reads = "{% for m in messages %}[{{ m.role }}:{{ m.reasoning_content or '' }}]{% endfor %}"
    assert ChatTemplate(reads).render(r.messages) == "[user:][assistant:Need weather.][tool:]"
    ignores = "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}"
    assert ChatTemplate(ignores).render(r.messages) == "[user:q][assistant:][tool:r]"


def test_each_tool_result_becomes_its_own_tool_message():
    r = Request(
        (
            Message.user("q"),
            Message.assistant([ToolUseBlock("a", "f", {}), ToolUseBlock("b", "f", {})]),
            Message(
                "user",
                [ToolResultBlock("a", "ra"), ToolResultBlock("b", "rb"), TextBlock("and now?")],
            ),
        ),
        tools=(Tool("f"),),
    )
    msgs = request_to_openai(r)["messages"]
    assert msgs[2:] == [
        {"role": "tool", "tool_call_id": "a", "content": "ra"},
        {"role": "tool", "tool_call_id": "b", "content": "rb"},
        {"role": "user", "content": "and now?"},
    ]


def test_tool_choice_named_tool():
    r = Request.chat("q", tools=(WEATHER,), tool_choice=ToolChoice("tool", "get_weather"))
    assert request_to_openai(r)["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    r2 = Request.chat("q", tools=(WEATHER,), tool_choice="required")
    assert request_to_openai(r2)["tool_choice"] == "required"


def test_images_become_data_urls_including_attachments():
    png = b"\x89PNG fake"
    r = Request(
        (
            Message.user(
                [
                    TextBlock("what is "),
                    TextBlock("this?"),
                    ImageBlock(data=png, media_type="image/png"),
                    ImageBlock(url="https://example.invalid/cat.jpg"),
                    ImageBlock(attachment="img1"),
                ]
            ),
        ),
        attachments=(Attachment("img1", "image", b"JPEGDATA", "image/jpeg"),),
    )
    parts = request_to_openai(r, vision=True)["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "what is this?"}
    assert parts[1]["image_url"]["url"] == (
        "data:image/png;base64," + base64.b64encode(png).decode()
    )
    assert parts[2]["image_url"]["url"] == "https://example.invalid/cat.jpg"
    assert parts[3]["image_url"]["url"] == (
        "data:image/jpeg;base64," + base64.b64encode(b"JPEGDATA").decode()
    )


def test_images_without_vision_are_a_clear_invalid_request():
    r = Request((Message.user([TextBlock("x"), ImageBlock(data=b"1")]),))
    with pytest.raises(InvalidRequest, match="vision"):
        request_to_openai(r, vision=False)


def test_audio_becomes_input_audio():
    r = Request((Message.user([AudioBlock(data=b"RIFF", format="wav")]),))
    part = request_to_openai(r)["messages"][0]["content"][0]
    assert part == {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"},
    }


def test_extensions_sent_only_when_set():
    body = request_to_openai(Request.chat("x", top_k=40, min_p=0.05, ignore_eos=True))
    assert (body["top_k"], body["min_p"], body["ignore_eos"]) == (40, 0.05, True)
    plain = request_to_openai(Request.chat("x"))
    assert not {"top_k", "min_p", "ignore_eos"} & set(plain)


def test_request_delegates_to_wire():
    r = tool_round_trip_request()
    assert r.to_openai(model="m") == request_to_openai(r, model="m")
    assert Request.from_openai(r.to_openai()) == request_from_openai(r.to_openai())


# =========================================================================== in


def test_round_trip_preserves_request():
    r = tool_round_trip_request()
    assert request_from_openai(request_to_openai(r)) == r


def test_round_trip_preserves_body():
    body = request_to_openai(tool_round_trip_request(), model="m")
    assert request_to_openai(request_from_openai(body)) == body


def test_round_trip_with_images():
    r = Request(
        (Message.user([TextBlock("see"), ImageBlock(data=b"abc", media_type="image/webp")]),)
    )
    assert request_from_openai(request_to_openai(r)) == r


def test_from_openai_accepts_client_variants():
    body = {
        "model": "x",
        "messages": [
            {"role": "developer", "content": "sys"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAEC"}},
                    {"type": "image_url", "image_url": "http://h/i.png"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": {"k": 1}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ok"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "max_completion_tokens": 9,
        "stop": "X",
        "seed": 3,
        "top_k": 5,
        "min_p": 0.1,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "someone",
        "response_format": {"type": "text"},
    }
    r = request_from_openai(body)
    assert r.messages[0] == Message.system("sys")
    assert r.messages[1].content[1] == ImageBlock(data=b"\x00\x01\x02", media_type="image/png")
    assert r.messages[1].content[2] == ImageBlock(url="http://h/i.png")
    assert r.messages[2].content == (ToolUseBlock("c1", "f", {"k": 1}),)
    assert r.messages[3] == Message.tool("c1", "ok")
    assert r.tool_choice == ToolChoice("tool", "f")
    assert (r.max_tokens, r.stop, r.seed, r.top_k, r.min_p, r.ignore_eos, r.model) == (
        9,
        ("X",),
        3,
        5,
        0.1,
        True,
        "x",
    )
    assert r.response_format == {"type": "text"}


def test_max_tokens_legacy_name():
    assert (
        request_from_openai(
            {"messages": [{"role": "user", "content": "a"}], "max_tokens": 5}
        ).max_tokens
        == 5
    )


@pytest.mark.parametrize(
    ("extra", "thinking"),
    [
        ({}, False),
        ({"reasoning_effort": "high"}, True),
        ({"reasoning_effort": "none"}, False),
        ({"reasoning": {"effort": "low"}}, True),
        ({"thinking": {"type": "enabled", "budget_tokens": 100}}, True),
        ({"thinking": {"type": "disabled"}}, False),
        ({"chat_template_kwargs": {"enable_thinking": True}}, True),
    ],
)
def test_thinking_flag(extra, thinking):
    body = {"messages": [{"role": "user", "content": "a"}], **extra}
    assert request_from_openai(body).thinking is thinking


def test_auto_tool_choice_without_tools_is_dropped():
    r = request_from_openai({"messages": [{"role": "user", "content": "a"}], "tool_choice": "auto"})
    assert r.tool_choice is None


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([], "JSON object"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "a"}]}, "role"),
        ({"messages": ["hi"]}, r"messages\[0\]"),
        ({"messages": [{"role": "user", "content": 3}]}, "content"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]}, "video"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "text"),
        (
            {
                "messages": [
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                    }
                ]
            },
            "image_url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}
                        ],
                    }
                ]
            },
            "base64",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}
                        ],
                    }
                ]
            },
            "base64",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    }
                ]
            },
            "not valid JSON",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}],
                    }
                ]
            },
            "JSON object",
        ),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]}, "id"),
        (
            {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "retrieval"}]},
            "function",
        ),
        ({"messages": [{"role": "user", "content": "a"}], "stop": 5}, "stop"),
        ({"messages": [{"role": "user", "content": "a"}], "n": 17}, "n=17"),
        ({"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "a"}], "tool_choice": "required"}, "tool"),
        ({"messages": [{"role": "user", "content": "a"}], "model": 5}, "model"),
    ],
)
def test_bad_input_is_a_clear_invalid_request(body, match):
    with pytest.raises(InvalidRequest, match=match):
        request_from_openai(body)


# =========================================================================== chunks out


def test_chunk_writer_stream():
    w = ChunkWriter("m", "chatcmpl-1", created=123)
    chunks = []
    for ev in (
        Thinking("hmm"),
        Text("Hi"),
        Text(""),
        ToolUse("c1", "f", {"a": 1}, '{"a": 1}'),
        ToolUse("c2", "g", {"b": 2}),
        Done(StopReason.TOOL_USE, Usage(10, 5, 4)),
    ):
        chunks += w.write(ev)
    assert all(
        c["id"] == "chatcmpl-1"
        and c["model"] == "m"
        and c["created"] == 123
        and c["object"] == "chat.completion.chunk"
        for c in chunks
    )
    deltas = [c["choices"][0]["delta"] if c["choices"] else None for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"reasoning_content": "hmm"}
    assert deltas[2] == {"content": "Hi"}
    assert deltas[3]["tool_calls"] == [
        {
            "index": 0,
            "id": "c1",
            "type": "function",
            "function": {"name": "f", "arguments": '{"a": 1}'},
        }
    ]
    assert deltas[4]["tool_calls"][0]["index"] == 1
    assert deltas[4]["tool_calls"][0]["function"]["arguments"] == '{"b":2}'
    assert chunks[5]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[6]["choices"] == []
    assert chunks[6]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert len(chunks) == 7 and w.finished
    with pytest.raises(InvalidRequest):
        w.write(Text("late"))


def test_chunk_writer_without_usage_and_role_once():
    w = ChunkWriter("m", "id", include_usage=False)
    assert len(w.start()) == 1 and w.start() == []
    out = w.write(Done(StopReason.MAX_TOKENS))
    assert len(out) == 1 and out[0]["choices"][0]["finish_reason"] == "length"


def test_sse_encoding():
    assert sse_encode({"a": 1}) == b'data: {"a":1}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("stop", "reason"),
    [
        (StopReason.END_TURN, "stop"),
        (StopReason.STOP_SEQUENCE, "stop"),
        (StopReason.MAX_TOKENS, "length"),
        (StopReason.TOOL_USE, "tool_calls"),
        (StopReason.CANCELLED, "stop"),
        (StopReason.ERROR, "stop"),
    ],
)
def test_finish_reasons(stop, reason):
    assert finish_reason(stop) == reason


def test_stop_reason_from_finish():
    assert stop_reason_from_finish("length") is StopReason.MAX_TOKENS
    assert stop_reason_from_finish("tool_calls") is StopReason.TOOL_USE
    assert stop_reason_from_finish(None) is StopReason.END_TURN
    assert stop_reason_from_finish("eos") is StopReason.END_TURN


def test_content_filter_is_end_turn_and_every_reader_uses_one_table():
    """``content_filter``: the upstream ended the reply itself, so END_TURN.

    STOP_SEQUENCE would tell the caller that one of *its* ``stop`` strings matched,
    which did not happen (and a request without ``stop`` could then end with it).
    The streaming cores read the same table object, so they cannot drift from it.
    """
    from inferd._fast import _chunks_py

    assert stop_reason_from_finish("content_filter") is StopReason.END_TURN
    assert _chunks_py._FINISH is STOP_REASONS
    acc = _chunks_py.ChunkAccumulator()
    acc.ingest({"choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]})
    assert acc.finalize()[-1].stop_reason is StopReason.END_TURN
    for reason, stop in STOP_REASONS.items():
        acc = _chunks_py.ChunkAccumulator()
        acc.ingest({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
        assert acc.finalize()[-1].stop_reason is stop is stop_reason_from_finish(reason)


def test_usage_both_ways():
    u = Usage(3, 4, 1)
    assert usage_from_openai(usage_to_openai(u)) == u
    assert usage_from_openai(None) == Usage()
    assert usage_from_openai({"prompt_tokens": "x"}) == Usage()


def test_response_to_completion():
    resp = Response(
        "Hello",
        "thought",
        (ToolUse("c", "f", {"x": 1}, '{"x":1}'),),
        Done(StopReason.TOOL_USE, Usage(2, 3)),
    )
    out = response_to_completion(resp, model="m", id="cmpl-9", created=5)
    assert out["object"] == "chat.completion" and out["id"] == "cmpl-9"
    msg = out["choices"][0]["message"]
    assert msg == {
        "role": "assistant",
        "content": "Hello",
        "reasoning_content": "thought",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
        ],
    }
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["usage"]["total_tokens"] == 5
    only_tools = Response("", "", resp.tool_calls, resp.done)
    assert (
        response_to_completion(only_tools, model="m", id="i")["choices"][0]["message"]["content"]
        is None
    )
    plain = Response("", "", (), Done(StopReason.END_TURN))
    msg = response_to_completion(plain, model="m", id="i")["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": ""}


def test_replies_carry_llama_server_timings():
    """``timings`` under llama-server's names: on a whole reply, and on the last chunk
    of a stream (the usage chunk when asked for); draft counts only when drafted."""
    timed = Timings(ttft_s=0.5, total_s=2.5, tokens_per_s=4.0, draft_tokens=6, draft_accepted=4)
    resp = Response("Hi", "", (), Done(StopReason.END_TURN, Usage(10, 9, 3), timed))
    t = response_to_completion(resp, model="m", id="i")["timings"]
    assert t == {
        "cache_n": 3,
        "prompt_n": 7,
        "predicted_n": 9,
        "predicted_ms": pytest.approx(2000.0),
        "predicted_per_second": 4.0,
        "draft_n": 6,
        "draft_n_accepted": 4,
    }
    plain = Done(StopReason.END_TURN, Usage(10, 9), Timings(0.5, 2.5, 4.0))
    for include_usage in (False, True):
        chunks = ChunkWriter("m", "i", include_usage=include_usage).write(plain)
        assert "draft_n" not in chunks[-1]["timings"]
        assert chunks[-1]["timings"]["predicted_n"] == 9
        assert all("timings" not in c for c in chunks[:-1])
        assert ("usage" in chunks[-1]) is include_usage


@pytest.mark.parametrize(
    ("exc", "etype", "status"),
    [
        (InvalidRequest("bad"), "invalid_request_error", 400),
        (EmbedUnsupported("no"), "invalid_request_error", 400),
        (NotReady("loading"), "server_error", 503),
        (QueueFull("full"), "rate_limit_error", 429),
        (BackendUnavailable("down", status=502), "server_error", 502),
        (InternalError("bug"), "server_error", 500),
    ],
)
def test_error_objects(exc, etype, status):
    obj = error_object(exc)
    assert obj == {
        "error": {"message": exc.message, "type": etype, "code": exc.code, "param": None}
    }
    assert http_status(exc) == status


def test_foreign_exceptions_do_not_leak_their_text():
    obj = error_object(RuntimeError("sk-secret-in-here"))
    assert "sk-secret" not in obj["error"]["message"]
    assert obj["error"]["code"] == "internal" and http_status(RuntimeError()) == 500


# =========================================================================== embeddings


def test_embed_request_both_ways():
    body = embed_request_to_openai(EmbedRequest(("a", "b"), dimensions=4), model="e")
    assert body == {"input": ["a", "b"], "encoding_format": "float", "model": "e", "dimensions": 4}
    assert embed_request_from_openai(body) == EmbedRequest(("a", "b"), 4)
    assert embed_request_from_openai({"input": "x"}).input == ("x",)
    with pytest.raises(InvalidRequest):
        embed_request_from_openai({"input": [[1, 2]]})
    with pytest.raises(InvalidRequest):
        embed_request_from_openai({"input": "x", "encoding_format": "base64"})


def test_embed_result_reorders_by_index():
    body = {
        "data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
        "model": "e",
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    res = embed_result_from_openai(body, count=2)
    assert res.embeddings == ((1.0, 0.0), (0.0, 1.0))
    assert (res.dimensions, res.model, res.usage.input_tokens) == (2, "e", 4)
    back = embed_result_to_openai(res)
    assert [d["index"] for d in back["data"]] == [0, 1]
    assert embed_result_from_openai(back, count=2) == EmbedResult(
        res.embeddings, 2, "e", Usage(4, 0)
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"data": [{"index": 0, "embedding": [1.0]}]},
        {"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [1.0]}]},
        {"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]},
        {"data": [{"index": 0}, {"index": 1, "embedding": [1.0]}]},
    ],
)
def test_embed_result_faults(body):
    with pytest.raises(BackendUnavailable):
        embed_result_from_openai(body, count=2)


def test_counts_are_refused_before_the_items_are_read(monkeypatch):
    """Issue 13, item 4: a huge list is refused by its length, before it is walked."""
    import inferd.openai_wire as ow

    monkeypatch.setattr(ow, "MAX_MESSAGES", 2)
    monkeypatch.setattr(ow, "MAX_TOOLS", 1)
    user = {"role": "user", "content": "hi"}
    bad = {"role": "robot"}  # would fail on its own if it were read
    with pytest.raises(InvalidRequest, match=r"3 messages given; at most 2 \(MAX_MESSAGES\)"):
        request_from_openai({"messages": [user, user, bad]})
    with pytest.raises(InvalidRequest, match=r"2 tools given; at most 1 \(MAX_TOOLS\)"):
        request_from_openai({"messages": [user], "tools": [{"type": "x"}, {"type": "y"}]})
    with pytest.raises(InvalidRequest, match="ignore_eos must be true or false"):
        request_from_openai({"messages": [user], "ignore_eos": "yes"})
