"""The HTTP bridge against hostile and careless clients (issue 13).

Real servers on 127.0.0.1: the bridge in-process (so its counters can be read) or as
``inferd bridge`` subprocesses, in front of ``inferd serve`` subprocesses running the
Mock backend. Raw sockets send what HTTP libraries refuse to send.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest

from inferd import openai_wire
from inferd.backends.mock import Mock
from inferd.errors import BackendUnavailable, QueueFull
from inferd.limits import MAX_JSON_DEPTH
from inferd.router import Router
from inferd.serve.bridge import SHUTDOWN_TIMEOUT_S, STATS_KEY, _FastChunks
from inferd.serve.client import Client, admin_status
from inferd.types import (
    Capabilities,
    Done,
    EmbedRequest,
    Event,
    Request,
    StopReason,
    Text,
    Thinking,
    ToolUse,
    Usage,
)

from .serve_helpers import (
    BridgeProc,
    DaemonProc,
    bridge_in_process,
    raw_http,
    short_tmpdir,
    write_config,
)

KEY_ENV = "INFERD_TEST_HOSTILE_KEY"
KEY = "sk-hostile-0123456789"
#: Tokens of the "big" daemon's stream: far more bytes than a stalled client's socket
#: buffers and the bridge's per-stream queue hold, so a reader that stops stalls it.
BIG_TOKENS = ["x" * 2048] * 6000
#: Seconds a well-behaved request may take while another client is stalled.
REQUEST_TIMEOUT_S = 20.0
#: How long the well-behaved client keeps asking after the stalled stream started:
#: long past the point where the stalled stream has filled every buffer (well under
#: one second of work) and froze the shared connection before the fix.
STALL_WINDOW_S = 5.0
#: Bounded waits for a counter to settle (cancellation, slots freed).
SETTLE_TIMEOUT_S = 10.0
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def daemons() -> Iterator[dict[str, DaemonProc]]:
    with short_tmpdir() as d:
        specs = {
            "big": {"type": "mock", "name": "big", "tokens": BIG_TOKENS},
            "slow": {"type": "mock", "name": "slow", "tokens": ["x"] * 200, "delay": 0.02},
        }
        procs: dict[str, DaemonProc] = {}
        try:
            for kind, spec in specs.items():
                cfg = write_config(d / f"{kind}.toml", [spec], daemon={"max_concurrent": 64})
                procs[kind] = DaemonProc.start(cfg, d / kind / "infer.sock", wait=False)
            for p in procs.values():
                p.wait_ready()
            yield procs
        finally:
            for p in procs.values():
                p.stop()


async def _settled(check, timeout: float = SETTLE_TIMEOUT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got is True:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"did not settle within {timeout}s: {got}")
        await asyncio.sleep(0.05)


def _stalled_socket(url: str, body: dict) -> socket.socket:
    """Send a streaming request and never read: a 4 KiB receive buffer fills at once."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
    s.connect((host, int(port)))
    payload = orjson.dumps(body)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return s


# --------------------------------------------------------------------------- flow control


async def test_a_client_that_never_reads_stalls_only_itself(daemons) -> None:
    bridge = BridgeProc.start("--socket", str(daemons["big"].sock))
    stalled = await asyncio.to_thread(_stalled_socket, bridge.url, {**CHAT, "stream": True})
    try:
        done = 0
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(REQUEST_TIMEOUT_S)) as h:
            while time.monotonic() - started < STALL_WINDOW_S or done < 3:
                async with h.post(
                    f"{bridge.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}
                ) as r:
                    body = await r.json()
                assert r.status == 200, body
                assert body["choices"][0]["message"]["content"] == "x" * 4096
                done += 1
        assert done >= 3
    finally:
        stalled.close()
        bridge.stop()


async def test_pool_limit_is_named_and_a_waiter_gets_queue_full(daemons) -> None:
    client = Client(daemons["slow"].sock, max_connections=1, pool_timeout_s=0.3)
    try:
        await client.connect()  # the daemon's state, cached
        first = client.generate(Request.chat("hi"))
        assert await first.__anext__() == Text("x")  # holds the only connection
        async with asyncio.timeout(1.0):  # a full pool keeps the state, never waits on it
            assert (await client.refresh()).embed
        assert client.ready()
        with pytest.raises(QueueFull, match="max_connections"):
            await client.generate(Request.chat("hi")).__anext__()
        await first.aclose()  # gives it back: the next request gets it
        events = [e async for e in client.generate(Request.chat("hi", max_tokens=1))]
        assert isinstance(events[-1], Done)
        assert client.pool_stats() == {"open": 1, "idle": 1, "busy": 0}
    finally:
        await client.aclose()


