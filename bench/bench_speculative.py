"""Speculative decoding with n-gram drafting on CPU, SmolLM2-135M-Instruct (issue 20,
docs/adr/0027-speculative-decoding-batched.md).

Three peers, all over HTTP (streamed ``/v1/chat/completions``, or ``/v1/completions``
with ``--completion``; greedy; same slots, context, threads, batch and flash-attention
setting, ``bench/servers.py``):

* ``ours-spec``: ``inferd bridge`` with ``draft = {type = "ngram", n = N, n_draft = M}``;
* ``ours-plain``: the same bridge without a draft (our non-speculative path);
* ``server-spec``: llama-server built from the vendored tree with ``--spec-type
  ngram-simple --spec-ngram-simple-size-n N --spec-ngram-simple-size-m M`` (its lookup
  of the last N tokens in the sequence's history, drafting the M that followed).

Three tasks: ``edit`` (the prompt holds a 60-line function; the reply rewrites it with
one change, the default of one argument, so most of the reply can quote the prompt),
``rename`` (the same function with a variable renamed at its 15 uses: every use breaks
an n-gram match) and ``chat`` (a plain question; little repeats). At each concurrency
(1 and 8 streams) a round runs every peer once per task in an order that rotates by
round, on that round's variant of the task's prompt (other keys in the function, another
city: a greedy reply is one fixed text per prompt, and what drafts earn depends on it),
after one short request of the same prompt to every peer (its prefill is not timed).
A peer's figure is its decode throughput: tokens after each reply's first, over the time
from the earliest first token to the last end (the prefill is left out).
Reported: the median over rounds of the per-round ratios ours-spec/ours-plain and
ours-spec/server-spec (decode throughput; higher is better).

    python bench/bench_speculative.py [--smoke] [--tokens T] [--rounds R] [--streams 1,8]
        [--tasks edit,rename,chat] [--model GGUF-or-name] [--completion]

``--completion`` sends each task as a raw ``/v1/completions`` prompt (the text before
the reply; code replies stop at the closing fence) to every peer, for a base model with
no chat template: ``--model gemma3-270m --completion`` is the edit task on a model that
copies (SmolLM2-135M-Instruct rewrites the function instead: bench/README.md). Rows
of raw-completion runs say ``raw``; ``--smoke`` runs both kinds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

#: Slots of every peer (the widest concurrency measured).
SLOTS = 8
#: KV cells per slot: the edit prompt (about 700 tokens) and its reply.
CTX_PER_SLOT = 2048
#: Compute threads of every peer.
THREADS = 2
#: n-gram lookup length and most tokens drafted, the same for both speculating peers.
NGRAM_N = 3
N_DRAFT = 16
#: Seconds a peer gets to answer /health after start.
SERVER_START_TIMEOUT_S = 180.0
#: Seconds one request may take.
REQUEST_TIMEOUT_S = 900.0
PEERS = ("ours-spec", "ours-plain", "server-spec")
TASKS = ("edit", "rename", "chat")


#: Per-round variants of the prompts: a greedy reply is one fixed text per prompt, and
#: how much drafts earn depends on that text, so each round asks about another one.
KEY_PREFIXES = ("k", "col", "f", "id", "m", "x", "tag", "q")
CITIES = ("Lyon", "Porto", "Krakow", "Bologna", "Ghent", "Seville", "Tartu", "Bergen")


def _function(lines: int = 60, variant: int = 0) -> str:
    """A 60-line Python function (plain, varied statements, no randomness); ``variant``
    changes its keys and numbers."""
    prefix = KEY_PREFIXES[variant % len(KEY_PREFIXES)]
    body = ["def summarize(records, limit=10):", '    """Totals per key, largest first."""']
    body += ["    totals = {}", "    counts = {}"]
    i = 0
    while len(body) < lines - 3:
        body += [
            f"    for rec in records[{i}::{i + 2}]:",
            f"        key = rec.get('{prefix}{i}', 'none')",
            f"        totals[key] = totals.get(key, 0) + rec.get('v{i}', {i + variant})",
            "        counts[key] = counts.get(key, 0) + 1",
        ]
        i += 1
    body += ["    order = sorted(totals, key=totals.get, reverse=True)", "    return order[:limit]"]
    return "\n".join(body[:lines])


#: What each code task asks of the function.
CHANGES = {
    "edit": "the default of `limit` becomes 20 instead of 10",
    "rename": "rename the variable `totals` to `sums`",
}


def task_prompt(task: str, variant: int = 0) -> str:
    """The chat prompt of ``task``'s ``variant`` (a user message)."""
    if task in CHANGES:
        return (
            "Here is a Python function:\n\n```python\n" + _function(variant=variant) + "\n```\n\n"
            f"Rewrite the whole function with one change: {CHANGES[task]}. "
            "Reply with the complete code only."
        )
    city = CITIES[variant % len(CITIES)]
    return f"Tell me about the history of the city of {city}, in a few paragraphs."


