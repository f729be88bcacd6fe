"""``/tokenize``, ``/detokenize``, ``/apply-template`` on the bridge over ``LlamaCpp``,
checked against llama-server's own endpoints on the same SmolLM2 file (issue 19).

The bridge runs in-process over a real ``LlamaCpp`` (aiohttp's test server on
127.0.0.1); llama-server is the vendored build (``tests/test_llama_server.py``).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from inferd.backends.mock import Mock
from inferd.serve.bridge import make_app
from inferd.serve.token_routes import MAX_TOKENS_PER_REQUEST

from .conftest import require_llama_core
from .test_llama_server import _serve, llama_server_bin  # noqa: F401 - fixture

pytestmark = [pytest.mark.llama]

#: Inputs that exercise BOS handling, special-token parsing, multi-byte characters
#: split across tokens and whitespace runs.
TEXTS = [
    "Hello, world!",
    "<|im_start|>user\nHi<|im_end|>",
    "naïve café — 東京 🦙🦙",
    "  spaces\t\tand\nnewlines  ",
    "",
]


@pytest.fixture(scope="module")
def llama(smollm2_path: Path) -> Iterator[Any]:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=512, n_threads=2)
    yield b
    b.close()


@pytest.fixture
async def bridge(llama: Any) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(llama), host="127.0.0.1")) as tc:
        yield tc


@pytest.fixture(scope="module")
def server(llama_server_bin: Path, smollm2_path: Path) -> Iterator[str]:  # noqa: F811
    with _serve(llama_server_bin, smollm2_path) as url:
        yield url


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:  # loopback only
        return json.loads(r.read())


async def _ours(bridge: TestClient, path: str, body: dict[str, Any]) -> Any:
    r = await bridge.post(path, json=body)
    assert r.status == 200, await r.text()
    return await r.json()


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("add_special", [False, True])
@pytest.mark.parametrize("parse_special", [False, True])
async def test_tokenize_equals_llama_server(bridge, server, add_special, parse_special):
    for text in TEXTS:
        body = {"content": text, "add_special": add_special, "parse_special": parse_special}
        theirs = _post(server, "/tokenize", body)
        ours = await _ours(bridge, "/tokenize", body)
        assert ours == theirs, text


@pytest.mark.server
@pytest.mark.slow
async def test_pieces_mixed_content_and_detokenize_equal_llama_server(bridge, server):
    for text in TEXTS:
        body = {"content": text, "with_pieces": True}
        assert await _ours(bridge, "/tokenize", body) == _post(server, "/tokenize", body)
    mixed = {"content": ["Hi", 1, " there", 2], "add_special": True}
    assert await _ours(bridge, "/tokenize", mixed) == _post(server, "/tokenize", mixed)
    for text in TEXTS:
        toks = _post(server, "/tokenize", {"content": text})["tokens"]
        body = {"tokens": toks}
        ours = await _ours(bridge, "/detokenize", body)
        assert ours == _post(server, "/detokenize", body)
        assert ours["content"] == text  # SmolLM2's byte-level BPE round-trips


@pytest.mark.server
@pytest.mark.slow
async def test_apply_template_equals_llama_server(bridge, server):
    body = {
        "messages": [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you?"},
        ]
    }
    ours = await _ours(bridge, "/apply-template", body)
    assert ours == _post(server, "/apply-template", body)
    assert ours["prompt"].endswith("<|im_start|>assistant\n")


async def test_backend_methods_agree_with_routes(bridge, llama):
    toks = await llama.tokenize("Hello <|im_end|>", add_special=False)
    assert toks == (await _ours(bridge, "/tokenize", {"content": "Hello <|im_end|>"}))["tokens"]
    assert await llama.detokenize(toks) == "Hello <|im_end|>"
    assert llama.capabilities().tokenize is True
    pieces = await llama.token_pieces(toks)
    assert b"".join(pieces) == b"Hello <|im_end|>"


async def test_bad_bodies_are_400_naming_the_field(bridge):
    cases = [
        ("/tokenize", {"content": 5}, "content"),
        ("/tokenize", {"content": "x", "add_special": "yes"}, "add_special"),
        ("/tokenize", {"content": ["x", True]}, "content"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {"tokens": [1, "2"]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "token"),
        ("/apply-template", {"messages": "hi"}, "messages"),
    ]
    for path, body, field in cases:
        r = await bridge.post(path, json=body)
        assert r.status == 400, (path, body)
        assert field in (await r.json())["error"]["message"], (path, body)


async def test_token_count_limit(bridge, monkeypatch):
    from inferd.serve import token_routes

    monkeypatch.setattr(token_routes, "MAX_TOKENS_PER_REQUEST", 3)
    r = await bridge.post("/detokenize", json={"tokens": [1, 2, 3, 4]})
    assert r.status == 400
    assert "MAX_TOKENS_PER_REQUEST" in (await r.json())["error"]["message"]
    assert MAX_TOKENS_PER_REQUEST >= 100_000  # the default allows a long prompt


async def test_backend_without_tokenizer_answers_400():
    mock = Mock(["ok"])
    assert mock.capabilities().tokenize is False
    async with TestClient(TestServer(make_app(mock), host="127.0.0.1")) as tc:
        for path, body in (
            ("/tokenize", {"content": "hi"}),
            ("/detokenize", {"tokens": [1]}),
            ("/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
        ):
            r = await tc.post(path, json=body)
            assert r.status == 400, path
            assert "no tokenizer" in (await r.json())["error"]["message"]
