"""Decode speed, time to first token and peak RSS: LlamaCpp vs llama-cpp-python vs llama-bench.

Same model (SmolLM2-135M-Instruct Q4_1), same thread count, same prompt, same number
of generated tokens (EOS ignored so every run generates exactly N), one run with the
three peers interleaved round by round so that machine noise hits all of them alike:

* ``inferd``: ``LlamaCpp.generate`` (async stream of events, greedy, ``ignore_eos``);
* ``llama-cpp-python``: ``Llama.create_completion(stream=True)`` on the same rendered
  prompt; it has no ignore_eos, so end-of-generation is banned by a ``-inf`` logit bias
  in its C sampler chain, as llama-server's ``ignore_eos`` does (``bench/fair.py``; its
  ``logit_bias`` argument would add a Python logits processor per token), and its
  count is the tokens its sampler drew, the last one included;
* ``binding``: ``inferd._fast._llama`` alone (``Context.step`` in a Python loop, no
  event loop, no scheduler): what the Cython layer itself costs;
* ``llama-bench``: llama.cpp's own tool built from the same vendored tree
  (``bench/peers.py``), ``-d P -p 0 -n N`` for decode (after the prompt's P cells, at
  the positions the other peers decode) and ``-p P -n 0`` for prompt speed (its TTFT
  is estimated as P / prompt-tokens-per-second; it has no streaming). It sizes its
  context itself (P + N cells, where the others have ``--ctx``): the one setting it
  cannot match.

Same work: same batch (512), and the same flash-attention setting for every peer: ours
is libllama's AUTO (``Context`` has no flash-attention argument), resolved once by
``bench/fair.py``; llama-cpp-python (whose default is off) and llama-bench get that
value explicitly, and the report says which. Each peer runs in its own process; peak
RSS comes from ``wait4`` of that process.
Reports medians and the ratios inferd/llama-bench (target >= 0.97) and
inferd/llama-cpp-python (target >= 1.10).

    python bench/bench_llamacpp.py [--smoke] [--tokens N] [--threads T] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "Write a long, detailed story about a lighthouse keeper and the sea."
#: Logical and physical batch of every peer (LlamaCpp's and llama-cpp-python's default).
N_BATCH = 512


def _model_path() -> Path:
    from inferd.models import resolve

    return Path(resolve("smollm2-135m", pull=True, progress=False))


# ---------------------------------------------------------------- children


def child_inferd(a: argparse.Namespace) -> dict:
    import asyncio

    from inferd.backends.llamacpp import LlamaCpp
    from inferd.types import Request

    async def run() -> dict:
        # one sequence slot, the context every peer here decodes in (parallel would
        # default to n_ctx // 512 slots: a split KV cache of several streams, which
        # cost a single stream 0-7% per token in five runs on the 2-core box)
        b = LlamaCpp(
            a.model, n_ctx=a.ctx, n_threads=a.threads, n_gpu_layers=a.gpu_layers, parallel=1
        )

        def req(i: int) -> Request:
            # a different first word each run: no prefix cache, TTFT includes the prompt
            return Request.chat(
                f"({i}) {PROMPT}", temperature=0, max_tokens=a.tokens, ignore_eos=True
            )

        short = Request.chat(PROMPT, temperature=0, max_tokens=4, ignore_eos=True)
        async for _ in b.generate(short):  # warm-up
            pass
        tps, ttft = [], []
        prompt_tokens = 0
        for i in range(a.repeats):
            n, first = 0, None
            t0 = time.perf_counter()
            async for ev in b.generate(req(i)):
                if first is None:
                    first = time.perf_counter()
                if type(ev).__name__ == "Done":
                    n = ev.usage.output_tokens
                    prompt_tokens = ev.usage.input_tokens
            end = time.perf_counter()
            assert n == a.tokens, f"generated {n}, wanted {a.tokens}"
            ttft.append(first - t0)
            tps.append((n - 1) / (end - first))
        prompt = b.render(req(0))
        await b.aclose()
        return {"tps": tps, "ttft": ttft, "prompt_tokens": prompt_tokens, "prompt": prompt}

    return asyncio.run(run())


def child_binding(a: argparse.Namespace) -> dict:
    """The compiled binding alone (``Context.step`` in a loop): the floor under LlamaCpp."""
    from inferd._fast import _llama as L

    m = L.Model(a.model, n_gpu_layers=a.gpu_layers)
    ctx = L.Context(m, n_ctx=a.ctx, n_threads=a.threads)
    prompt = m.tokenize(a.prompt_text, add_special=False, parse_special=True)
    tps, ttft = [], []
    for _ in range(a.repeats + 1):  # the first run warms up
        ctx.clear()
        s = L.Sampler(m, temperature=0)
        b = L.Batch(len(prompt))
        t0 = time.perf_counter()
        last = b.add_sequence(prompt, 0, 0)
        ctx.decode(b)
        tok = s.sample(ctx, last)
        first = time.perf_counter()
        for pos in range(len(prompt), len(prompt) + a.tokens - 1):
            tok = ctx.step(s, tok, pos)
        end = time.perf_counter()
        tps.append((a.tokens - 1) / (end - first))
        ttft.append(first - t0)
    return {"tps": tps[1:], "ttft": ttft[1:]}


def child_lcp(a: argparse.Namespace) -> dict:
    """llama-cpp-python's streaming ``create_completion``; EOG banned in its C sampler chain
    and flash attention set as ours resolves (bench/fair.py)."""
    from bench.fair import eog_banned_llama

    llm = eog_banned_llama(
        a.model,
        n_ctx=a.ctx,
        n_batch=N_BATCH,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        n_gpu_layers=a.gpu_layers,
        flash_attn=bool(a.flash_attn),
        verbose=False,
    )
    prompt = a.prompt_text
    kw = dict(max_tokens=a.tokens, temperature=0.0, stream=True)
    warm = prompt.replace(f"(0) {PROMPT}", f"(warm-up) {PROMPT}")
    for _ in llm.create_completion(warm, **{**kw, "max_tokens": 4}):  # not a prefix of a run
        pass
    tps, ttft = [], []
    for i in range(a.repeats):
        first = None
        p_i = prompt.replace(f"(0) {PROMPT}", f"({i}) {PROMPT}")
        llm.sampled = 0
        t0 = time.perf_counter()
        for _chunk in llm.create_completion(p_i, **kw):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        # chunks can merge tokens (held UTF-8): count what the sampler drew, the last
        # token included (Llama.n_tokens misses it: the last token is never decoded)
        n = llm.sampled
        assert n == a.tokens, f"llama-cpp-python sampled {n}, wanted {a.tokens}"
        ttft.append(first - t0)
        tps.append((n - 1) / (end - first))
    return {"tps": tps, "ttft": ttft}


def _spawn_rss(cmd: list[str], env: dict | None = None) -> tuple[str, int]:
    """Like _spawn, but reaps the child ourselves so wait4 gives its rusage."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read()  # type: ignore[union-attr]
    err = p.stderr.read()  # type: ignore[union-attr]
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return out.decode(), ru.ru_maxrss * 1024


