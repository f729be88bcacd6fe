"""The context's knobs per model (docs/adr/0026-grammar-fast-path-and-context-knobs.md):
flash attention, KV cache types, batch sizes, KV offload, GPU split, mmap/mlock,
RoPE/YaRN; each checked with a clear error, each in the TOML config and on the command
line, and what libllama does with them on the real SmolLM2 model."""

from __future__ import annotations

import asyncio
import math

import pytest

from inferd.backends.llamacpp.options import KV_CACHE_TYPES, LlamaCppOptions
from inferd.errors import InvalidRequest
from inferd.types import Done, Message, Request, Text

from .conftest import missing, require_llama_core


def _opts(**kw) -> LlamaCppOptions:
    return LlamaCppOptions.from_kwargs(None, kw)


# ---------------------------------------------------------------- checks, no model


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"type_k": "q3_k"}, "type_k"),
        ({"type_v": "int8"}, "type_v"),
        ({"flash_attn": "yes"}, "flash_attn"),
        ({"split_mode": "tensor-ish"}, "split_mode"),
        ({"rope_scaling": "ntk"}, "rope_scaling"),
        ({"rope_freq_base": math.nan}, "rope_freq_base"),
        ({"rope_freq_scale": -1.0}, "rope_freq_scale"),
        ({"yarn_orig_ctx": -5}, "yarn_orig_ctx"),
        ({"n_ubatch": 0}, "n_ubatch"),
        ({"n_batch": 64, "n_ubatch": 128}, "n_ubatch"),
        ({"main_gpu": -1}, "main_gpu"),
        ({"offload_kqv": "no"}, "offload_kqv"),
        ({"use_mlock": 1}, "use_mlock"),
        ({"inline_steps": "auto"}, "inline_steps"),
        ({"lora": [("a.gguf", math.inf)]}, "lora"),
        ({"lora": [("a.gguf", 1.0, 2.0)]}, "lora"),
        ({"lora": [("a.gguf", 1000.0)]}, "MAX_LORA_SCALE"),
        ({"lora": [("", 1.0)]}, "lora"),
    ],
)
def test_a_bad_knob_is_refused_naming_it(kw, named):
    with pytest.raises(InvalidRequest, match=named):
        _opts(**kw)


@pytest.mark.parametrize("v", ["q8_0", "q4_0", "q5_1", "iq4_nl"])
def test_a_quantised_v_cache_needs_flash_attention(v):
    with pytest.raises(InvalidRequest, match="flash attention"):
        _opts(type_v=v, flash_attn="off")
    assert _opts(type_v=v, flash_attn="auto").type_v == v
    assert _opts(type_k=v, flash_attn="off").type_k == v  # a quantised K cache does not


def test_knobs_reach_the_context_as_named_and_defaults_stay_out():
    assert _opts().context_knobs() == {"flash_attn": "auto"}
    knobs = _opts(
        type_k="q8_0",
        type_v="q4_0",
        offload_kqv=False,
        rope_scaling="yarn",
        rope_freq_scale=0.25,
        yarn_orig_ctx=2048,
    ).context_knobs()
    assert knobs == {
        "flash_attn": "auto",
        "type_k": "q8_0",
        "type_v": "q4_0",
        "offload_kqv": False,
        "rope_scaling": "yarn",
        "rope_freq_scale": 0.25,
        "yarn_orig_ctx": 2048,
    }
    assert _opts(lora=["a.gguf", ("b.gguf", 0.5)]).lora == (("a.gguf", 1.0), ("b.gguf", 0.5))
    assert _opts(lora={"a.gguf": 2}).lora == (("a.gguf", 2.0),)


def test_toml_config_carries_the_knobs(tmp_path):
    from inferd.serve.config import load_config

    cfg_path = tmp_path / "inferd.toml"
    cfg_path.write_text(
        '[[backend]]\ntype = "llamacpp"\nmodel = "m.gguf"\nflash_attn = "on"\n'
        'type_k = "q8_0"\ntype_v = "q8_0"\nn_ubatch = 128\nrope_freq_base = 20000.0\n'
        'split_mode = "none"\nlora = [["a.gguf", 0.5]]\n'
    )
    cfg = load_config(cfg_path)
    options = dict(cfg.backends[0].options)
    options.pop("model")
    o = _opts(**options)
    assert (o.flash_attn, o.type_k, o.type_v, o.n_ubatch) == ("on", "q8_0", "q8_0", 128)
    assert (o.rope_freq_base, o.split_mode, o.lora) == (20000.0, "none", (("a.gguf", 0.5),))
    cfg_path.write_text('[[backend]]\ntype = "llamacpp"\nmodel = "m.gguf"\ntype_v = "q4_0"\n')
    bad = dict(load_config(cfg_path).backends[0].options)
    bad.pop("model")
    with pytest.raises(InvalidRequest, match="flash"):
        _opts(flash_attn="off", **bad)


