"""Continuous batching: aggregate tok/s and TTFT under concurrent load, same work for every peer.

``C`` clients arrive at once; each streams one chat completion of exactly ``--tokens``
new tokens (end-of-generation ignored, so token counts are exact), each with its own
prompt; greedy and sampled (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, seed =
request id, sent to both sides). Every peer gets the same model, slots (``C``), context
per slot (``--ctx``, 1,024), threads, batch (512) and flash-attention setting (ours is
libllama's AUTO; the others get what AUTO resolves to: ``bench/fair.py``).

``--suite http`` (the default, the headline; issue 14): ``inferd bridge`` serving an
in-process ``LlamaCpp`` over HTTP against llama-server (``-np C -c C*ctx``, built from
the vendored tree by ``bench/peers.py``), both driven by the same aiohttp client
(``bench/http_load.py``: streamed SSE read line by line, usage from the last chunk).
llama-server gives each slot its own KV stream, so ``bridge split`` is the like-for-like
peer; ``bridge unified`` (ADR 0008) is reported beside it. All servers of one ``C`` stay
up together; within each round the peers run one after another in a rotating order, and
the ratio to llama-server is taken per round (same round, same prompts, same seeds),
then its median is reported.

``--suite inprocess`` (the second table): ``LlamaCpp.generate`` in-process (unified and
split), llama-server (same HTTP client), llama-cpp-python (one ``Llama`` behind a
lock: it serves one stream at a time) and ``binding``: the compiled binding alone in
one Python loop (one prefill of every stream's suffix, then one ``decode_sample`` per
step; slots chosen by longest shared prefix, as the servers choose), the ceiling under
in-process ``LlamaCpp``. Each peer a fresh process per round, peers interleaved round
by round.

``--system-words N`` (http suite): every request of a round also carries one system
prompt of about N words (a handbook, as agent frameworks send tools and rules each
time), opened by the round's id so each round starts cold for every peer. This is the
burst-prefix case (ADR 0031): we prefill the shared part once, llama-server once per
slot; it has no setting that shares a prefix between slots in one burst.

Reports medians of tok/s (all tokens / wall time from arrival to the last token) and
TTFT p50/p99 (from arrival, queueing included), and medians of per-round ratios.

    python bench/bench_batching.py [--smoke] [--suite http|inprocess] [--tokens N]
        [--threads T] [--rounds R] [--conc 1,4,8,16] [--modes greedy,sampled]
        [--system-words N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench import http_load  # noqa: E402
from bench.http_load import RoundResult  # noqa: E402
from bench.timing import describe_ratio  # noqa: E402

RESULTS = HERE / "results"
HTTP_PEERS = ("bridge split", "bridge unified", "llama-server")
#: Run only when named in ``--peers``: the bridge with every step on the scheduler
#: thread (``inline_steps = false``, ADR 0034), to measure what inline steps change.
HTTP_EXTRA_PEERS = ("bridge split thread",)
INPROC_PEERS = ("inferd unified", "inferd split", "binding", "llama-server", "llama-cpp-python")
#: Request ids: round r, mode m use ids ``r * ROUND_IDS + m * MODE_IDS + i``.
ROUND_IDS, MODE_IDS, WARMUP_ID = 1000, 100, 900_000
#: New tokens per stream of the warm-up round (primes every slot of every peer).
WARMUP_TOKENS = 4


def _model_path() -> Path:
    from inferd.models import resolve

    return Path(resolve("smollm2-135m", pull=True, progress=False))


def _ids(r: int, mode: str) -> int:
    return r * ROUND_IDS + (MODE_IDS if mode == "sampled" else 0)


# ---------------------------------------------------------------- http suite


def _start_http(a: argparse.Namespace, conc: int) -> dict:
    from bench.peers import ensure_peer
    from bench.servers import Settings, start_bridge, start_llama_server

    s = Settings(a.model, conc, a.ctx, a.threads, a.gpu_layers, a.flash_attn)
    servers = {}
    try:
        for name in a.peer_list:
            if name == "llama-server":
                port = _free_port()
                servers[name] = start_llama_server(ensure_peer("llama-server"), s, port)
            else:
                layout = name.split()[1]
                servers[name] = start_bridge(s, layout, inline_steps=not name.endswith(" thread"))
    except BaseException:
        for srv in servers.values():
            srv.stop()
        raise
    return servers


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _drive_http(servers: dict, a: argparse.Namespace, conc: int, raw: dict) -> None:
    """All peers of one concurrency: warm up, then rounds with a rotating peer order."""
    for srv in servers.values():
        await http_load.wait_healthy(srv.base_url, srv.alive)
    for srv in servers.values():  # untimed: loads weights, primes every slot's prefix
        await http_load.run_round(
            srv.base_url, conc, WARMUP_TOKENS, False, WARMUP_ID, _system(a, WARMUP_ID)
        )
    names = list(servers)
    for r in range(a.rounds):
        for m, mode in enumerate(a.mode_list):
            k = (r * len(a.mode_list) + m) % len(names)
            ids = _ids(r, mode)
            for name in names[k:] + names[:k]:
                res = await http_load.run_round(
                    servers[name].base_url, conc, a.tokens, mode == "sampled", ids, _system(a, ids)
                )
                raw.setdefault(mode, {}).setdefault(name, {}).setdefault(conc, []).append(
                    res.summary()
                )
        print(f"  C={conc}: round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)


def _system(a: argparse.Namespace, ids: int) -> str | None:
    """The system prompt a round's requests share (``--system-words``), or None."""
    return http_load.shared_system(ids, a.system_words) if a.system_words else None


