"""Reranking: ``LlamaCpp.rerank`` and the bridge's ``/v1/rerank`` on a synthetic BERT
cross-encoder (``bench/synth_reranker.py``), checked against ``llama-server
--reranking`` on the same file (issue 19)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from inferd.errors import EmbedUnsupported, InvalidRequest
from inferd.serve.bridge import make_app
from inferd.types import MAX_RERANK_DOCUMENTS, RerankRequest, RerankResult

from .conftest import require_llama_core
from .test_llama_server import _serve, llama_server_bin  # noqa: F401 - fixture

pytestmark = [pytest.mark.llama]

QUERY = "what is the capital of france"
DOCS = [
    "paris is the capital of france",
    "dogs eat food",
    "the river in berlin",
    "a cat is a pet",
    "Paris, France: capital city!",
    "zzz qqq 123",
]
#: Relative tolerance on scores. Both runtimes run the same graph, but how many tokens
#: share a decode picks ggml's CPU kernels (a batch of 64+ tokens takes another matmul
#: and GELU path), which moves this random-weight model's logits by up to ~0.1%.
TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.synth_reranker import write

    return write(tmp_path_factory.mktemp("rerank") / "rerank.gguf")


@pytest.fixture(scope="module")
def reranker(reranker_path: Path) -> Iterator[Any]:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(reranker_path, n_ctx=512, n_threads=2, parallel=1)
    yield b
    b.close()


@pytest.fixture
async def bridge(reranker: Any) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(reranker), host="127.0.0.1")) as tc:
        yield tc


@pytest.fixture(scope="module")
def server(llama_server_bin: Path, reranker_path: Path) -> Iterator[str]:  # noqa: F811
    with _serve(llama_server_bin, reranker_path, "--reranking") as url:
        yield url


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:  # loopback only
        return json.loads(r.read())


async def test_reranker_capabilities_and_scores(reranker):
    caps = reranker.capabilities()
    assert caps.rerank and not caps.embed
    res = await reranker.rerank(RerankRequest(QUERY, tuple(DOCS)))
    assert isinstance(res, RerankResult) and len(res.scores) == len(DOCS)
    assert len(set(res.scores)) == len(DOCS)  # random weights still separate the inputs
    assert res.usage.input_tokens > len(DOCS)
    # One pair at a time gives the same score as the batched call.
    for i in (0, 3):
        one = await reranker.rerank(RerankRequest(QUERY, (DOCS[i],)))
        assert one.scores[0] == pytest.approx(res.scores[i], rel=TOLERANCE)


@pytest.mark.server
@pytest.mark.slow
async def test_scores_equal_llama_server(bridge, server):
    body = {"query": QUERY, "documents": DOCS}
    theirs = _post(server, "/v1/rerank", body)
    r = await bridge.post("/v1/rerank", json=body)
    assert r.status == 200, await r.text()
    ours = await r.json()
    assert [x["index"] for x in ours["results"]] == [x["index"] for x in theirs["results"]]
    for a, b in zip(ours["results"], theirs["results"], strict=True):
        assert a["relevance_score"] == pytest.approx(b["relevance_score"], rel=TOLERANCE)
    assert ours["usage"]["prompt_tokens"] == theirs["usage"]["prompt_tokens"]


@pytest.mark.server
@pytest.mark.slow
async def test_top_n_equals_llama_server(bridge, server):
    body = {"query": "dogs", "documents": DOCS, "top_n": 2}
    theirs = _post(server, "/v1/rerank", body)
    ours = await (await bridge.post("/v1/rerank", json=body)).json()
    assert len(ours["results"]) == 2
    assert [x["index"] for x in ours["results"]] == [x["index"] for x in theirs["results"]]


async def test_bridge_shape_and_return_documents(bridge, reranker):
    body = {"model": "r", "query": QUERY, "documents": DOCS, "return_documents": True}
    r = await bridge.post("/v1/rerank", json=body)
    out = await r.json()
    assert r.status == 200 and out["object"] == "list" and out["model"] == "r"
    scores = [x["relevance_score"] for x in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(x["document"]["text"] == DOCS[x["index"]] for x in out["results"])
    direct = await reranker.rerank(RerankRequest(QUERY, tuple(DOCS)))
    assert [i for i, _ in direct.ranked()] == [x["index"] for x in out["results"]]


async def test_bad_rerank_bodies_are_400_naming_the_field(bridge):
    cases = [
        ({"documents": ["a"]}, "query"),
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": "a"}, "documents"),
        ({"query": "q", "documents": ["a", 3]}, "documents"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["a"], "texts": ["b"]}, "texts"),
        ({"query": 7, "documents": ["a"]}, "query"),
    ]
    for body, field in cases:
        r = await bridge.post("/v1/rerank", json=body)
        assert r.status == 400, body
        assert field in (await r.json())["error"]["message"], body


def test_rerank_request_document_limit():
    RerankRequest("q", ("d",) * MAX_RERANK_DOCUMENTS)
    with pytest.raises(InvalidRequest, match="MAX_RERANK_DOCUMENTS"):
        RerankRequest("q", ("d",) * (MAX_RERANK_DOCUMENTS + 1))


async def test_pair_too_long_is_refused(reranker):
    with pytest.raises(InvalidRequest, match=r"documents\[1\]"):
        await reranker.rerank(RerankRequest("q", ("short", "word " * 2000)))


async def test_chat_model_does_not_rerank(smollm2_path):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=512, n_threads=2, parallel=1)
    try:
        assert b.capabilities().rerank is False
        with pytest.raises(EmbedUnsupported, match="not a reranker"):
            await b.rerank(RerankRequest("q", ("d",)))
        async with TestClient(TestServer(make_app(b), host="127.0.0.1")) as tc:
            r = await tc.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
            assert r.status == 400
    finally:
        b.close()


async def test_backend_without_reranker_answers_400():
    from inferd.backends.mock import Mock

    mock = Mock(["ok"])
    assert mock.capabilities().rerank is False
    with pytest.raises(EmbedUnsupported, match="does not rerank"):
        await mock.rerank(RerankRequest("q", ("d",)))
    async with TestClient(TestServer(make_app(mock), host="127.0.0.1")) as tc:
        r = await tc.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        assert r.status == 400
        assert "does not rerank" in (await r.json())["error"]["message"]
