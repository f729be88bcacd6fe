"""Router overhead per request and per event at 64 concurrent streams (issue 21, ADR 0020).

Two contenders in the same process, interleaved round by round (the order alternates,
so a burst of load from elsewhere hits both alike):

* ``mock``: one ``Mock`` backend (no delay: each event costs one loop turn), driven
  directly;
* ``router``: ``Router(policy="least_loaded")`` with background probes on (the default
  interval) over three such Mocks, driven the same way.

Each round runs ``--requests`` requests, at most 64 at once, twice: with 1-token streams
(the per-request cost dominates) and with ``--tokens``-token streams (the per-event cost
dominates). Reported: the median over rounds of the per-round time ratio router/mock,
and the added microseconds per request (from the 1-token runs) and per event (the
extra of the long runs over the short ones, per extra event).

    python bench/bench_router.py [--smoke] [--requests N] [--tokens T] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

#: Streams in flight at once (the issue's figure).
CONCURRENCY = 64


async def _drive(backend: Any, requests: int) -> float:
    """Seconds to run ``requests`` streams to their end, ``CONCURRENCY`` at a time."""
    from inferd.types import Request

    req = Request.chat("hi")
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async for _ in backend.generate(req):
                pass

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - t0


async def _round(tokens: int, requests: int, first: str) -> dict[str, float]:
    from inferd.backends.mock import Mock
    from inferd.router import Router

    script = ["x"] * tokens
    contenders = {
        "mock": Mock(script, name="m"),
        "router": Router([Mock(script, name=f"r{i}") for i in range(3)], policy="least_loaded"),
    }
    names = ["mock", "router"] if first == "mock" else ["router", "mock"]
    out = {}
    try:
        for name in names:
            await _drive(contenders[name], min(requests, CONCURRENCY))  # warm-up
            out[name] = await _drive(contenders[name], requests)
    finally:
        for b in contenders.values():
            await b.aclose()
    return out


async def run(a: argparse.Namespace) -> dict[str, list[float]]:
    """Per round: the ratios, and the added seconds per request and per event."""
    ratio_short, ratio_long, per_req, per_event = [], [], [], []
    for r in range(a.rounds):
        first = "mock" if r % 2 == 0 else "router"
        short = await _round(1, a.requests, first)
        long = await _round(a.tokens, a.requests, first)
        d_short = (short["router"] - short["mock"]) / a.requests
        d_long = (long["router"] - long["mock"]) / a.requests
        ratio_short.append(short["router"] / short["mock"])
        ratio_long.append(long["router"] / long["mock"])
        per_req.append(d_short)
        per_event.append((d_long - d_short) / (a.tokens - 1))
    return {
        "ratio_short": ratio_short,
        "ratio_long": ratio_long,
        "per_request_s": per_req,
        "per_event_s": per_event,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    a = p.parse_args(argv)
    a.requests = a.requests or (256 if a.smoke else 4096)
    a.tokens = a.tokens or (16 if a.smoke else 64)
    a.rounds = a.rounds or (3 if a.smoke else 11)
    if a.tokens < 2 or a.requests < 1 or a.rounds < 1:
        p.error("--tokens must be >= 2, --requests and --rounds >= 1")
    out = asyncio.run(run(a))
    med = {k: statistics.median(v) for k, v in out.items()}
    print(
        f"concurrency={CONCURRENCY} requests={a.requests} tokens={a.tokens} rounds={a.rounds} "
        "(router: least_loaded over 3 Mocks, probes on)"
    )
    print("| stream | router/mock time (median of per-round ratios) | spread |")
    print("|---|---:|---|")
    for label, key in (("1 token", "ratio_short"), (f"{a.tokens} tokens", "ratio_long")):
        spread = f"{min(out[key]):.2f}-{max(out[key]):.2f}"
        print(f"| {label} | {med[key]:.2f} | {spread} |")
    print(f"added per request: {med['per_request_s'] * 1e6:+.1f} us (median)")
    print(f"added per event:   {med['per_event_s'] * 1e6:+.2f} us (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