def run_http(a: argparse.Namespace) -> dict:
    raw: dict = {}
    for conc in a.conc:
        servers = _start_http(a, conc)
        try:
            asyncio.run(_drive_http(servers, a, conc, raw))
        finally:
            for srv in servers.values():
                srv.stop()
        if a.json:  # as we go: a run cut short still leaves its data
            Path(a.json).with_suffix(".partial.json").write_text(json.dumps({"raw": raw}))
    return raw


# ---------------------------------------------------------------- in-process suite


def _inferd_request(i: int, tokens: int, sampled: bool):
    from inferd.types import Request

    opts = dict(http_load.SAMPLED if sampled else http_load.GREEDY)
    if sampled:
        opts["seed"] = i
    return Request.chat(http_load.prompt(i), max_tokens=tokens, ignore_eos=True, **opts)


def child_inferd(a: argparse.Namespace, kv_layout: str) -> dict:
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.types import Done, Text

    async def client(b: LlamaCpp, i: int, sampled: bool, t0: float) -> tuple[int, float]:
        first, n = None, 0
        async for ev in b.generate(_inferd_request(i, a.tokens, sampled)):
            if first is None and isinstance(ev, Text) and ev.text:
                first = time.perf_counter() - t0
            if isinstance(ev, Done):
                n = ev.usage.output_tokens
        assert n == a.tokens, f"generated {n}, wanted {a.tokens}"
        return n, first if first is not None else time.perf_counter() - t0

    async def run() -> dict:
        out: dict = {}
        for c in a.conc:
            b = LlamaCpp(
                a.model,
                n_ctx=c * a.ctx,
                n_threads=a.threads,
                parallel=c,
                n_batch=512,
                n_gpu_layers=a.gpu_layers,
                kv_layout=kv_layout,
            )
            t0 = time.perf_counter()  # warm-up: every slot, as the HTTP peers get
            await asyncio.gather(*(client(b, WARMUP_ID + i, False, t0) for i in range(c)))
            await _timed_modes(a, c, lambda i, sampled, t0, b=b: client(b, i, sampled, t0), out)
            await b.aclose()
        return out

    return asyncio.run(run())


