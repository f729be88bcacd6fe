"""KV cache quantisation: memory per sequence, sequences per budget, decode speed
(issue 20, docs/adr/0026-grammar-fast-path-and-context-knobs.md).

For each cache type (f16, q8_0, q4_0 for both K and V, flash attention on: a quantised
V cache needs it) on SmolLM2-135M-Instruct, CPU, through the compiled binding:

* ``bytes/token``: libllama's serialised state of one sequence holding the prompt
  (``seq_state_bytes``: its K and V cells in the cache's own type), per token;
* ``MiB/seq``: that times ``CTX_PER_SEQ`` tokens, what one slot of that size costs;
* ``parallel in budget``: how many such slots fit ``BUDGET_MIB`` of KV memory;
* ``tok/s x1`` and ``tok/s xN``: greedy decode of one sequence (``Context.step``) and of
  ``STREAMS`` sequences in one ``decode_sample`` batch per step (tokens of all streams).

Contenders are interleaved round by round; reported: medians.

    python bench/bench_kv_quant.py [--smoke] [--tokens T] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

TYPES = ("f16", "q8_0", "q4_0")
THREADS = 2
#: KV cells one slot is sized for, and the KV memory budget the slots share.
CTX_PER_SEQ = 4096
BUDGET_MIB = 1024
STREAMS = 4
PROMPT = "Write a long story about a lighthouse keeper and the sea. " * 4


def _measure(L, model, kind: str, tokens: int, threads: int) -> tuple[float, float, float]:
    """(bytes per token of one sequence, tok/s single stream, tok/s over STREAMS)."""
    ctx = L.Context(
        model,
        n_ctx=STREAMS * 512,
        n_batch=512,
        n_seq_max=STREAMS,
        n_threads=threads,
        flash_attn="on",
        type_k=kind,
        type_v=kind,
    )
    try:
        prompt = model.tokenize(PROMPT, add_special=True, parse_special=False)
        b = L.Batch(512)
        last = b.add_sequence(prompt, 0, 0)
        ctx.decode(b)
        per_token = L.seq_state_bytes(ctx, 0) / len(prompt)
        s = L.Sampler(model, temperature=0)
        tok, pos = s.sample(ctx, last), len(prompt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = ctx.step(s, tok, pos)
            pos += 1
        single = tokens / (time.perf_counter() - t0)
        ctx.seq_rm(-1)
        samplers = [L.Sampler(model, temperature=0) for _ in range(STREAMS)]
        b = L.Batch(512 * STREAMS)
        idxs = [b.add_sequence(prompt, 0, q) for q in range(STREAMS)]
        toks = L.decode_sample(ctx, b, samplers, idxs)
        pos = len(prompt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            b.clear()
            idxs = [b.add(t, pos, q, True) for q, t in enumerate(toks)]
            toks = L.decode_sample(ctx, b, samplers, idxs)
            pos += 1
        multi = tokens * STREAMS / (time.perf_counter() - t0)
        return per_token, single, multi
    finally:
        ctx.close()


def main(argv: list[str] | None = None) -> int:
    # Run as a script (python bench/x.py) as well as under run_all: bench.* imports work.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.model_args import add_model_args, model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--tokens", type=int, default=None, help="decode steps per measurement")
    p.add_argument("--rounds", type=int, default=None)
    add_model_args(p, THREADS)
    args = p.parse_args(argv)
    tokens = args.tokens or (16 if args.smoke else 128)
    rounds = args.rounds or (1 if args.smoke else 5)
    from inferd._fast import _llama as L

    path, label = model_path(args)
    model = L.Model(path, n_gpu_layers=args.gpu_layers)
    got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in TYPES}
    try:
        for r in range(rounds):
            for kind in TYPES[r % 3 :] + TYPES[: r % 3]:
                got[kind].append(_measure(L, model, kind, tokens, args.threads))
    finally:
        model.close()
    print(
        f"{label}, "
        f"{args.gpu_layers} GPU layers, {args.threads} threads, {tokens} steps, {rounds} rounds; "
        f"slot = {CTX_PER_SEQ} tokens, budget = {BUDGET_MIB} MiB"
    )
    print(
        f"{'type':<6}{'bytes/token':>12}{'MiB/seq':>9}{'parallel':>9}"
        f"{'tok/s x1':>10}{f'tok/s x{STREAMS}':>10}"
    )
    for kind, rows in got.items():
        per_tok = statistics.median(r[0] for r in rows)
        per_seq = per_tok * CTX_PER_SEQ / 2**20
        print(
            f"{kind:<6}{per_tok:>12.0f}{per_seq:>9.1f}{int(BUDGET_MIB // per_seq):>9}"
            f"{statistics.median(r[1] for r in rows):>10.1f}"
            f"{statistics.median(r[2] for r in rows):>10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
