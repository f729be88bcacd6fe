"""Streaming-core benchmark: bytes of an OpenAI chat stream to events, against peers.

Two measurements, every number a ratio against a peer timed in the same run:

1. *Stream decode.* One generated ``chat.completion.chunk`` stream (content deltas,
   parallel tool calls with fragmented arguments, keep-alive comments) is fed in
   random 1..4096-byte slices to: our fused decoder (compiled core), its pure-Python
   twin, openai-python's ``SSEDecoder`` + ``json.loads`` (as its ``Stream`` does, with
   no accumulation at all), and a floor (``bytes.split`` + ``orjson.loads`` over the
   whole buffer, no framing rules, no events). Reported: SSE events per second.
2. *One huge tool-call argument.* A 1 MiB argument string in 20-byte deltas into our
   ``ChunkAccumulator`` against openai-python's ``accumulate_delta`` (what its stream
   helpers use to build the snapshot), on the already-parsed delta dicts; a
   quarter-size run shows growth (linear: ~4x) and a 2 MiB run (one repeat) shows
   where the quadratic peer is heading.

``python bench/bench_stream_core.py [--smoke]``; ``--smoke`` runs tiny sizes once (CI).
Contenders run round robin within each repeat (``bench/timing.py``); ratios are medians
of per-round ratios, rates medians over repeats; results also go to
``bench/results/stream_core.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent))

from bench.timing import interleaved_times, per_round, ratio  # noqa: E402
from inferd._fast import load_twin  # noqa: E402

WORDS = (
    "the",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " lazy",
    " dog",
    "é",
    " 😀",
    "\n",
    " résumé",
    " naïve",
    " 中文",
    ",",
    ".",
    " model",
    " tokens",
)


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion.chunk",
            "created": 1741570283,
            "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_eb9dce56a8",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
    )


def _tool_call_burst(rng: random.Random, first: int) -> tuple[list[bytes], int]:
    """Events of 2-3 parallel tool calls (ids from ``first``), their arguments in
    3..15-byte fragments, interleaved at random; and the number of calls."""
    k = rng.randint(2, 3)
    args = [
        orjson.dumps(
            {"city": f"City {rng.randint(0, 999)}", "days": rng.randint(1, 9), "units": "metric"}
        ).decode()
        for _ in range(k)
    ]
    out = []
    for j in range(k):
        head = {
            "index": first + j,
            "id": f"call_{first + j:08d}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
        out.append(b"data: " + _chunk({"tool_calls": [head]}) + b"\n\n")
    pos = [0] * k
    while any(pos[j] < len(args[j]) for j in range(k)):
        j = rng.randrange(k)
        if pos[j] >= len(args[j]):
            continue
        step = rng.randint(3, 15)
        frag = args[j][pos[j] : pos[j] + step]
        pos[j] += step
        delta = {"tool_calls": [{"index": first + j, "function": {"arguments": frag}}]}
        out.append(b"data: " + _chunk(delta) + b"\n\n")
    return out, k


def make_stream(n_events: int, seed: int = 7) -> tuple[bytes, int]:
    """An SSE body with ``n_events`` data events (plus comments); returns (body, events)."""
    rng = random.Random(seed)
    parts: list[bytes] = [b"data: " + _chunk({"role": "assistant", "content": ""}) + b"\n\n"]
    events = 1
    next_call = 0
    while events < n_events - 3:
        r = rng.random()
        if r < 0.02:
            parts.append(b": keep-alive\n\n")
        elif r < 0.03:
            burst, calls = _tool_call_burst(rng, next_call)
            parts += burst
            events += len(burst)
            next_call += calls
        else:
            text = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
            parts.append(b"data: " + _chunk({"content": text}) + b"\n\n")
            events += 1
    parts.append(b"data: " + _chunk({}, "tool_calls") + b"\n\n")
    parts.append(
        b'data: {"id":"chatcmpl-B9","object":"chat.completion.chunk","choices":[],'
        b'"usage":{"prompt_tokens":120,"completion_tokens":99000}}\n\n'
    )
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts), events + 3


def slice_randomly(body: bytes, seed: int = 11) -> list[bytes]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(body):
        n = rng.randint(1, 4096)
        out.append(body[i : i + n])
        i += n
    return out


# --------------------------------------------------------------------------- contenders

FUSED = "fused C decoder"
TWIN = "pure-Python twin"
OPENAI = "openai SSEDecoder + json.loads"
FLOOR = "floor: split + orjson.loads"
OPENAI_ACC = "openai accumulate_delta"


def run_ours(kind: str) -> Callable[[list[bytes], bytes], int]:
    mod = load_twin("chunks", kind)

    def run(slices: list[bytes], body: bytes) -> int:
        dec = mod.ChatStreamDecoder()
        n = 0
        for s in slices:
            n += len(dec.feed(s))
        n += len(dec.close())
        return n

    return run


def run_openai(slices: list[bytes], body: bytes) -> int:
    from openai._streaming import SSEDecoder

    n = 0
    for sse in SSEDecoder().iter_bytes(iter(slices)):
        if sse.data.startswith("[DONE]"):
            break
        json.loads(sse.data)
        n += 1
    return n


def run_floor(slices: list[bytes], body: bytes) -> int:
    n = 0
    loads = orjson.loads
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: {"):
            loads(block[6:])
            n += 1
    return n


def bench_stream(n_events: int, repeats: int) -> dict[str, Any]:
    body, events = make_stream(n_events)
    slices = slice_randomly(body)
    runners: dict[str, Callable[[list[bytes], bytes], int]] = {
        FUSED: run_ours("c"),
        TWIN: run_ours("py"),
        OPENAI: run_openai,
        FLOOR: run_floor,
    }
    times = interleaved_times(
        {name: (lambda fn=fn: fn(slices, body)) for name, fn in runners.items()}, repeats
    )
    res: dict[str, Any] = {
        "events": events,
        "bytes": len(body),
        "slices": len(slices),
        "events_per_s": {n: events / statistics.median(t) for n, t in times.items()},
        "ratios": {},
        "per_round": {},
    }
    for label, fast, slow in (
        ("fused / openai", FUSED, OPENAI),
        ("fused / floor", FUSED, FLOOR),
        ("python twin / openai", TWIN, OPENAI),
    ):
        res["ratios"][label] = ratio(times, slow, fast)
        res["per_round"][label] = per_round(times, slow, fast)
    return res


def _arg_chunks(total: int, step: int = 20) -> list[dict[str, Any]]:
    arg = orjson.dumps({"blob": "x" * (total - 12)}).decode()
    chunks: list[dict[str, Any]] = [
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_big",
                                "type": "function",
                                "function": {"name": "store", "arguments": ""},
                            }
                        ]
                    },
                    "finish_reason": None,
                }
            ]
        }
    ]
    for i in range(0, len(arg), step):
        chunks.append(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {"index": 0, "function": {"arguments": arg[i : i + step]}}
                            ]
                        },
                        "finish_reason": None,
                    }
                ]
            }
        )
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return chunks


def bench_big_args(total: int, repeats: int, extra: bool = False) -> dict[str, Any]:
    from openai.lib.streaming._deltas import accumulate_delta

    def ours(kind: str) -> Callable[[list[dict[str, Any]]], object]:
        mod = load_twin("chunks", kind)

        def run(chunks: list[dict[str, Any]]) -> object:
            acc = mod.ChunkAccumulator()
            for c in chunks:
                acc.ingest(c)
            return acc.finalize()

        return run

    def theirs(chunks: list[dict[str, Any]]) -> object:
        snap: dict[object, object] = {}
        for c in chunks:
            snap = accumulate_delta(snap, c["choices"][0]["delta"])
        return snap

    runners = {"ours C": ours("c"), "ours py": ours("py"), OPENAI_ACC: theirs}
    res: dict[str, Any] = {}
    sizes = (total // 4, total, total * 2) if extra else (total // 4, total)
    for size in sizes:
        times = _interleaved_fresh(runners, orjson.dumps(_arg_chunks(size)), repeats, size > total)
        res[size] = {k: statistics.median(v) for k, v in times.items()}
        res[f"speedup vs openai at {size} B"] = {
            k: ratio(times, OPENAI_ACC, k) for k in ("ours C", "ours py")
        }
    small, big = total // 4, total
    res["growth 4x size"] = {k: res[big][k] / res[small][k] for k in res[big]}
    return res


def _interleaved_fresh(
    runners: dict[str, Callable[[list[dict[str, Any]]], object]],
    blob: bytes,
    repeats: int,
    once: bool,
) -> dict[str, list[float]]:
    """Round robin per repeat, each call on fresh dicts (accumulate_delta keeps them)."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(1 if once else repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            chunks = orjson.loads(blob)
            t0 = time.perf_counter()
            runners[name](chunks)
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (CI)")
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    n_events, repeats, total = args.events, args.repeats, 1 << 20
    if args.smoke:
        n_events, repeats, total = 2_000, 1, 1 << 14
    s = bench_stream(n_events, repeats)
    print(f"stream: {s['events']} events, {s['bytes']} bytes, {s['slices']} slices of 1..4096 B")
    base = s["events_per_s"]["openai SSEDecoder + json.loads"]
    for name, eps in s["events_per_s"].items():
        print(f"  {name:32s} {eps:12,.0f} events/s  {eps / base:6.2f}x openai")
    print("  medians of per-round ratios (contenders round robin within each repeat):")
    for name, r in s["ratios"].items():
        print(f"  {name:32s} {r:6.2f}  per round {s['per_round'][name]}")
    b = bench_big_args(total, 1 if args.smoke else 3, extra=not args.smoke)
    print(
        f"tool-call argument of {total} B in 20-byte deltas (seconds, median; "
        "speedups: medians of per-round ratios):"
    )
    sizes = [k for k in b if isinstance(k, int)]
    for size in sizes:
        print(f"  {size:>8} B: " + ", ".join(f"{k} {v:.4f}" for k, v in b[size].items()))
        print(
            "            speedup vs openai: "
            + ", ".join(f"{k} {v:.0f}x" for k, v in b[f"speedup vs openai at {size} B"].items())
        )
    print(
        f"  growth {total // 4} B -> {total} B (4x; linear = ~4x): "
        + ", ".join(f"{k} {v:.1f}x" for k, v in b["growth 4x size"].items())
    )
    if not args.smoke:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / "stream_core.json").write_text(
            json.dumps({"stream": s, "big_args": {str(k): v for k, v in b.items()}}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