def child_server(a: argparse.Namespace) -> dict:
    out: dict = {}
    for c in a.conc:
        servers = _start_http(argparse.Namespace(**{**vars(a), "peer_list": ["llama-server"]}), c)
        srv = servers["llama-server"]

        async def drive(srv=srv, c=c) -> None:
            await http_load.wait_healthy(srv.base_url, srv.alive)
            await http_load.run_round(srv.base_url, c, WARMUP_TOKENS, False, WARMUP_ID)
            for mode in a.mode_list:
                res = await http_load.run_round(
                    srv.base_url, c, a.tokens, mode == "sampled", _ids(a.round, mode)
                )
                out.setdefault(mode, {})[c] = res.summary()

        try:
            asyncio.run(drive())
        finally:
            srv.stop()
    return out


def child_lcp(a: argparse.Namespace) -> dict:
    """llama-cpp-python behind a lock; EOG banned in its C sampler chain (bench/fair.py)."""
    import threading

    from bench.fair import eog_banned_llama
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.types import Request

    renderer = LlamaCpp(a.model, n_ctx=512, n_threads=1, parallel=1)
    llm = eog_banned_llama(
        a.model,
        n_ctx=a.ctx,
        n_batch=512,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_gpu_layers=a.gpu_layers,
        flash_attn=a.flash_attn,
        verbose=False,
    )
    lock = threading.Lock()

    def one(i: int, sampled: bool, t0: float) -> tuple[int, float]:
        s = http_load.SAMPLED if sampled else http_load.GREEDY
        kw = {k: s[k] for k in ("top_k", "top_p", "min_p") if k in s}
        if not sampled:
            kw["top_k"] = 1
        prompt = prompts[i]
        first = None
        with lock:  # llama-cpp-python serves one stream at a time
            llm.sampled = 0
            for _ in llm.create_completion(
                prompt,
                max_tokens=a.tokens,
                temperature=s["temperature"],
                seed=i if sampled else None,
                stream=True,
                **kw,
            ):
                if first is None:
                    first = time.perf_counter() - t0
            n = llm.sampled
        assert n == a.tokens, f"llama-cpp-python sampled {n}, wanted {a.tokens}"
        return n, first if first is not None else time.perf_counter() - t0

    wanted = [WARMUP_ID] + [_ids(a.round, m) + i for m in a.mode_list for i in range(max(a.conc))]
    prompts = {i: renderer.render(Request.chat(http_load.prompt(i))) for i in wanted}
    renderer.close()
    return asyncio.run(_threaded_rounds(a, one))


async def _threaded_rounds(a: argparse.Namespace, one: Any) -> dict:
    """Every C and mode: C clients at once, each ``one(id, sampled, t0)`` in a thread."""
    out: dict = {}
    await asyncio.to_thread(one, WARMUP_ID, False, time.perf_counter())
    for c in a.conc:
        await _timed_modes(a, c, lambda *args: asyncio.to_thread(one, *args), out)
    return out


async def _timed_modes(a: argparse.Namespace, c: int, client: Any, out: dict) -> None:
    """Each mode once at concurrency ``c``: ``c`` clients at once, each the awaitable
    ``client(id, sampled, t0)`` returning (tokens, TTFT); the round's summary goes to
    ``out[mode][c]``."""
    for mode in a.mode_list:
        ids = _ids(a.round, mode)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(client(ids + i, mode == "sampled", t0) for i in range(c)))
        wall = time.perf_counter() - t0
        rr = RoundResult(sum(n for n, _ in res), wall, [f for _, f in res])
        out.setdefault(mode, {})[c] = rr.summary()


def _binding_samplers(L, model, ids: list[int], sampled: bool) -> list:
    """One sampler per stream: greedy, or the sampled settings with seed = request id.
    Nothing is banned: like ``LlamaCpp`` with ``ignore_eos``, an end-of-generation
    token is decoded as any other."""
    if not sampled:
        return [L.Sampler(model, temperature=0.0) for _ in ids]
    return [L.Sampler(model, **http_load.SAMPLED, seed=i) for i in ids]


def _binding_slots(slots: list[list[int]], prompts: list[list[int]]) -> list[int]:
    """Each prompt's slot: the free one whose cells share the longest prefix with it
    (llama-server's and our slot choice), so the ceiling reuses what they reuse."""
    from inferd.backends.llamacpp.scheduler import common_prefix

    free, chosen = set(range(len(slots))), []
    for p in prompts:
        best = max(sorted(free), key=lambda s: common_prefix(p, slots[s]))
        free.discard(best)
        chosen.append(best)
    return chosen


