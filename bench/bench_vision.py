"""Image prefill, and decoding while an image is encoded, vs llama-server --mmproj (issue 16).

Two HTTP peers on the synthetic pair of ``bench/synth_vision.py`` (random weights: speed
depends on shapes, not values), same slots, context, threads, batch and flash-attention
setting (``bench/servers.py``), driven by the same aiohttp client:

* ``inferd``: ``inferd bridge --config`` serving ``LlamaCpp(model, mmproj=...)``;
* ``llama-server``: built from the vendored llama.cpp (``bench/peers.py``) with ``--mmproj``.

Per round and peer, in alternating order (load from elsewhere hits both alike):

* ``prefill``: one request with a fresh image (new pixels every round, so neither peer
  reuses a cached prefix) and ``max_tokens=1``: encode + decode of its tokens + one step;
* ``again``: the same image right after, with another question *before* it: no prefix
  reaches the image, so llama-server encodes it again; inferd's media cache (ADR 0032)
  serves the encode and only the embeddings are decoded;
* ``decode``: two text streams alone (tok/s), then the same two while images are sent one
  after another. Two figures of the window in which images were in flight:

  - ``stall``: how long each image stopped the text streams, in ms: the window's length
    minus the time the tokens they got in it take alone, over the number of images
    (0: images cost the other streams nothing). This is what "slowed by" means to the
    text streams' users: how much later they finish;
  - ``fraction``: their tok/s in the window as a fraction of alone. It also rewards a
    peer that spends longer receiving and preparing each image (the streams decode
    meanwhile), so it is reported but is not the target's figure.

Reported: median over rounds of the per-round ratios: prefill speed (llama-server's time
over ours; >= 1.0 is the target), the same for ``again``, stall (llama-server's stall
over ours; >= 1.0: we slow the text streams no more than it does) and the decode
fraction of each peer. Until
``LlamaCpp(mmproj=)`` exists the inferd column says so and llama-server is measured alone.

    python bench/bench_vision.py [--smoke] [--rounds R] [--tokens T]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import io
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

from bench.http_load import REQUEST_TIMEOUT_S, chat_body, wait_healthy  # noqa: E402
from bench.servers import (  # noqa: E402
    BRIDGE_START_TIMEOUT_S,
    N_BATCH,
    Server,
    Settings,
    _first_line,
    bridge_config,
    json_str,
)

#: Slots of both peers (two text streams and an image at once).
SLOTS = 4
#: KV cells per slot (an image of the full shape is 576 tokens).
CTX_PER_SLOT = 2048
#: Compute threads of both peers.
THREADS = 2
#: Text streams decoding while images are encoded.
N_TEXT_STREAMS = 2
#: Images sent one after another during the decode measurement.
N_IMAGES = 3
PROMPT = "Describe it."


def shapes(smoke: bool) -> Any:
    """The projector: the tests' (64 tokens per image) for smoke runs, LLaVA-1.5's token
    count (336 px / 14 = 24 x 24 = 576) with a wider ViT otherwise."""
    from bench.synth_vision import VisionShape

    if smoke:
        return VisionShape()
    return VisionShape(image_size=336, patch_size=14, hidden=256, ffn=1024, layers=6)


def image(i: int) -> bytes:
    """A 640 x 480 JPEG of noise seeded by ``i``: the same bytes to both peers."""
    import numpy as np
    from PIL import Image

    px = np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def image_body(data: bytes, lead: str | None = None) -> dict[str, Any]:
    """One image and PROMPT after it; ``lead``: text before the image (another question
    first, so no prefix reaches the image)."""
    import base64

    url = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    parts: list[dict[str, Any]] = [] if lead is None else [{"type": "text", "text": lead}]
    parts += [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    return {
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 1,
        "temperature": 0,
    }


async def prefill(
    session: aiohttp.ClientSession, base: str, data: bytes, n_media: int, lead: str | None = None
) -> float:
    """Seconds for one image request of one token (non-streamed)."""
    t0 = time.perf_counter()
    async with session.post(f"{base}/v1/chat/completions", json=image_body(data, lead)) as r:
        reply = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {str(reply)[:500]}")
    elapsed = time.perf_counter() - t0
    if reply["usage"]["prompt_tokens"] < n_media:
        raise RuntimeError(f"{base}: {reply['usage']} counts fewer than {n_media} media tokens")
    return elapsed


async def stream_times(
    session: aiohttp.ClientSession, base: str, body: dict, first: asyncio.Event | None = None
) -> list[float]:
    """perf_counter() of every content chunk of one streamed reply; ``first`` is set at the
    first one."""
    import json

    times: list[float] = []
    async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{base}: HTTP {resp.status}: {(await resp.text())[:500]}")
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data:") and line != b"data: [DONE]":
                chunk = json.loads(line[5:])
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                    times.append(time.perf_counter())
                    if first is not None:
                        first.set()
    return times


def rate(streams: list[list[float]], start: float, end: float) -> float:
    """Chunks per second of all streams inside [start, end]."""
    n = sum(start <= t <= end for ts in streams for t in ts)
    return n / (end - start)


async def decode_fraction(
    session: aiohttp.ClientSession, base: str, tokens: int, images: list[bytes], n_media: int
) -> tuple[float, float]:
    """Text streams' tok/s while images are in flight, over their tok/s alone, and the
    stall per image in ms (the window, less the time its tokens take alone)."""
    bodies = [chat_body(i, tokens, sampled=False) for i in range(N_TEXT_STREAMS)]
    alone = await asyncio.gather(*(stream_times(session, base, b) for b in bodies))
    start, end = max(ts[0] for ts in alone), min(ts[-1] for ts in alone)
    base_rate = rate(alone, start, end)
    firsts = [asyncio.Event() for _ in bodies]
    texts = [
        asyncio.create_task(stream_times(session, base, b, f))
        for b, f in zip(bodies, firsts, strict=True)
    ]
    await asyncio.gather(*(f.wait() for f in firsts))  # images overlap decoding, not prefill
    t_img = time.perf_counter()
    for data in images:
        await prefill(session, base, data, n_media)
    t_img_end = time.perf_counter()
    during = await asyncio.gather(*texts)
    window_end = min(t_img_end, min(ts[-1] for ts in during))
    if window_end - t_img <= 0:
        raise RuntimeError("the text streams ended before the images: raise --tokens")
    window = window_end - t_img
    got = rate(during, t_img, window_end) * window  # the tokens the window held
    stall_ms = 1000 * (window - got / base_rate) / len(images)
    return got / window / base_rate, stall_ms


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(s: Settings, mmproj: Path) -> Server:
    """llama-server with the flags of ``bench/servers.py`` plus ``--mmproj``."""
    from bench.fair import server_fa_flag
    from bench.peers import ensure_peer

    port = _free_port()
    cmd = [
        str(ensure_peer("llama-server")),
        *("-m", s.model, "--mmproj", str(mmproj), "-np", str(s.conc)),
        *("-c", str(s.conc * s.ctx_per_slot), "-t", str(s.threads), "-tb", str(s.threads)),
        *("-b", str(N_BATCH), "-ub", str(N_BATCH), *server_fa_flag(s.flash_attn)),
        *("--no-kv-unified", "--host", "127.0.0.1", "--port", str(port), "--no-webui"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server("llama-server", proc, f"http://127.0.0.1:{port}")


def start_bridge(s: Settings, mmproj: Path) -> Server:
    """``inferd bridge --config`` serving LlamaCpp(model, mmproj=...), split KV layout."""
    fd, name = tempfile.mkstemp(prefix="inferd-bench-vision-", suffix=".toml")
    cfg = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(bridge_config(s, "split") + f"mmproj = {json_str(str(mmproj))}\n")
    log = cfg.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "inferd.serve.bridge", "--config", str(cfg), "--port", "0"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    server = Server("inferd", proc, "", [cfg, log])
    line = _first_line(proc, BRIDGE_START_TIMEOUT_S)
    if "listening on " not in line:
        tail = log.read_text(errors="replace")[-2000:]
        server.stop()
        raise RuntimeError(f"inferd bridge did not start: {line!r} {tail}")
    server.base_url = line.rsplit("listening on ", 1)[1].strip()
    return server


def ours_available() -> bool:
    """True once LlamaCpp takes a projector (the libmtmd engine of issue 16)."""
    from inferd._fast import _llama
    from inferd.backends.llamacpp import LlamaCpp

    return hasattr(_llama, "Mtmd") and "mmproj" in inspect.signature(LlamaCpp).parameters


async def measure(peers: list[Server], n_media: int, tokens: int, rounds: int) -> dict:
    """Per-round prefill seconds and decode fractions of each peer, interleaved."""
    out: dict[str, dict[str, list[float]]] = {
        p.name: {"prefill": [], "again": [], "decode": [], "stall": []} for p in peers
    }
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        for p in peers:  # warm each once (projector buffers, first graph)
            await wait_healthy(p.base_url, p.alive)
            await prefill(session, p.base_url, image(999_999), n_media)
        for r in range(rounds):
            order = peers if r % 2 == 0 else peers[::-1]
            fresh = [image(1000 * r + k) for k in range(N_IMAGES + 1)]
            for p in order:
                t = await prefill(session, p.base_url, fresh[0], n_media)
                lead = f"Question {r + 2}, about the same picture:"
                again = await prefill(session, p.base_url, fresh[0], n_media, lead)
                frac, stall = await decode_fraction(session, p.base_url, tokens, fresh[1:], n_media)
                out[p.name]["prefill"].append(t)
                out[p.name]["again"].append(again)
                out[p.name]["decode"].append(frac)
                out[p.name]["stall"].append(stall)
    return out


def run(smoke: bool, rounds: int, tokens: int) -> int:
    from bench.fair import our_flash_attn
    from bench.synth_vision import TextShape, ensure
    from inferd import models

    vision = shapes(smoke)
    tok_src = models.resolve("smollm2-135m", pull=True, progress=False)
    cache = Path(os.environ.get("INFERD_TEST_CACHE") or Path.home() / ".cache/inferd/test")
    pair = ensure(tok_src, cache, text=TextShape(), vision=vision, audio=None)
    s = Settings(str(pair.model), SLOTS, CTX_PER_SLOT, THREADS, 0, our_flash_attn(str(pair.model)))
    peers = [start_server(s, pair.mmproj)]
    have_ours = ours_available()
    try:
        if have_ours:
            peers.insert(0, start_bridge(s, pair.mmproj))
        res = asyncio.run(measure(peers, vision.n_tokens, tokens, rounds))
    finally:
        for p in peers:
            p.stop()
    report(res, vision, tokens, rounds, have_ours)
    return 0


def report(res: dict, vision: Any, tokens: int, rounds: int, have_ours: bool) -> None:
    med = {p: {k: statistics.median(v) for k, v in d.items()} for p, d in res.items()}
    print(
        f"synthetic pair, {vision.n_tokens} tokens per image ({vision.image_size} px / "
        f"{vision.patch_size}), {N_TEXT_STREAMS} text streams of {tokens} tokens, "
        f"{N_IMAGES} images, {rounds} rounds, {THREADS} threads"
    )
    print(
        f"{'peer':<14}{'prefill s':>11}{'again s':>9}{'stall ms/image':>16}{'decode fraction':>17}"
    )
    for peer, m in med.items():
        print(
            f"{peer:<14}{m['prefill']:>11.3f}{m['again']:>9.3f}{m['stall']:>16.1f}"
            f"{m['decode']:>17.2f}"
        )
    if not have_ours:
        print("inferd: not measured (LlamaCpp(mmproj=) has not landed)")
        return
    ours, theirs = res["inferd"], res["llama-server"]
    speed = [t / o for o, t in zip(ours["prefill"], theirs["prefill"], strict=True)]
    dec = [o / t for o, t in zip(ours["decode"], theirs["decode"], strict=True)]
    stall = [t / o for o, t in zip(ours["stall"], theirs["stall"], strict=True) if o > 0]
    again = [t / o for o, t in zip(ours["again"], theirs["again"], strict=True)]
    print(f"image prefill speed, llama-server's time / ours: {statistics.median(speed):.2f}")
    print(
        "same image behind another question, llama-server's time / ours: "
        f"{statistics.median(again):.2f}"
    )
    if stall:
        print(f"stall per image, llama-server's / ours: {statistics.median(stall):.2f}")
    print(f"decode under images, our fraction / llama-server's: {statistics.median(dec):.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens per text stream")
    a = p.parse_args(argv)
    rounds = a.rounds or (2 if a.smoke else 7)
    tokens = a.tokens or (64 if a.smoke else 256)
    return run(a.smoke, rounds, tokens)


if __name__ == "__main__":
    sys.exit(main())