async def test_idle_connections_are_capped(daemons) -> None:
    client = Client(daemons["slow"].sock, max_idle_connections=2)
    try:

        async def one() -> None:
            events = [e async for e in client.generate(Request.chat("hi", max_tokens=2))]
            assert isinstance(events[-1], Done)

        await asyncio.gather(*(one() for _ in range(5)))  # five connections at once
        assert client.pool_stats() == {"open": 2, "idle": 2, "busy": 0}
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- cancellation


async def test_a_non_streaming_request_is_cancelled_when_its_client_leaves(daemons) -> None:
    daemon = daemons["slow"]
    before = (await admin_status(daemon.sock))["counters"]["cancelled"]
    client = Client(daemon.sock)
    async with bridge_in_process(client) as (url, app, _runner):
        async with aiohttp.ClientSession() as h:
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(0.5):  # the 4 s reply is far from done: hang up
                    await h.post(f"{url}/v1/chat/completions", json=CHAT)

        async def cancelled() -> bool | dict:
            st = await admin_status(daemon.sock)
            ok = st["counters"]["cancelled"] > before and st["queue"]["running"] == 0
            return (ok and app[STATS_KEY].in_flight == 0) or st

        await _settled(cancelled)  # well before the 4 s generation could end by itself
        assert client.active_streams == 0
    await client.aclose()


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def keyed_bridge(daemons) -> Iterator[BridgeProc]:
    b = BridgeProc.start(
        "--socket", str(daemons["slow"].sock), "--api-key-env", KEY_ENV, env={KEY_ENV: KEY}
    )
    yield b
    b.stop()


async def test_a_non_ascii_authorization_header_is_a_401(keyed_bridge) -> None:
    for value in (b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer \xff\xfe", "Bearer é".encode()):
        status, _headers, body = await raw_http(
            keyed_bridge.url,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
            + value
            + b"\r\n\r\n",
        )
        assert status == 401, body
        assert orjson.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, body = await raw_http(
        keyed_bridge.url,
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {KEY}\r\n\r\n".encode(),
    )
    assert status == 200, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"G(T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", id="bad-method"),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8200 + b"\r\n\r\n",
            id="8KiB-header",
        ),
        pytest.param(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(200))
            + b"\r\n",
            id="200-headers",
        ),
        pytest.param(b"NOT-HTTP\r\n\r\n", id="garbage"),
        pytest.param(b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n", id="unknown-method"),
    ],
)
async def test_every_error_has_the_openai_shape(keyed_bridge, request_bytes: bytes) -> None:
    status, headers, body = await raw_http(keyed_bridge.url, request_bytes)
    assert status >= 400
    assert headers["content-type"].startswith("application/json"), (headers, body)
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"]


async def test_a_deeply_nested_body_is_a_400_json_error() -> None:
    nested = b"[" * 1000 + b'"auto"' + b"]" * 1000  # parses (orjson allows 1024 levels)
    async with bridge_in_process(Mock(["ok"])) as (url, _app, _runner):
        async with aiohttp.ClientSession() as h:
            for field in (b"tool_choice", b"n", b"tools"):
                body = orjson.dumps(CHAT)[:-1] + b',"' + field + b'":' + nested + b"}"
                async with h.post(f"{url}/v1/chat/completions", data=body) as r:
                    assert r.status == 400
                    err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error"
                assert f"MAX_JSON_DEPTH={MAX_JSON_DEPTH}" in err["message"]


class _Boom(Mock):
    """A backend with a bug whose exception text must stay on the server."""

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        raise ValueError("password=hunter2 at /srv/secret/path")
        yield Text("never")  # pragma: no cover - makes this an async generator


