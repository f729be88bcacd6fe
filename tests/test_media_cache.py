"""The media cache (issue 16, ADR 0032): a projector's encodes reused across prompts.

Real chunks and encodes from the synthetic vision/audio pair (bench/synth_vision.py):
the keys (a file's chunks in order, a file sent twice, a long audio file's equal-sized
segments), the byte budget, and requests where the same file comes back behind other
text: no encode, the cached floats decoded, the greedy reply a fresh encode gives.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest

from inferd.backends.llamacpp.media_cache import (
    DEFAULT_MEDIA_CACHE_MIB,
    MediaCache,
    check_media_cache_mib,
    chunk_keys,
)
from inferd.errors import InvalidRequest
from inferd.types import AudioBlock, Done, ImageBlock, Message, Request, TextBlock
from tests.conftest import require_llama_core
from tests.test_media_requests import IMAGE_TOKENS, JPEG, png

AUDIO_SEGMENT_S = 30  # mtmd splits audio for Whisper-style encoders into 30 s pieces


def noise_wav(seconds: float, seed: int, rate: int = 16000) -> bytes:
    """A mono 16-bit WAV of seeded noise: every 30 s segment differs from the others."""
    rng = random.Random(seed)
    n = int(seconds * rate)
    data = struct.pack(f"<{n}h", *(rng.randint(-8000, 8000) for _ in range(n)))
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(body) + len(data)) + body + data


def backend(synth_vision: Any, **kw: Any) -> Any:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    return LlamaCpp(
        synth_vision.model,
        mmproj=synth_vision.mmproj,
        n_ctx=4096,
        n_threads=2,
        **{"parallel": 1, **kw},
    )


@pytest.fixture(scope="module")
def cached(synth_vision: Any) -> Any:
    b = backend(synth_vision)
    yield b
    b.close()


@pytest.fixture(scope="module")
def uncached(synth_vision: Any) -> Any:
    b = backend(synth_vision, media_cache_mib=0)
    yield b
    b.close()


def ask(lead: str, *media: Any, n: int = 6) -> Request:
    return Request(
        (Message.user((TextBlock(lead), *media, TextBlock("What is this?"))),),
        max_tokens=n,
        temperature=0,
        ignore_eos=True,
    )


async def reply(b: Any, request: Request) -> tuple[str, Done]:
    events = [ev async for ev in b.generate(request)]
    done = events[-1]
    assert isinstance(done, Done)
    return "".join(getattr(e, "text", "") for e in events[:-1]), done


def hits(b: Any) -> int:
    return int(b.batching_stats().get("media_cache_hits", 0))


def media_chunks(mtmd: Any, *files: bytes) -> Any:
    bitmaps = [mtmd.bitmap(f) for f in files]
    text = " ".join(["look"] + [mtmd.marker] * len(files) + ["end"])
    return mtmd.tokenize(text, bitmaps, add_special=False), bitmaps


def copies(bitmaps: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for bm in bitmaps:
        out[bm.id] = out.get(bm.id, 0) + 1
    return out


# ---------------------------------------------------------------- keys and budget


def test_media_cache_mib_is_validated() -> None:
    from inferd.backends.llamacpp.options import LlamaCppOptions

    for bad in (-1, 1.5, True, "64", 1 << 21):
        with pytest.raises(InvalidRequest, match="media_cache_mib"):
            check_media_cache_mib(bad)
        with pytest.raises(InvalidRequest, match="media_cache_mib"):
            LlamaCppOptions(media_cache_mib=bad)
    assert LlamaCppOptions().media_cache_mib == DEFAULT_MEDIA_CACHE_MIB
    assert LlamaCppOptions(media_cache_mib=0).media_cache_mib == 0


def test_a_long_audio_files_segments_get_their_own_keys(cached: Any) -> None:
    """Equal-sized segments of one file share its id: the key tells them apart by order,
    and the same file sent twice gives the same keys twice."""
    audio = noise_wav(2 * AUDIO_SEGMENT_S + 5, seed=1)
    chunks, bitmaps = media_chunks(cached._mtmd, audio, audio)
    keys = chunk_keys(chunks, copies(bitmaps))
    media = [k for k in range(len(chunks)) if chunks.kind(k) == "audio"]
    assert len(media) == 6 and set(keys) == set(media)
    first, second = [keys[k] for k in media[:3]], [keys[k] for k in media[3:]]
    assert len(set(first)) == 3 and first == second
    assert chunk_keys(chunks, {}) == {}  # copies unknown: no key, encoded every time
    assert chunk_keys(chunks, {bitmaps[0].id: 4}) == {}  # 6 chunks do not split in 4


def test_the_budget_keeps_the_most_recent(cached: Any) -> None:
    mtmd = cached._mtmd
    red, blue = png(16, 16, (250, 0, 0)), png(16, 16, (0, 0, 250))
    chunks, bitmaps = media_chunks(mtmd, red, blue, JPEG.read_bytes())
    keys = chunk_keys(chunks, copies(bitmaps))
    idx = sorted(keys)
    one = mtmd.encode(chunks, idx[0]).nbytes
    cache = MediaCache(2 * one)
    for k in idx:
        cache.encode(mtmd, chunks, k, keys[k])
    assert len(cache) == 2 and cache.used_bytes == 2 * one
    assert cache.stats == {"media_cache_hits": 0, "media_cache_misses": 3, "media_cache_evicted": 1}
    cache.encode(mtmd, chunks, idx[0], keys[idx[0]])  # evicted first: encoded again
    assert cache.stats["media_cache_hits"] == 0
    emb = cache.encode(mtmd, chunks, idx[2], keys[idx[2]])
    assert cache.stats["media_cache_hits"] == 1 and emb.attached and emb.nbytes == one
    small = MediaCache(one - 1)  # a chunk larger than the whole budget is not kept
    small.encode(mtmd, chunks, idx[0], keys[idx[0]])
    assert len(small) == 0 and small.used_bytes == 0


def test_detached_embeddings_cannot_be_decoded(cached: Any) -> None:
    from inferd._fast._llama import decode_embeddings

    mtmd = cached._mtmd
    chunks, bitmaps = media_chunks(mtmd, png(16, 16))
    k = sorted(chunk_keys(chunks, copies(bitmaps)))[0]
    detached = mtmd.encode(chunks, k).detached()
    assert not detached.attached
    with pytest.raises(ValueError, match="detached"):
        decode_embeddings(cached._ctx, detached, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="not a copy"):
        detached.bound(chunks, 0)  # chunk 0 is text
    assert detached.bound(chunks, k).attached


# ---------------------------------------------------------------- through LlamaCpp


async def test_the_same_image_behind_other_text_is_not_encoded_again(
    cached: Any, uncached: Any
) -> None:
    img = png(24, 24, (20, 120, 220))
    await reply(cached, ask("First question.", ImageBlock(data=img)))
    before = hits(cached)
    text, done = await reply(cached, ask("A different question first.", ImageBlock(data=img)))
    assert hits(cached) == before + 1
    # no prefix reuse served it: the text before the image differs, so the cached
    # cells stop before the image (they would number more than its own otherwise)
    assert done.usage.cached_tokens < IMAGE_TOKENS
    fresh, fresh_done = await reply(
        uncached, ask("A different question first.", ImageBlock(data=img))
    )
    assert text == fresh and done.usage.input_tokens == fresh_done.usage.input_tokens
    assert "media_cache_hits" not in uncached.batching_stats()


async def test_a_long_audio_file_comes_back_segment_by_segment(cached: Any, uncached: Any) -> None:
    audio = noise_wav(2 * AUDIO_SEGMENT_S + 5, seed=2)
    block = AudioBlock(data=audio, format="wav")
    await reply(cached, ask("Listen.", block, n=2))
    before = hits(cached)
    text, _ = await reply(cached, ask("Now listen again, carefully.", block))
    assert hits(cached) == before + 3
    fresh, _ = await reply(uncached, ask("Now listen again, carefully.", block))
    assert text == fresh


async def test_a_file_sent_twice_in_one_prompt_is_encoded_once(cached: Any, uncached: Any) -> None:
    img = png(20, 28, (90, 200, 40))
    before = hits(cached)
    text, _ = await reply(cached, ask("Two:", ImageBlock(data=img), ImageBlock(data=img)))
    assert hits(cached) == before + 1
    fresh, _ = await reply(uncached, ask("Two:", ImageBlock(data=img), ImageBlock(data=img)))
    assert text == fresh


async def test_other_images_are_not_served_from_the_cache(cached: Any, uncached: Any) -> None:
    await reply(cached, ask("One.", ImageBlock(data=png(16, 16, (1, 2, 3)))))
    before = hits(cached)
    other = png(16, 16, (3, 2, 1))
    text, _ = await reply(cached, ask("Two.", ImageBlock(data=other)))
    assert hits(cached) == before
    fresh, _ = await reply(uncached, ask("Two.", ImageBlock(data=other)))
    assert text == fresh


async def test_clearing_the_prefix_cache_forgets_the_encodes(cached: Any) -> None:
    img = png(18, 18, (240, 240, 10))
    await reply(cached, ask("Before.", ImageBlock(data=img)))
    cached.clear_prefix_cache()
    before = hits(cached)
    await reply(cached, ask("After clearing.", ImageBlock(data=img)))
    assert hits(cached) == before


async def test_media_cache_events_reach_the_metrics(cached: Any) -> None:
    """Operators see the cache at work: ``inferd_llamacpp_cache_events_total`` carries
    the hits and misses ``batching_stats()`` counts (ADR 0016's exposition)."""
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client.parser import text_string_to_metric_families

    from inferd.serve.bridge import make_app

    img = png(22, 22, (33, 66, 99))
    await reply(cached, ask("Metrics one.", ImageBlock(data=img)))
    await reply(cached, ask("Metrics two.", ImageBlock(data=img)))
    async with TestClient(TestServer(make_app(cached))) as tc:
        text = await (await tc.get("/metrics")).text()
    got = {
        s.labels["event"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "inferd_llamacpp_cache_events_total" and s.labels.get("cache") == "media"
    }
    stats = cached.batching_stats()
    assert got == {
        "hit": stats["media_cache_hits"],
        "miss": stats["media_cache_misses"],
        "evicted": stats["media_cache_evicted"],
    }
    assert got["hit"] >= 1 and got["miss"] >= 1


async def test_concurrent_requests_share_one_encode(synth_vision: Any, uncached: Any) -> None:
    """Four requests at once, one image behind four different questions, in four slots:
    the scheduler encodes it once (one media chunk per step, so the others find it
    cached) and every greedy reply is what a cache-less backend gives alone."""
    import asyncio

    img = png(26, 26, (150, 40, 200))
    leads = [f"Question {i}: what do you see?" for i in range(4)]
    b = backend(synth_vision, parallel=4)
    try:
        got = await asyncio.gather(*(reply(b, ask(q, ImageBlock(data=img))) for q in leads))
        stats = b.batching_stats()
    finally:
        b.close()
    assert stats["media_cache_misses"] == 1 and stats["media_cache_hits"] == 3
    assert stats["media_chunks"] == 4
    for q, (text, done) in zip(leads, got, strict=True):
        want, _ = await reply(uncached, ask(q, ImageBlock(data=img)))
        assert text == want and done.usage.output_tokens == 6
