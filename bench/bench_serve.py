"""Serving overhead: the Mock backend in-process vs through the daemon vs daemon + bridge.

The same Mock (no delay, so the backend itself costs next to nothing) is reached three
ways in one run:

* ``in-process``: ``Mock.generate`` called directly;
* ``daemon``: ``inferd.Client`` over the Unix socket to ``inferd serve`` (subprocess);
* ``daemon+bridge``: aiohttp streaming ``POST /v1/chat/completions`` to ``inferd
  bridge`` (subprocess) in front of that daemon.

Reported, as medians over repeats: requests/s for short requests (8 tokens) at
concurrency 16; first-frame latency of a 1-token request, sequential; and per-frame
time inside a long stream ((t_last - t_first) / (frames - 1)). Overheads are the
differences to in-process, ratios are against it. Machines are shared and noisy:
read the ratios, not the absolute numbers.

``python bench/bench_serve.py [--smoke]``. Results also go to ``bench/results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from inferd.backends.mock import Mock  # noqa: E402
from inferd.serve.client import Client  # noqa: E402
from inferd.types import Request  # noqa: E402

SHORT_TOKENS = 8
LONG_TOKENS = 2000
CONCURRENCY = 16
START_TIMEOUT_S = 30.0


def _env() -> dict[str, str]:
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{old}" if old else str(SRC)}


def _start_daemon(d: Path, n_tokens: int) -> tuple[subprocess.Popen[bytes], Path]:
    d.mkdir()
    cfg = d / "c.toml"
    toks = ", ".join(f'"t{i} "' for i in range(n_tokens))
    cfg.write_text(
        f"[daemon]\nmax_concurrent = 64\nmax_queued = 1024\n"
        f'[[backend]]\ntype = "mock"\nname = "m"\ntokens = [{toks}]\n'
    )
    sock = d / "infer.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferd.serve.daemon", "--config", str(cfg), "--socket", str(sock)],
        env=_env(),
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not sock.with_name("admin.sock").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("daemon did not start")
        time.sleep(0.05)
    return proc, sock


def _start_bridge(sock: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferd.serve.bridge", "--port", "0", "--socket", str(sock)],
        env=_env(),
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "listening on " not in line:
        raise RuntimeError(f"bridge did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].strip()


Stream = Callable[[int], Awaitable[list[float]]]  # max_tokens -> arrival times of frames


def in_process(n_tokens: int) -> Stream:
    mock = Mock([f"t{i} " for i in range(n_tokens)], name="m")

    async def run(n: int) -> list[float]:
        return [time.perf_counter() async for _ in mock.generate(Request.chat("hi", max_tokens=n))]

    return run


def via_client(client: Client) -> Stream:
    async def run(n: int) -> list[float]:
        return [
            time.perf_counter() async for _ in client.generate(Request.chat("hi", max_tokens=n))
        ]

    return run


def via_bridge(session: Any, url: str) -> Stream:
    async def run(n: int) -> list[float]:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "stream": True}
        times = []
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    times.append(time.perf_counter())
        return times

    return run


async def requests_per_s(stream: Stream, total: int) -> float:
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with sem:
            await stream(SHORT_TOKENS)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - t0)


async def first_frame_ms(stream: Stream, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        times = await stream(1)
        samples.append((times[0] - t0) * 1e3)
    return statistics.median(samples)


async def per_frame_us(stream: Stream, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        times = await stream(LONG_TOKENS)
        samples.append((times[-1] - times[0]) / (len(times) - 1) * 1e6)
    return statistics.median(samples)


async def measure(name: str, short: Stream, long: Stream, smoke: bool) -> dict[str, float]:
    """``short`` serves an 8-token script, ``long`` a 2000-token one (Mock builds its
    whole script per request, so one long script would slow the short requests)."""
    reps = 1 if smoke else 5
    await short(SHORT_TOKENS)  # warm up connections and imports
    await long(2)
    rps = statistics.median(
        [await requests_per_s(short, 100 if smoke else 500) for _ in range(reps)]
    )
    first = await first_frame_ms(short, 20 if smoke else 200)
    frame = await per_frame_us(long, reps)
    print(
        f"  {name:<14} {rps:>10.0f} req/s   first frame {first:>7.3f} ms   "
        f"per frame {frame:>8.2f} us",
        flush=True,
    )
    return {"requests_per_s": rps, "first_frame_ms": first, "per_frame_us": frame}


async def main_async(smoke: bool) -> dict[str, Any]:
    import aiohttp

    d = Path(tempfile.mkdtemp(prefix="ifd-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        socks, urls = [], []
        for n, sub in ((SHORT_TOKENS, "s"), (LONG_TOKENS, "l")):
            daemon, sock = _start_daemon(d / sub, n)
            procs.append(daemon)
            bridge, url = _start_bridge(sock)
            procs.append(bridge)
            socks.append(sock)
            urls.append(url)
        print(
            f"serving overhead (Mock, {SHORT_TOKENS}-token requests at concurrency "
            f"{CONCURRENCY}; {LONG_TOKENS}-token stream for per-frame time)"
        )
        results = {
            "in-process": await measure(
                "in-process", in_process(SHORT_TOKENS), in_process(LONG_TOKENS), smoke
            )
        }
        clients = [Client(s) for s in socks]
        try:
            results["daemon"] = await measure(
                "daemon", via_client(clients[0]), via_client(clients[1]), smoke
            )
        finally:
            for c in clients:
                await c.aclose()
        async with aiohttp.ClientSession() as session:
            results["daemon+bridge"] = await measure(
                "daemon+bridge", via_bridge(session, urls[0]), via_bridge(session, urls[1]), smoke
            )
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            p.wait(30)
        shutil.rmtree(d, ignore_errors=True)
    base = results["in-process"]
    for name in ("daemon", "daemon+bridge"):
        r = results[name]
        r["rps_ratio_vs_in_process"] = r["requests_per_s"] / base["requests_per_s"]
        r["first_frame_overhead_ms"] = r["first_frame_ms"] - base["first_frame_ms"]
        r["per_frame_overhead_us"] = r["per_frame_us"] - base["per_frame_us"]
        print(
            f"  {name:<14} req/s x{r['rps_ratio_vs_in_process']:.3f} of in-process; "
            f"+{r['first_frame_overhead_ms']:.3f} ms first frame; "
            f"+{r['per_frame_overhead_us']:.2f} us per frame"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one repeat, small counts (CI)")
    args = p.parse_args(argv)
    results = asyncio.run(main_async(args.smoke))
    out = HERE / "results" / "serve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"smoke": args.smoke, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