async def test_exception_text_never_reaches_the_client(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for backend, status in ((_Boom(name="boom"), 500), (Router([_Boom(name="boom")]), 502)):
        async with bridge_in_process(backend) as (url, _app, _runner):
            async with aiohttp.ClientSession() as h:
                for stream in (False, True):
                    async with h.post(
                        f"{url}/v1/chat/completions", json={**CHAT, "stream": stream}
                    ) as r:
                        assert r.status == status
                        message = (await r.json())["error"]["message"]
                    assert "ValueError" in message and "ref " in message
                    assert "hunter2" not in message and "/srv" not in message
                    ref = message.split("ref ", 1)[1].rstrip(")")
                    assert ref in caplog.text  # the detail is in the server log
    assert "hunter2" in caplog.text  # ... with its traceback


class _LateBoom(Mock):
    async def generate(self, request: Request) -> AsyncIterator[Event]:
        yield Text("a")
        raise ValueError("password=hunter2 at /srv/secret/path")


async def test_exception_text_never_reaches_the_client_mid_stream(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with bridge_in_process(_LateBoom(name="late")) as (url, _app, _runner):
        async with aiohttp.ClientSession() as h:
            async with h.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status == 200
                lines = [line async for line in r.content if line.startswith(b"data: ")]
    error = orjson.loads(lines[-1][6:])["error"]  # the last event is the error
    assert "ValueError" in error["message"] and "hunter2" not in error["message"]
    assert error["message"].split("ref ", 1)[1].rstrip(")") in caplog.text


class _TextOnly(Mock):
    def capabilities(self) -> Capabilities:
        return Capabilities(tools=True)


async def test_an_image_for_a_text_only_model_is_a_400_naming_vision() -> None:
    image = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    }
    async with bridge_in_process(Router([_TextOnly(name="smol")])) as (url, _app, _runner):
        async with aiohttp.ClientSession() as h:
            for stream in (False, True):
                async with h.post(
                    f"{url}/v1/chat/completions", json={"messages": [image], "stream": stream}
                ) as r:
                    assert r.status == 400
                    err = (await r.json())["error"]
                assert err["type"] == "invalid_request_error"
                assert err["code"] == "invalid_request" and "vision" in err["message"]


# --------------------------------------------------------------------------- noise


async def test_clients_leaving_are_info_and_shutdown_is_quiet(daemons) -> None:
    bridge = BridgeProc.start("--socket", str(daemons["slow"].sock), "--log-level", "INFO")
    try:
        async with aiohttp.ClientSession() as h:
            for _ in range(3):  # three clients leave mid-stream
                async with h.post(
                    f"{bridge.url}/v1/chat/completions", json={**CHAT, "stream": True}
                ) as r:
                    assert r.status == 200
                    await r.content.readline()
            # one stays connected while the bridge is stopped
            r = await h.post(f"{bridge.url}/v1/chat/completions", json={**CHAT, "stream": True})
            await r.content.readline()
            await asyncio.sleep(0.3)  # the bridge has seen the three leave
            started = time.monotonic()
            bridge.proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(bridge.proc.wait, SHUTDOWN_TIMEOUT_S + 10)
            r.close()
        assert rc == 0
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S + 5
        assert bridge.proc.stderr is not None
        err = bridge.proc.stderr.read().decode()
    finally:
        bridge.stop()
    assert "Traceback" not in err and "ERROR" not in err, err
    assert err.count("client left") >= 3, err


# --------------------------------------------------------------------------- fast chunks


def test_fast_chunks_are_byte_identical_to_the_chunk_writer() -> None:
    events: list[Event] = [
        Thinking("hmm"),
        Text("Hello"),
        Thinking('quote " and \\ back'),
        Text("é ☃ \x00\x1f\n\t"),
        Text(""),
        ToolUse("call_1", "f", {"a": 1}, '{"a":1}'),
        Text("after"),
        Done(StopReason.TOOL_USE, Usage(input_tokens=3, output_tokens=5)),
    ]
    for include_usage in (False, True):
        kw = {"created": 1700000000, "include_usage": include_usage}
        fast = _FastChunks(openai_wire.ChunkWriter('m"\u2603', "chatcmpl-1", **kw))
        slow = openai_wire.ChunkWriter('m"\u2603', "chatcmpl-1", **kw)
        for ev in events:
            want = b"".join(openai_wire.sse_encode(c) for c in slow.write(ev))
            assert fast.encode(ev) == want, ev


def test_daemon_connections_is_a_named_option() -> None:
    import argparse

    from inferd.serve.bridge import (
        DEFAULT_DAEMON_CONNECTIONS,
        _backend_from_args,
        add_arguments,
        main,
    )

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).daemon_connections == DEFAULT_DAEMON_CONNECTIONS == 64
    client = _backend_from_args(parser.parse_args(["--daemon-connections", "3"]))
    assert isinstance(client, Client) and client.max_connections == 3
    assert main(["--daemon-connections", "0", "--port", "0"]) == 1  # refused, not served


async def test_a_reply_over_the_frame_limit_fails_only_its_own_request(daemons) -> None:
    # 1,000 dimensions is a ~20 KB embedding frame, over this client's 4 KiB limit
    client = Client(daemons["slow"].sock, max_frame_bytes=4096)
    try:
        stream = client.generate(Request.chat("hi", max_tokens=20))
        assert await stream.__anext__() == Text("x")
        with pytest.raises(BackendUnavailable, match="skipped"):
            await client.embed(EmbedRequest(("a",), dimensions=1000))
        rest = [e async for e in stream]  # the unrelated stream goes on to its Done
        assert rest[:-1] == [Text("x")] * 19 and isinstance(rest[-1], Done)
    finally:
        await client.aclose()
