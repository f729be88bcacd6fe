"""Tokenizer and rerank requests through the daemon (issue 19): ``inferd.Client``
implements ``tokenize``, ``token_pieces``, ``detokenize``, ``apply_template`` and
``rerank`` over the NDJSON wire (``inferd.serve.token_wire``), so a bridge in front of a
daemon answers ``/tokenize``, ``/detokenize``, ``/apply-template`` and ``/v1/rerank``
exactly as a bridge over the model itself.

The daemon runs in-process on a real Unix socket over a real ``LlamaCpp`` (SmolLM2, and
the synthetic reranker of ``bench/synth_reranker.py``); the bridges are aiohttp test
servers on 127.0.0.1. Hostile frames (ADR 0010) are sent raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from inferd.backend import Backend
from inferd.backends.mock import Mock
from inferd.errors import EmbedUnsupported, InternalError, InvalidRequest, NotReady
from inferd.serve import token_wire, wire
from inferd.serve.bridge import make_app
from inferd.serve.client import Client
from inferd.serve.daemon import Daemon
from inferd.types import MAX_RERANK_DOCUMENTS, Request, RerankRequest

from .conftest import require_llama_core
from .serve_helpers import RawConn, short_tmpdir

pytestmark = [pytest.mark.llama]

#: BOS handling, special tokens, multi-byte characters split across tokens, whitespace.
TEXTS = [
    "Hello, world!",
    "<|im_start|>user\nHi<|im_end|>",
    "naïve café — 東京 🦙🦙",
    "  spaces\t\tand\nnewlines  ",
    "",
]
QUERY = "what is the capital of france"
DOCS = ["paris is the capital of france", "dogs eat food", "a cat is a pet", "zzz 123"]


class _KeepOpen(Backend):
    """Serves ``inner`` without closing it: the daemon closes its backend on exit, and
    the module's model outlives each test's daemon."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name

    def ready(self) -> bool:
        return self.inner.ready()

    def capabilities(self) -> Any:
        return self.inner.capabilities()

    def generate(self, request: Request) -> Any:
        return self.inner.generate(request)

    async def tokenize(self, content: Any, **kw: Any) -> list[int]:
        return await self.inner.tokenize(content, **kw)

    async def token_pieces(self, tokens: list[int]) -> list[bytes]:
        return await self.inner.token_pieces(tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        return await self.inner.detokenize(tokens)

    async def apply_template(self, request: Request) -> str:
        return await self.inner.apply_template(request)

    async def rerank(self, request: RerankRequest) -> Any:
        return await self.inner.rerank(request)


@contextlib.asynccontextmanager
async def daemon_client(backend: Backend) -> AsyncIterator[tuple[Client, Path]]:
    """A daemon serving ``backend`` and a connected ``Client``; yields (client, socket)."""
    with short_tmpdir() as d:
        daemon = Daemon(_KeepOpen(backend), d / "infer.sock")
        await daemon.start()
        try:
            async with Client(d / "infer.sock") as client:
                await client.connect()
                yield client, d / "infer.sock"
        finally:
            await daemon.drain()
            await daemon.close()


@pytest.fixture(scope="module")
def llama(smollm2_path: Path) -> Iterator[Any]:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=512, n_threads=2)
    yield b
    b.close()


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_llama_core()
    from bench.synth_reranker import write

    from inferd.backends.llamacpp import LlamaCpp

    path = write(tmp_path_factory.mktemp("rerank") / "rerank.gguf")
    b = LlamaCpp(path, n_ctx=512, n_threads=2, parallel=1)
    yield b
    b.close()


