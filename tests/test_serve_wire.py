"""The NDJSON wire: frame encode/decode, the 64 MiB limit, resync after bad frames."""

from __future__ import annotations

import asyncio

import pytest

from inferd.errors import BackendUnavailable, InternalError, InvalidRequest, QueueFull
from inferd.serve import wire
from inferd.serve.config import ConfigError, build_backend, parse_config
from inferd.types import (
    AcceleratorInfo,
    Capabilities,
    Done,
    StopReason,
    Text,
    Thinking,
    Timings,
    ToolUse,
    Usage,
)


def test_frame_limit_is_64_mib() -> None:
    assert wire.MAX_FRAME_BYTES == 64 * 1024 * 1024
    assert set(wire.ERROR_CODES) == {
        "queue_full",
        "backend_unavailable",
        "invalid_request",
        "frame_too_large",
        "internal",
    }


def test_encode_decode_round_trip() -> None:
    frame = {"type": "generate", "id": 7, "messages": [], "x": "é\n"}
    data = wire.encode(frame)
    assert data.endswith(b"\n") and data.count(b"\n") == 1  # newlines inside are escaped
    assert wire.decode(data) == frame


@pytest.mark.parametrize(
    "raw, needle",
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"s"', "got str"),
    ],
)
def test_decode_names_the_problem(raw: bytes, needle: str) -> None:
    with pytest.raises(wire.FrameError, match=needle) as info:
        wire.decode(raw)
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize(
    "event",
    [
        Text("hé"),
        Thinking("hmm"),
        Thinking("", signature="EqQBCkgIARABGAIiQL+sig/=="),
        ToolUse("c1", "f", {"a": 1}, '{"a": 1}'),
        ToolUse("c", "g", None, "{"),
        Done(StopReason.TOOL_USE, Usage(3, 4, 1), Timings(0.1, 0.5, 20.0), "m1"),
    ],
)
def test_event_frames_round_trip(event) -> None:
    frame = wire.event_frame("r1", event)
    assert frame["id"] == "r1"
    # Symmetric: every event, Done included, is framed the same way.
    assert set(frame) == {"type", "id", "event"}
    assert frame["type"] == frame["event"]["type"] == event.to_dict()["type"]
    assert frame["type"] == ("done" if isinstance(event, Done) else frame["type"])
    assert wire.event_from_frame(wire.decode(wire.encode(frame))) == event


def test_unexpected_frame_is_internal_error() -> None:
    with pytest.raises(InternalError):
        wire.event_from_frame({"type": "bogus"})
    with pytest.raises(InternalError):
        wire.event_from_frame({"type": "text", "event": {"type": "nope"}})
    with pytest.raises(InternalError):  # the frame's type must be the event's
        wire.event_from_frame({"type": "done", "event": {"type": "text", "text": "x"}})


def test_error_frames_map_back_to_error_classes() -> None:
    for exc, cls in (
        (QueueFull("q"), QueueFull),
        (BackendUnavailable("b"), BackendUnavailable),
        (InvalidRequest("i"), InvalidRequest),
        (wire.FrameTooLarge("t"), wire.FrameTooLarge),
    ):
        f = wire.error_frame_for(5, exc)
        assert f == {"type": "error", "id": 5, "code": exc.code, "message": exc.message}
        back = wire.error_from_frame(f)
        assert type(back) is cls and back.message == exc.message
    # an unexpected exception's text stays on the server: the client gets its type and id
    f = wire.error_frame_for(1, RuntimeError("boom at /home/me/secret-key.txt"))
    assert f["code"] == "internal" and f["id"] == 1
    assert "RuntimeError" in f["message"] and "1" in f["message"]
    assert "boom" not in f["message"] and "secret" not in f["message"]
    assert isinstance(wire.error_from_frame({"code": "martian"}), InternalError)
    assert isinstance(wire.FrameTooLarge("x"), InvalidRequest)


def test_capabilities_round_trip() -> None:
    caps = Capabilities(
        tools=True, embed=True, accelerator=AcceleratorInfo("cuda", 10, "gpu", 1 << 30)
    )
    assert wire.capabilities_from_dict(caps.to_dict()) == caps
    assert wire.capabilities_from_dict({}) == Capabilities()


async def _frames(chunks: list[bytes], limit: int) -> list:
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    reader.feed_eof()
    return [f async for f in wire.FrameReader(reader, limit, chunk_bytes=7)]


async def test_reader_splits_across_chunks_and_ignores_blank_lines() -> None:
    out = await _frames([b'{"a":1}\n\n{"b"', b':2}\n  \n{"c":3}'], 100)
    assert out == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


