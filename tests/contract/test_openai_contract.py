"""OpenAICompat against the shared stream contract, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import pytest

from inferd.backends.openai_compat import OpenAICompat
from inferd.errors import BackendUnavailable, InvalidRequest
from inferd.types import ImageBlock, Message, Request, TextBlock

from ..upstream import DONE, Status, Stream, Upstream, chunk, sse, text_stream
from .suite import BackendContract, call_requests


@pytest.fixture
async def up():
    u = await Upstream().start()
    yield u
    await u.stop()


def _backend(url: str, **kw) -> OpenAICompat:
    return OpenAICompat(url, api_key="sk-contract", model="m", backoff_base=0.01, **kw)


class TestOpenAICompatContract(BackendContract):
    @pytest.fixture
    async def backend(self, up):
        up.script("ok", Stream(text_stream(["Hello ", "there ", "friend"]), delay=0.001))
        b = _backend(up.url("ok"))
        yield b
        await b.aclose()

    @pytest.fixture(params=["http_503", "http_400", "refused", "no_vision"])
    async def pre_stream_failure(self, request, up):
        kind = request.param
        if kind == "http_503":
            return (
                _backend(up.script("p503", Status(503)), max_retries=1),
                Request.chat("hi"),
                BackendUnavailable,
            )
        if kind == "http_400":
            return _backend(up.script("p400", Status(400))), Request.chat("hi"), InvalidRequest
        if kind == "refused":
            return (
                _backend("http://127.0.0.1:9", max_retries=0),
                Request.chat("hi"),
                BackendUnavailable,
            )
        img = Request((Message.user([TextBlock("x"), ImageBlock(data=b"1")]),))
        return _backend(up.url("img")), img, InvalidRequest

    @pytest.fixture
    def mid_stream_failure(self, up):
        pieces = text_stream(["a", "b", "c", "d"])
        return _backend(up.script("drop", Stream(pieces, drop_after=3, delay=0.01))), Request.chat(
            "hi"
        )

    @pytest.fixture
    def long_stream(self, up):
        pieces = text_stream([f"tok{i} " for i in range(400)])
        return _backend(up.script("long", Stream(pieces, delay=0.0005))), Request.chat("hi")

    @pytest.fixture(params=["tool_calls", "stop"])
    def call_reply(self, request, up):
        # Upstreams disagree on the finish reason after a call; ours is the one rule.
        call = {"index": 0, "id": "call_1", "type": "function"}
        pieces = [
            sse(chunk({"role": "assistant", "content": "Checking."})),
            sse(chunk({"tool_calls": [{**call, "function": {"name": "get_weather"}}]})),
            sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]})),
            sse(chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]})),
            sse(chunk({}, request.param)),
            DONE,
        ]
        return _backend(up.script(f"call-{request.param}", Stream(pieces))), call_requests()

    async def released(self, backend) -> bool:
        return backend.active == 0
