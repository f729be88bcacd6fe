"""What ``logprobs`` (top 5) and ``n=4`` cost next to plain generation (issue 15, ADR 0022).

Two peers on SmolLM2-135M-Instruct, the same requests, interleaved round by round (the
order alternates, so load from elsewhere hits both alike):

* ``inferd``: ``LlamaCpp`` in this process (split KV layout, ``parallel=4``);
* ``llama-server``: built from the vendored llama.cpp (``bench/peers.py``), same slots,
  context, threads, batch and flash-attention setting (``bench/servers.py``), driven
  over HTTP with non-streamed ``/v1/chat/completions`` requests.

Each round times, on each peer, one request of each kind with ``ignore_eos`` and
``max_tokens`` (so every reply has the same length): ``plain`` (n=1), ``logprobs``
(``logprobs=true, top_logprobs=5``) and ``n4`` (``n=4``, seeded sampling). Reported:
the median over rounds of the per-round ratios logprobs/plain and n4/plain (n4/plain
is the wall time of four choices against one: 4.0 would be no sharing at all).

    python bench/bench_choices.py [--smoke] [--tokens T] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

#: Slots of both peers (n=4 needs four sequences decoded together).
SLOTS = 4
#: KV cells per slot.
CTX_PER_SLOT = 512
#: Compute threads of both peers.
THREADS = 2
#: Seconds llama-server gets to answer /health after start.
SERVER_START_TIMEOUT_S = 120.0
PROMPT = "Write a short story about a lighthouse keeper."
KINDS = ("plain", "logprobs", "n4")


def _kind_fields(kind: str) -> dict[str, Any]:
    if kind == "logprobs":
        return {"logprobs": True, "top_logprobs": 5}
    if kind == "n4":
        return {"n": 4}
    return {}


async def _ours(backend: Any, kind: str, tokens: int) -> float:
    from inferd.types import Message, Request

    req = Request(
        (Message.user(PROMPT),),
        temperature=0.8,
        seed=1,
        max_tokens=tokens,
        ignore_eos=True,
        **_kind_fields(kind),
    )
    t0 = time.perf_counter()
    produced = 0
    async for ev in backend.generate(req):
        produced += getattr(getattr(ev, "usage", None), "output_tokens", 0)
    elapsed = time.perf_counter() - t0
    want = tokens * (4 if kind == "n4" else 1)
    if produced != want:
        raise RuntimeError(f"inferd {kind}: {produced} tokens, expected {want}")
    return elapsed


def _theirs(url: str, kind: str, tokens: int) -> float:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0.8,
        "seed": 1,
        "max_tokens": tokens,
        "ignore_eos": True,
        **_kind_fields(kind),
    }
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        reply = json.loads(resp.read())
    elapsed = time.perf_counter() - t0
    # llama-server's usage counts one choice of n (measured: 16 for n=4 x 16 tokens)
    got = reply["usage"]["completion_tokens"]
    if got != tokens or len(reply["choices"]) != (4 if kind == "n4" else 1):
        raise RuntimeError(f"llama-server {kind}: {got} tokens per choice, expected {tokens}")
    if kind == "logprobs" and not reply["choices"][0]["logprobs"]["content"]:
        raise RuntimeError("llama-server sent no logprobs")
    return elapsed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_health(url: str, server: Any) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError("llama-server exited during start")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("llama-server did not become healthy")


async def _run(tokens: int, rounds: int) -> dict[str, dict[str, float]]:
    from bench.fair import our_flash_attn
    from bench.peers import ensure_peer
    from bench.servers import Settings, start_llama_server
    from inferd import models
    from inferd.backends.llamacpp import LlamaCpp

    model = str(models.resolve("smollm2-135m", pull=True, progress=False))
    s = Settings(model, SLOTS, CTX_PER_SLOT, THREADS, 0, our_flash_attn(model))
    ours = LlamaCpp(
        model, n_ctx=SLOTS * CTX_PER_SLOT, parallel=SLOTS, n_threads=THREADS, n_batch=512
    )
    server = start_llama_server(ensure_peer("llama-server"), s, _free_port())
    ratios: dict[str, dict[str, list[float]]] = {
        p: {"logprobs": [], "n4": []} for p in ("inferd", "llama-server")
    }
    try:
        _wait_health(server.base_url, server)
        for kind in KINDS:  # warm both once
            await _ours(ours, kind, tokens)
            _theirs(server.base_url, kind, tokens)
        for r in range(rounds):
            peers = ["inferd", "llama-server"] if r % 2 == 0 else ["llama-server", "inferd"]
            for peer in peers:
                t = {}
                for kind in KINDS:
                    if peer == "inferd":
                        t[kind] = await _ours(ours, kind, tokens)
                    else:
                        t[kind] = await asyncio.to_thread(_theirs, server.base_url, kind, tokens)
                for kind in ("logprobs", "n4"):
                    ratios[peer][kind].append(t[kind] / t["plain"])
                print(
                    f"round {r + 1} {peer}: plain {t['plain']:.2f} s, logprobs "
                    f"{t['logprobs'] / t['plain']:.2f}x, n=4 {t['n4'] / t['plain']:.2f}x",
                    flush=True,
                )
    finally:
        server.stop()
        ours.close()
    return {p: {k: statistics.median(v) for k, v in d.items()} for p, d in ratios.items()}


def main(argv: list[str] | None = None) -> int:
    # Run as a script (python bench/x.py) as well as under run_all: bench.* imports work.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--tokens", type=int, default=None, help="tokens per reply (per choice)")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    tokens = args.tokens or (16 if args.smoke else 128)
    rounds = args.rounds or (2 if args.smoke else 7)
    out = asyncio.run(_run(tokens, rounds))
    print(f"SmolLM2-135M, {tokens} tokens per choice, {rounds} rounds, {THREADS} threads")
    print(f"{'peer':<14}{'logprobs(top5)/plain':>22}{'n=4/plain':>12}")
    for peer, r in out.items():
        print(f"{peer:<14}{r['logprobs']:>22.2f}{r['n4']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