def completion_prompt(task: str, variant: int = 0) -> str:
    """The same task as a raw completion, for a base model with no chat template: the
    text a document would hold just before the reply (the code tasks' replies end at the
    closing fence, :data:`COMPLETION_STOP`)."""
    if task in CHANGES:
        return (
            f"Below is a Python function, then the same function with one change: "
            f"{CHANGES[task]}.\n\nOriginal:\n```python\n{_function(variant=variant)}\n```\n\n"
            "Edited:\n```python\n"
        )
    city = CITIES[variant % len(CITIES)]
    return f"A short history of the city of {city}\n\n"


#: Where a raw-completion reply ends (the code block's closing fence), for every peer.
COMPLETION_STOP = "```"


def _request(url: str, prompt: str, tokens: int, completion: bool) -> tuple[float, float, int]:
    """One streamed greedy request: (first token time, end time, completion tokens).
    ``completion``: a raw ``/v1/completions`` request, else ``/v1/chat/completions``."""
    body: dict[str, Any] = {
        "temperature": 0.0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if completion:
        body |= {"prompt": prompt, "stop": [COMPLETION_STOP]}
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    path = "/v1/completions" if completion else "/v1/chat/completions"
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    first, chunks, usage = 0.0, 0, 0
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            msg = json.loads(line[5:])
            if msg.get("usage"):
                usage = int(msg["usage"].get("completion_tokens") or 0)
            if any(_chunk_text(c) for c in msg.get("choices") or ()):
                chunks += 1
                first = first or time.perf_counter()
    return first, time.perf_counter(), usage or chunks


def _chunk_text(choice: dict[str, Any]) -> str:
    """A streamed choice's new text: a chat chunk's ``delta.content`` or a completion
    chunk's ``text``."""
    return str((choice.get("delta") or {}).get("content") or choice.get("text") or "")


async def _measure(url: str, prompt: str, tokens: int, streams: int, completion: bool) -> float:
    """Decode tokens per second of ``streams`` concurrent requests: tokens after each
    reply's first, over the time from the earliest first token to the last end (the
    prompt's prefill is left out: speculation only changes decoding)."""
    got = await asyncio.gather(
        *(asyncio.to_thread(_request, url, prompt, tokens, completion) for _ in range(streams))
    )
    firsts = [g[0] for g in got if g[0]]
    if not firsts:
        return 0.0
    span = max(g[1] for g in got) - min(firsts)
    return sum(max(0, g[2] - 1) for g in got) / span if span > 0 else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_peers(model: str) -> dict[str, Any]:
    from bench.fair import our_flash_attn
    from bench.peers import ensure_peer
    from bench.servers import Settings, start_bridge

    s = Settings(model, SLOTS, CTX_PER_SLOT, THREADS, 0, our_flash_attn(model))
    peers: dict[str, Any] = {}
    try:
        peers["ours-plain"] = start_bridge(s, "split")
        peers["ours-spec"] = _start_spec_bridge(s)
        peers["server-spec"] = _start_spec_server(ensure_peer("llama-server"), s)
        for p in peers.values():
            _wait_health(p)
    except BaseException:
        for p in peers.values():
            p.stop()
        raise
    return peers


def _start_spec_bridge(s: Any) -> Any:
    """The bridge with n-gram drafting: bench/servers.py's config plus one line."""
    from bench import servers

    draft = f'draft = {{ type = "ngram", n = {NGRAM_N}, n_draft = {N_DRAFT} }}\n'
    return servers.start_bridge(s, "split", extra=draft)


def _start_spec_server(exe: Path, s: Any) -> Any:
    import subprocess

    from bench.fair import server_fa_flag
    from bench.servers import N_BATCH, Server

    port = _free_port()
    cmd = [
        str(exe),
        *("-m", s.model, "-np", str(s.conc), "-c", str(s.conc * s.ctx_per_slot)),
        *("-t", str(s.threads), "-tb", str(s.threads), "-b", str(N_BATCH), "-ub", str(N_BATCH)),
        *server_fa_flag(s.flash_attn),
        "--no-kv-unified",
        *("--host", "127.0.0.1", "--port", str(port), "--no-webui", "-ngl", "0"),
        *("--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(NGRAM_N)),
        *("--spec-ngram-simple-size-m", str(N_DRAFT), "--spec-draft-n-max", str(N_DRAFT)),
    ]
    log = Path(tempfile.mkstemp(prefix="inferd-bench-spec-", suffix=".log")[1])
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
    return Server("llama-server spec", proc, f"http://127.0.0.1:{port}", [log])


def _wait_health(server: Any) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.alive():
            tail = server.files[-1].read_text(errors="replace")[-1500:] if server.files else ""
            raise RuntimeError(f"{server.name} exited during start: {tail}")
        try:
            with urllib.request.urlopen(f"{server.base_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{server.name} did not become healthy")


async def _run(
    model: str,
    tokens: int,
    rounds: int,
    widths: tuple[int, ...],
    tasks: tuple[str, ...],
    modes: tuple[bool, ...],
) -> dict[str, list[float]]:
    """Every round of every width, task and mode (``True``: raw completion) on one set of
    peers; the per-round ratios."""
    peers = _start_peers(model)
    ratios: dict[str, list[float]] = {}
    try:
        for width in widths:
            for r in range(rounds):
                for completion in modes:
                    for task in tasks:
                        key = f"{task}{' raw' if completion else ''} x{width}"
                        tps = await _round(peers, task, r, width, tokens, completion)
                        line = ", ".join(f"{n} {tps[n]:.1f} tok/s" for n in PEERS)
                        print(f"round {r + 1}, {key}: {line}", flush=True)
                        for ratio, a, b in _RATIOS:
                            ratios.setdefault(f"{key} {ratio}", []).append(tps[a] / tps[b])
    finally:
        for p in peers.values():
            p.stop()
    return ratios


#: The reported ratios: (name, numerator peer, denominator peer).
_RATIOS = (("spec/plain", "ours-spec", "ours-plain"), ("ours/server", "ours-spec", "server-spec"))


async def _round(
    peers: dict[str, Any], task: str, r: int, width: int, tokens: int, completion: bool
) -> dict[str, float]:
    """One round of ``task``: every peer warmed on round ``r``'s prompt (its prefill is
    not timed), then measured in an order that rotates by round; decode tok/s per peer."""
    prompt = (completion_prompt if completion else task_prompt)(task, r)
    for name in PEERS:
        await _measure(peers[name].base_url, prompt, 8, 1, completion)
    order = PEERS[r % 3 :] + PEERS[: r % 3]
    return {n: await _measure(peers[n].base_url, prompt, tokens, width, completion) for n in order}


def main(argv: list[str] | None = None) -> int:
    # Run as a script (python bench/x.py) as well as under run_all: bench.* imports work.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.model_args import add_model_arg, model_path
    from bench.timing import describe_ratio

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--tokens", type=int, default=None, help="most tokens per reply")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--streams", default=None, help="comma-separated concurrencies (1,8)")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    p.add_argument(
        "--completion",
        action="store_true",
        help="raw /v1/completions prompts, for a base model with no chat template",
    )
    add_model_arg(p)
    args = p.parse_args(argv)
    tasks = tuple(args.tasks.split(","))
    if not set(tasks) <= set(TASKS):
        p.error(f"--tasks: choose among {', '.join(TASKS)}")
    tokens = args.tokens or (48 if args.smoke else 400)
    rounds = args.rounds or (1 if args.smoke else 5)
    widths = tuple(int(x) for x in (args.streams or ("1,2" if args.smoke else "1,8")).split(","))
    model, label = model_path(args)
    # the smoke run also sends the raw-completion prompts, so CI proves that path too
    modes = (False, True) if args.smoke else (args.completion,)
    out = asyncio.run(_run(model, tokens, rounds, widths, tasks, modes))
    print(
        f"{label}, greedy, up to {tokens} tokens, {rounds} rounds, {THREADS} threads, "
        f"n-gram n={NGRAM_N} draft<={N_DRAFT}; median per-round ratio of decode tok/s"
    )
    for k, v in out.items():
        print(f"{k:<28}{describe_ratio(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
