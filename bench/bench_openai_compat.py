"""Cloud-backend benchmark: OpenAICompat against openai-python over real loopback HTTP.

A loopback aiohttp upstream (in a child process, so the client's CPU time is its own)
streams one ``chat.completion.chunk`` per token as fast as it can. In the same run:

1. *Throughput.* ``OpenAICompat.generate`` (events out) against openai-python's
   ``AsyncOpenAI(...).chat.completions.create(stream=True)`` (chunk objects out) and a
   floor (aiohttp ``iter_any`` reading the raw bytes, no parsing at all): chunks/s and
   client CPU seconds per 1,000 chunks, medians over repeats, and the ratios.
2. *Latency.* Time to first event against a raw aiohttp read of the first bytes
   (repeated requests on a warm connection), and per-chunk latency on a paced stream
   whose chunks carry their send time (``time.perf_counter`` is CLOCK_MONOTONIC,
   shared across processes on Linux). Overhead = ours - raw, medians. Target: within
   0.2 ms.

``python bench/bench_openai_compat.py [--smoke]``. ``--smoke`` (CI) does one repeat
and fewer latency samples; the throughput stream is >= 50,000 chunks either way.
Results also go to ``bench/results/openai_compat.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

WORDS = (
    "the",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " lazy",
    " dog",
    " é",
    " 中文",
    ",",
    ".",
)


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "bench",
                "system_fingerprint": "fp_bench",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
                **extra,
            }
        )
        + b"\n\n"
    )


def make_stream(n: int) -> bytes:
    """``n`` chunks: a role chunk, n-2 content deltas, a finish chunk with usage; [DONE]."""
    parts = [_chunk({"role": "assistant", "content": ""})]
    parts += [_chunk({"content": WORDS[i % len(WORDS)]}) for i in range(n - 2)]
    parts.append(
        _chunk(
            {},
            "stop",
            usage={"prompt_tokens": 5, "completion_tokens": n - 2, "total_tokens": n + 3},
        )
    )
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


# --------------------------------------------------------------------------- upstream


def _serve(conn: Any, n_chunks: int) -> None:
    """Child process: the loopback upstream. Sends its port through ``conn``."""
    from aiohttp import web

    body = make_stream(n_chunks)
    first = make_stream(3)
    slice_bytes = 64 * 1024

    async def fast(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        data = body if request.path.startswith("/fast") else first
        for i in range(0, len(data), slice_bytes):
            await resp.write(data[i : i + slice_bytes])
        await resp.write_eof()
        return resp

    async def paced(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "200"))
        gap = float(request.query.get("gap", "0.002"))
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(n):
            await resp.write(_chunk({"content": repr(time.perf_counter())}))
            await asyncio.sleep(gap)
        await resp.write(_chunk({}, "stop"))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/fast/v1/chat/completions", fast)
        app.router.add_post("/first/v1/chat/completions", fast)
        app.router.add_post("/paced/v1/chat/completions", paced)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


# --------------------------------------------------------------------------- clients


def _measure(fn: Any) -> Any:
    async def run() -> tuple[int, float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        n = await fn()
        return n, time.perf_counter() - w0, time.process_time() - c0

    return run


async def bench_throughput(port: int, n_chunks: int, repeats: int) -> dict[str, Any]:
    import aiohttp
    from openai import AsyncOpenAI

    from inferd.backends.openai_compat import OpenAICompat
    from inferd.types import Done, Request

    base = f"http://127.0.0.1:{port}/fast"
    request = Request.chat("go", max_tokens=n_chunks)
    ours = OpenAICompat(base, api_key="bench", model="bench", max_retries=0)
    theirs = AsyncOpenAI(base_url=base + "/v1", api_key="bench", max_retries=0)
    session = aiohttp.ClientSession()

    async def run_ours() -> int:
        n = 0
        async for ev in ours.generate(request):
            n += 1
            if isinstance(ev, Done):
                assert ev.usage.output_tokens == n_chunks - 2
        return n

    async def run_openai() -> int:
        n = 0
        stream = await theirs.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": "go"}],
            stream=True,
            max_tokens=n_chunks,
        )
        async for _chunk_obj in stream:
            n += 1
        return n

    async def run_raw() -> int:
        n = 0
        async with session.post(base + "/v1/chat/completions", data=b"{}") as resp:
            async for data in resp.content.iter_any():
                n += len(data)
        return n_chunks

    runners = {
        "inferd OpenAICompat": run_ours,
        "openai-python AsyncOpenAI": run_openai,
        "raw aiohttp read (floor)": run_raw,
    }
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    try:
        for fn in runners.values():  # warm-up: connections, imports, caches
            await fn()
        for _ in range(repeats):
            for name, fn in runners.items():  # interleaved, so drift hits all alike
                _n, wall, cpu = await _measure(fn)()
                samples[name].append((wall, cpu))
    finally:
        await ours.aclose()
        await theirs.close()
        await session.close()
    return _throughput_summary(samples, n_chunks, repeats)


def _throughput_summary(
    samples: dict[str, list[tuple[float, float]]], n_chunks: int, repeats: int
) -> dict[str, Any]:
    """Median chunks/s and CPU per client, and ours against openai-python's."""
    out: dict[str, Any] = {"chunks": n_chunks, "repeats": repeats, "clients": {}}
    for name, s in samples.items():
        wall = statistics.median(w for w, _ in s)
        cpu = statistics.median(c for _, c in s)
        out["clients"][name] = {
            "chunks_per_s": n_chunks / wall,
            "cpu_s_per_1000_chunks": cpu / (n_chunks / 1000),
        }
    c = out["clients"]
    o, t = c["inferd OpenAICompat"], c["openai-python AsyncOpenAI"]
    out["ratio_chunks_per_s"] = o["chunks_per_s"] / t["chunks_per_s"]
    out["ratio_cpu"] = t["cpu_s_per_1000_chunks"] / o["cpu_s_per_1000_chunks"]
    return out


