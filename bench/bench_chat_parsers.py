"""Chat-format benchmark: output parsers per family, and grammar-constrained sampling.

1. *Parser throughput.* A reply typical of each family (text, reasoning, two tool
   calls) is cut into token-like pieces and fed through that family's streaming
   parser. Reported: characters per second, and two ratios against peers timed in the
   same run on the same pieces: the backend's plain pass-through parser (the floor:
   what streaming costs with no parsing) and "buffer everything, one regex at the end"
   (how non-streaming tool-call handlers work; it cannot stream, it is the bar for
   total work).
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

from bench.timing import median_time  # noqa: E402
from inferd.chat import get_parser  # noqa: E402
from inferd.types import Text  # noqa: E402

Q = '<|"|>'
PROSE = (
    "The weather service says it is mild today, with a light breeze from the west "
    "and a chance of rain later — über-typical for the season. 東京 is warmer. "
)
REPLIES = {
    "plain": PROSE * 4,
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
_TOKEN = re.compile(r"<\|[^|]*\|>|\[[A-Z_/]+\]|</?\w+>| ?\w+|\s+|.", re.S)
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def bench_parsers(repeats: int, copies: int) -> list[dict[str, Any]]:
    rows = []
    for fmt, reply in REPLIES.items():
        pieces = _TOKEN.findall(reply) * copies
        n_chars = sum(map(len, pieces))

        def ours(fmt: str = fmt, pieces: list[str] = pieces) -> None:
            # one parser per reply, as the backend does
            per = len(pieces) // copies
            for c in range(copies):
                p = get_parser(fmt)
                for piece in pieces[c * per : (c + 1) * per]:
                    p.feed(piece)
                p.finish()

        def passthrough(pieces: list[str] = pieces) -> None:
            for piece in pieces:
                [Text(piece)] if piece else []

        def buffer_regex(pieces: list[str] = pieces) -> None:
            per = len(pieces) // copies
            for c in range(copies):
                text = "".join(pieces[c * per : (c + 1) * per])
                for m in _CALL.finditer(text):
                    try:
                        json.loads(m.group(1))
                    except ValueError:
                        pass

        t_ours = median_time(ours, repeats)
        t_pass = median_time(passthrough, repeats)
        t_buf = median_time(buffer_regex, repeats)
        rows.append(
            {
                "format": fmt,
                "chars": n_chars,
                "pieces": len(pieces),
                "chars_per_s": n_chars / t_ours,
                "us_per_piece": 1e6 * t_ours / len(pieces),
                "x_passthrough_time": t_ours / t_pass,
                "x_buffer_regex_time": t_ours / t_buf,
            }
        )
    return rows


def bench_grammar(n_tokens: int, repeats: int) -> dict[str, Any] | None:
    try:
        from inferd import models
        from inferd._fast import _llama as L
        from inferd.chat.grammar import schema_to_gbnf
    except ImportError as e:
        if os.environ.get("CI"):
            raise  # CI builds the binding: its absence is a failure there
        print(f"grammar cost: skipped, no compiled binding ({e})")
        return None
    try:
        path = models.resolve("smollm2-135m", pull=False, progress=False)
    except Exception as e:
        if os.environ.get("CI"):
            raise
        print(f"grammar cost: skipped, no SmolLM2 model ({e})")
        return None
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

    def run(g: str | None) -> tuple[float, float, int]:
        ctx.seq_rm(0)
        batch.clear()
        last = batch.add_sequence(prompt, 0, 0, True)
        ctx.decode(batch)
        s = L.Sampler(model, temperature=0.8, seed=1, grammar=g)
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

    for label, g in (("unconstrained", None), ("grammar", grammar)):
        runs = [run(g) for _ in range(repeats)]
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