async def _post(tc: TestClient, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    r = await tc.post(path, json=body)
    return r.status, await r.json()


async def test_bridge_over_daemon_answers_as_bridge_over_model(llama):
    bodies: list[tuple[str, dict[str, Any]]] = []
    for text in TEXTS:
        for add_special in (False, True):
            bodies.append(("/tokenize", {"content": text, "add_special": add_special}))
        bodies.append(("/tokenize", {"content": text, "parse_special": False}))
        bodies.append(("/tokenize", {"content": text, "with_pieces": True}))
        toks = await llama.tokenize(text)
        bodies.append(("/detokenize", {"tokens": toks}))
    bodies.append(("/tokenize", {"content": ["Hi", 1, " there", 2], "add_special": True}))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    bodies.append(("/apply-template", {"messages": msgs}))
    async with daemon_client(llama) as (client, _):
        async with (
            TestClient(TestServer(make_app(llama), host="127.0.0.1")) as direct,
            TestClient(TestServer(make_app(client), host="127.0.0.1")) as via,
        ):
            for path, body in bodies:
                want = await _post(direct, path, body)
                assert want[0] == 200, (path, body, want)
                assert await _post(via, path, body) == want, (path, body)


async def test_client_methods_equal_the_models_and_pieces_keep_their_bytes(llama):
    async with daemon_client(llama) as (client, _):
        assert client.capabilities().tokenize is True
        assert client.capabilities().rerank is False
        for text in TEXTS:
            toks = await client.tokenize(text, add_special=True)
            assert toks == await llama.tokenize(text, add_special=True)
            assert await client.detokenize(toks) == await llama.detokenize(toks)
            assert await client.token_pieces(toks) == await llama.token_pieces(toks)
        # the emoji splits into byte pieces that are not UTF-8 alone: the wire keeps them
        pieces = await client.token_pieces(await llama.tokenize("🦙"))
        assert any(_not_utf8(p) for p in pieces) and b"".join(pieces) == "🦙".encode()
        req = Request.chat("Hi", system="Be brief.")
        assert await client.apply_template(req) == await llama.apply_template(req)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


async def test_backend_errors_come_back_and_the_client_goes_on(llama):
    async with daemon_client(llama) as (client, _):
        with pytest.raises(InvalidRequest, match="token"):
            await client.detokenize([10**9])  # a valid id on the wire, not in the vocabulary
        with pytest.raises(EmbedUnsupported, match="reranker"):  # the model's own refusal
            await client.rerank(RerankRequest("q", ("d",)))
        assert await client.detokenize(await client.tokenize("ok")) == "ok"


async def test_rerank_through_the_daemon_equals_the_model(reranker):
    direct = await reranker.rerank(RerankRequest(QUERY, tuple(DOCS)))
    async with daemon_client(reranker) as (client, _):
        assert client.capabilities().rerank is True
        got = await client.rerank(RerankRequest(QUERY, tuple(DOCS), top_n=2))
        assert got.scores == pytest.approx(direct.scores, rel=1e-6)
        assert got.usage.input_tokens == direct.usage.input_tokens > 0
        assert got.model == direct.model
        body = {"model": "r", "query": QUERY, "documents": DOCS, "top_n": 3}
        async with (
            TestClient(TestServer(make_app(reranker), host="127.0.0.1")) as d,
            TestClient(TestServer(make_app(client), host="127.0.0.1")) as via,
        ):
            s1, want = await _post(d, "/v1/rerank", body)
            s2, out = await _post(via, "/v1/rerank", body)
    assert s1 == s2 == 200 and len(out["results"]) == 3
    assert [x["index"] for x in out["results"]] == [x["index"] for x in want["results"]]
    for a, b in zip(out["results"], want["results"], strict=True):
        assert a["relevance_score"] == pytest.approx(b["relevance_score"], rel=1e-6)


async def test_daemon_without_tokenizer_is_a_clear_400():
    async with daemon_client(Mock(["ok"])) as (client, _):
        assert client.capabilities().tokenize is False
        async with TestClient(TestServer(make_app(client), host="127.0.0.1")) as tc:
            for path, body in (
                ("/tokenize", {"content": "hi"}),
                ("/detokenize", {"tokens": [1]}),
                ("/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
                ("/v1/rerank", {"query": "q", "documents": ["d"]}),
            ):
                status, out = await _post(tc, path, body)
                assert status == 400, path
                assert "does not rerank" in out["error"]["message"] or (
                    "no tokenizer" in out["error"]["message"]
                ), path


#: Hostile frames (ADR 0010): each refused with a message naming what was wrong.
BAD_FRAMES = [
    ({"type": "tokenize", "content": 5}, "content"),
    ({"type": "tokenize", "content": ["x", True]}, "content"),
    ({"type": "tokenize", "content": ["x", 1.5]}, "content"),
    ({"type": "tokenize", "content": "x", "add_special": "yes"}, "add_special"),
    ({"type": "tokenize", "content": "x", "with_pieces": True}, "with_pieces"),
    ({"type": "token_pieces"}, "tokens"),
    ({"type": "token_pieces", "tokens": "abc"}, "tokens"),
    ({"type": "detokenize", "tokens": [1, "2"]}, "tokens"),
    ({"type": "detokenize", "tokens": [-1]}, "tokens"),
    ({"type": "detokenize", "tokens": [2**31]}, "tokens"),
    ({"type": "detokenize", "tokens": [False]}, "tokens"),
    ({"type": "apply_template", "messages": "hi"}, "messages"),
    ({"type": "rerank", "documents": ["a"]}, "query"),
    ({"type": "rerank", "query": "q", "documents": "a"}, "documents"),
    ({"type": "rerank", "query": "q", "documents": []}, "documents"),
    ({"type": "rerank", "query": "q", "documents": ["a", 3]}, "documents"),
    ({"type": "rerank", "query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"type": "rerank", "query": "q", "documents": ["d"] * (MAX_RERANK_DOCUMENTS + 1)}, "MAX_"),
    ({"type": "rerank", "query": "q", "documents": ["a"], "texts": []}, "texts"),
]


async def test_bad_frames_are_refused_by_name_and_the_connection_goes_on():
    async with daemon_client(Mock(["ok"])) as (_, sock):
        conn = await RawConn.open(sock)
        try:
            for i, (frame, named) in enumerate(BAD_FRAMES):
                await conn.send({**frame, "id": i})
                reply = await conn.recv()
                assert reply["id"] == i and reply["type"] == "error", frame
                assert reply["code"] == wire.INVALID_REQUEST, frame
                assert named in reply["message"], (frame, reply["message"])
            await conn.send({"type": "capabilities", "id": "after"})
            assert (await conn.recv())["type"] == "capabilities"
        finally:
            await conn.close()


async def test_token_count_limit_on_both_sides(monkeypatch):
    monkeypatch.setattr(token_wire, "MAX_WIRE_TOKENS", 3)
    async with daemon_client(Mock(["ok"])) as (client, sock):
        conn = await RawConn.open(sock)
        try:
            for i, frame in enumerate(
                [
                    {"type": "detokenize", "tokens": [1, 2, 3, 4]},
                    {"type": "tokenize", "content": ["a", 1, "b", 2]},
                ]
            ):
                await conn.send({**frame, "id": i})
                reply = await conn.recv()
                assert reply["type"] == "error" and "MAX_WIRE_TOKENS" in reply["message"]
        finally:
            await conn.close()
        with pytest.raises(InvalidRequest, match="MAX_WIRE_TOKENS"):  # refused before sending
            await client.detokenize([1, 2, 3, 4])


async def test_tokenize_text_size_limit(monkeypatch):
    monkeypatch.setattr(token_wire, "MAX_TOKENIZE_BYTES", 8)
    async with daemon_client(Mock(["ok"])) as (client, sock):
        conn = await RawConn.open(sock)
        try:
            for i, content in enumerate(["123456789", ["1234", 7, "é" * 3], "é" * 5]):
                await conn.send({"type": "tokenize", "id": i, "content": content})
                reply = await conn.recv()
                assert reply["type"] == "error" and "MAX_TOKENIZE_BYTES" in reply["message"]
            # at the limit it passes the wire (this daemon's backend has no tokenizer)
            await conn.send({"type": "tokenize", "id": 9, "content": "é" * 4})
            assert "no tokenizer" in (await conn.recv())["message"]
        finally:
            await conn.close()
        with pytest.raises(InvalidRequest, match="MAX_TOKENIZE_BYTES"):  # refused before sending
            await client.tokenize("x" * 9)


def test_malformed_answers_from_a_daemon_are_internal_errors():
    with pytest.raises(InternalError, match="tokens"):
        token_wire.tokens_of({"tokens": [1, "x"]})
    with pytest.raises(InternalError, match="pieces"):
        token_wire.pieces_of({"pieces": ["a"]}, 2)
    with pytest.raises(InternalError, match="Latin-1"):
        token_wire.pieces_of({"pieces": ["東"]}, 1)
    with pytest.raises(InternalError, match="scores"):
        token_wire.rerank_result_of({"scores": [1.0, True]}, 2)
    with pytest.raises(InternalError, match="content"):
        token_wire.text_of({"content": 5}, "content")
    assert token_wire.pieces_of({"pieces": ["\xff\x00a"]}, 1) == [b"\xff\x00a"]


async def test_tokenizer_requests_while_loading_are_not_ready():
    """While the backends load, a tokenizer or rerank request is told to retry, not that
    there is no tokenizer (the capability may well come with the model)."""
    gate = threading.Event()

    def loader(progress: Any) -> Backend:
        gate.wait(10)
        return Mock(["x"])

    with short_tmpdir() as d:
        daemon = Daemon(None, d / "infer.sock")
        task = asyncio.create_task(daemon.run(loader))
        try:
            for _ in range(200):
                if daemon.socket_path.exists():
                    break
                await asyncio.sleep(0.05)
            async with Client(d / "infer.sock") as client:
                for call in (
                    client.tokenize("hi"),
                    client.token_pieces([1]),
                    client.detokenize([1]),
                    client.apply_template(Request.chat("hi")),
                    client.rerank(RerankRequest("q", ("d",))),
                ):
                    with pytest.raises(NotReady, match="still loading"):
                        await call
        finally:
            gate.set()
            os.kill(os.getpid(), signal.SIGTERM)  # run() stops on SIGTERM, as in the CLI
            await asyncio.wait_for(task, 30)
