"""Embeddings throughput (inputs/s): inferd vs llama-server vs llama-cpp-python (issue 19).

Same model (SmolLM2-135M-Instruct Q4_1, mean pooling), same threads, same texts (N short
sentences, 256 by default), every peer given all N in one call, contenders interleaved
round by round (``bench/timing.py``), ratios the median of per-round ratios. Two pairs,
each compared over the same transport class:

* HTTP, one ``POST /v1/embeddings`` of N inputs over loopback from the same blocking
  client (``urllib``): ``inferd bridge`` (a subprocess serving an in-process
  ``LlamaCpp(embed=True)``) vs ``llama-server --embeddings --pooling mean`` (the vendored
  build), each in its own process. llama-server batches inputs across its ``-np``
  slots; the bridge packs them into decodes of up to 64 sequences
  (``inferd.backends.llamacpp.embedding``). Target: bridge >= 1.0x llama-server.
* In-process Python call: ``LlamaCpp.embed(EmbedRequest(texts))`` vs llama-cpp-python's
  ``Llama.create_embedding(texts)`` (which also packs inputs into one batch).

Same work: every peer's batch holds 2048 tokens, flash attention as ours resolves it
(``bench/fair.py``), ``-t``/``-tb`` = ``n_threads``.

    python bench/bench_embeddings.py [--smoke] [--texts N] [--threads T] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Tokens per batch for every peer (``-b``/``-ub``, ``n_batch``, ``embed_n_ctx``).
BATCH_TOKENS = 2048
#: llama-server slots (each a sequence it may batch into one decode).
SERVER_SLOTS = 16
#: Seconds a server gets to load its model and answer ``/health``.
START_TIMEOUT_S = 120.0


def texts(n: int) -> list[str]:
    """``n`` distinct short sentences (about a dozen tokens each)."""
    topics = ("llamas", "the weather", "a red bicycle", "quantum physics", "bread", "rivers")
    return [
        f"Sentence {i} is about {topics[i % len(topics)]} and number {i * 7}." for i in range(n)
    ]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_health(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:  # loopback
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy")


def start_llama_server(model: str, threads: int, flash_attn: bool) -> tuple[Any, str]:
    from bench.fair import server_fa_flag
    from bench.peers import ensure_peer

    exe = ensure_peer("llama-server", quiet=True)
    port = _port()
    cmd = [
        str(exe),
        *("-m", model, "--embeddings", "--pooling", "mean"),
        *("-np", str(SERVER_SLOTS), "-c", str(SERVER_SLOTS * 256)),
        *("-b", str(BATCH_TOKENS), "-ub", str(BATCH_TOKENS)),
        *("-t", str(threads), "-tb", str(threads)),
        *server_fa_flag(flash_attn),
        *("--host", "127.0.0.1", "--port", str(port), "--no-webui"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_health(url, proc)
    return proc, url


def start_bridge(model: str, threads: int) -> tuple[Any, str, Path]:
    from bench.servers import _env, _first_line, json_str

    fd, name = tempfile.mkstemp(prefix="inferd-bench-embed-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(
            '[[backend]]\ntype = "llamacpp"\n'
            f"model = {json_str(model)}\nembed = true\nn_threads = {threads}\n"
            f"n_ctx = 512\nparallel = 1\nembed_n_ctx = {BATCH_TOKENS}\n"
        )
    cmd = [sys.executable, "-m", "inferd.serve.bridge", "--config", name, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env())
    line = _first_line(proc, START_TIMEOUT_S)
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"inferd bridge did not start: {line!r}")
    return proc, line.rsplit("listening on ", 1)[1].strip(), Path(name)


def http_embed(url: str, inputs: list[str]) -> Callable[[], object]:
    body = json.dumps({"input": inputs, "model": "m", "encoding_format": "float"}).encode()

    def call() -> object:
        req = urllib.request.Request(
            url + "/v1/embeddings", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as r:  # loopback
            data = json.loads(r.read())["data"]
        assert len(data) == len(inputs), len(data)
        return data

    return call


def in_process(model: str, threads: int, inputs: list[str]) -> tuple[Callable[[], object], Any]:
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.types import EmbedRequest

    b = LlamaCpp(
        model, embed=True, n_threads=threads, n_ctx=512, parallel=1, embed_n_ctx=BATCH_TOKENS
    )
    loop = asyncio.new_event_loop()
    req = EmbedRequest(tuple(inputs))

    def call() -> object:
        return loop.run_until_complete(b.embed(req))

    return call, (b, loop)


def lcp(model: str, threads: int, flash_attn: bool, inputs: list[str]) -> Callable[[], object]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=BATCH_TOKENS,
        n_batch=BATCH_TOKENS,
        n_ubatch=BATCH_TOKENS,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        verbose=False,
    )

    def call() -> object:
        out = llm.create_embedding(inputs)
        assert len(out["data"]) == len(inputs)
        return out

    return call


def add_lcp(
    contenders: dict[str, Callable[[], object]],
    model: str,
    threads: int,
    fa: bool,
    inputs: list[str],
) -> None:
    """llama-cpp-python as one more contender, where it is installed (CI installs it)."""
    try:
        contenders["llama-cpp-python"] = lcp(model, threads, fa, inputs)
    except ImportError:
        if os.environ.get("CI"):
            raise SystemExit("llama-cpp-python is not installed; CI installs it") from None
        print("llama-cpp-python is not installed: skipping that peer", file=sys.stderr)


def report(times: dict[str, list[float]], n: int, a: argparse.Namespace, fa: bool) -> dict:
    from bench.timing import describe_speedup, ratio

    rate = {k: n / statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {"texts": n, "threads": a.threads, "flash_attn": fa, "inputs_per_s": rate}
    print(
        f"\n{Path(a.model).name}, {a.threads} threads, {n} texts per call, "
        f"{a.rounds} rounds, flash attention {'on' if fa else 'off'} for every peer"
    )
    for k, v in rate.items():
        print(f"  {k:<18} {v:9.1f} inputs/s")
    for fast, slow in (("inferd bridge", "llama-server"), ("inferd", "llama-cpp-python")):
        if fast in times and slow in times:
            r = ratio(times, slow, fast)
            out[f"{fast} / {slow}"] = r
            print(f"  {fast} / {slow}: {describe_speedup(times, slow, fast)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI: must run)")
    ap.add_argument("--texts", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--model", default=None, help="GGUF path (default: smollm2-135m)")
    ap.add_argument("--json", default=None, help="write results to this file")
    ap.add_argument(
        "--http-only",
        action="store_true",
        help="only the HTTP pair (inferd bridge vs llama-server): half the time",
    )
    a = ap.parse_args(argv)
    n = a.texts or (16 if a.smoke else 256)
    a.rounds = a.rounds or (1 if a.smoke else 5)
    sys.path.insert(0, str(ROOT))
    from bench.fair import our_flash_attn
    from inferd.models import resolve

    a.model = a.model or str(resolve("smollm2-135m", pull=True))
    fa = our_flash_attn(a.model)
    inputs = texts(n)
    procs: list[Any] = []
    try:
        srv, srv_url = start_llama_server(a.model, a.threads, fa)
        procs.append(srv)
        br, br_url, cfg = start_bridge(a.model, a.threads)
        procs.append(br)
        contenders = {
            "inferd bridge": http_embed(br_url, inputs),
            "llama-server": http_embed(srv_url, inputs),
        }
        keep = None
        if not a.http_only:
            contenders["inferd"], keep = in_process(a.model, a.threads, inputs)
            add_lcp(contenders, a.model, a.threads, fa, inputs)
        from bench.timing import interleaved_times

        times = interleaved_times(contenders, a.rounds)
        out = report(times, n, a, fa)
        if keep is not None:
            keep[0].close()
        cfg.unlink(missing_ok=True)
    finally:
        for p in procs:
            p.terminate()
            p.wait(15)
    if a.json:
        Path(a.json).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