async def test_reader_skips_an_oversized_frame_and_resyncs() -> None:
    limit = 16
    exact = b"x" * limit
    out = await _frames([b"a" * 40 + b"\n", exact + b"\n", b"b" * 17, b"b" * 30 + b"\nok\n"], limit)
    assert isinstance(out[0], wire.FrameTooLarge)
    assert "at most 16 bytes" in out[0].message
    assert out[1] == exact  # a frame of exactly the limit is fine
    assert isinstance(out[2], wire.FrameTooLarge)
    assert out[3] == b"ok"
    assert len(out) == 4


async def test_reader_oversized_without_newline_at_eof() -> None:
    out = await _frames([b"z" * 100], 10)
    assert len(out) == 1 and isinstance(out[0], wire.FrameTooLarge)


# --------------------------------------------------------------------------- config


def test_config_parses_backends_in_order_and_limits() -> None:
    cfg = parse_config(
        {
            "daemon": {"max_concurrent": 2, "max_queued": 0, "drain_timeout_s": 1.5},
            "router": {"failure_threshold": 5},
            "backend": [
                {"type": "mock", "name": "a", "tokens": ["x"]},
                {
                    "type": "openai",
                    "base_url": "http://127.0.0.1:1/v1",
                    "api_key_env": "INFERD_TEST_KEY",
                },
            ],
        }
    )
    assert (cfg.max_concurrent, cfg.max_queued, cfg.drain_timeout_s) == (2, 0, 1.5)
    assert [b.type for b in cfg.backends] == ["mock", "openai"]
    assert cfg.backends[1].api_key_env == "INFERD_TEST_KEY"
    assert cfg.router == {"failure_threshold": 5}
    mock = build_backend(cfg.backends[0])
    assert mock.name == "a"


@pytest.mark.parametrize(
    "data, needle",
    [
        ({}, "no [[backend]]"),
        ({"backend": [{"type": "gpu-magic"}]}, "type 'gpu-magic'"),
        ({"backend": [{"type": "openai", "api_key": "sk-secret"}]}, "api_key_env"),
        ({"daemon": {"max_concurrent": 0}, "backend": [{"type": "mock"}]}, "max_concurrent"),
        ({"daemon": {"bogus": 1}, "backend": [{"type": "mock"}]}, "bogus"),
        ({"extra": {}, "backend": [{"type": "mock"}]}, "extra"),
    ],
)
def test_config_errors_say_what_is_wrong(data, needle) -> None:
    with pytest.raises(ConfigError, match=r".*") as info:
        parse_config(data)
    assert needle in str(info.value)
    assert "sk-secret" not in str(info.value)


def test_api_key_comes_from_the_named_env_var_only(monkeypatch) -> None:
    cfg = parse_config({"backend": [{"type": "mock", "api_key_env": "INFERD_T_KEY"}]})
    monkeypatch.delenv("INFERD_T_KEY", raising=False)
    with pytest.raises(ConfigError, match="INFERD_T_KEY"):
        build_backend(cfg.backends[0])
    monkeypatch.setenv("INFERD_T_KEY", "sk-very-secret")
    with pytest.raises(ConfigError) as info:  # Mock takes no api_key: a clean TypeError
        build_backend(cfg.backends[0])
    assert "sk-very-secret" not in str(info.value)
    assert "sk-very-secret" not in repr(cfg)


def test_bad_backend_setting_is_a_config_error() -> None:
    cfg = parse_config({"backend": [{"type": "mock", "delay": -1}]})
    with pytest.raises(ConfigError, match="delay"):
        build_backend(cfg.backends[0])


def test_openai_backend_gets_its_key_from_the_env_only(monkeypatch) -> None:
    monkeypatch.setenv("INFERD_T_KEY2", "sk-never-shown-42")
    cfg = parse_config(
        {
            "backend": [
                {
                    "type": "openai",
                    "base_url": "http://127.0.0.1:9/v1",
                    "model": "m",
                    "api_key_env": "INFERD_T_KEY2",
                }
            ]
        }
    )
    backend = build_backend(cfg.backends[0])
    assert type(backend).__name__ == "OpenAICompat"
    assert "sk-never-shown-42" not in repr(backend) + repr(cfg)


@pytest.mark.parametrize("header", ["Authorization", "X-Api-Key", "x-auth-token", "Cookie"])
def test_config_refuses_a_credential_in_headers(header: str) -> None:
    data = {"backend": [{"type": "openai", "headers": {header: "sk-in-the-file"}}]}
    with pytest.raises(ConfigError, match="api_key_env") as info:
        parse_config(data)
    assert header in str(info.value) and "sk-in-the-file" not in str(info.value)


