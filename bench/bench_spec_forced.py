"""Speculative decoding at forced acceptance rates: what verification costs and earns,
apart from how well a drafter guesses (issue 20, docs/adr/0027-speculative-decoding-batched.md).

Why: a real drafter's acceptance depends on the text (and with random weights, as on the
GPU runs' synthetic models, it means nothing), so the benchmarks of ``bench_speculative``
mix two things: the drafter's skill and the machinery's cost. Here the drafter is an
oracle with a dial. Pass one records each stream's greedy reply with drafting off. Pass
two drafts, for a stream that has produced ``j`` tokens of that reply, the next
``width`` tokens of it, each one replaced by a wrong token with probability ``1 - rate``
(seeded per stream and position): a draft's first ``i`` tokens are all right with
probability ``rate ** i``. A stream whose reply leaves the recorded one (a multi-row
verification rounds logits otherwise than one row and can flip a close pick, ADR 0027)
gets no more drafts; the measured acceptance is printed beside each figure, so a
forcing that did not hold shows.

Everything runs in-process (``LlamaCpp``, same threads, slots, batch and flash
attention for both paths), greedy, ``ignore_eos``, the same prompts. Per round, for
each concurrency, the plain path and every (width, rate) run one after another in an
order that rotates by round. Reported: the median over rounds of the per-round ratio
of decode throughput (tokens after each stream's first, over the time from the earliest
first token to the last end), forced / plain.

    python bench/bench_spec_forced.py [--smoke] [--tokens T] [--rounds R] [--streams 1,8]
        [--widths 4,8] [--rates 0,0.5,0.9,1] [--model GGUF] [--gpu-layers N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

THREADS = 2
CTX_PER_SLOT = 1024
N_BATCH = 512
PROMPTS = (
    "Tell me about the history of the city of {}, in a few paragraphs.",
    "Write a short story about a lighthouse keeper in {}.",
    "Explain how the trams of {} work, for a visitor.",
    "Describe a walk through the old town of {}.",
)
CITIES = ("Lyon", "Porto", "Krakow", "Bologna", "Ghent", "Seville", "Tartu", "Bergen")


class Oracle:
    """The scheduler's drafter (``Speculator.drafter``): records replies (``rate`` None)
    or drafts them back at a forced acceptance rate. Keyed by the prompt's tokens."""

    def __init__(self, width: int, rate: float | None, replies: dict) -> None:
        self.n_draft, self.rate, self.replies = width, rate, replies

    def propose(self, items: list[tuple[Any, list[int], int]]) -> list[list[int]]:
        return [self._draft(s, hist, limit) for s, hist, limit in items]

    def _draft(self, s: Any, hist: list[int], limit: int) -> list[int]:
        key, done = tuple(s.prompt), hist[len(s.prompt) :]
        if self.rate is None:  # recording: the longest history seen is the reply
            if len(done) > len(self.replies.get(key, ())):
                self.replies[key] = list(done)
            return []
        ref = self.replies.get(key, [])
        j = len(done)
        if ref[:j] != done:  # left the recorded reply: nothing to copy from
            return []
        rng = random.Random(f"{key}:{j}:{self.rate}")
        out = ref[j : j + min(limit, self.n_draft)]
        return [t if rng.random() < self.rate else (t + 1 if t == 0 else t - 1) for t in out]

    def feedback(self, s: Any, drafted: int, accepted: int) -> None:
        pass  # a fixed width: the figure is the machinery's, not a policy's

    def close(self) -> None:
        pass


async def _decode_tps(backend: Any, prompts: list[str], tokens: int, spec: bool) -> float:
    """Decode tok/s of all ``prompts`` at once (prefill left out, as bench_speculative)."""
    from inferd import Message, Request

    async def one(text: str) -> tuple[float, float, int]:
        req = Request(
            (Message.user(text),), temperature=0.0, max_tokens=tokens, ignore_eos=True,
            speculative=spec,
        )  # fmt: skip
        first, n = 0.0, 0
        async for ev in backend.generate(req):
            if getattr(ev, "text", None):
                n += 1
                first = first or time.perf_counter()
        return first, time.perf_counter(), n

    got = await asyncio.gather(*(one(p) for p in prompts))
    start, end = min(g[0] for g in got), max(g[1] for g in got)
    return sum(g[2] - 1 for g in got) / max(end - start, 1e-9)