def llama_bench(exe: Path, a: argparse.Namespace, prompt_tokens: int) -> tuple[dict, int]:
    from bench.fair import server_fa_flag

    base = [
        str(exe),
        "-m",
        a.model,
        "-t",
        str(a.threads),
        "-r",
        str(a.repeats),
        "-o",
        "json",
        "-ngl",
        str(a.gpu_layers if a.gpu_layers >= 0 else 999),
        "-b",
        str(N_BATCH),
        "-ub",
        str(N_BATCH),
        *server_fa_flag(bool(a.flash_attn)),
    ]
    # decode after the prompt's cells, as the other peers do (-d: prefilled, not timed)
    out, rss = _spawn_rss([*base, "-d", str(prompt_tokens), "-p", "0", "-n", str(a.tokens)])
    tg = json.loads(out)[0]
    out2, rss2 = _spawn_rss([*base, "-p", str(prompt_tokens), "-n", "0"])
    pp = json.loads(out2)[0]
    tps = tg.get("samples_ts") or [tg["avg_ts"]]
    pp_ts = pp.get("samples_ts") or [pp["avg_ts"]]
    return {"tps": tps, "ttft": [prompt_tokens / x for x in pp_ts]}, max(rss, rss2)


# ---------------------------------------------------------------- parent


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI: must run)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--model",
        default=None,
        help="GGUF to run (default: SmolLM2-135M-Instruct from the model store)",
    )
    ap.add_argument(
        "--gpu-layers",
        type=int,
        default=0,
        help="layers to offload on a GPU build, for every peer (-1 = all)",
    )
    ap.add_argument("--prompt-text", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--flash-attn", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write results to this file")
    a = ap.parse_args(argv)
    a.tokens = a.tokens or (16 if a.smoke else 128)
    a.rounds = a.rounds or (1 if a.smoke else 3)
    a.repeats = a.repeats or (1 if a.smoke else 3)
    return a


