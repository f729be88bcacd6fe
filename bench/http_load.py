"""One aiohttp client for every HTTP peer of the batching benchmark (same requests, same reads).

Why shared: issue 14 asks that ``inferd bridge`` and llama-server be measured with the
same client sending the same requests and reading the replies the same way, so that a
ratio says something about the servers and nothing about two different clients. Each
request is an OpenAI Chat Completions stream (``stream: true``, usage in the last chunk,
``ignore_eos`` so every stream yields exactly ``max_tokens`` tokens); the reply is read
line by line and every ``data:`` line is parsed, as real SSE clients do. Time to first
token is the first chunk whose delta carries content, measured from the moment all
``C`` clients were released (queueing included). The token count comes from the
server's ``usage.completion_tokens`` and must equal the tokens asked for.

A fresh connection per request (``force_close``) for every peer: llama-server closes a
keep-alive connection after a stream without saying so (bench/README.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

#: Seconds a server may take to answer ``GET /health`` after it started.
HEALTH_TIMEOUT_S = 120.0
#: Seconds one streamed request may take before the round fails.
REQUEST_TIMEOUT_S = 600.0
#: Sampling of the "sampled" mode (llama-server's and our defaults, sent explicitly).
SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
#: Greedy: temperature 0 (argmax) on both sides.
GREEDY = {"temperature": 0.0}
TOPICS = (
    "a lighthouse keeper",
    "a lost robot",
    "the first rain on Mars",
    "a jazz cat",
    "an old map",
    "a paper boat",
    "a clockmaker",
    "a winter garden",
    "a pirate cook",
    "a shy dragon",
    "a talking tree",
    "a deep-sea diver",
    "a kite festival",
    "a bakery at dawn",
    "a desert train",
    "a moon library",
)


#: Sentences of the shared system prompt (``shared_system``), cycled to its length.
HANDBOOK = (
    "Orders ship within two working days from the nearest warehouse.",
    "Returns are free for thirty days when the item is unused.",
    "Quote the order number in every answer about an order.",
    "Never promise a delivery date the carrier has not confirmed.",
    "Offer a replacement before a refund when a part arrives broken.",
    "Escalate any safety complaint to a human supervisor at once.",
)


def prompt(i: int) -> str:
    """The user message of request ``i`` (each request its own prompt)."""
    return f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (#{i})."


def shared_system(tag: int, words: int) -> str:
    """A system prompt of about ``words`` words that every request of one round shares
    (a handbook, tool definitions: what agent frameworks send with each request).
    ``tag`` opens it, so two rounds share only a few tokens and each starts cold on
    every peer."""
    out = [f"Handbook {tag}: you are the shop's support agent."]
    n, k = len(out[0].split()), 0
    while n < words:
        line = f"Rule {k + 1}: {HANDBOOK[k % len(HANDBOOK)]}"
        out.append(line)
        n, k = n + len(line.split()), k + 1
    return " ".join(out)


def chat_body(i: int, tokens: int, sampled: bool, system: str | None = None) -> dict[str, Any]:
    """Request ``i``: same body to every peer; sampled requests carry seed ``i``;
    ``system``, when given, is sent as the system message first."""
    head = [{"role": "system", "content": system}] if system else []
    body: dict[str, Any] = {
        "messages": [*head, {"role": "user", "content": prompt(i)}],
        "stream": True,
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        **(SAMPLED if sampled else GREEDY),
    }
    if sampled:
        body["seed"] = i
    return body


@dataclass
class RoundResult:
    """One round of ``C`` concurrent streams against one peer."""

    tokens: int
    wall_s: float
    ttfts: list[float]

    def summary(self) -> dict[str, float]:
        return {
            "tps": self.tokens / self.wall_s,
            "ttft_p50": percentile(self.ttfts, 0.5),
            "ttft_p99": percentile(self.ttfts, 0.99),
        }


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a handful of samples)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def stream_one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], t0: float
) -> tuple[int, float]:
    """Stream one completion; return (completion tokens from usage, time to first token)."""
    first: float | None = None
    n = 0
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:500]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: stream error: {str(chunk['error'])[:500]}")
            if first is None and any(
                (ch.get("delta") or {}).get("content") for ch in chunk.get("choices") or ()
            ):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
    if n != body["max_tokens"]:
        raise RuntimeError(f"{url}: generated {n} tokens, asked for {body['max_tokens']}")
    return n, first if first is not None else time.perf_counter() - t0


async def run_round(
    base_url: str, conc: int, tokens: int, sampled: bool, first_id: int, system: str | None = None
) -> RoundResult:
    """``conc`` clients released at once, request ids ``first_id .. first_id + conc - 1``,
    all with the system prompt ``system`` when given."""
    url = f"{base_url}/v1/chat/completions"
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        t0 = time.perf_counter()
        res = await asyncio.gather(
            *(
                stream_one(session, url, chat_body(first_id + i, tokens, sampled, system), t0)
                for i in range(conc)
            )
        )
        wall = time.perf_counter() - t0
    return RoundResult(sum(n for n, _ in res), wall, [f for _, f in res])


async def wait_healthy(base_url: str, alive: Any = None) -> None:
    """Poll ``GET /health`` until 200; ``alive()`` returning False stops early."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"{base_url}: the server exited while starting")
            try:
                async with session.get(f"{base_url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base_url}: not healthy after {HEALTH_TIMEOUT_S:.0f} s")
