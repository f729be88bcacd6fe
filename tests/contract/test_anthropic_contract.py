"""AnthropicCompat against the shared stream contract, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import pytest

from inferd.backends.anthropic_compat import AnthropicCompat
from inferd.errors import BackendUnavailable, InvalidRequest
from inferd.types import ImageBlock, Message, Request, TextBlock

from ..anthropic_upstream import (
    Stream,
    Upstream,
    anthropic_error,
    stream,
    text_block,
    tool_block,
)
from .suite import BackendContract, call_requests


@pytest.fixture
async def up():
    u = await Upstream().start()
    yield u
    await u.stop()


def _backend(url: str, **kw) -> AnthropicCompat:
    return AnthropicCompat(url, api_key="sk-ant-contract", model="m", backoff_base=0.01, **kw)


class TestAnthropicCompatContract(BackendContract):
    @pytest.fixture
    async def backend(self, up):
        up.script("ok", Stream(stream(text_block(0, ["Hello ", "there ", "friend"])), delay=0.001))
        b = _backend(up.url("ok"))
        yield b
        await b.aclose()

    @pytest.fixture(params=["http_529", "http_400", "refused", "no_vision"])
    async def pre_stream_failure(self, request, up):
        kind = request.param
        if kind == "http_529":
            busy = anthropic_error(529, "overloaded_error")
            return (
                _backend(up.script("p529", busy), max_retries=1),
                Request.chat("hi"),
                BackendUnavailable,
            )
        if kind == "http_400":
            bad = anthropic_error(400, "invalid_request_error")
            return _backend(up.script("p400", bad)), Request.chat("hi"), InvalidRequest
        if kind == "refused":
            return (
                _backend("http://127.0.0.1:9", max_retries=0),
                Request.chat("hi"),
                BackendUnavailable,
            )
        img = Request((Message.user([TextBlock("x"), ImageBlock(data=b"1")]),))
        return _backend(up.url("img"), vision=False), img, InvalidRequest

    @pytest.fixture
    def mid_stream_failure(self, up):
        pieces = stream(text_block(0, ["a", "b", "c", "d"]))
        return _backend(up.script("drop", Stream(pieces, drop_after=5, delay=0.01))), Request.chat(
            "hi"
        )

    @pytest.fixture
    def long_stream(self, up):
        pieces = stream(text_block(0, [f"tok{i} " for i in range(400)]))
        return _backend(up.script("long", Stream(pieces, delay=0.0005))), Request.chat("hi")

    @pytest.fixture
    def call_reply(self, up):
        blocks = (
            text_block(0, ["Checking."]),
            tool_block(1, "toolu_1", "get_weather", ['{"city": ', '"Paris"}']),
        )
        script = Stream(stream(*blocks, stop_reason="tool_use"))
        return _backend(up.script("call", script)), call_requests()

    async def released(self, backend) -> bool:
        return backend.active == 0