def _binding_prefill(L, ctx, slots: list[list[int]], prompts: list[list[int]], samplers) -> list:
    """Slot ``s`` takes ``prompts[s]`` and keeps the cells they share (prefix reuse, as
    the other peers' slots do); the suffixes prefill together, in batches of at most
    512 tokens (the context's ``n_batch``). Returns each slot's first token."""
    from inferd.backends.llamacpp.scheduler import common_prefix

    first: list[int] = []
    batch, idxs, group = L.Batch(512), [], []

    def flush() -> None:
        first.extend(L.decode_sample(ctx, batch, [samplers[g] for g in group], idxs))
        batch.clear()
        idxs.clear()
        group.clear()

    for s, p in enumerate(prompts):
        k = min(common_prefix(p, slots[s]), len(p) - 1)
        ctx.seq_rm(s, k, -1)
        if batch.n_tokens + len(p) - k > 512:
            flush()
        idxs.append(batch.add_sequence(p[k:], k, s))
        group.append(s)
        slots[s] = list(p)
    flush()
    return first


def _binding_round(
    L, ctx, model, slots: list[list[int]], prompts: dict, tokens: int, sampled: bool
) -> RoundResult:
    """All streams at once: one prefill, then one ``decode_sample`` per step."""
    chosen = _binding_slots(slots, list(prompts.values()))
    ids = [i for _, i in sorted(zip(chosen, prompts, strict=True))]  # request of each slot
    samplers = _binding_samplers(L, model, ids, sampled)
    t0 = time.perf_counter()
    toks = _binding_prefill(L, ctx, slots, [prompts[i] for i in ids], samplers)
    first = time.perf_counter() - t0
    batch = L.Batch(len(toks))  # one token per stream and step
    for _ in range(tokens - 1):
        batch.clear()
        idxs = [batch.add(t, len(slots[s]), s, True) for s, t in enumerate(toks)]
        for s, t in enumerate(toks):
            slots[s].append(t)
        toks = L.decode_sample(ctx, batch, samplers, idxs)
    for s, kept in enumerate(slots):  # every slot holds its prompt and reply, no gap
        assert ctx.seq_pos_max(s) == len(kept) - 1, f"slot {s}: cells out of step"
    for smp in samplers:
        smp.close()
    return RoundResult(tokens * len(toks), time.perf_counter() - t0, [first] * len(toks))


def child_binding(a: argparse.Namespace) -> dict:
    """The compiled binding alone in one Python loop (no scheduler, no events, no
    streams): the ceiling under in-process ``LlamaCpp`` on the same libllama."""
    from inferd._fast import _llama as L
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.types import Request

    renderer = LlamaCpp(a.model, n_ctx=512, n_threads=1, parallel=1)
    model = L.Model(a.model, n_gpu_layers=a.gpu_layers)

    def prompts(first: int, c: int) -> dict:
        text = {
            i: renderer.render(Request.chat(http_load.prompt(i))) for i in range(first, first + c)
        }
        return {
            i: model.tokenize(t, add_special=False, parse_special=True) for i, t in text.items()
        }

    out: dict = {}
    for c in a.conc:
        ctx = L.Context(
            model,
            n_ctx=c * a.ctx,
            n_batch=512,
            n_seq_max=c,
            n_threads=a.threads,
            kv_unified=False,
            flash_attn="on" if a.flash_attn else "off",
        )
        slots: list[list[int]] = [[] for _ in range(c)]
        _binding_round(L, ctx, model, slots, prompts(WARMUP_ID, c), WARMUP_TOKENS, False)
        for mode in a.mode_list:
            sampled = mode == "sampled"
            rr = _binding_round(
                L, ctx, model, slots, prompts(_ids(a.round, mode), c), a.tokens, sampled
            )
            out.setdefault(mode, {})[c] = rr.summary()
        ctx.close()
    renderer.close()
    return out


