"""``type = "anthropic"`` in the daemon's TOML and ``inferd run --backend anthropic``,
against the scripted Messages upstream (tests/anthropic_upstream.py) on 127.0.0.1:
the key comes only from a named environment variable and never shows."""

from __future__ import annotations

import asyncio
import os
import sys
import tomllib
from pathlib import Path

import orjson
import pytest

from inferd.backends.anthropic_compat import AnthropicCompat
from inferd.serve.config import ConfigError, build_backends, parse_config
from inferd.types import Request, Response

from .anthropic_upstream import (
    SIG,
    Stream,
    Upstream,
    anthropic_error,
    signed_reply,
    stream,
    text_block,
)

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = "sk-ant-config-SECRET-0123456789"
KEY_VARS = ("INFERD_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")


@pytest.fixture
async def up():
    u = await Upstream().start()
    yield u
    await u.stop()


def _toml(url: str, key_line: str) -> str:
    return f"""
[[backend]]
type = "anthropic"
base_url = "{url}"
model = "claude-test"
{key_line}
"""


async def test_config_builds_anthropic_with_the_key_from_a_named_variable(up, monkeypatch) -> None:
    monkeypatch.setenv("MY_ANTHROPIC_KEY", KEY)
    up.script("cfg", Stream(stream(text_block(0, ["hi"]))))
    cfg = parse_config(tomllib.loads(_toml(up.url("cfg"), 'api_key_env = "MY_ANTHROPIC_KEY"')))
    assert KEY not in repr(cfg.backends[0])
    (backend,) = build_backends(cfg)
    assert isinstance(backend, AnthropicCompat) and KEY not in repr(backend)
    try:
        reply = Response.collect([e async for e in backend.generate(Request.chat("hi"))])
    finally:
        await backend.aclose()
    assert reply.text == "hi" and reply.done.backend == "anthropic_compat"
    got = up.requests("cfg")[0]
    assert got.path == "/s/cfg/v1/messages" and got.headers["x-api-key"] == KEY
    assert got.body["model"] == "claude-test"


def test_config_refuses_an_inline_key_and_names_a_missing_variable(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="api_key in the file") as info:
        parse_config(tomllib.loads(_toml("http://127.0.0.1:9", f'api_key = "{KEY}"')))
    assert KEY not in str(info.value)
    monkeypatch.delenv("NO_SUCH_ANTHROPIC_KEY", raising=False)
    cfg = parse_config(
        tomllib.loads(_toml("http://127.0.0.1:9", 'api_key_env = "NO_SUCH_ANTHROPIC_KEY"'))
    )
    with pytest.raises(ConfigError, match=r"NO_SUCH_ANTHROPIC_KEY .* is not set"):
        build_backends(cfg)


async def _inferd(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """``python -m inferd ARGS`` as a subprocess, without blocking the upstream's loop."""
    base = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "inferd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, "PYTHONPATH": str(SRC), **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_run_streams_from_a_messages_upstream(up) -> None:
    up.script("cli", Stream(signed_reply()), Stream(stream(text_block(0, ["Hello", " there"]))))
    url = up.url("cli")
    flags = ("run", "--backend", "anthropic", "--base-url", url, "--model", "claude-test")
    rc, out, err = await _inferd(*flags, "--json", "hi", env={"INFERD_ANTHROPIC_API_KEY": KEY})
    assert rc == 0, err
    events = [orjson.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events][-2:] == ["tool_use", "done"]
    assert {"type": "thinking", "text": "", "signature": SIG} in events  # the block's seal
    assert events[-1]["backend"] == "anthropic_compat"
    # plain output, and the key read from the second variable when the first is unset
    rc, out, err = await _inferd(*flags, "hi", env={"ANTHROPIC_API_KEY": KEY})
    assert rc == 0, err
    assert out.strip() == "Hello there" and "[anthropic_compat:" in err
    sent = up.requests("cli")
    assert [r.headers["x-api-key"] for r in sent] == [KEY, KEY]
    assert sent[0].body["model"] == "claude-test" and sent[0].body["max_tokens"] == 256
    assert KEY not in out + err


async def test_cli_run_refused_key_names_the_variables_on_one_line(up) -> None:
    up.script("nokey", anthropic_error(401, "authentication_error", "invalid x-api-key"))
    flags = ("run", "--backend", "anthropic", "--base-url", up.url("nokey"), "hi")
    rc, out, err = await _inferd(*flags, env={})
    assert rc == 1 and "Traceback" not in err and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("inferd: error:") and "HTTP 401" in line
    assert "INFERD_ANTHROPIC_API_KEY / ANTHROPIC_API_KEY" in line
    assert "x-api-key" not in up.requests("nokey")[0].headers  # no key: none sent
