"""A least-loaded Router over three Mock replicas against the shared stream contract
(docs/adr/0020-replicas-least-loaded-router.md): the balancing, the open-stream counts
and the background probes must not bend the stream rules."""

from __future__ import annotations

import pytest

from inferd.backends.mock import Mock
from inferd.errors import BackendUnavailable, InvalidRequest
from inferd.router import Router
from inferd.types import Request

from .suite import BackendContract, call_requests

#: Keep breakers closed during the contract runs.
NEVER_TRIP = {"failure_threshold": 1_000_000}


def replicas(*tokens: str, **kw) -> list[Mock]:
    return [Mock(list(tokens), name=f"m{i}", **kw) for i in range(3)]


def balanced(backends: list[Mock], **kw) -> Router:
    # fixtures the suite does not close run without probes (no task to leak)
    return Router(backends, policy="least_loaded", health_interval_s=0, **NEVER_TRIP, **kw)


class TestLeastLoadedRouterContract(BackendContract):
    @pytest.fixture
    async def backend(self):
        ms = [Mock(["one ", "two ", "three"], thinking=["hmm"], name=f"m{i}") for i in range(3)]
        r = Router(ms, policy="least_loaded", health_interval_s=0.05, **NEVER_TRIP)
        # the probe task is the router's, not a stream's: start it before the suite
        # counts the tasks a stream leaves behind
        await r.refresh_state()
        assert r.health.running
        yield r
        await r.aclose()
        assert not r.health.running

    @pytest.fixture(params=["invalid_request", "unavailable", "none_ready"])
    def pre_stream_failure(self, request):
        if request.param == "none_ready":
            return balanced(replicas("x", ready=False)), Request.chat("hi"), BackendUnavailable
        exc = InvalidRequest if request.param == "invalid_request" else BackendUnavailable
        router = balanced(replicas("x", pre_stream_error=request.param))
        return router, Request.chat("hi"), exc

    @pytest.fixture
    def mid_stream_failure(self):
        return balanced(replicas("a", "b", "c", drop_after=2)), Request.chat("hi")

    @pytest.fixture
    def long_stream(self):
        ms = [Mock([f"tok{i} " for i in range(400)], delay=0.0005, name=f"m{i}") for i in range(3)]
        return balanced(ms), Request.chat("hi")

    @pytest.fixture
    def call_reply(self):
        calls = [("get_weather", {"city": "Paris"})]
        return balanced(replicas("Checking.", tool_calls=calls)), call_requests()

    async def released(self, backend) -> bool:
        mocks = [b for b in backend.backends if isinstance(b, Mock)]
        return all(m.active == 0 for m in mocks) and backend.outstanding == [0, 0, 0]
