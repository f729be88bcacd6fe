"""The Mock backend's own behaviour (the contract is in tests/contract)."""

from __future__ import annotations

import asyncio
import time

import pytest

from inferd import (
    BackendUnavailable,
    Done,
    EmbedRequest,
    Mock,
    Request,
    StopReason,
    Text,
    Thinking,
    ToolUse,
    acollect,
    complete,
)


async def test_scripted_output_is_request_independent():
    m = Mock(["a", "b"], thinking=["t"], tool_calls=[("f", {"x": 1})])
    r1 = await acollect(m, Request.chat("one"))
    r2 = await acollect(m, Request.chat("something else entirely"))
    assert (r1.text, r1.thinking) == (r2.text, r2.thinking) == ("ab", "t")
    assert r1.tool_calls[0].name == "f" and r1.tool_calls[0].input == {"x": 1}
    assert r1.stop_reason is StopReason.TOOL_USE
    assert len(m.requests) == 2


async def test_event_order_thinking_text_tools_done():
    m = Mock(["a"], thinking=["t"], tool_calls=[ToolUse("id1", "g", {}, "{}")])
    kinds = [type(e) async for e in m.generate(Request.chat("x"))]
    assert kinds == [Thinking, Text, ToolUse, Done]


async def test_max_tokens_cuts_and_reports():
    m = Mock(["a", "b", "c", "d"])
    r = await acollect(m, Request.chat("x", max_tokens=2))
    assert r.text == "ab" and r.stop_reason is StopReason.MAX_TOKENS
    assert r.done.usage.output_tokens == 2


async def test_delay_paces_tokens():
    m = Mock(["a", "b", "c"], delay=0.03)
    t0 = time.perf_counter()
    await acollect(m, Request.chat("x"))
    assert time.perf_counter() - t0 >= 0.09


async def test_drop_after_raises_mid_stream():
    m = Mock(["a", "b", "c"], drop_after=1)
    seen = []
    with pytest.raises(BackendUnavailable, match="after 1 tokens"):
        async for ev in m.generate(Request.chat("x")):
            seen.append(ev)
    assert seen == [Text("a")]
    assert m.active == 0


async def test_embeddings_follow_the_documented_formula():
    m = Mock()
    res = await m.embed(EmbedRequest(("ab", "héllo"), dimensions=4))
    assert res.dimensions == 4
    assert res.embeddings[0] == pytest.approx([1 / 3, 2 / 3, 3 / 3, 4 / 3])
    n = len("héllo".encode())
    assert res.embeddings[1] == pytest.approx([(i + 1) / (n + 1) for i in range(4)])
    assert len((await m.embed(EmbedRequest(("x",)))).embeddings[0]) == 8


def test_complete_helper_sync():
    r = complete(Mock(["x", "y"]), "hi")
    assert r.text == "xy" and r.done.backend == "mock"


async def test_set_ready_toggles_pre_stream_error():
    m = Mock()
    m.set_ready(False)
    assert not m.ready()
    m.set_ready(True)
    assert (await acollect(m, Request.chat("x"))).text == "mock-response"


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="pre_stream_error"):
        Mock(pre_stream_error="boom")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delay"):
        Mock(delay=-1)


def test_bad_configuration_is_invalid_request_naming_the_argument():
    """The error rule: what a config can carry raises InvalidRequest (a ValueError)."""
    from inferd import InvalidRequest

    for kwargs, name in (
        ({"pre_stream_error": "boom"}, "pre_stream_error"),
        ({"delay": -1}, "delay=-1"),
        ({"drop_after": -2}, "drop_after=-2"),
        ({"embed_dims": 0}, "embed_dims=0"),
    ):
        with pytest.raises(InvalidRequest, match=name):
            Mock(**kwargs)  # type: ignore[arg-type]


async def test_cancel_mid_stream_leaves_nothing_running():
    m = Mock([str(i) for i in range(1000)], delay=0.001)

    async def consume():
        async for _ in m.generate(Request.chat("x")):
            pass

    t = asyncio.create_task(consume())
    await asyncio.sleep(0.02)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert m.active == 0