def _prompts(streams: int, r: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)].format(CITIES[(i + r) % len(CITIES)]) for i in range(streams)]


async def _rounds(a: Any, model: str, streams: int) -> dict[str, list[float]]:
    """Every round at one concurrency: plain and each (width, rate) in a rotating order;
    returns per-round ratios to plain and measured acceptance rates."""
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.backends.llamacpp.speculative import NgramDraft

    b = LlamaCpp(
        model, n_ctx=streams * CTX_PER_SLOT, parallel=streams, n_threads=a.threads,
        n_batch=N_BATCH, n_gpu_layers=a.gpu_layers, prefix_cache=0,
        draft=NgramDraft(n_draft=max(a.widths)),
    )  # fmt: skip
    spec = b._scheduler().speculator  # the bench swaps its drafter (no public hook)
    peers = ["plain"] + [f"w{w} r{r:g}" for w in a.widths for r in a.rates]
    out: dict[str, list[float]] = {}
    try:
        for rnd in range(a.rounds):
            prompts, replies = _prompts(streams, rnd), {}
            spec.drafter = Oracle(1, None, replies)
            await _decode_tps(b, prompts, a.tokens, True)  # records the replies
            tps, acc = {}, {}
            for name in peers[rnd % len(peers) :] + peers[: rnd % len(peers)]:
                w, _, r = name[1:].partition(" r") if name != "plain" else ("1", "", "0")
                spec.drafter = Oracle(int(w), float(r), replies)
                before = dict(b.batching_stats())
                tps[name] = await _decode_tps(b, prompts, a.tokens, name != "plain")
                after = b.batching_stats()
                drafted = after.get("spec_drafted", 0) - before.get("spec_drafted", 0)
                taken = after.get("spec_accepted", 0) - before.get("spec_accepted", 0)
                acc[name] = taken / drafted if drafted else 0.0
            for name in peers[1:]:
                out.setdefault(name, []).append(tps[name] / tps["plain"])
                out.setdefault(f"{name} acceptance", []).append(acc[name])
            print(f"{streams} streams, round {rnd + 1}: plain {tps['plain']:.1f} tok/s, "
                  + ", ".join(f"{n} {tps[n]:.1f}" for n in peers[1:]), flush=True)  # fmt: skip
    finally:
        b.close()
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--tokens", type=int, default=None, help="tokens per reply")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--streams", default=None, help="comma-separated concurrencies (1,8)")
    p.add_argument("--widths", default=None, help="draft widths (4,8)")
    p.add_argument("--rates", default=None, help="forced acceptance rates (0,0.5,0.9,1)")
    from bench.model_args import add_model_args, model_path

    add_model_args(p, THREADS)
    a = p.parse_args(argv)
    a.tokens = a.tokens or (16 if a.smoke else 128)
    a.rounds = a.rounds or (1 if a.smoke else 3)
    a.widths = [int(x) for x in (a.widths or ("4" if a.smoke else "4,8")).split(",")]
    a.rates = [float(x) for x in (a.rates or ("0,1" if a.smoke else "0,0.5,0.9,1")).split(",")]
    streams = [int(x) for x in (a.streams or ("1,2" if a.smoke else "1,8")).split(",")]
    a.model, label = model_path(a)
    res = {c: asyncio.run(_rounds(a, a.model, c)) for c in streams}
    print(
        f"{label}, greedy, {a.tokens} tokens, {a.rounds} rounds, "
        f"{a.threads} threads; median per-round ratio of decode tok/s, forced / plain "
        "(measured acceptance in brackets)"
    )
    for c, r in res.items():
        for name in (k for k in r if not k.endswith("acceptance")):
            acc = statistics.median(r[f"{name} acceptance"])
            print(f"x{c:<3} {name:<12}{statistics.median(r[name]):>8.2f}   ({acc:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
