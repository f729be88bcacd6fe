"""Several models behind one server: cold start, model switches, idle memory (issue 17).

Peers, both over HTTP with streamed chat completions on the same GGUF under two names
("small", "big"), the same context, threads and one model loaded at a time:

* ``inferd bridge --config`` with ``[[model]]`` tables and a ``max_loaded_bytes``
  budget that holds one of them (docs/adr/0015-several-models-load-on-demand.md);
* llama.cpp's ``llama-server`` in router mode (``--models-dir``, ``--models-max 1``),
  which starts one child server per loaded model.

Measured: cold start (request -> first token, load included: the first request and
every request of the alternating phase, where each one swaps the model), warm
requests on one model, and the bridge's resident memory before any load, with two
models loaded, and after ``keep_alive`` unloaded them (it should return to its level
before the load, plus libllama's own state). ``--smoke`` runs two rounds.
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
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import ensure_peer  # noqa: E402
from bench.servers import Server, _env, _first_line  # noqa: E402

#: Context and reply length of every request (small: the load, not decoding, is measured).
N_CTX = 512
MAX_TOKENS = 4
#: Seconds a server may take to start or to answer one request (a load included).
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0
#: inferd's keep_alive in the memory phase.
KEEP_ALIVE_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (llama-server's router runs one child per model)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        at = todo.pop()
        kids = [c for c, p in parent.items() if p == at]
        out += kids
        todo += kids
    return out


def start_inferd(model: Path, threads: int, budget: int, tmp: Path) -> Server:
    cfg = tmp / "models.toml"
    lines = ["[pool]", f"max_loaded_bytes = {budget}", f"keep_alive = {KEEP_ALIVE_S}"]
    for name in ("small", "big"):
        lines += [
            "[[model]]",
            f'name = "{name}"',
            f"source = {json.dumps(str(model))}",
            f"n_ctx = {N_CTX}",
            f"n_threads = {threads}",
        ]
    cfg.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "inferd.serve.bridge", "--config", str(cfg), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env())
    line = _first_line(proc, START_TIMEOUT_S)
    server = Server("inferd", proc, "")
    if "listening on " not in line:
        server.stop()
        raise RuntimeError(f"inferd bridge did not start: {line!r}")
    server.base_url = line.rsplit("listening on ", 1)[1].strip()
    return server


def start_router(model: Path, threads: int, tmp: Path) -> Server:
    models_dir = tmp / "models"
    models_dir.mkdir()
    for name in ("small", "big"):
        (models_dir / f"{name}.gguf").symlink_to(model)
    port = free_port()
    cmd = [
        str(ensure_peer("llama-server")),
        *("--models-dir", str(models_dir), "--models-max", "1"),
        *("-c", str(N_CTX), "-t", str(threads), "-tb", str(threads)),
        *("--host", "127.0.0.1", "--port", str(port), "--no-webui"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server("llama-server router", proc, f"http://127.0.0.1:{port}")


async def wait_up(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            async with session.get(url + "/v1/models") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def ttft(session: aiohttp.ClientSession, url: str, model: str) -> float:
    """Seconds from sending a streamed request to its first content chunk."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    first: float | None = None
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with session.post(url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status != 200:
            raise RuntimeError(f"{model}: HTTP {r.status}: {(await r.text())[:300]}")
        async for line in r.content:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{model}: no content chunk")
    return first


async def measure(server: Server, rounds: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        await wait_up(session, server.base_url)
        idle_before = rss_bytes([server.proc.pid, *children(server.proc.pid)])
        cold = await ttft(session, server.base_url, "small")
        warm = [await ttft(session, server.base_url, "small") for _ in range(rounds)]
        switch = []
        for i in range(rounds):
            switch.append(await ttft(session, server.base_url, ("big", "small")[i % 2]))
        loaded = rss_bytes([server.proc.pid, *children(server.proc.pid)])
        await asyncio.sleep(KEEP_ALIVE_S + 2.0)  # inferd's keep_alive passes
        idle_after = rss_bytes([server.proc.pid, *children(server.proc.pid)])
    return {
        "cold_ttft_s": cold,
        "warm_ttft_s": statistics.median(warm),
        "switch_ttft_s": statistics.median(switch),
        "rss_idle_before": idle_before,
        "rss_loaded": loaded,
        "rss_idle_after": idle_after,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="two rounds")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = p.parse_args(argv)
    rounds = 2 if args.smoke else args.rounds
    from inferd import models
    from inferd.serve.config import BackendSpec, ModelSpec
    from inferd.serve.models_pool import estimate

    model = models.resolve("smollm2-135m", pull=True)
    one = estimate(ModelSpec("x", BackendSpec("llamacpp", {"n_ctx": N_CTX}), str(model)))[1]
    results = {}
    with tempfile.TemporaryDirectory(prefix="inferd-bench-models-") as d:
        for name, start in (
            ("inferd", lambda t: start_inferd(model, args.threads, one + one // 2, t)),
            ("llama-server router", lambda t: start_router(model, args.threads, t)),
        ):
            tmp = Path(d) / name.replace(" ", "-")
            tmp.mkdir()
            server = start(tmp)
            try:
                results[name] = asyncio.run(measure(server, rounds))
            finally:
                server.stop()
    for name, r in results.items():
        ms = {k: r[k] * 1e3 for k in ("cold_ttft_s", "warm_ttft_s", "switch_ttft_s")}
        mb = {k: r[k] / 1e6 for k in ("rss_idle_before", "rss_loaded", "rss_idle_after")}
        print(
            f"{name:22} cold {ms['cold_ttft_s']:8.1f} ms  warm {ms['warm_ttft_s']:7.1f} ms"
            f"  switch {ms['switch_ttft_s']:8.1f} ms  RSS idle {mb['rss_idle_before']:6.1f}"
            f" -> loaded {mb['rss_loaded']:6.1f} -> idle {mb['rss_idle_after']:6.1f} MB"
        )
    if not args.smoke:
        out = ROOT / "bench" / "results" / "models.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
