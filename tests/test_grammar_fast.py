"""The grammar fast path (docs/adr/0026-grammar-fast-path-and-context-knobs.md).

A Sampler checks the drawn token against its grammar and applies the grammar to the
whole vocabulary only when it rejects the token (llama.cpp's common_sampler). For
greedy decoding the output must equal the full-grammar order's (``grammar_first=True``,
the grammar first in the chain) token for token: on a JSON-schema grammar, on a tool-call
grammar, on a lazy tool-call grammar once triggered, through ``Context.step`` and through
``decode_sample`` with several sequences in one batch.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from inferd.chat.grammar import response_format_grammar
from inferd.chat.tool_grammar import lazy_tool_call_grammar, tool_call_grammar
from inferd.types import Tool, ToolChoice

from .conftest import missing

pytestmark = pytest.mark.llama

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "colours": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "colours"],
}
TOOLS = [
    Tool(
        "get_weather",
        "Weather for a city",
        {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
        },
    )
]
#: Tokens each comparison generates at most (enough to finish the small schema).
N_TOKENS = 48


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


@pytest.fixture(scope="module")
def ctx(L, model):
    c = L.Context(model, n_threads=1, n_ctx=1024, n_batch=256, n_seq_max=4)
    yield c
    c.close()


def _prompt(model, text: str) -> list[int]:
    return model.tokenize(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        add_special=False,
        parse_special=True,
    )


def _grammar_kwargs(model, kind: str) -> dict:
    if kind == "json_schema":
        g = response_format_grammar({"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    elif kind == "tool_call":
        g = tool_call_grammar("hermes", TOOLS, ToolChoice.parse("required"))
    else:
        g = lazy_tool_call_grammar("hermes", TOOLS)
    assert g is not None
    kw = {"grammar": g.text, "grammar_root": g.root}
    if g.lazy:
        kw["grammar_trigger_patterns"] = list(g.trigger_patterns)
        toks = [model.tokenize(t, add_special=False, parse_special=True) for t in g.trigger_tokens]
        kw["grammar_trigger_tokens"] = [t[0] for t in toks if len(t) == 1]
    return kw


def _run(L, model, ctx, sampler, text: str, forced: list[int] = ()) -> list[int]:
    """Greedy tokens after the prompt; ``forced`` tokens are fed (and shown to the
    sampler) first, as if drawn: they trigger a lazy grammar."""
    ctx.seq_rm(0)
    toks = _prompt(model, text) + list(forced)
    for t in forced:
        sampler.accept(t)
    b = L.Batch(256)
    last = b.add_sequence(toks, 0, 0)
    ctx.decode(b)
    out = [sampler.sample(ctx, last)]
    pos = len(toks)
    while not model.is_eog(out[-1]) and len(out) < N_TOKENS:
        out.append(ctx.step(sampler, out[-1], pos))
        pos += 1
    return out


CASES = {
    "json_schema": "Describe a person as JSON with name, age and favourite colours.",
    "tool_call": "What is the weather in Paris? Call the tool.",
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_greedy_equals_the_full_grammar_order(L, model, ctx, kind):
    kw = _grammar_kwargs(model, kind)
    fast = _run(L, model, ctx, L.Sampler(model, temperature=0, **kw), CASES[kind])
    full = L.Sampler(model, temperature=0, grammar_first=True, **kw)
    assert full.grammar_first and not full.argmax
    assert _run(L, model, ctx, full, CASES[kind]) == fast
    text = model.detokenize([t for t in fast if not model.is_eog(t)])
    if kind == "json_schema" and model.is_eog(fast[-1]):
        jsonschema.validate(json.loads(text), SCHEMA)  # the grammar accepted every token
    if kind == "tool_call":
        assert text.startswith("<tool_call>")


def test_penalties_and_bias_keep_the_equality(L, model, ctx):
    """With stages before the greedy pick (a penalty, a bias) the chain is applied to
    the whole vocabulary first; the result still equals the full-grammar order."""
    kw = _grammar_kwargs(model, "json_schema")
    extra = {"repeat_penalty": 1.3, "logit_bias": {model.tokenize("{", add_special=False)[0]: 5}}
    text = CASES["json_schema"]
    fast = _run(L, model, ctx, L.Sampler(model, temperature=0, **extra, **kw), text)
    full = L.Sampler(model, temperature=0, grammar_first=True, **extra, **kw)
    assert _run(L, model, ctx, full, text) == fast


def test_lazy_grammar_waits_for_its_trigger_then_constrains(L, model, ctx):
    kw = _grammar_kwargs(model, "lazy_tool_call")
    text = "Say hello."
    plain = _run(L, model, ctx, L.Sampler(model, temperature=0), text)
    lazy = _run(L, model, ctx, L.Sampler(model, temperature=0, **kw), text)
    if "<tool_call>" not in model.detokenize(plain):
        assert lazy == plain  # untriggered: the grammar changes nothing
    opener = model.tokenize("<tool_call>", add_special=False, parse_special=True)
    fast = _run(L, model, ctx, L.Sampler(model, temperature=0, **kw), text, opener)
    full = L.Sampler(model, temperature=0, grammar_first=True, **kw)
    assert _run(L, model, ctx, full, text, opener) == fast
    body = model.detokenize([t for t in fast if not model.is_eog(t)]).strip()
    assert body.startswith("{")  # triggered: the call's JSON, not free text
    if model.is_eog(fast[-1]):
        call = json.loads(body.removesuffix("</tool_call>").strip())
        assert call["name"] == "get_weather"


def test_decode_sample_batch_equals_the_full_grammar_order(L, model, ctx):
    """Several grammar sequences (and a plain one) in one decode_sample batch."""
    kinds = ["json_schema", "tool_call", None]

    def run(grammar_first: bool) -> list[list[int]]:
        ctx.seq_rm(-1)
        samplers = [
            L.Sampler(
                model, temperature=0, grammar_first=grammar_first, **_grammar_kwargs(model, k)
            )
            if k
            else L.Sampler(model, temperature=0)
            for k in kinds
        ]
        prompts = [_prompt(model, CASES.get(k or "", "Hi there.")) for k in kinds]
        b = L.Batch(512)
        idxs = [b.add_sequence(p, 0, s) for s, p in enumerate(prompts)]
        outs: list[list[int]] = [[] for _ in kinds]
        pos = [len(p) for p in prompts]
        for _ in range(24):
            toks = L.decode_sample(ctx, b, samplers, idxs)
            b.clear()
            idxs = []
            for s, t in enumerate(toks):
                outs[s].append(t)
                b.add(t, pos[s], s, True)
                idxs.append(s)
                pos[s] += 1
        return outs

    assert run(False) == run(True)


def test_sampled_output_stays_in_the_grammar(L, model, ctx):
    """At temperature > 0 the fast path may draw differently from the full order (it
    draws from the whole distribution first), but every token is still the grammar's."""
    kw = _grammar_kwargs(model, "json_schema")
    for seed in (1, 2, 3):
        s = L.Sampler(model, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=seed, **kw)
        out = _run(L, model, ctx, s, CASES["json_schema"])
        if model.is_eog(out[-1]):
            text = model.detokenize(out[:-1])
            jsonschema.validate(json.loads(text), SCHEMA)
        else:  # cut at N_TOKENS: a prefix of a JSON object
            assert model.detokenize(out).lstrip().startswith("{")
