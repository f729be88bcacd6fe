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
        ToolUse("c1", "f", {"a": 1}, '{"a": 1}'),
        ToolUse("c", "g", None, "{"),
        Done(StopReason.TOOL_USE, Usage(3, 4, 1), Timings(0.1, 0.5, 20.0), "m1"),
    ],
)
def test_event_frames_round_trip(event) -> None:
    frame = wire.event_frame("r1", event)
    assert frame["id"] == "r1"
    if isinstance(event, Done):
        assert frame["type"] == "done"
        assert set(frame) == {"type", "id", "stop_reason", "usage", "timings", "backend"}
    else:
        assert frame["type"] == "frame" and frame["block"]["type"] in (
            "text",
            "thinking",
            "tool_use",
        )
    assert wire.event_from_frame(wire.decode(wire.encode(frame))) == event


def test_unexpected_frame_is_internal_error() -> None:
    with pytest.raises(InternalError):
        wire.event_from_frame({"type": "bogus"})
    with pytest.raises(InternalError):
        wire.event_from_frame({"type": "frame", "block": {"type": "nope"}})


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