def test_config_refuses_user_info_in_a_url_and_keeps_plain_headers() -> None:
    data = {"backend": [{"type": "openai", "base_url": "https://bob:hunter2@api.example/v1"}]}
    with pytest.raises(ConfigError, match="user:password@") as info:
        parse_config(data)
    assert "hunter2" not in str(info.value) and "bob" not in str(info.value)
    ok = parse_config({"backend": [{"type": "openai", "headers": {"X-Title": "my app"}}]})
    assert ok.backends[0].options["headers"] == {"X-Title": "my app"}


def test_backend_spec_repr_redacts_what_could_be_a_secret() -> None:
    from inferd.serve.config import BackendSpec

    spec = BackendSpec(
        "openai",
        {
            "base_url": "https://u:pw-123@h.example/v1?key=q-456",
            "headers": {"X-Api-Key": "hdr-789"},
            "auth_token": "tok-000",
            "model": "m",
            "tokens": ["a"],
        },
    )
    text = repr(spec)
    for secret in ("pw-123", "q-456", "hdr-789", "tok-000"):
        assert secret not in text
    assert "X-Api-Key" in text and "'model': 'm'" in text and "['a']" in text


def test_config_daemon_limits_are_parsed_and_checked() -> None:
    cfg = parse_config(
        {
            "daemon": {"max_connections": 3, "write_stall_timeout_s": 2.5, "max_queued": 0},
            "backend": [{"type": "mock"}],
        }
    )
    assert (cfg.limits.max_connections, cfg.limits.write_stall_timeout_s) == (3, 2.5)
    assert cfg.max_queued == 0 and cfg.max_concurrent == 16
    with pytest.raises(ConfigError, match="frame_timeout_s"):
        parse_config({"daemon": {"frame_timeout_s": 0}, "backend": [{"type": "mock"}]})


# --------------------------------------------------------------------------- hostile frames


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


async def test_reader_skips_a_frame_that_would_pass_the_shared_budget() -> None:
    budget = _Budget(20)
    reader = asyncio.StreamReader()
    reader.feed_data(b"a" * 30 + b"\nok\n" + b"b" * 13 + b"\n")  # read 15 bytes at a time
    reader.feed_eof()
    frames = wire.FrameReader(reader, 100, chunk_bytes=15, budget=budget)
    out = [f async for f in frames]
    assert isinstance(out[0], wire.BufferFull) and out[0].code == "queue_full"
    assert "max_buffered_bytes" in out[0].message
    assert out[1:] == [b"ok", b"b" * 13]  # a frame within the budget passes
    assert budget.used == 0  # everything given back


async def test_reader_closes_a_frame_that_never_ends() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b'{"ok":1}\n{"never":')
    frames = wire.FrameReader(reader, 100, frame_timeout_s=0.2)
    got = []
    with pytest.raises(wire.FrameTimeout, match=r"frame_timeout_s=0\.2"):
        async for f in frames:
            got.append(f)
    assert got == [b'{"ok":1}']


async def test_reader_does_not_time_out_between_frames() -> None:
    reader = asyncio.StreamReader()
    frames = wire.FrameReader(reader, 100, frame_timeout_s=0.05)

    async def later() -> None:
        await asyncio.sleep(0.3)  # silence with no frame started is not a timeout
        reader.feed_data(b'{"a":1}\n')
        reader.feed_eof()

    feeder = asyncio.create_task(later())
    assert [f async for f in frames] == [b'{"a":1}']
    await feeder


def test_client_frames_are_checked_before_they_are_walked() -> None:
    bomb = b'{"type":"embed","id":1,"input":[' + b'"",' * 300 + b'""]}'
    f = wire.parse_client_frame(bomb, max_elements=100)
    assert f.rid is None and "max_frame_elements=100" in f.error.message
    deep = b'{"type":"embed","id":"d","input":' + b"[" * 100 + b"]" * 100 + b"}"
    f = wire.parse_client_frame(deep)
    assert f.rid == "d" and "MAX_JSON_DEPTH" in f.error.message
    f = wire.parse_client_frame(b'{"type":"embed","id":"x' + b"y" * 300 + b'","input":["a"]}')
    assert f.rid is None and "MAX_ID_CHARS" in f.error.message and len(f.error.message) < 300
    f = wire.parse_client_frame(b'{"type":"embed","id":2,"input":["a"],"bogus":1}')
    assert f.rid == 2 and "'bogus'" in f.error.message
    f = wire.parse_client_frame(b'{"type":"cancel","id":3}')
    assert (f.kind, f.request, f.error) == ("cancel", None, None)
    f = wire.parse_client_frame(b'{"type":"embed","id":4,"input":["a","b"]}')
    assert f.request is not None and f.request.input == ("a", "b")


def test_error_messages_are_cut_whatever_built_them() -> None:
    f = wire.error_frame(1, "invalid_request", "x" * 100_000)
    assert len(f["message"]) < 1100