def _have_lcp() -> bool:
    """llama-cpp-python is a peer where installed; CI installs it, so there it must be."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise SystemExit("llama-cpp-python is not installed; CI installs it") from None
        print("llama-cpp-python is not installed: skipping that peer", file=sys.stderr)
        return False
    return True


def _rounds(a: argparse.Namespace, exe: Path, have_lcp: bool) -> tuple[dict, dict, int]:
    """Every peer once per round, each in its own process: (samples, peak RSS, prompt
    tokens)."""
    samples: dict[str, dict[str, list[float]]] = {}
    rss: dict[str, int] = {}
    prompt_tokens = 0

    def record(peer: str, res: dict, m: int) -> None:
        _add(samples, peer, res)
        rss[peer] = max(rss.get(peer, 0), m)

    for r in range(a.rounds):
        out, m = _spawn_rss(_child_cmd("inferd", a), _env())
        res = json.loads(out)
        prompt_text, prompt_tokens = res["prompt"], res["prompt_tokens"]
        record("inferd", res, m)
        if have_lcp:
            out, m = _spawn_rss(_child_cmd("lcp", a, "--prompt-text", prompt_text), _env())
            record("llama-cpp-python", json.loads(out), m)
        out, m = _spawn_rss(_child_cmd("binding", a, "--prompt-text", prompt_text), _env())
        record("binding", json.loads(out), m)
        record("llama-bench", *llama_bench(exe, a, prompt_tokens))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    return samples, rss, prompt_tokens


def _paired(samples: dict, repeats: int) -> dict[str, list[float]]:
    """Ratios of medians within each round: a load spike from other jobs hits the peers
    of one round alike, so paired ratios are steadier than ratios of overall medians on
    a shared machine."""
    paired: dict[str, list[float]] = {}
    for peer in ("llama-bench", "llama-cpp-python"):
        if peer in samples:
            ours, theirs = samples["inferd"]["tps"], samples[peer]["tps"]
            paired[peer] = [
                statistics.median(ours[i : i + repeats])
                / statistics.median(theirs[i : i + repeats])
                for i in range(0, min(len(ours), len(theirs)), repeats)
            ]
    return paired


def _report(a: argparse.Namespace, med: dict, rss: dict, paired: dict, prompt_tokens: int) -> None:
    from bench.timing import describe_ratio

    print(
        f"\n{Path(a.model).name}, {a.threads} threads, {a.gpu_layers} GPU layers, "
        f"{prompt_tokens}-token prompt, batch {N_BATCH}, flash attention "
        f"{'on' if a.flash_attn else 'off'} for every peer (ours AUTO, resolved), "
        f"{a.tokens} generated tokens, medians of {a.rounds * a.repeats} runs\n"
    )
    print("| peer | decode tok/s | TTFT ms | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    for k in (x for x in ("inferd", "binding", "llama-cpp-python", "llama-bench") if x in med):
        note = " (est.)" if k == "llama-bench" else ""
        print(
            f"| {k} | {med[k]['tps']:.1f} | {med[k]['ttft'] * 1000:.1f}{note} | "
            f"{rss[k] / 2**20:.0f} |"
        )
    ours = med["inferd"]["tps"]
    print(
        f"\nbinding alone / llama-bench decode: "
        f"{med['binding']['tps'] / med['llama-bench']['tps']:.3f}x"
    )
    for peer, target in (("llama-bench", 0.97), ("llama-cpp-python", 1.10)):
        if peer in med:
            print(
                f"inferd / {peer} decode: {ours / med[peer]['tps']:.3f}x of medians, "
                f"median of per-round ratios {describe_ratio(paired[peer])}; per round "
                f"{[round(x, 2) for x in paired[peer]]} (target >= {target})"
            )
    if "llama-cpp-python" in med:
        print(
            f"TTFT inferd vs llama-cpp-python: {med['inferd']['ttft'] * 1000:.1f} ms vs "
            f"{med['llama-cpp-python']['ttft'] * 1000:.1f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.child:
        res = {"inferd": child_inferd, "binding": child_binding, "lcp": child_lcp}[a.child](a)
        print(json.dumps(res))
        return 0

    a.model = a.model or str(_model_path())
    sys.path.insert(0, str(ROOT))
    from bench.fair import our_flash_attn
    from bench.peers import ensure_peer

    have_lcp = _have_lcp()
    exe = ensure_peer("llama-bench", quiet=True)
    # ours is libllama's AUTO; every other peer gets what AUTO resolved to, explicitly
    a.flash_attn = our_flash_attn(a.model, a.gpu_layers)
    print(
        f"model {Path(a.model).name}, threads {a.threads}, {a.tokens} tokens, "
        f"{a.rounds} rounds x {a.repeats} repeats",
        file=sys.stderr,
    )
    samples, rss, prompt_tokens = _rounds(a, exe, have_lcp)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in samples.items()}
    paired = _paired(samples, a.repeats)
    _report(a, med, rss, paired, prompt_tokens)
    if a.json:
        Path(a.json).write_text(
            json.dumps({"samples": samples, "median": med, "rss": rss, "paired": paired})
        )
    return 0


def _child_cmd(kind: str, a: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--model",
        a.model,
        "--tokens",
        str(a.tokens),
        "--threads",
        str(a.threads),
        "--repeats",
        str(a.repeats),
        "--ctx",
        str(a.ctx),
        "--gpu-layers",
        str(a.gpu_layers),
        "--flash-attn",
        str(int(a.flash_attn)),
        *extra,
    ]


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])
        ),
    }


def _add(samples: dict, name: str, res: dict) -> None:
    d = samples.setdefault(name, {"tps": [], "ttft": []})
    d["tps"].extend(res["tps"])
    d["ttft"].extend(res["ttft"])


if __name__ == "__main__":
    sys.exit(main())
