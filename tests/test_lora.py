"""LoRA adapters (docs/adr/0026-grammar-fast-path-and-context-knobs.md) on SmolLM2 with a
synthetic adapter written by bench/synth_lora.py: scale 0 is the base model, a non-zero
scale changes the output; files libllama refuses come back as ModelLoadError naming the
file; a request's ``lora`` sets its own scales (tests/test_lora_batching.py has them
under batching) and names only loaded adapters, else ``InvalidRequest`` naming ``lora``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from inferd.errors import InvalidRequest, ModelLoadError
from inferd.types import Message, Request, Text

from .conftest import missing, require_llama_core

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def L():
    try:
        from inferd._fast import _llama
    except ImportError as e:
        missing(f"the compiled llama.cpp core inferd._fast._llama ({e})")
    return _llama


@pytest.fixture(scope="module")
def adapters(smollm2_path, tmp_path_factory) -> dict[str, Path]:
    """The adapter for SmolLM2, one written for another architecture."""
    try:
        from bench.synth_lora import write_lora
    except ImportError as e:
        missing(f"bench/synth_lora.py and llama.cpp's gguf-py ({e})")
    d = tmp_path_factory.mktemp("lora")
    return {
        "good": write_lora(smollm2_path, d / "lora.gguf"),
        "gpt2": write_lora(smollm2_path, d / "gpt2.gguf", arch="gpt2"),
    }


@pytest.fixture(scope="module")
def model(L, smollm2_path):
    m = L.Model(str(smollm2_path))
    yield m
    m.close()


def _logits(L, model, adapter, scale: float) -> list[float]:
    ctx = L.Context(model, n_threads=1, n_ctx=256, n_batch=64)
    try:
        if adapter is not None:
            L.set_lora(ctx, [adapter], [scale])
        toks = model.tokenize(
            "<|im_start|>user\nHi<|im_end|>\n", add_special=False, parse_special=True
        )
        b = L.Batch(64)
        last = b.add_sequence(toks, 0, 0)
        ctx.decode(b)
        return list(ctx.logits(last))
    finally:
        ctx.close()


def test_scale_zero_is_the_base_model_and_a_scale_changes_it(L, model, adapters):
    a = L.LoraAdapter(model, adapters["good"])
    assert a.meta("adapter.type") == "lora" and a.meta("no.such.key") is None
    base = _logits(L, model, None, 0.0)
    assert _logits(L, model, a, 0.0) == base
    changed = _logits(L, model, a, 1.0)
    assert max(abs(x - y) for x, y in zip(base, changed, strict=True)) > 1e-2


def test_files_libllama_refuses_are_named(L, model, adapters, smollm2_path):
    with pytest.raises(ModelLoadError, match=r"gpt2\.gguf.*arch"):
        L.LoraAdapter(model, adapters["gpt2"])
    with pytest.raises(ModelLoadError, match="adapter"):  # a model, not an adapter
        L.LoraAdapter(model, smollm2_path)
    with pytest.raises(ValueError, match="scales"):
        L.set_lora(L.Context(model, n_ctx=64), [L.LoraAdapter(model, adapters["good"])], [])


def _backend(path, **kw):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    return LlamaCpp(path, n_ctx=512, n_threads=1, parallel=1, **kw)


async def _text(b, **kw) -> str:
    req = Request(messages=(Message.user("Name a colour."),), max_tokens=10, temperature=0.0, **kw)
    return "".join([e.text async for e in b.generate(req) if isinstance(e, Text)])


def test_llamacpp_loads_adapters_at_start(smollm2_path, adapters, tmp_path):
    base = _backend(smollm2_path)
    try:
        want = asyncio.run(_text(base))
    finally:
        base.close()
    zero = _backend(smollm2_path, lora=[(str(adapters["good"]), 0.0)])
    try:
        assert asyncio.run(_text(zero)) == want
        # the model's own scales: nothing to change
        assert asyncio.run(_text(zero, lora={0: 0.0})) == want
        # other scales: the reply of a model loaded with them (lora_groups.py)
        boosted = asyncio.run(_text(zero, lora={0: 8.0}))
        with pytest.raises(InvalidRequest, match="lora: no adapter"):
            asyncio.run(_text(zero, lora={3: 0.0}))
    finally:
        zero.close()
    strong = _backend(smollm2_path, lora=[(str(adapters["good"]), 8.0)])
    try:
        assert asyncio.run(_text(strong)) == boosted != want
        assert asyncio.run(_text(strong, lora=[])) == want  # unnamed adapters are off
    finally:
        strong.close()
    for path, match in (
        (tmp_path / "absent.gguf", r"absent\.gguf.*does not exist"),
        (adapters["gpt2"], "gpt2.gguf"),
    ):
        with pytest.raises(ModelLoadError, match=match):
            _backend(smollm2_path, lora=[(str(path), 1.0)])


def test_request_lora_field_parses_and_round_trips():
    r = Request(messages=(Message.user("x"),), lora=[{"id": 0, "scale": 0.5}])
    assert dict(r.lora) == {0: 0.5}
    assert Request.from_dict(r.to_dict()).lora == r.lora
    assert dict(Request(messages=(Message.user("x"),), lora={"1": 2}).lora) == {1: 2.0}
    for bad in ({0: float("nan")}, {-1: 1.0}, [{"scale": 1}], {0: "x"}, "a", {0: 1000.0}):
        with pytest.raises(InvalidRequest, match="lora"):
            Request(messages=(Message.user("x"),), lora=bad)


def test_backends_that_cannot_apply_lora_refuse_it():
    from inferd.anthropic_wire import request_to_anthropic
    from inferd.openai_wire import request_to_openai

    req = Request(messages=(Message.user("x"),), lora={0: 1.0})
    with pytest.raises(InvalidRequest, match="lora"):
        request_to_openai(req)
    with pytest.raises(InvalidRequest, match="lora"):
        request_to_anthropic(req, model="m")
