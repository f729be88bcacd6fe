"""Anthropic backend benchmark: AnthropicCompat against the ``anthropic`` SDK over
real loopback HTTP.

A loopback aiohttp upstream (in a child process, so the client's CPU time is its own)
streams one Messages API SSE event per token as fast as it can (``message_start``, a
text block of ``content_block_delta`` events, ``message_delta``, ``message_stop``).
Contenders, run round robin per round (starting one further each round) so a burst
of load hits all alike (``bench/timing.py``):

* ``AnthropicCompat.generate`` (inferd events out);
* the SDK's ``AsyncAnthropic().messages.stream()`` (what the issue names: typed events
  plus the accumulated message snapshot);
* the SDK's ``messages.create(stream=True)`` (typed events, no snapshot);
* a floor: aiohttp reading the raw bytes, no parsing.

Quoted: events/s and client CPU per 1,000 events (medians), and the median of the
per-round ratios (SDK time / ours) for wall and CPU. Target >= 10x.

``python bench/bench_anthropic_compat.py [--smoke]``; the stream is >= 50,000 events
either way, ``--smoke`` (CI) does 2 rounds instead of 5. Results also go to
``bench/results/anthropic_compat.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

WORDS = ("the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", " é", " 中文")


def _ev(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


def make_stream(n: int) -> bytes:
    """``n`` SSE events: message_start, block start, n-5 text deltas, block stop,
    message_delta, message_stop."""
    msg = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "bench",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 1},
    }
    parts = [
        _ev("message_start", {"message": msg}),
        _ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    parts += [
        _ev(
            "content_block_delta",
            {"index": 0, "delta": {"type": "text_delta", "text": WORDS[i % len(WORDS)]}},
        )
        for i in range(n - 5)
    ]
    parts += [
        _ev("content_block_stop", {"index": 0}),
        _ev(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": n - 5},
            },
        ),
        _ev("message_stop", {}),
    ]
    return b"".join(parts)


def _serve(conn: Any, n_events: int) -> None:
    """Child process: the loopback upstream. Sends its port through ``conn``."""
    from aiohttp import web

    body = make_stream(n_events)
    slice_bytes = 64 * 1024

    async def messages(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(body), slice_bytes):
            await resp.write(body[i : i + slice_bytes])
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", messages)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


async def _timed(fn: Callable[[], Awaitable[int]]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    await fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _contenders(port: int, n_events: int) -> tuple[dict[str, Callable[[], Awaitable[int]]], Any]:
    import aiohttp
    from anthropic import AsyncAnthropic

    from inferd.backends.anthropic_compat import AnthropicCompat
    from inferd.types import Done, Request

    base = f"http://127.0.0.1:{port}"
    request = Request.chat("go", max_tokens=n_events)
    ours = AnthropicCompat(base, api_key="bench", model="bench", max_retries=0)
    sdk = AsyncAnthropic(base_url=base, api_key="bench", max_retries=0)
    session = aiohttp.ClientSession()
    kw = {"model": "bench", "max_tokens": n_events, "messages": [{"role": "user", "content": "go"}]}

    async def run_ours() -> int:
        n = 0
        async for ev in ours.generate(request):
            n += 1
            if isinstance(ev, Done):
                assert ev.usage.output_tokens == n_events - 5, ev.usage
        assert n == n_events - 4, n
        return n

    async def run_sdk_stream() -> int:
        n = 0
        async with sdk.messages.stream(**kw) as stream:
            async for _ev_obj in stream:
                n += 1
        return n

    async def run_sdk_create() -> int:
        n = 0
        async for _ev_obj in await sdk.messages.create(stream=True, **kw):
            n += 1
        assert n == n_events, n
        return n

    async def run_raw() -> int:
        async with session.post(base + "/v1/messages", data=b"{}") as resp:
            async for _data in resp.content.iter_any():
                pass
        return n_events

    async def close() -> None:
        await ours.aclose()
        await sdk.close()
        await session.close()

    contenders = {
        "inferd AnthropicCompat": run_ours,
        "anthropic SDK messages.stream()": run_sdk_stream,
        "anthropic SDK create(stream=True)": run_sdk_create,
        "raw aiohttp read (floor)": run_raw,
    }
    return contenders, close


async def bench(port: int, n_events: int, rounds: int) -> dict[str, Any]:
    contenders, close = _contenders(port, n_events)
    names = list(contenders)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    try:
        for fn in contenders.values():  # warm-up: connections, imports, caches
            await fn()
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                w, c = await _timed(contenders[name])
                wall[name].append(w)
                cpu[name].append(c)
    finally:
        await close()
    ours = "inferd AnthropicCompat"
    out: dict[str, Any] = {"events": n_events, "rounds": rounds, "clients": {}, "ratios": {}}
    for name in names:
        out["clients"][name] = {
            "events_per_s": n_events / statistics.median(wall[name]),
            "cpu_ms_per_1000_events": statistics.median(cpu[name]) / (n_events / 1000) * 1e3,
        }
        if name != ours and "floor" not in name:
            per_wall = [t / o for t, o in zip(wall[name], wall[ours], strict=True)]
            per_cpu = [t / o for t, o in zip(cpu[name], cpu[ours], strict=True)]
            out["ratios"][name] = {
                "wall": statistics.median(per_wall),
                "cpu": statistics.median(per_cpu),
                "per_round_wall": [round(x, 2) for x in per_wall],
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="2 rounds (CI)")
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.smoke else 5)
    n_events = max(50_000, args.events)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child, n_events), daemon=True)
    server.start()
    try:
        if not parent.poll(30):
            print("the loopback upstream did not start", file=sys.stderr)
            return 1
        result = asyncio.run(bench(parent.recv(), n_events, rounds))
    finally:
        server.terminate()
        server.join(5)
    from inferd.sse import IMPLEMENTATION

    print(
        f"{n_events} Messages SSE events over loopback HTTP, {rounds} interleaved rounds "
        f"(SSE core: {IMPLEMENTATION})"
    )
    for name, r in result["clients"].items():
        print(
            f"  {name:36s} {r['events_per_s']:12,.0f} events/s  "
            f"{r['cpu_ms_per_1000_events']:8.3f} ms CPU per 1,000 events"
        )
    for name, r in result["ratios"].items():
        print(
            f"  ours vs {name}: {r['wall']:.1f}x faster, {r['cpu']:.1f}x less CPU "
            f"(median of per-round ratios {r['per_round_wall']}; target >= 10x)"
        )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "anthropic_compat.json").write_text(
        json.dumps({**result, "core": IMPLEMENTATION, "smoke": args.smoke}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
