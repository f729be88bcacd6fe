"""The daemon Client and the Router against the shared stream contract.

The Client runs against real daemon subprocesses (one per scripted behaviour, shared by
the module); the Router runs in-process over Mock backends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from inferd.backends.mock import Mock
from inferd.errors import BackendUnavailable, InvalidRequest
from inferd.router import Router
from inferd.serve.client import Client, admin_status
from inferd.types import Request

from ..serve_helpers import DaemonProc, short_tmpdir, write_config
from .suite import BackendContract, call_requests

#: Router settings that keep a breaker from opening during the contract runs.
NEVER_TRIP = {"failure_threshold": 1_000_000}

DAEMON_BACKENDS = {
    "normal": {
        "type": "mock",
        "name": "m",
        "tokens": ["one ", "two ", "three"],
        "thinking": ["hmm"],
    },
    "calls": {
        "type": "mock",
        "name": "m",
        "tokens": ["Checking."],
        "tool_calls": [["get_weather", {"city": "Paris"}]],
    },
    "invalid": {"type": "mock", "name": "m", "pre_stream_error": "invalid_request"},
    "unavailable": {"type": "mock", "name": "m", "pre_stream_error": "unavailable"},
    "mid": {"type": "mock", "name": "m", "tokens": ["a", "b", "c"], "drop_after": 2},
    "long": {
        "type": "mock",
        "name": "m",
        "tokens": [f"tok{i} " for i in range(400)],
        "delay": 0.0005,
    },
}


@pytest.fixture(scope="module")
def daemons() -> Iterator[dict[str, DaemonProc]]:
    with short_tmpdir() as d:
        procs: dict[str, DaemonProc] = {}
        try:
            for kind, backend in DAEMON_BACKENDS.items():
                cfg = write_config(d / f"{kind}.toml", [backend], router=NEVER_TRIP)
                procs[kind] = DaemonProc.start(cfg, d / kind / "infer.sock", wait=False)
            for p in procs.values():
                p.wait_ready()
            yield procs
        finally:
            for p in procs.values():
                p.stop()


class TestClientContract(BackendContract):
    @pytest.fixture
    async def backend(self, daemons):
        c = Client(daemons["normal"].sock)
        await c.connect()  # the connection's reader task predates the test's task census
        yield c
        await c.aclose()

    @pytest.fixture(params=["invalid", "unavailable"])
    async def pre_stream_failure(self, request, daemons):
        c = Client(daemons[request.param].sock)
        await c.connect()
        exc = InvalidRequest if request.param == "invalid" else BackendUnavailable
        yield c, Request.chat("hi"), exc
        await c.aclose()

    @pytest.fixture
    async def mid_stream_failure(self, daemons):
        c = Client(daemons["mid"].sock)
        await c.connect()
        yield c, Request.chat("hi")
        await c.aclose()

    @pytest.fixture
    async def long_stream(self, daemons):
        c = Client(daemons["long"].sock)
        await c.connect()
        yield c, Request.chat("hi")
        await c.aclose()

    @pytest.fixture
    async def call_reply(self, daemons):
        c = Client(daemons["calls"].sock)
        await c.connect()
        yield c, call_requests()
        await c.aclose()

    async def released(self, backend) -> bool:
        if backend.active_streams:
            return False
        st = await admin_status(backend.socket_path)
        return st["queue"]["running"] == 0 and st["queue"]["queued"] == 0


def _mocks(router: Router) -> list[Mock]:
    return [b for b in router.backends if isinstance(b, Mock)]


class TestRouterContract(BackendContract):
    @pytest.fixture
    async def backend(self):
        r = Router([Mock(["one ", "two ", "three"], thinking=["hmm"], name="m")], **NEVER_TRIP)
        yield r
        await r.aclose()

    @pytest.fixture(params=["invalid_request", "unavailable", "none_ready"])
    def pre_stream_failure(self, request):
        if request.param == "none_ready":
            return Router([Mock(ready=False)]), Request.chat("hi"), BackendUnavailable
        exc = InvalidRequest if request.param == "invalid_request" else BackendUnavailable
        return Router([Mock(pre_stream_error=request.param)]), Request.chat("hi"), exc

    @pytest.fixture
    def mid_stream_failure(self):
        return Router([Mock(["a", "b", "c"], drop_after=2)]), Request.chat("hi")

    @pytest.fixture
    def long_stream(self):
        return Router([Mock([f"tok{i} " for i in range(400)], delay=0.0005)]), Request.chat("hi")

    @pytest.fixture
    def call_reply(self):
        mock = Mock(["Checking."], tool_calls=[("get_weather", {"city": "Paris"})], name="m")
        return Router([mock], **NEVER_TRIP), call_requests()

    async def released(self, backend) -> bool:
        return all(m.active == 0 for m in _mocks(backend))
