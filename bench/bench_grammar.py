"""Grammar-constrained decode against plain decode (issue 20, ADR 0026).

Two tables on SmolLM2-135M-Instruct, greedy, CPU:

* ``binding``: the compiled binding in this process, one sequence, ``Context.step`` in a
  loop: plain greedy, the grammar fast path (check the drawn token, apply the grammar
  to the vocabulary only on rejection) and the full-grammar order (``grammar_first=True``:
  the grammar first in the chain, every token), each timed over the same prompt and
  token count, interleaved round by round.
* ``peers``: constrained/unconstrained tok/s of ``inferd`` (``LlamaCpp`` in this
  process) and of ``llama-server`` (built from the vendored llama.cpp, over HTTP) with
  the same ``json_schema``; each peer's ratio is its own constrained time against its
  own plain time, so transport costs cancel within a peer. Rounds alternate the peers'
  order; reported: the median per-round ratio.

The schema (an array of at least MIN_ITEMS strings) cannot end before the token budget,
so every constrained reply has exactly ``max_tokens`` tokens, like the plain ones
(``ignore_eos``).

    python bench/bench_grammar.py [--smoke] [--tokens T] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

#: Compute threads of every contender.
THREADS = 2
CTX = 1024
#: The array cannot close before this many strings: longer than any token budget here.
MIN_ITEMS = 200
SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": MIN_ITEMS}
PROMPT = "List as many animal names as you can, as a JSON array of strings."
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "animals", "schema": SCHEMA}}


def _binding(model_path: str, tokens: int, rounds: int, threads: int, ngl: int) -> dict[str, float]:
    """tok/s per contender (median over rounds) through the binding."""
    from inferd._fast import _llama as L
    from inferd.chat.grammar import response_format_grammar

    g = response_format_grammar(RESPONSE_FORMAT)
    assert g is not None
    model = L.Model(model_path, n_gpu_layers=ngl)
    ctx = L.Context(model, n_ctx=CTX, n_batch=256, n_threads=threads)
    prompt = model.tokenize(
        f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n",
        add_special=False,
        parse_special=True,
    )
    makers = {
        "plain": lambda: L.Sampler(model, temperature=0),
        "grammar (fast path)": lambda: L.Sampler(model, temperature=0, grammar=g.text),
        "grammar (full order)": lambda: L.Sampler(
            model, temperature=0, grammar=g.text, grammar_first=True
        ),
    }

    def one(make: Any) -> float:
        ctx.seq_rm(0)
        s = make()
        b = L.Batch(256)
        last = b.add_sequence(prompt, 0, 0)
        ctx.decode(b)
        tok = s.sample(ctx, last)
        pos = len(prompt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = ctx.step(s, tok, pos)
            pos += 1
        return tokens / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {k: [] for k in makers}
    try:
        for k in makers:  # warm
            one(makers[k])
        names = list(makers)
        for r in range(rounds):
            for k in names[r % 3 :] + names[: r % 3]:
                rates[k].append(one(makers[k]))
    finally:
        ctx.close()
        model.close()
    return {k: statistics.median(v) for k, v in rates.items()}


async def _ours(backend: Any, constrained: bool, tokens: int) -> float:
    from inferd.types import Message, Request

    req = Request(
        (Message.user(PROMPT),),
        temperature=0.0,
        max_tokens=tokens,
        ignore_eos=not constrained,
        response_format=RESPONSE_FORMAT if constrained else None,
    )
    t0 = time.perf_counter()
    produced = 0
    async for ev in backend.generate(req):
        produced += getattr(getattr(ev, "usage", None), "output_tokens", 0)
    elapsed = time.perf_counter() - t0
    if produced != tokens:
        raise RuntimeError(f"inferd: {produced} tokens, expected {tokens}")
    return elapsed


def _theirs(url: str, constrained: bool, tokens: int) -> float:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0.0,
        "max_tokens": tokens,
    }
    if constrained:
        body["response_format"] = RESPONSE_FORMAT
    else:
        body["ignore_eos"] = True
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        reply = json.loads(resp.read())
    elapsed = time.perf_counter() - t0
    if reply["usage"]["completion_tokens"] != tokens:
        raise RuntimeError(f"llama-server: {reply['usage']['completion_tokens']} tokens")
    return elapsed


async def _peers(model: str, tokens: int, rounds: int, threads: int, ngl: int) -> dict[str, float]:
    """Median per-round constrained/unconstrained tok/s ratio of each peer."""
    from bench.bench_choices import _free_port, _wait_health
    from bench.fair import our_flash_attn
    from bench.peers import ensure_peer
    from bench.servers import Settings, start_llama_server
    from inferd.backends.llamacpp import LlamaCpp

    s = Settings(model, 1, CTX, threads, ngl, our_flash_attn(model))
    ours = LlamaCpp(model, n_ctx=CTX, parallel=1, n_threads=threads, n_batch=512, n_gpu_layers=ngl)
    server = start_llama_server(ensure_peer("llama-server"), s, _free_port())
    ratios: dict[str, list[float]] = {"inferd": [], "llama-server": []}
    try:
        _wait_health(server.base_url, server)
        for c in (False, True):
            await _ours(ours, c, tokens)
            _theirs(server.base_url, c, tokens)
        for r in range(rounds):
            for peer in ("inferd", "llama-server")[:: 1 if r % 2 == 0 else -1]:
                if peer == "inferd":
                    plain, cons = await _ours(ours, False, tokens), await _ours(ours, True, tokens)
                else:
                    plain = await asyncio.to_thread(_theirs, server.base_url, False, tokens)
                    cons = await asyncio.to_thread(_theirs, server.base_url, True, tokens)
                ratios[peer].append(plain / cons)  # tok/s constrained / tok/s plain
    finally:
        server.stop()
        ours.close()
    return {p: statistics.median(v) for p, v in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    # Run as a script (python bench/x.py) as well as under run_all: bench.* imports work.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--tokens", type=int, default=None, help="tokens per reply")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--binding-only", action="store_true", help="skip the llama-server table")
    p.add_argument("--peers-only", action="store_true", help="skip the binding table")
    from bench.model_args import add_model_args, model_path

    add_model_args(p, THREADS)
    args = p.parse_args(argv)
    tokens = args.tokens or (24 if args.smoke else 128)
    rounds = args.rounds or (2 if args.smoke else 7)
    model, label = model_path(args)
    t, ngl = args.threads, args.gpu_layers
    print(f"{label}, greedy, {tokens} tokens, {rounds} rounds, {t} threads, {ngl} GPU layers")
    if not args.peers_only:
        rates = _binding(model, tokens, rounds, t, ngl)
        print(f"{'binding (in-process)':<24}{'tok/s':>10}{'x plain':>10}")
        for k, v in rates.items():
            print(f"{k:<24}{v:>10.1f}{v / rates['plain']:>10.2f}")
    if not args.binding_only:
        out = asyncio.run(_peers(model, tokens, rounds, t, ngl))
        print(f"{'peer':<24}{'constrained/plain tok/s':>26}")
        for peer, r in out.items():
            print(f"{peer:<24}{r:>26.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
