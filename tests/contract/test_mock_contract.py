"""The Mock backend against the shared stream contract."""

from __future__ import annotations

import pytest

from inferd.backends.mock import Mock
from inferd.errors import BackendUnavailable, InvalidRequest, NotReady
from inferd.types import Request

from .suite import BackendContract, call_requests


class TestMockContract(BackendContract):
    @pytest.fixture
    async def backend(self):
        b = Mock(["one ", "two ", "three"], thinking=["hmm"])
        yield b
        await b.aclose()

    @pytest.fixture(params=["not_ready", "invalid_request", "unavailable", "set_ready"])
    def pre_stream_failure(self, request):
        kind = request.param
        if kind == "set_ready":
            b = Mock()
            b.set_ready(False)
            return b, Request.chat("hi"), NotReady
        exc = {
            "not_ready": NotReady,
            "invalid_request": InvalidRequest,
            "unavailable": BackendUnavailable,
        }[kind]
        return Mock(pre_stream_error=kind), Request.chat("hi"), exc

    @pytest.fixture
    def mid_stream_failure(self):
        return Mock(["a", "b", "c"], drop_after=2), Request.chat("hi")

    @pytest.fixture
    def long_stream(self):
        return Mock([f"tok{i} " for i in range(400)], delay=0.0005), Request.chat("hi")

    @pytest.fixture
    def call_reply(self):
        return Mock(["Checking."], tool_calls=[("get_weather", {"city": "Paris"})]), call_requests()

    async def released(self, backend) -> bool:
        return backend.active == 0
