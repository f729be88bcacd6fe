"""Tools, grammars and parsers end to end on the real SmolLM2-135M-Instruct.

SmolLM2's template knows nothing about tools, so these runs also cover the built-in
tool prompt (``inferd.chat.tool_prompt``) and its Hermes-style replies. The model or
the compiled core missing is a skip locally and a failure in CI (``missing``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from inferd.errors import InvalidRequest
from inferd.types import (
    Done,
    Event,
    Message,
    Request,
    StopReason,
    Text,
    Tool,
    ToolUse,
    ToolUseBlock,
)
from tests.conftest import missing

pytestmark = [pytest.mark.llama, pytest.mark.slow]

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = (
    Tool("get_weather", "Current weather for a city", WEATHER),
    Tool(
        "add",
        "Add two integers",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    ),
)
ASK = (Message.user("What is the weather in Paris right now?"),)
RUNS = 50


@pytest.fixture(scope="module")
def backend(smollm2_path: Path) -> Any:
    try:
        from inferd.backends.llamacpp import LlamaCpp
        from inferd.errors import ModelLoadError

        b = LlamaCpp(smollm2_path, n_ctx=1024, n_threads=1)
    except (ImportError, ModelLoadError) as e:
        missing(f"the compiled llama.cpp core ({e})")
    yield b
    b.close()


async def collect(it: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in it]


def test_format_detected_from_template(backend: Any) -> None:
    assert backend.plan(Request(ASK)).format == "plain"
    plan = backend.plan(Request(ASK, tools=TOOLS))
    assert plan.format == "hermes" and plan.folded  # no tools in SmolLM2's template
    assert backend.capabilities().tools


async def test_tool_round_trip(backend: Any) -> None:
    events = await collect(
        backend.generate(
            Request(ASK, tools=TOOLS, tool_choice="get_weather", max_tokens=64, seed=3)
        )
    )
    calls = [e for e in events if isinstance(e, ToolUse)]
    assert len(calls) == 1 and calls[0].name == "get_weather", events
    call = calls[0]
    history = (
        *ASK,
        Message.assistant([ToolUseBlock(call.id, call.name, call.input or {})]),
        Message.tool(call.id, '{"temperature": 21, "unit": "celsius"}'),
    )
    follow = Request(history, tools=TOOLS, tool_choice="none", max_tokens=24, seed=3)
    prompt = backend.render(follow)
    assert '"name": "get_weather"' in prompt and "<tool_response>" in prompt
    assert '"temperature": 21' in prompt
    events = await collect(backend.generate(follow))
    assert isinstance(events[-1], Done)
    assert not any(isinstance(e, ToolUse) for e in events)
    assert "<tool_call>" not in "".join(e.text for e in events if isinstance(e, Text))


async def test_required_always_valid(backend: Any) -> None:
    schemas = {t.name: dict(t.parameters) for t in TOOLS}
    bad = []
    for seed in range(RUNS):
        events = await collect(
            backend.generate(
                Request(
                    ASK,
                    tools=TOOLS,
                    tool_choice="required",
                    max_tokens=96,
                    seed=seed,
                    temperature=1.0,
                    parallel_tool_calls=False,
                )
            )
        )
        calls = [e for e in events if isinstance(e, ToolUse)]
        done = events[-1]
        try:
            assert len(calls) == 1, events
            assert calls[0].input is not None
            jsonschema.validate(dict(calls[0].input), schemas[calls[0].name])
            assert isinstance(done, Done) and done.stop_reason is StopReason.TOOL_USE
        except (AssertionError, jsonschema.ValidationError) as e:
            bad.append((seed, str(e)[:200]))
    assert bad == [], f"{len(bad)}/{RUNS} invalid: {bad[:3]}"


async def test_response_format_always_validates(backend: Any) -> None:
    # Every field is bounded so the longest valid reply fits in max_tokens: a reply
    # cut short by max_tokens would be unparseable through no fault of the grammar.
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 12},
            "confidence": {"enum": [1, 2, 3, 4, 5]},
            "sure": {"type": "boolean"},
            "tags": {
                "type": "array",
                "items": {"enum": ["weather", "city", "other"]},
                "maxItems": 2,
            },
        },
        "required": ["answer", "sure"],
    }
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    bad = []
    for seed in range(RUNS):
        events = await collect(
            backend.generate(
                Request(ASK, response_format=rf, max_tokens=96, seed=seed, temperature=1.0)
            )
        )
        text = "".join(e.text for e in events if isinstance(e, Text))
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            bad.append((seed, text, str(e)[:100]))
    assert bad == [], f"{len(bad)}/{RUNS} invalid: {bad[:3]}"


async def test_combination_refused_before_the_stream(backend: Any) -> None:
    rf = {"type": "json_object"}
    it = backend.generate(Request(ASK, tools=TOOLS, response_format=rf))
    with pytest.raises(InvalidRequest, match="cannot be combined"):
        await it.__anext__()


async def test_tool_format_override(smollm2_path: Path) -> None:
    from inferd.backends.llamacpp import LlamaCpp

    with pytest.raises(InvalidRequest, match="unknown tool format"):
        LlamaCpp(smollm2_path, tool_format="nope")


async def test_auto_never_leaves_a_broken_call(backend: Any) -> None:
    """``auto``: free text stays free; no reply ends with a half-made call as Text.

    The check on finished replies must run: some replies end on their own (END_TURN)
    before ``max_tokens``, and those are the ones that must not show a raw call.
    """
    schemas = {t.name: dict(t.parameters) for t in TOOLS}
    ended = 0
    for seed in range(6):
        events = await collect(
            backend.generate(
                Request(
                    ASK, tools=TOOLS, tool_choice="auto", max_tokens=160, seed=seed, temperature=1.0
                )
            )
        )
        done = events[-1]
        assert isinstance(done, Done)
        text = "".join(e.text for e in events if isinstance(e, Text))
        if done.stop_reason is not StopReason.MAX_TOKENS:
            # a reply whose last act is a call says so (ADR 0023)
            ends_in_call = isinstance(events[-2], ToolUse) if len(events) > 1 else False
            want = StopReason.TOOL_USE if ends_in_call else StopReason.END_TURN
            assert done.stop_reason is want, done
            assert done.usage.output_tokens < 160
            assert "<tool_call>" not in text, (seed, text)  # a fallback shows the raw call
            ended += 1
        for e in events:
            if isinstance(e, ToolUse):
                jsonschema.validate(dict(e.input or {}), schemas[e.name])
    assert ended >= 1, "no reply ended before max_tokens: the check above never ran"


def test_lazy_grammar_engages_at_the_opener(smollm2_path: Path) -> None:
    """Once the output reaches ``<tool_call>``, the rest is forced to a valid call.

    SmolLM2 rarely chooses to call on its own, so the opener is written for it: its
    tokens are decoded and *accepted* by the sampler as if generated, which fires the
    trigger; everything sampled after that must complete a schema-valid call.
    """
    from inferd.chat import get_parser
    from inferd.chat.tool_grammar import lazy_tool_call_grammar

    try:
        from inferd._fast import _llama as L
    except ImportError as e:
        missing(f"the compiled llama.cpp core ({e})")
    if not getattr(L, "LAZY_GRAMMAR", False):
        missing("lazy grammar support in the compiled binding")
    schemas = {t.name: dict(t.parameters) for t in TOOLS}
    model = L.Model(str(smollm2_path))
    ctx = L.Context(model, n_ctx=512, n_batch=256, n_threads=1)
    batch = L.Batch(256, 1)
    g = lazy_tool_call_grammar("hermes", TOOLS)
    head = model.tokenize(
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n",
        add_special=False,
        parse_special=True,
    )
    opener = model.tokenize("<tool_call>\n", add_special=False, parse_special=True)
    try:
        for seed in range(8):
            s = L.Sampler(
                model,
                temperature=1.0,
                seed=seed,
                grammar=g.text,
                grammar_trigger_patterns=list(g.trigger_patterns),
            )
            for t in opener:
                s.accept(t)
            ctx.seq_rm(0)
            batch.clear()
            last = batch.add_sequence(head + opener, 0, 0, True)
            ctx.decode(batch)
            pos, out = len(head) + len(opener), []
            tok = s.sample(ctx, last)
            while not model.is_eog(tok) and len(out) < 80:
                out.append(tok)
                tok = ctx.step(s, tok, pos, 0)
                pos += 1
            s.close()
            text = "<tool_call>\n" + model.detokenize(out, special=True)
            p = get_parser("hermes")
            events = p.feed(text) + p.finish()
            assert p.malformed == [] and len(events) == 1, (seed, text)
            (call,) = events
            assert isinstance(call, ToolUse) and call.input is not None, (seed, text)
            jsonschema.validate(dict(call.input), schemas[call.name])
    finally:
        ctx.close()
        model.close()
