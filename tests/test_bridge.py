"""The HTTP bridge as a subprocess in front of a daemon subprocess, driven by openai-python."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from inferd.serve.bridge import DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES

from .serve_helpers import BridgeProc, DaemonProc, short_tmpdir, write_config

KEY_ENV = "INFERD_TEST_BRIDGE_KEY"
KEY = "sk-test-bridge-0123456789"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def bridges() -> Iterator[dict[str, BridgeProc]]:
    with short_tmpdir() as d:
        plain_cfg = write_config(
            d / "plain.toml",
            [
                {
                    "type": "mock",
                    "name": "plain",
                    "tokens": ["Hello", ",", " world"],
                    "thinking": ["let me think"],
                },
            ],
        )
        tools_cfg = write_config(
            d / "tools.toml",
            [
                {
                    "type": "mock",
                    "name": "tooly",
                    "tokens": ["Checking."],
                    "tool_calls": [["get_weather", {"city": "Paris"}]],
                },
            ],
        )
        flaky_cfg = write_config(
            d / "flaky.toml",
            [
                {"type": "mock", "name": "flaky", "tokens": ["a", "b", "c"], "drop_after": 1},
            ],
            router={"failure_threshold": 1_000_000},
        )
        daemons = [
            DaemonProc.start(plain_cfg, d / "p" / "infer.sock", wait=False),
            DaemonProc.start(tools_cfg, d / "t" / "infer.sock", wait=False),
        ]
        procs: dict[str, BridgeProc] = {}
        try:
            for dp in daemons:
                dp.wait_ready()
            procs["plain"] = BridgeProc.start("--socket", str(daemons[0].sock), wait=False)
            procs["tools"] = BridgeProc.start(
                "--socket",
                str(daemons[1].sock),
                "--api-key-env",
                KEY_ENV,
                env={KEY_ENV: KEY},
                wait=False,
            )
            procs["flaky"] = BridgeProc.start("--config", str(flaky_cfg), wait=False)  # in-proc
            for bp in procs.values():
                bp.wait_url()
            yield procs
        finally:
            for bp in procs.values():
                bp.stop()
            for dp in daemons:
                dp.stop()


def client(bridge: BridgeProc, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{bridge.url}/v1",
        api_key=key,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False, timeout=20),
    )


def test_defaults_are_loopback_and_named() -> None:
    assert DEFAULT_HOST == "127.0.0.1"
    assert DEFAULT_PORT == 8800
    assert MAX_BODY_BYTES == 64 * 1024 * 1024


async def test_plain_chat(bridges) -> None:
    async with client(bridges["plain"]) as c:
        r = await c.chat.completions.create(
            model="whatever", messages=[{"role": "user", "content": "hi"}]
        )
    assert r.choices[0].message.content == "Hello, world"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == "whatever"
    assert r.usage is not None and r.usage.completion_tokens == 4  # 1 thinking + 3 text


async def test_streaming_with_usage(bridges) -> None:
    async with client(bridges["plain"]) as c:
        stream = await c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                if ch.delta.content:
                    text.append(ch.delta.content)
                finish = ch.finish_reason or finish
    assert "".join(text) == "Hello, world"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 4


async def test_tool_call_round_trip(bridges) -> None:
    messages = [{"role": "user", "content": "weather in Paris?"}]
    async with client(bridges["tools"], KEY) as c:
        r = await c.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = msg.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        messages += [
            {
                "role": "assistant",
                "content": msg.content,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": call.function.arguments,
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
        ]
        r2 = await c.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
        assert r2.choices[0].message.content == "Checking."
        # streamed tool calls arrive as they are written (ADR 0023): the first delta
        # has the index, id and name, later ones more of the arguments
        stream = await c.chat.completions.create(
            model="m", messages=messages, tools=[WEATHER_TOOL], stream=True
        )
        calls = [
            tc
            async for chunk in stream
            for ch in chunk.choices
            for tc in (ch.delta.tool_calls or [])
        ]
    assert calls[0].index == 0 and calls[0].function.name == "get_weather" and calls[0].id
    assert all(tc.index == 0 and tc.id is None for tc in calls[1:]) and len(calls) > 1
    args = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(args) == {"city": "Paris"}


async def test_embeddings_and_models(bridges) -> None:
    async with client(bridges["plain"]) as c:
        e = await c.embeddings.create(model="emb", input=["one", "two words"])
        assert [d.index for d in e.data] == [0, 1]
        assert len(e.data[0].embedding) == 8
        models = await c.models.list()
        assert [m.id for m in models.data] == ["inferd"]
    async with aiohttp.ClientSession() as h:  # the float encoding, as plain HTTP clients ask
        async with h.post(
            f"{bridges['plain'].url}/v1/embeddings",
            json={"input": "one", "encoding_format": "float"},
        ) as r:
            body = await r.json()
    assert body["data"][0]["embedding"] == pytest.approx(e.data[0].embedding)


async def test_health(bridges) -> None:
    async with aiohttp.ClientSession() as h:
        async with h.get(f"{bridges['plain'].url}/health") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with h.get(f"{bridges['tools'].url}/health") as r:  # open even with a key
            assert r.status == 200


async def test_bearer_key_is_required_and_never_echoed(bridges) -> None:
    async with client(bridges["tools"], "sk-wrong") as c:
        with pytest.raises(openai.AuthenticationError) as info:
            await c.models.list()
    assert info.value.status_code == 401
    assert KEY not in str(info.value.body) and "sk-wrong" not in str(info.value.body)
    async with aiohttp.ClientSession() as h:
        async with h.get(f"{bridges['tools'].url}/v1/models") as r:  # no header at all
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        async with h.get(
            f"{bridges['tools'].url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
        ) as r:
            assert r.status == 200


async def test_invalid_request_is_a_400_error_object(bridges) -> None:
    async with client(bridges["plain"]) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], temperature=-1
            )
    assert info.value.status_code == 400
    err = info.value.body
    assert err["type"] == "invalid_request_error" and "temperature" in err["message"]
    async with aiohttp.ClientSession() as h:
        async with h.post(f"{bridges['plain'].url}/v1/chat/completions", data=b"{nope") as r:
            assert r.status == 400
            assert "not valid JSON" in (await r.json())["error"]["message"]
        async with h.get(f"{bridges['plain'].url}/v1/nothing-here") as r:
            assert r.status == 404 and "error" in await r.json()


async def test_backend_failures_surface_as_openai_errors(bridges) -> None:
    async with client(bridges["flaky"]) as c:
        with pytest.raises(openai.APIStatusError) as info:  # non-streaming: whole reply fails
            await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 502
        assert info.value.body["code"] == "backend_unavailable"
        stream = await c.chat.completions.create(  # streaming: the error arrives as an event
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        got = []
        with pytest.raises(openai.APIError, match="dropped the stream"):
            async for chunk in stream:
                got += [ch.delta.content for ch in chunk.choices if ch.delta.content]
        assert got == ["a"]


async def test_daemon_down_is_a_clear_error() -> None:
    with short_tmpdir() as d:
        bridge = BridgeProc.start("--socket", str(d / "missing.sock"))
        try:
            async with aiohttp.ClientSession() as h:
                async with h.get(f"{bridge.url}/health") as r:
                    assert r.status == 503
                async with h.post(
                    f"{bridge.url}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}]},
                ) as r:
                    assert r.status == 502
                    body = await r.json()
            assert "is `inferd serve` running" in body["error"]["message"]
        finally:
            assert bridge.stop() == 0


async def test_http_client_leaving_a_stream_cancels_the_generation() -> None:
    from inferd.serve.client import admin_status

    with short_tmpdir() as d:
        cfg = write_config(
            d / "slow.toml",
            [{"type": "mock", "name": "slow", "tokens": ["x"] * 200, "delay": 0.02}],
        )
        daemon = DaemonProc.start(cfg, d / "infer.sock")
        bridge = BridgeProc.start("--socket", str(daemon.sock))
        try:
            async with aiohttp.ClientSession() as h:
                async with h.post(
                    f"{bridge.url}/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": "hi"}],
                        "stream": True,
                    },
                ) as r:
                    assert r.status == 200
                    await r.content.readline()  # the first SSE line, then hang up
            for _ in range(100):  # bounded wait: the 4 s stream is cancelled long before
                st = await admin_status(daemon.sock)
                if st["counters"]["cancelled"] == 1 and st["queue"]["running"] == 0:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"generation not cancelled: {st}")
        finally:
            bridge.stop()
            daemon.stop()


async def test_body_limit_is_a_413_error_object_in_process() -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from inferd.backends.mock import Mock
    from inferd.serve.bridge import make_app

    app = make_app(Mock(["ok"]), max_body_bytes=1024)
    async with TestClient(TestServer(app)) as tc:
        r = await tc.post("/v1/chat/completions", data=b"{" + b" " * 2048 + b"}")
        assert r.status == 413
        body = await r.json()
        assert body["error"]["code"] == "413" and "1024" in body["error"]["message"]
        r = await tc.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"] == "ok"
