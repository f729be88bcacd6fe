"""``LlamaCpp.embed``: pooling types, many inputs per decode, Matryoshka ``dimensions``
(issue 19; docs/adr/0018-embeddings-rerank-tokens.md). Real SmolLM2, real libllama."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inferd.backends.llamacpp import embedding
from inferd.errors import EmbedUnsupported, InvalidRequest
from inferd.types import EmbedRequest

from .conftest import require_llama_core

pytestmark = [pytest.mark.llama]

TEXTS = (
    "The cat sat on the mat.",
    "hello",
    "Paris is the capital of France, on the Seine.",
    "naïve café 🦙",
    "a",
    "Embeddings of several inputs share one decode.",
)
#: Largest per-component difference allowed between a batched and a one-by-one
#: vector (unit vectors; the only difference is float summation order).
TOLERANCE = 1e-4
#: Least cosine similarity between a vector from a decode of 64 sequences and the
#: one-by-one vector: a batch of that many tokens takes other ggml CPU kernels for the
#: quantized matmuls (measured: cosine > 0.9999, components within ~3e-3).
COSINE_FLOOR = 0.999


def _open(path: Path, **kw: Any) -> Any:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    # one thread: the suite's machines are shared, and ggml's spinning barriers make
    # two threads on a loaded 2-core box many times slower than one
    return LlamaCpp(path, n_ctx=512, n_threads=1, parallel=1, embed_n_ctx=512, **kw)


@pytest.fixture(scope="module")
def mean(smollm2_path: Path) -> Iterator[Any]:
    b = _open(smollm2_path, embed=True)
    yield b
    b.close()


def _close(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


async def test_batched_equals_one_by_one(mean):
    together = await mean.embed(EmbedRequest(TEXTS))
    assert len(together.embeddings) == len(TEXTS)
    assert together.dimensions == mean.model.n_embd
    for text, vec in zip(TEXTS, together.embeddings, strict=True):
        alone = (await mean.embed(EmbedRequest((text,)))).embeddings[0]
        assert _close(vec, alone) < TOLERANCE, text
        assert math.isclose(sum(x * x for x in vec), 1.0, rel_tol=1e-4)
    # different texts give different vectors (the batch did not mix them up)
    assert _close(together.embeddings[0], together.embeddings[1]) > 0.01


async def test_inputs_are_packed_into_few_decodes(mean):
    await mean.embed(EmbedRequest(("warm",)))
    e = mean._ectx
    seqs = [mean.model.tokenize(t) for t in TEXTS]
    assert e._groups(seqs) == [list(range(len(TEXTS)))]  # one decode for all six
    many = [[1, 2, 3]] * (embedding.DEFAULT_EMBED_SEQS + 1)
    assert [len(g) for g in e._groups(many)] == [embedding.DEFAULT_EMBED_SEQS, 1]
    long = [[1] * (e.batch.capacity // 2 + 1)] * 3  # two never fit one batch
    assert [len(g) for g in e._groups(long)] == [1, 1, 1]


async def test_more_inputs_than_one_decode_holds(mean):
    texts = tuple(f"llama {i}" for i in range(embedding.DEFAULT_EMBED_SEQS + 2))
    res = await mean.embed(EmbedRequest(texts))
    assert len(res.embeddings) == len(texts)
    for i in (0, 63, 64, 65):
        alone = (await mean.embed(EmbedRequest((texts[i],)))).embeddings[0]
        cos = sum(x * y for x, y in zip(res.embeddings[i], alone, strict=True))
        assert cos > COSINE_FLOOR, i
    assert res.usage.input_tokens == sum(len(mean.model.tokenize(t)) for t in texts)


@pytest.mark.parametrize("pooling", ["cls", "last"])
async def test_each_sentence_pooling(smollm2_path, mean, pooling):
    b = _open(smollm2_path, pooling=pooling)
    try:
        assert b.capabilities().embed and not b.capabilities().rerank
        texts = (TEXTS[0], TEXTS[2], TEXTS[5])  # several tokens each: poolings differ
        res = await b.embed(EmbedRequest(texts))
        assert b._ectx.ctx.pooling == pooling
        ref = (await mean.embed(EmbedRequest(texts))).embeddings
        assert all(_close(v, r) > 0.01 for v, r in zip(res.embeddings, ref, strict=True))
        for text, vec in zip(texts, res.embeddings, strict=True):
            alone = (await b.embed(EmbedRequest((text,)))).embeddings[0]
            assert _close(vec, alone) < TOLERANCE
    finally:
        b.close()


async def test_pooling_none_gives_one_vector_per_token(smollm2_path):
    b = _open(smollm2_path, pooling="none", embed=True)
    try:
        vecs = await b.embed_tokens("The cat sat")
        assert len(vecs) == len(b.model.tokenize("The cat sat"))
        assert all(len(v) == b.model.n_embd for v in vecs)
        with pytest.raises(EmbedUnsupported, match="embed_tokens"):
            await b.embed(EmbedRequest(("x",)))
    finally:
        b.close()


def test_pooling_option_is_validated(smollm2_path):
    with pytest.raises(InvalidRequest, match="pooling"):
        _open(smollm2_path, pooling="max")
    with pytest.raises(InvalidRequest, match="matryoshka_dims"):
        _open(smollm2_path, matryoshka_dims=[0])


async def test_dimensions_refused_without_matryoshka(mean):
    with pytest.raises(InvalidRequest, match="dimensions"):
        await mean.embed(EmbedRequest(("x",), dimensions=64))


async def test_dimensions_truncate_and_renormalise_with_matryoshka(smollm2_path, mean):
    b = _open(smollm2_path, embed=True, matryoshka_dims=(64, 256))
    try:
        full = (await mean.embed(EmbedRequest(TEXTS[:2]))).embeddings
        short = await b.embed(EmbedRequest(TEXTS[:2], dimensions=64))
        assert short.dimensions == 64
        for f, s in zip(full, short.embeddings, strict=True):
            norm = math.sqrt(sum(x * x for x in f[:64]))
            assert _close([x / norm for x in f[:64]], s) < TOLERANCE
        with pytest.raises(InvalidRequest, match="dimensions=100 must be one of"):
            await b.embed(EmbedRequest(("x",), dimensions=100))
        with pytest.raises(InvalidRequest, match="dimensions"):
            await b.embed(EmbedRequest(("x",), dimensions=4096))
    finally:
        b.close()


async def test_empty_and_too_long_inputs_name_the_input(mean):
    with pytest.raises(InvalidRequest, match=r"input\[1\] is empty"):
        await mean.embed(EmbedRequest(("ok", "")))
    with pytest.raises(InvalidRequest, match=r"input\[0\] is .* tokens"):
        await mean.embed(EmbedRequest(("word " * 5000,)))


def test_chat_model_is_not_an_embedding_model_by_default(smollm2_path):
    b = _open(smollm2_path)
    try:
        caps = b.capabilities()
        assert not caps.embed and not caps.rerank and caps.tokenize
    finally:
        b.close()
