"""Chat-format benchmark: output parsers per family, and grammar-constrained sampling.

1. *Parser throughput.* A reply typical of each family (plain, plain with a
   ``<think>`` block, hermes, llama3, mistral, gemma4: text, reasoning, two tool
   calls) is cut into token-like pieces and fed through that family's streaming
   parser. Reported: characters per second, and two ratios against peers timed in
   the same run on the same pieces: the backend's plain pass-through parser (the floor:
   what streaming costs with no parsing) and "buffer everything, parse once at the end"
   with a regex (or ``raw_decode``) and ``json.loads`` written for each family: content,
   reasoning and every tool call with its arguments (how non-streaming tool-call
   handlers work; it cannot stream, it is the bar for total work). The three run round
   robin within each repeat (``bench/timing.py``) and the ratios are medians of
   per-round ratios.
2. *Grammar cost.* On SmolLM2-135M-Instruct through the compiled binding: per-token
   time of ``decode`` and of ``sample`` with a JSON-schema grammar against the same
   sampler without one, same prompt, same seed. Skipped (with a line saying so) when
   the binding or model is missing.

``python bench/bench_chat_parsers.py [--smoke]``. Medians over repeats; results also go
to ``bench/results/chat_parsers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent))

from bench.timing import interleaved_times, ratio  # noqa: E402
from inferd.chat import get_parser  # noqa: E402
from inferd.types import Text  # noqa: E402

Q = '<|"|>'
PROSE = (
    "The weather service says it is mild today, with a light breeze from the west "
    "and a chance of rain later — über-typical for the season. 東京 is warmer. "
)
REPLIES = {
    "plain": PROSE * 4,
    "thinking": "<think>\n" + PROSE + "\n</think>\n\n" + PROSE * 2,
    "hermes": "<think>\n"
    + PROSE
    + "\n</think>\n\n"
    + PROSE
    + "".join(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
        "\n</tool_call>\n"
        for _ in range(2)
    ),
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "note": "'
    + PROSE.replace('"', "'")
    + '"}}; {"name": "get_time", "parameters": {}}',
    "mistral": PROSE
    + "".join('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}' for _ in range(2)),
    "gemma4": "<|channel>thought\n"
    + PROSE
    + "<channel|>"
    + PROSE
    + "".join(
        f"<|tool_call>call:get_weather{{city:{Q}Zürich{Q},days:3}}<tool_call|>" for _ in range(2)
    ),
}
#: Family -> (parser name, parser options). "thinking" is the plain format with a
#: reasoning block (``<think>``), as templates that mention one get.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("plain", {}),
    "thinking": ("plain", {"thinking": True}),
    "hermes": ("hermes", {}),
    "llama3": ("llama3", {}),
    "mistral": ("mistral", {}),
    "gemma4": ("gemma4", {}),
}
_TOKEN = re.compile(r"<\|[^|]*\|>|\[[A-Z_/]+\]|</?\w+>| ?\w+|\s+|.", re.S)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_MISTRAL_CALL = re.compile(r"\[TOOL_CALLS\](\w+)\[ARGS\]")
_GEMMA_THOUGHT = re.compile(r"<\|channel>thought\n(.*?)<channel\|>", re.S)
_GEMMA_CALL = re.compile(r"<\|tool_call>call:(\w+)(\{.*?\})<tool_call\|>", re.S)
_GEMMA_KEY = re.compile(r"([{,])(\w+):")
_DECODER = json.JSONDecoder()

Parsed = tuple[str, str, list[Any]]  # content, reasoning, calls


def _split_think(text: str, pattern: re.Pattern[str] = _THINK) -> tuple[str, str]:
    m = pattern.search(text)
    return (text, "") if m is None else (text[: m.start()] + text[m.end() :], m.group(1))


def _json_objects(text: str, pos: int = 0) -> list[Any]:
    """Consecutive JSON objects separated by ``;`` or blanks (llama3's calls)."""
    out = []
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == len(text):
            break
        obj, pos = _DECODER.raw_decode(text, pos)
        out.append(obj)
    return out


def buffered_hermes(text: str) -> Parsed:
    content, reasoning = _split_think(text)
    calls = [json.loads(m.group(1)) for m in _HERMES_CALL.finditer(content)]
    return _HERMES_CALL.sub("", content), reasoning, calls


def buffered_llama3(text: str) -> Parsed:
    return "", "", _json_objects(text)


def buffered_mistral(text: str) -> Parsed:
    calls = []
    for m in _MISTRAL_CALL.finditer(text):
        calls.append((m.group(1), _DECODER.raw_decode(text, m.end())[0]))
    cut = text.find("[TOOL_CALLS]")
    return (text if cut < 0 else text[:cut]), "", calls


def buffered_gemma4(text: str) -> Parsed:
    content, reasoning = _split_think(text, _GEMMA_THOUGHT)
    calls = []
    for m in _GEMMA_CALL.finditer(content):  # Gemma's bare keys and <|"|> quotes to JSON
        args = _GEMMA_KEY.sub(r'\1"\2":', m.group(2).replace(Q, '"'))
        calls.append((m.group(1), json.loads(args)))
    return _GEMMA_CALL.sub("", content), reasoning, calls


#: "Buffer everything, parse once at the end" for every family: the non-streaming bar.
BUFFERED: dict[str, Any] = {
    "plain": lambda text: (text, "", []),
    "thinking": lambda text: (*_split_think(text), []),
    "hermes": buffered_hermes,
    "llama3": buffered_llama3,
    "mistral": buffered_mistral,
    "gemma4": buffered_gemma4,
}


def _check_buffered() -> None:
    """Each buffered peer must find the calls and reasoning our parser finds."""
    for fmt, reply in REPLIES.items():
        name, opts = FAMILIES[fmt]
        p = get_parser(name, **opts)
        events = p.feed(reply) + p.finish()
        ours = sum(type(e).__name__ == "ToolUse" for e in events)
        _, reasoning, calls = BUFFERED[fmt](reply)
        thought = any(type(e).__name__ == "Thinking" for e in events)
        if len(calls) != ours or bool(reasoning) != thought:
            raise AssertionError(f"{fmt}: buffered peer found {len(calls)} calls, ours {ours}")


def bench_parsers(repeats: int, copies: int) -> list[dict[str, Any]]:
    _check_buffered()
    rows = []
    for fmt, reply in REPLIES.items():
        one = _TOKEN.findall(reply)  # one reply's pieces; ``copies`` replies per call
        pieces = one * copies
        name, opts = FAMILIES[fmt]

        def ours(name: str = name, opts: dict = opts, one: list[str] = one) -> None:
            for _ in range(copies):  # one parser per reply, as the backend does
                p = get_parser(name, **opts)
                for piece in one:
                    p.feed(piece)
                p.finish()

        def passthrough(pieces: list[str] = pieces) -> None:
            for piece in pieces:
                [Text(piece)] if piece else []

        def buffer_parse(fmt: str = fmt, one: list[str] = one) -> None:
            for _ in range(copies):
                BUFFERED[fmt]("".join(one))

        times = interleaved_times(
            {"ours": ours, "passthrough": passthrough, "buffer": buffer_parse}, repeats
        )
        t_ours = statistics.median(times["ours"])
        rows.append(
            {
                "format": fmt,
                "chars": sum(map(len, pieces)),
                "pieces": len(pieces),
                "chars_per_s": sum(map(len, pieces)) / t_ours,
                "us_per_piece": 1e6 * t_ours / len(pieces),
                "x_passthrough_time": ratio(times, "ours", "passthrough"),
                "x_buffer_regex_time": ratio(times, "ours", "buffer"),
            }
        )
    return rows


def _smollm2_binding() -> tuple[Any, Path] | None:
    """The compiled binding and SmolLM2's file; None (skipped) where either is missing,
    except in CI, which builds and pulls both, so there their absence fails."""
    try:
        from inferd import models
        from inferd._fast import _llama as L
    except ImportError as e:
        if os.environ.get("CI"):
            raise
        print(f"grammar cost: skipped, no compiled binding ({e})")
        return None
    try:
        return L, models.resolve("smollm2-135m", pull=False, progress=False)
    except Exception as e:
        if os.environ.get("CI"):
            raise
        print(f"grammar cost: skipped, no SmolLM2 model ({e})")
        return None


def _timed_decode(L, model, ctx, batch, prompt, grammar: str | None, n_tokens: int):
    """One sampled reply: (decode s per token, sample s per token, tokens)."""
    ctx.seq_rm(0)
    batch.clear()
    last = batch.add_sequence(prompt, 0, 0, True)
    ctx.decode(batch)
    s = L.Sampler(model, temperature=0.8, seed=1, grammar=grammar)
    t_dec = t_samp = 0.0
    pos, n = len(prompt), 0
    t0 = time.perf_counter()
    tok = s.sample(ctx, last)
    t_samp += time.perf_counter() - t0
    while n < n_tokens and not model.is_eog(tok):
        batch.clear()
        batch.add(tok, pos, 0, True)
        t0 = time.perf_counter()
        ctx.decode(batch)
        t1 = time.perf_counter()
        tok = s.sample(ctx, 0)
        t_samp += time.perf_counter() - t1
        t_dec += t1 - t0
        pos += 1
        n += 1
    s.close()
    return t_dec / max(n, 1), t_samp / (n + 1), n


def bench_grammar(n_tokens: int, repeats: int) -> dict[str, Any] | None:
    found = _smollm2_binding()
    if found is None:
        return None
    from inferd.chat.grammar import schema_to_gbnf

    L, path = found
    model = L.Model(str(path))
    ctx = L.Context(model, n_ctx=512, n_batch=256, n_threads=1)
    batch = L.Batch(256, 1)
    prompt = model.tokenize(
        "<|im_start|>user\nList ten cities as JSON.<|im_end|>\n<|im_start|>assistant\n",
        add_special=False,
        parse_special=True,
    )
    schema = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
            "required": ["city", "population"],
        },
    }
    grammar = schema_to_gbnf(schema)
    result: dict[str, Any] = {"model": "SmolLM2-135M-Instruct Q4_1", "vocab": model.n_vocab}
    for label, g in (("unconstrained", None), ("grammar", grammar)):
        runs = [_timed_decode(L, model, ctx, batch, prompt, g, n_tokens) for _ in range(repeats)]
        result[label] = {
            "decode_ms_per_token": 1e3 * statistics.median(r[0] for r in runs),
            "sample_ms_per_token": 1e3 * statistics.median(r[1] for r in runs),
            "tokens": runs[0][2],
        }
    u, g_ = result["unconstrained"], result["grammar"]
    result["x_sample_time"] = g_["sample_ms_per_token"] / u["sample_ms_per_token"]
    result["x_token_time"] = (g_["sample_ms_per_token"] + g_["decode_ms_per_token"]) / (
        u["sample_ms_per_token"] + u["decode_ms_per_token"]
    )
    ctx.close()
    model.close()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, once (CI)")
    args = p.parse_args(argv)
    repeats, copies, n_tokens = (1, 2, 8) if args.smoke else (7, 200, 64)
    rows = bench_parsers(repeats, copies)
    print(
        f"{'format':8} {'chars/s':>12} {'us/piece':>9} {'x passthrough':>14} {'x buffer+regex':>15}"
    )
    for r in rows:
        print(
            f"{r['format']:8} {r['chars_per_s']:12,.0f} {r['us_per_piece']:9.2f} "
            f"{r['x_passthrough_time']:14.1f} {r['x_buffer_regex_time']:15.1f}"
        )
    gram = bench_grammar(n_tokens, 1 if args.smoke else 3)
    if gram:
        for label in ("unconstrained", "grammar"):
            d = gram[label]
            print(
                f"{label:14} decode {d['decode_ms_per_token']:.2f} ms/tok, sample "
                f"{d['sample_ms_per_token']:.2f} ms/tok ({d['tokens']} tokens)"
            )
        print(
            f"grammar: sample x{gram['x_sample_time']:.1f}, whole token x{gram['x_token_time']:.2f}"
        )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "chat_parsers.json").write_text(
        json.dumps({"smoke": args.smoke, "parsers": rows, "grammar": gram}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