def _child(a: argparse.Namespace) -> dict:
    if a.child.startswith("inferd "):
        return child_inferd(a, a.child.split()[1])
    peers = {"llama-server": child_server, "llama-cpp-python": child_lcp, "binding": child_binding}
    return peers[a.child](a)


def _spawn(peer: str, a: argparse.Namespace, r: int) -> dict:
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", peer, "--round", str(r)]
    cmd += ["--model", a.model]
    for flag in ("tokens", "threads", "ctx", "gpu_layers", "flash_attn"):
        cmd += [f"--{flag.replace('_', '-')}", str(int(getattr(a, flag)))]
    cmd += ["--conc", ",".join(map(str, a.conc)), "--modes", ",".join(a.mode_list)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{peer} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_inprocess(a: argparse.Namespace) -> dict:
    raw: dict = {}
    for r in range(a.rounds):  # peers interleaved round by round, rotating order
        k = r % len(a.peer_list)
        for peer in a.peer_list[k:] + a.peer_list[:k]:
            for mode, by_c in _spawn(peer, a, r).items():
                for c, summary in by_c.items():
                    raw.setdefault(mode, {}).setdefault(peer, {}).setdefault(int(c), [])
                    raw[mode][peer][int(c)].append(summary)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
        if a.json:
            Path(a.json).with_suffix(".partial.json").write_text(json.dumps({"raw": raw}))
    return raw


# ---------------------------------------------------------------- report


def _median(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def paired(ours: list[dict], theirs: list[dict]) -> list[float]:
    """ours/theirs tok/s round by round: a load spike hits one round of both peers."""
    return [round(o["tps"] / t["tps"], 3) for o, t in zip(ours, theirs, strict=True)]


def report(raw: dict, a: argparse.Namespace, reference: str, ours: tuple[str, ...]) -> dict:
    """Print one table per mode and the per-round ratios; return the medians."""
    med: dict = {}
    for mode, by_peer in raw.items():
        med[mode] = {p: {c: _median(v) for c, v in by_c.items()} for p, by_c in by_peer.items()}
        peers = [p for p in a.peer_list if p in by_peer]
        print(f"\n{mode}: tok/s (TTFT p50 / p99 ms), medians of {a.rounds} rounds\n")
        print("| C | " + " | ".join(peers) + " |")
        print("|---:|" + "---:|" * len(peers))
        for c in a.conc:
            cells = []
            for p in peers:
                m = med[mode][p][c]
                p50, p99 = m["ttft_p50"] * 1e3, m["ttft_p99"] * 1e3
                cells.append(f"{m['tps']:.1f} ({p50:.0f} / {p99:.0f})")
            print(f"| {c} | " + " | ".join(cells) + " |")
        print()
        for c in a.conc:
            for p in (x for x in ours if x in by_peer and reference in by_peer):
                pr = paired(by_peer[p][c], by_peer[reference][c])
                print(f"{mode} C={c}: {p} / {reference} = {describe_ratio(pr)}; per round {pr}")
    return med


def plot(med: dict, conc: list[int], peers: list[str], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot; pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for peer, style in zip(peers, ("o-", "s--", "^:", "d-."), strict=False):
        if peer in med:
            ax.plot(conc, [med[peer][c]["tps"] for c in conc], style, label=peer)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("generated tokens/s (all streams)")
    ax.set_xticks(conc)
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- main


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, both suites (CI)")
    ap.add_argument("--suite", choices=("http", "inprocess", "all"), default=None)
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per stream (128)")
    ap.add_argument("--threads", type=int, default=None, help="compute threads per peer")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=1024, help="context tokens per slot")
    ap.add_argument("--conc", type=str, default=None, help="concurrencies, e.g. 1,4,8,16")
    ap.add_argument("--modes", type=str, default=None, help="greedy,sampled")
    ap.add_argument(
        "--system-words",
        type=int,
        default=0,
        help="http suite: a system prompt of about N words shared by a round's requests",
    )
    ap.add_argument("--peers", type=str, default=None, help="subset of the suite's peers")
    ap.add_argument("--json", type=str, default=None, help="write raw results here")
    ap.add_argument("--model", type=str, default=None, help="GGUF (default: SmolLM2-135M)")
    ap.add_argument("--gpu-layers", type=int, default=0, help="offload, every peer (-1 = all)")
    ap.add_argument("--title", type=str, default="SmolLM2-135M Q4_1, continuous batching")
    ap.add_argument("--plot", type=Path, default=RESULTS / "batching.png", help="PNG path")
    ap.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--flash-attn", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.suite = a.suite or ("all" if a.smoke else "http")
    if a.system_words and a.suite != "http":
        ap.error("--system-words is for the http suite only")
    a.tokens = a.tokens or (8 if a.smoke else 128)
    a.rounds = a.rounds or (1 if a.smoke else 3)
    a.conc = [int(x) for x in (a.conc or ("1,2" if a.smoke else "1,4,8,16")).split(",")]
    a.mode_list = (a.modes or "greedy,sampled").split(",")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    a.threads = a.threads or (1 if a.smoke else cpus or 1)
    return a


def run_suite(a: argparse.Namespace, suite: str) -> dict:
    """Run one suite, print its tables and ratios; return {"raw", "median"}."""
    all_peers = HTTP_PEERS if suite == "http" else INPROC_PEERS
    named = (*all_peers, *HTTP_EXTRA_PEERS) if suite == "http" else all_peers
    a.peer_list = [p for p in (a.peers.split(",") if a.peers else all_peers) if p in named]
    print(
        f"\n# batching, {suite} suite: {a.tokens} new tokens per stream, {a.threads} threads, "
        f"{a.ctx}-token slots, batch 512, flash attention "
        f"{'on' if a.flash_attn else 'off'} for every peer (ours: AUTO, resolved), "
        f"rounds={a.rounds}, concurrency {a.conc}, modes {a.mode_list}, peers {a.peer_list}"
        + (f", a {a.system_words}-word system prompt per round" if a.system_words else ""),
        flush=True,
    )
    t0 = time.perf_counter()
    raw = run_http(a) if suite == "http" else run_inprocess(a)
    ours = (
        "bridge split",
        "bridge unified",
        "bridge split thread",
        "inferd unified",
        "inferd split",
        "binding",
    )
    med = report(raw, a, "llama-server", ours)
    if suite == "inprocess":
        report_inprocess(raw, a)
    print(f"\n({suite} suite: {time.perf_counter() - t0:.0f} s)")
    return {"raw": raw, "median": med}


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.child:
        a.flash_attn = bool(a.flash_attn)
        print(json.dumps(_child(a)))
        return 0
    from bench.fair import our_flash_attn

    a.model = a.model or str(_model_path())
    a.flash_attn = our_flash_attn(a.model, a.gpu_layers)
    results = {}
    for suite in ("http", "inprocess") if a.suite == "all" else (a.suite,):
        results[suite] = run_suite(a, suite)
        if a.json:
            Path(a.json).write_text(json.dumps(results))
    first = results[next(iter(results))]
    peers = HTTP_PEERS if "http" in results else INPROC_PEERS
    out = plot(first["median"].get(a.mode_list[0], {}), a.conc, list(peers), a.plot, a.title)
    if out:
        print(f"plot: {out}")
    return 0


def report_inprocess(raw: dict, a: argparse.Namespace) -> None:
    """In-process against in-process: ours over llama-cpp-python, and ours over the
    binding alone (how much of the ceiling the serving path keeps)."""
    for mode, by_peer in raw.items():
        for ref in (r for r in ("llama-cpp-python", "binding") if r in by_peer):
            for p in (x for x in ("inferd unified", "inferd split") if x in by_peer):
                for c in a.conc:
                    pr = paired(by_peer[p][c], by_peer[ref][c])
                    print(f"{mode} C={c}: {p} / {ref} = {describe_ratio(pr)}; per round {pr}")


if __name__ == "__main__":
    sys.exit(main())