def test_command_line_flags_set_the_knobs():
    from inferd.cli import backend_spec, build_parser
    from inferd.serve.config import BackendSpec, Config, llamacpp_overrides, override_llamacpp
    from inferd.serve.daemon import add_arguments

    args = build_parser().parse_args(
        [
            "run",
            "hi",
            "--flash-attn",
            "on",
            "--cache-type-k",
            "q8_0",
            "--cache-type-v",
            "q4_0",
            "--ubatch-size",
            "64",
            "--no-kv-offload",
            "--mlock",
            "--rope-freq-scale",
            "0.5",
            "--lora",
            "a.gguf:0.25",
            "--lora",
            "b.gguf",
            "--draft",
            "ngram",
        ]
    )
    opts = backend_spec(args).options
    assert opts["flash_attn"] == "on" and opts["type_k"] == "q8_0" and opts["type_v"] == "q4_0"
    assert opts["n_ubatch"] == 64 and opts["offload_kqv"] is False and opts["use_mlock"]
    assert opts["rope_freq_scale"] == 0.5
    assert opts["lora"] == [("a.gguf", 0.25), ("b.gguf", 1.0)]
    assert opts["draft"] == "ngram"

    import argparse

    serve = argparse.ArgumentParser()
    add_arguments(serve)
    sargs = serve.parse_args(
        ["--cache-type-k", "q4_0", "--split-mode", "row", "--draft", "small.gguf"]
    )
    cfg = Config(backends=[BackendSpec("llamacpp", {"model": "m"}), BackendSpec("mock", {})])
    override_llamacpp(cfg, llamacpp_overrides(sargs))
    assert cfg.backends[0].options == {
        "model": "m",
        "type_k": "q4_0",
        "split_mode": "row",
        "draft": {"path": "small.gguf"},
    }
    assert cfg.backends[1].options == {}


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def L():
    try:
        from inferd._fast import _llama
    except ImportError as e:
        missing(f"the compiled llama.cpp core inferd._fast._llama ({e})")
    return _llama


@pytest.fixture(scope="module")
def model(L, smollm2_path):
    m = L.Model(str(smollm2_path))
    yield m
    m.close()


def _prompt(model) -> list[int]:
    return model.tokenize(
        "<|im_start|>user\nName three rivers of Europe.<|im_end|>\n<|im_start|>assistant\n",
        add_special=False,
        parse_special=True,
    )


def _fill(L, model, **knobs):
    """A context with ``knobs`` holding the prompt in sequence 0: (its state bytes, the
    last logits)."""
    ctx = L.Context(model, n_threads=1, n_ctx=512, n_batch=128, **knobs)
    try:
        b = L.Batch(128)
        last = b.add_sequence(_prompt(model), 0, 0)
        ctx.decode(b)
        return L.seq_state_bytes(ctx, 0), list(ctx.logits(last))
    finally:
        ctx.close()


def test_the_binding_knows_the_same_cache_types(L):
    assert tuple(L.KV_CACHE_TYPES) == KV_CACHE_TYPES


@pytest.mark.llama
def test_quantised_kv_cache_costs_less_per_sequence(L, model):
    f16, base = _fill(L, model, flash_attn="on")
    q8, logits8 = _fill(L, model, flash_attn="on", type_k="q8_0", type_v="q8_0")
    q4, _ = _fill(L, model, flash_attn="on", type_k="q4_0", type_v="q4_0")
    assert q4 < q8 < 0.7 * f16  # 8.5 and 4.5 bits a value against 16
    # the cache is approximate but still the same model: the top token agrees
    assert max(range(len(base)), key=base.__getitem__) == max(
        range(len(logits8)), key=logits8.__getitem__
    )


@pytest.mark.llama
def test_rope_frequency_changes_what_the_model_computes(L, model):
    _, base = _fill(L, model)
    _, scaled = _fill(L, model, rope_freq_scale=0.5)
    assert max(abs(a - b) for a, b in zip(base, scaled, strict=True)) > 1e-3
    _, again = _fill(L, model, rope_freq_base=0.0)  # 0: the model's own
    assert again == base


@pytest.mark.llama
def test_the_binding_refuses_unknown_names_and_what_libllama_refuses(L, model):
    with pytest.raises(ValueError, match="type_k"):
        L.Context(model, n_ctx=256, type_k="q9_9")
    with pytest.raises(ValueError, match="flash_attn"):
        L.Context(model, n_ctx=256, flash_attn="maybe")
    with pytest.raises(ValueError, match="unknown context setting"):
        L.Context(model, n_ctx=256, not_a_knob=1)
    with pytest.raises(MemoryError, match="type_v"):  # libllama's own refusal, named
        L.Context(model, n_ctx=256, flash_attn="off", type_v="q8_0")
    with pytest.raises(ValueError, match="split_mode"):
        L.Model(model.path, vocab_only=True, split_mode="diagonal")


@pytest.mark.llama
def test_llamacpp_serves_with_a_quantised_cache(smollm2_path):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    with pytest.raises(InvalidRequest, match="flash attention"):
        LlamaCpp(smollm2_path, type_v="q4_0", flash_attn="off")
    b = LlamaCpp(
        smollm2_path,
        n_ctx=1024,
        n_threads=1,
        parallel=2,
        flash_attn="on",
        type_k="q8_0",
        type_v="q8_0",
        n_ubatch=64,
        use_mlock=False,
        split_mode="none",
    )
    try:

        async def run() -> tuple[str, Done]:
            req = Request(messages=(Message.user("Say hello."),), max_tokens=12, temperature=0.0)
            events = [e async for e in b.generate(req)]
            return "".join(e.text for e in events if isinstance(e, Text)), events[-1]

        text, done = asyncio.run(run())
        assert isinstance(done, Done) and done.usage.output_tokens > 0 and text.strip()
    finally:
        b.close()