async def _paced_latencies(ours: Any, session: Any, raw_url: str, request: Any):
    """Per-chunk latency through our client and through a raw read of the same paced
    stream: each chunk's text is the server's send time."""
    from inferd.types import Text

    lat_ours: list[float] = []
    lat_raw: list[float] = []
    async for ev in ours.generate(request):
        now = time.perf_counter()
        if isinstance(ev, Text):
            lat_ours.append(now - float(ev.text))
    async with session.post(raw_url, data=b"{}") as resp:
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            start = 0
            while (i := data.find(b'"content":"', start)) >= 0:
                j = data.index(b'"', i + 11)
                lat_raw.append(now - float(data[i + 11 : j]))
                start = j
    return lat_ours, lat_raw


async def bench_latency(port: int, samples: int, paced_chunks: int) -> dict[str, Any]:
    import aiohttp

    from inferd.backends.openai_compat import OpenAICompat
    from inferd.types import Request

    request = Request.chat("go")
    ours_first = OpenAICompat(f"http://127.0.0.1:{port}/first", api_key="", max_retries=0)
    ours_paced = OpenAICompat(
        f"http://127.0.0.1:{port}/paced?n={paced_chunks}&gap=0.002", api_key="", max_retries=0
    )
    session = aiohttp.ClientSession()
    first_url = f"http://127.0.0.1:{port}/first/v1/chat/completions"
    paced_url = f"http://127.0.0.1:{port}/paced/v1/chat/completions?n={paced_chunks}&gap=0.002"
    ttfe_ours: list[float] = []
    ttfb_raw: list[float] = []

    async def one_ours() -> float:
        t0 = time.perf_counter()
        gen = ours_first.generate(request)
        await gen.__anext__()
        t = time.perf_counter() - t0
        async for _ in gen:
            pass
        return t

    async def one_raw() -> float:
        t0 = time.perf_counter()
        async with session.post(first_url, data=b"{}") as resp:
            chunks = resp.content.iter_any()
            await chunks.__anext__()
            t = time.perf_counter() - t0
            async for _ in chunks:
                pass
        return t

    gc.collect()
    try:
        for _ in range(5):
            await one_ours()
            await one_raw()
        for _ in range(samples):
            ttfe_ours.append(await one_ours())
            ttfb_raw.append(await one_raw())
        lat_ours, lat_raw = await _paced_latencies(ours_paced, session, paced_url, request)
    finally:
        await ours_first.aclose()
        await ours_paced.aclose()
        await session.close()
    med = statistics.median
    return {
        "samples": samples,
        "paced_chunks": paced_chunks,
        "ttfe_ours_ms": med(ttfe_ours) * 1e3,
        "ttfb_raw_ms": med(ttfb_raw) * 1e3,
        # median of paired differences: each pair ran back to back, so machine noise
        # (other processes on a shared box) cancels better than in a difference of medians
        "ttfe_overhead_ms": med(a - b for a, b in zip(ttfe_ours, ttfb_raw, strict=True)) * 1e3,
        "chunk_latency_ours_ms": med(lat_ours) * 1e3,
        "chunk_latency_raw_ms": med(lat_raw) * 1e3,
        "chunk_overhead_ms": (med(lat_ours) - med(lat_raw)) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one repeat, fewer samples (CI)")
    p.add_argument("--chunks", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 5)
    n_chunks = max(50_000, args.chunks)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child, n_chunks), daemon=True)
    server.start()
    try:
        if not parent.poll(30):
            print("the loopback upstream did not start", file=sys.stderr)
            return 1
        port = parent.recv()
        tp = asyncio.run(bench_throughput(port, n_chunks, repeats))
        lat = asyncio.run(
            bench_latency(port, 50 if args.smoke else 300, 100 if args.smoke else 500)
        )
    finally:
        server.terminate()
        server.join(5)

    from inferd.toolcalls import IMPLEMENTATION

    print(
        f"throughput: {n_chunks} chunks over loopback HTTP, median of {repeats} "
        f"(decoder core: {IMPLEMENTATION})"
    )
    for name, r in tp["clients"].items():
        print(
            f"  {name:28s} {r['chunks_per_s']:12,.0f} chunks/s  "
            f"{r['cpu_s_per_1000_chunks'] * 1e3:8.3f} ms CPU per 1,000 chunks"
        )
    print(
        f"  ratio vs openai-python: {tp['ratio_chunks_per_s']:.1f}x chunks/s, "
        f"{tp['ratio_cpu']:.1f}x less CPU (target >= 10x)"
    )
    print(
        f"latency (medians): time to first event {lat['ttfe_ours_ms']:.3f} ms vs raw "
        f"{lat['ttfb_raw_ms']:.3f} ms -> overhead {lat['ttfe_overhead_ms']:+.3f} ms; "
        f"per chunk {lat['chunk_latency_ours_ms']:.3f} ms vs raw "
        f"{lat['chunk_latency_raw_ms']:.3f} ms -> overhead {lat['chunk_overhead_ms']:+.3f} ms "
        "(target within 0.2 ms)"
    )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "openai_compat.json").write_text(
        json.dumps(
            {"throughput": tp, "latency": lat, "core": IMPLEMENTATION, "smoke": args.smoke},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
