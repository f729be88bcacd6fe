"""RPC overhead: decode tok/s of SmolLM2 split over two local ggml RPC workers vs local.

Issue 21 asks what splitting a model over machines costs, measured on this machine
(docs/adr/0019-rpc-backend.md). Two ``inferd rpc-worker`` processes on 127.0.0.1 hold
the layers (``-ngl all``, an even split); every contender decodes the same N tokens
greedily with end-of-generation ignored, each in its own process, interleaved round
by round (round robin, starting one further each round) so load from other jobs hits
all of them alike. Ratios are medians of per-round ratios.

Contenders, paired by transport (in-process with in-process):

* ``inferd``: ``LlamaCpp`` on this host's CPU;
* ``inferd-rpc``: ``LlamaCpp(rpc_servers=[w1, w2], rpc_in_process=True)``: the split in
  the measuring process, the same transport as llama-bench's;
* ``inferd-rpc-child``: ``LlamaCpp(rpc_servers=[w1, w2])`` as users get it by default:
  the split in a supervised child daemon, events over its Unix socket (ADR 0019);
* ``llama-bench`` and ``llama-bench-rpc``: llama.cpp's own tool from the vendored
  tree (``bench/peers.py``), ``-d P -p 0 -n N`` (decoding after the prompt's P cells,
  as ours does), locally and with ``-rpc w1,w2`` over the same workers.

Same settings on every side: threads (``--threads``), batch 512, and flash attention
left at libllama's AUTO, which is llama-bench's default as it is ours, so both resolve
it on the same devices. The one setting llama-bench cannot match is its context: it
sizes its own (P + N cells) where ours has 512.

Reported: median tok/s of each, and the ratios inferd-rpc/inferd (what the split costs
us), llama-bench-rpc/llama-bench (what it costs llama.cpp), inferd-rpc/llama-bench-rpc
(us vs llama.cpp on the same split) and inferd-rpc-child/inferd-rpc (the child hop).

    python bench/bench_rpc.py [--smoke] [--tokens N] [--rounds R] [--threads T]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "Write a long, detailed story about a lighthouse keeper and the sea."
#: Seconds a worker may take to start listening.
WORKER_START_S = 60.0
CONTENDERS = ("inferd", "inferd-rpc", "inferd-rpc-child", "llama-bench", "llama-bench-rpc")
PAIRS = (
    ("inferd-rpc", "inferd"),
    ("llama-bench-rpc", "llama-bench"),
    ("inferd-rpc", "llama-bench-rpc"),
    ("inferd-rpc-child", "inferd-rpc"),
)


def _model_path() -> str:
    from inferd.models import resolve

    return str(resolve("smollm2-135m", pull=True, progress=False))


def child_inferd(a: argparse.Namespace) -> float:
    """Decode tok/s of one LlamaCpp run (local, split in process, or split in a child)."""
    import asyncio

    from inferd.backends.llamacpp import LlamaCpp
    from inferd.types import Done, Request

    kwargs: dict[str, object] = {"n_ctx": 512, "n_threads": a.threads, "parallel": 1}
    if a.servers:
        kwargs["rpc_servers"] = a.servers.split(",")
        kwargs["rpc_in_process"] = a.child == "inferd-rpc"

    async def run() -> float:
        async with LlamaCpp(a.model, **kwargs) as b:
            warm = Request.chat(PROMPT, temperature=0, max_tokens=4, ignore_eos=True)
            async for _ in b.generate(warm):
                pass
            req = Request.chat(PROMPT, temperature=0, max_tokens=a.tokens, ignore_eos=True)
            n, first = 0, None
            async for ev in b.generate(req):
                if first is None:
                    first = time.perf_counter()
                if isinstance(ev, Done):
                    n = ev.usage.output_tokens
            end = time.perf_counter()
            assert n == a.tokens and first is not None, f"generated {n}, wanted {a.tokens}"
            return (n - 1) / (end - first)

    return asyncio.run(run())


def prompt_tokens(model: str) -> int:
    """The chat-rendered prompt's token count: llama-bench prefills as many cells first
    (``-d``, untimed), so it decodes at the positions our contenders decode at."""
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.types import Request

    b = LlamaCpp(model, n_ctx=512, n_threads=1, parallel=1)
    try:
        return len(b.tokenize_prompt(b.render(Request.chat(PROMPT))))
    finally:
        b.close()


def llama_bench(exe: Path, a: argparse.Namespace, servers: str | None) -> float:
    cmd = [str(exe), "-m", a.model, "-t", str(a.threads), "-r", "1", "-o", "json"]
    cmd += ["-d", str(a.depth), "-p", "0", "-n", str(a.tokens), "-b", "512", "-ub", "512"]
    cmd += ["-ngl", "999" if servers else "0"]
    if servers:
        cmd += ["-rpc", servers]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({p.returncode}): {p.stderr[-2000:]}")
    return float(json.loads(p.stdout)[0]["avg_ts"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def workers(n: int, threads: int) -> Iterator[str]:
    """``n`` inferd rpc-workers on 127.0.0.1; yields ``host:port,host:port``."""
    from inferd.backends.llamacpp.rpc_probe import probe
    from inferd.errors import ModelLoadError

    procs, eps = [], []
    try:
        for _ in range(n):
            port = _free_port()
            cmd = [sys.executable, "-m", "inferd", "rpc-worker", "--port", str(port)]
            procs.append(
                subprocess.Popen(
                    [*cmd, "--threads", str(threads)], stdout=subprocess.DEVNULL, env=_env()
                )
            )
            eps.append(f"127.0.0.1:{port}")
        deadline = time.monotonic() + WORKER_START_S
        for ep in eps:
            while True:
                try:
                    probe(ep)
                    break
                except ModelLoadError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        yield ",".join(eps)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def _env() -> dict[str, str]:
    path = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def _run_one(name: str, a: argparse.Namespace, servers: str, exe: Path) -> float:
    if name.startswith("llama-bench"):
        return llama_bench(exe, a, servers if name.endswith("rpc") else None)
    cmd = [sys.executable, __file__, "--child", name, "--model", a.model]
    cmd += ["--tokens", str(a.tokens), "--threads", str(a.threads)]
    if name != "inferd":
        cmd += ["--servers", servers]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed ({p.returncode}): {p.stderr[-2000:]}")
    return float(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads of the head and of each worker")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--servers", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args(argv)
    if a.child:
        print(child_inferd(a))
        return 0
    if a.smoke:
        a.tokens, a.rounds = 16, 2
    a.model = _model_path()
    a.depth = prompt_tokens(a.model)
    sys.path.insert(0, str(ROOT))
    from bench.peers import ensure_peer

    exe = ensure_peer("llama-bench", rpc=True)
    samples: dict[str, list[float]] = {n: [] for n in CONTENDERS}
    with workers(2, a.threads) as servers:
        for r in range(a.rounds):
            k = r % len(CONTENDERS)
            for name in CONTENDERS[k:] + CONTENDERS[:k]:
                samples[name].append(_run_one(name, a, servers, exe))
    report = _report(samples, a)
    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _report(samples: dict[str, list[float]], a: argparse.Namespace) -> dict[str, object]:
    ratios = {
        f"{x}/{y}": round(
            statistics.median(p / q for p, q in zip(samples[x], samples[y], strict=True)), 3
        )
        for x, y in PAIRS
    }
    return {
        "tokens": a.tokens,
        "rounds": a.rounds,
        "threads": a.threads,
        "tok_s_median": {k: round(statistics.median(v), 1) for k, v in samples.items()},
        "tok_s_rounds": {k: [round(x, 1) for x in v] for k, v in samples.items()},
        "ratio_median_per_round": ratios,
    }


if __name__ == "__main__":
    sys.exit(main())
