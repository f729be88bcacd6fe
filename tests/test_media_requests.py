"""Images and audio in requests to ``LlamaCpp(mmproj=...)`` (issue 16, ADR 0028).

Limits and hostile files (refused before libmtmd decodes them, each naming the limit),
requests through the scheduler (usage counts media cells, prefix reuse keyed by the
media's hash, several media per message, attachments), and the refusals of a model
without a projector. The synthetic pair of ``bench/synth_vision.py``; the differential
tests against llama.cpp's own tools are in tests/test_mtmd_differential.py.
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from inferd.errors import InvalidRequest, ModelLoadError
from inferd.media_limits import (
    MAX_IMAGE_PIXELS,
    MediaLimits,
    audio_format,
    audio_seconds,
    check_audio,
    check_audio_seconds,
    check_image,
    image_size,
)
from inferd.types import (
    Attachment,
    AudioBlock,
    Done,
    ImageBlock,
    Message,
    Request,
    TextBlock,
)
from tests.conftest import require_llama_core

MTMD_DIR = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "tools" / "mtmd"
JPEG = MTMD_DIR / "test-1.jpeg"
MP3 = MTMD_DIR / "test-2.mp3"
IMAGE_TOKENS = 64  # the synthetic projector: (64 / 8) ** 2


def png(
    w: int,
    h: int,
    rgb: tuple[int, int, int] = (200, 30, 30),
    *,
    body: bool = True,
    idat: bytes | None = None,
) -> bytes:
    """A real RGB PNG (or only its header, claiming ``w`` x ``h``, when ``body`` is off;
    with ``idat``, those bytes as its compressed data, whatever they are)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    if not body:
        return head
    raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))
    data = zlib.compress(raw) if idat is None else idat
    return head + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def wav(seconds: float, rate: int = 16000) -> bytes:
    """A silent mono 16-bit WAV of ``seconds``."""
    n = int(seconds * rate)
    data = b"\x00\x00" * n
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(body) + len(data)) + body + data


# ---------------------------------------------------------------- limits, no model


def test_image_headers_are_read() -> None:
    assert image_size(png(33, 17)) == ("png", 33, 17)
    fmt, w, h = image_size(JPEG.read_bytes()) or ("", 0, 0)
    assert fmt == "jpeg" and w > 100 and h > 100
    gif = b"GIF89a" + struct.pack("<HH", 5, 7) + b"\x00" * 8
    assert image_size(gif) == ("gif", 5, 7)
    assert image_size(b"\x00" * 100) is None


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"\x13\x37" * 50, "not an image"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (png(100_000, 100_000, body=False), "max_image_pixels"),
        (png(0, 10, body=False), "0x10"),
        (JPEG.read_bytes()[:-2], "truncated"),
        (png(9, 9)[:-12], "truncated"),
        (b"GIF89a" + struct.pack("<HH", 5, 7) + b"\x00" * 8, "truncated"),
    ],
)
def test_hostile_images_are_refused_by_name(data: bytes, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        check_image(data, "messages[0] image 1")


def test_image_limits_are_settable() -> None:
    check_image(png(64, 64), "img")
    with pytest.raises(InvalidRequest, match="max_image_pixels is 100"):
        check_image(png(11, 10), "img", MediaLimits(max_image_pixels=100))
    with pytest.raises(InvalidRequest, match="max_media_bytes"):
        check_image(png(64, 64), "img", MediaLimits(max_media_bytes=10))
    assert MAX_IMAGE_PIXELS == 8192 * 4096


def test_audio_checks() -> None:
    assert audio_format(wav(0.1)) == "wav"
    assert audio_format(MP3.read_bytes()) == "mp3"
    assert audio_format(b"fLaC" + b"\x00" * 10) == "flac"
    with pytest.raises(InvalidRequest, match="not audio"):
        check_audio(png(4, 4), "clip")
    with pytest.raises(InvalidRequest, match="empty"):
        check_audio(b"", "clip")
    with pytest.raises(InvalidRequest, match="max_audio_seconds is 5"):
        check_audio_seconds(6.0, "clip", MediaLimits(max_audio_seconds=5))


#: One MPEG-2.5 layer III frame (8 kHz, 8 kbit/s, 72 bytes, 72 ms of sound).
MP3_FRAME = bytes([0xFF, 0xE3, 0x18, 0xC4]) + bytes(68)


def test_audio_length_is_read_before_decoding() -> None:
    """Two hours promised by a header are refused without decoding a sample: WAV's data
    size, FLAC's STREAMINFO, and MP3's frames walked (7.2 MB, under max_media_bytes)."""
    assert audio_seconds(wav(1.5)) == pytest.approx(1.5)
    assert audio_seconds(MP3.read_bytes()) == pytest.approx(17.44, rel=0.02)  # decoded: 17.44
    two_hours = MP3_FRAME * 100_000
    assert audio_seconds(two_hours) == pytest.approx(7200)
    streaminfo = (8000 << 44 | 8000 * 7200).to_bytes(8, "big")
    flac = b"fLaC" + b"\x00" * 14 + streaminfo + b"\x00" * 16
    assert audio_seconds(flac) == pytest.approx(7200)
    wav_header = wav(0.01)[:40] + struct.pack("<I", 2 * 3600 * 32000)
    for data in (two_hours, flac, wav_header):
        with pytest.raises(InvalidRequest, match=r"7200\.0 s of audio; max_audio_seconds is 600"):
            check_audio(data, "clip")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_image_pixels": 0}, {"max_audio_seconds": -1}, {"max_media_bytes": True}],
)
def test_bad_limits_are_named(kwargs: dict[str, Any]) -> None:
    from inferd.backends.llamacpp.options import LlamaCppOptions

    with pytest.raises(InvalidRequest, match=next(iter(kwargs))):
        LlamaCppOptions(**kwargs)


def test_split_media_places_markers_and_resolves_attachments() -> None:
    from inferd.backends.llamacpp.media import split_media

    a, b = png(8, 8), png(8, 8, (0, 0, 255))
    req = Request(
        (
            Message.user(
                (
                    TextBlock("one "),
                    ImageBlock(data=a),
                    TextBlock(" two "),
                    ImageBlock(attachment="x"),
                )
            ),
        ),
        attachments=(Attachment("x", "image", b, "image/png"),),
    )
    text_req, media = split_media(req, "<M>")
    assert [m[1] for m in media] == [a, b]
    (msg,) = text_req.messages
    assert "".join(blk.text for blk in msg.content) == "one <M> two <M>"


@pytest.mark.parametrize(
    ("messages", "words"),
    [
        ((Message.user((ImageBlock(url="http://example.invalid/a.png"),)),), "URL"),
        (
            (Message.user("hi"), Message.assistant((ImageBlock(data=b"\x89PNG"),))),
            "user messages",
        ),
        ((Message.user((TextBlock("<M>"), ImageBlock(data=b"x"))),), "media marker"),
    ],
)
def test_split_media_refusals(messages: tuple[Message, ...], words: str) -> None:
    from inferd.backends.llamacpp.media import split_media

    with pytest.raises(InvalidRequest, match=words):
        split_media(Request(messages), "<M>")


def test_text_runs_stop_at_media() -> None:
    from inferd.backends.llamacpp.media import MediaPrompt

    prompt = [1, 2, 3, -9, -9, -9, 4, 5]
    mp = MediaPrompt(None, None, {3: (1, 3)})
    assert mp.text_run(prompt, 0, 100) == [1, 2, 3]
    assert mp.text_run(prompt, 0, 2) == [1, 2]
    assert mp.text_run(prompt, 3, 100) == []
    assert mp.text_run(prompt, 4, 100) == []  # inside the media: never placeholders
    assert mp.text_run(prompt, 6, 100) == [4, 5]
    assert mp.span_at(3) == (3, 1, 3) and mp.span_at(5) == (3, 1, 3)
    assert mp.span_at(6) is None and mp.span_at(0) is None


# ---------------------------------------------------------------- through LlamaCpp


@pytest.fixture(scope="module")
def vision(synth_vision: Any) -> Any:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(
        synth_vision.model, mmproj=synth_vision.mmproj, n_ctx=2048, n_threads=2, parallel=2
    )
    yield b
    b.close()


def ask(*blocks: Any, n: int = 4, **kw: Any) -> Request:
    return Request(
        (Message.user((*blocks, TextBlock("What is this?"))),),
        max_tokens=n,
        temperature=0,
        ignore_eos=True,
        **kw,
    )


async def done_of(b: Any, request: Request) -> Done:
    events = [ev async for ev in b.generate(request)]
    assert isinstance(events[-1], Done)
    return events[-1]


def test_capabilities_come_from_the_projector(vision: Any) -> None:
    caps = vision.capabilities()
    assert caps.vision and caps.audio


async def test_usage_counts_the_media_cells(vision: Any) -> None:
    plain = await done_of(vision, ask())
    one = await done_of(vision, ask(ImageBlock(data=png(16, 16))))
    two = await done_of(
        vision,
        ask(
            ImageBlock(data=png(16, 16)),
            ImageBlock(data=JPEG.read_bytes(), media_type="image/jpeg"),
        ),
    )
    # the marker text is replaced by the media: the prompt grows by the cells only
    assert one.usage.input_tokens - plain.usage.input_tokens == IMAGE_TOKENS
    assert two.usage.input_tokens - plain.usage.input_tokens == 2 * IMAGE_TOKENS
    assert one.usage.output_tokens == 4


async def test_prefix_reuse_is_keyed_by_the_media(vision: Any) -> None:
    """The same image after the same text reuses its cells; another image does not
    (the match stops where the media starts)."""
    vision.clear_prefix_cache()
    red, blue = png(16, 16, (255, 0, 0)), png(16, 16, (0, 0, 255))
    first = await done_of(vision, ask(TextBlock("Look: "), ImageBlock(data=red)))
    again = await done_of(vision, ask(TextBlock("Look: "), ImageBlock(data=red)))
    other = await done_of(vision, ask(TextBlock("Look: "), ImageBlock(data=blue)))
    assert first.usage.input_tokens == again.usage.input_tokens == other.usage.input_tokens
    assert again.usage.cached_tokens > IMAGE_TOKENS
    assert other.usage.cached_tokens < again.usage.cached_tokens - IMAGE_TOKENS
    stats = vision.batching_stats()
    assert stats["media_chunks"] >= 3


async def test_same_image_same_reply(vision: Any) -> None:
    """Greedy: a reused image gives the reply a fresh one gives (same cells)."""
    img = png(24, 24, (10, 200, 10))
    vision.clear_prefix_cache()
    cold = [ev async for ev in vision.generate(ask(ImageBlock(data=img), n=8))]
    warm = [ev async for ev in vision.generate(ask(ImageBlock(data=img), n=8))]
    assert warm[-1].usage.cached_tokens > IMAGE_TOKENS
    text = lambda evs: "".join(getattr(e, "text", "") for e in evs[:-1])  # noqa: E731
    assert text(cold) == text(warm)


async def test_an_image_prefix_returns_from_host_memory(synth_vision: Any) -> None:
    """One slot: a text request overwrites the image's cells, which were saved to host
    memory first (ADR 0030); the image request again restores them (positions
    included), encodes nothing and replies as the first time."""
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    img = png(20, 20, (200, 30, 30))
    b = LlamaCpp(synth_vision.model, mmproj=synth_vision.mmproj, n_ctx=512, n_threads=2, parallel=1)
    try:
        cold = [ev async for ev in b.generate(ask(ImageBlock(data=img), n=6))]
        await done_of(b, ask(TextBlock("Something else entirely, please.")))
        warm = [ev async for ev in b.generate(ask(ImageBlock(data=img), n=6))]
        stats = b.batching_stats()
    finally:
        b.close()
    assert warm[-1].usage.cached_tokens == cold[-1].usage.input_tokens - 1
    assert stats["media_chunks"] == 1 and stats["ram_restored"] == 1
    text = lambda evs: "".join(getattr(e, "text", "") for e in evs[:-1])  # noqa: E731
    assert text(cold) == text(warm)


async def test_media_are_prepared_off_the_event_loop(
    vision: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding and resizing an image takes tens of ms: it runs in a worker thread, so
    one client's image never stalls the loop that serves every other stream."""
    import threading

    from inferd.backends.llamacpp import media as media_mod

    seen: list[threading.Thread] = []
    real = media_mod.tokenize

    def recording(*args: Any, **kw: Any) -> Any:
        seen.append(threading.current_thread())
        return real(*args, **kw)

    monkeypatch.setattr(media_mod, "tokenize", recording)
    await done_of(vision, ask(ImageBlock(data=png(16, 16))))
    assert len(seen) == 1 and seen[0] is not threading.current_thread()


async def test_media_decoded_a_piece_per_step(synth_vision: Any, vision: Any) -> None:
    """With step_tokens=16 the image's 64 cells go in four steps (a decoding stream
    waits for one piece at a time) and the reply is the one-piece reply."""
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    img = png(20, 20, (90, 90, 250))
    b = LlamaCpp(
        synth_vision.model,
        mmproj=synth_vision.mmproj,
        n_ctx=2048,
        n_threads=2,
        parallel=2,
        step_tokens=16,
    )
    try:
        small = [ev async for ev in b.generate(ask(ImageBlock(data=img), n=6))]
        stats = b.batching_stats()
    finally:
        b.close()
    vision.clear_prefix_cache()
    whole = [ev async for ev in vision.generate(ask(ImageBlock(data=img), n=6))]
    assert stats["media_chunks"] == 1 and stats["media_tokens"] == IMAGE_TOKENS
    assert stats["media_pieces"] == IMAGE_TOKENS // 16
    text = lambda evs: "".join(getattr(e, "text", "") for e in evs[:-1])  # noqa: E731
    assert text(small) == text(whole)


async def test_media_streams_decode_without_speculation(synth_vision: Any, vision: Any) -> None:
    """With n-gram drafting on, an image request (whose token list holds placeholders)
    decodes without drafts and replies as without speculation; text streams still draft."""
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    img = png(12, 12, (250, 250, 0))
    b = LlamaCpp(
        synth_vision.model,
        mmproj=synth_vision.mmproj,
        n_ctx=2048,
        n_threads=2,
        parallel=2,
        draft="ngram",
    )
    try:
        spec = [ev async for ev in b.generate(ask(ImageBlock(data=img), n=12))]
        drafted_media = b.batching_stats().get("spec_drafted", 0)
    finally:
        b.close()
    vision.clear_prefix_cache()
    plain = [ev async for ev in vision.generate(ask(ImageBlock(data=img), n=12))]
    text = lambda evs: "".join(getattr(e, "text", "") for e in evs[:-1])  # noqa: E731
    assert text(spec) == text(plain)
    assert drafted_media == 0


async def test_audio_and_attachments(vision: Any) -> None:
    data = MP3.read_bytes()
    d = await done_of(
        vision,
        Request(
            (Message.user((AudioBlock(attachment="clip", format="mp3"), TextBlock("Hear?"))),),
            max_tokens=3,
            temperature=0,
            ignore_eos=True,
            attachments=(Attachment("clip", "audio", data, "audio/mpeg"),),
        ),
    )
    assert d.usage.output_tokens == 3 and d.usage.input_tokens > 20


async def test_text_streams_run_beside_media(vision: Any) -> None:
    """A text-only stream and two image requests at once: all finish with their token
    counts (the media chunks are evaluated between steps, not instead of them)."""
    reqs = [ask(n=24), ask(ImageBlock(data=png(16, 16)), n=6), ask(ImageBlock(data=png(8, 8)), n=6)]
    dones = await asyncio.gather(*(done_of(vision, r) for r in reqs))
    assert [d.usage.output_tokens for d in dones] == [24, 6, 6]


@pytest.mark.parametrize(
    ("block", "words"),
    [
        (ImageBlock(data=b""), "empty"),
        (ImageBlock(data=b"\x01\x02" * 40, media_type="image/png"), "not an image"),
        (ImageBlock(data=png(50_000, 50_000, body=False)), "max_image_pixels"),
        (ImageBlock(data=png(8, 8, body=False)), "truncated"),
        (ImageBlock(data=png(8, 8, idat=b"not zlib at all")), "could not be decoded"),
        (ImageBlock(data=JPEG.read_bytes()[:5000], media_type="image/jpeg"), "truncated"),
        (ImageBlock(data=b"<svg xmlns='http://www.w3.org/2000/svg'></svg>"), "SVG"),
        (AudioBlock(data=png(8, 8)), "not audio"),
        (ImageBlock(data=wav(0.2)), "not an image"),
    ],
)
async def test_hostile_media_in_requests(vision: Any, block: Any, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        await done_of(vision, ask(block))


async def test_audio_length_limit(synth_vision: Any) -> None:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(
        synth_vision.model,
        mmproj=synth_vision.mmproj,
        n_ctx=512,
        n_threads=2,
        parallel=1,
        max_audio_seconds=0.5,
    )
    try:
        with pytest.raises(InvalidRequest, match="max_audio_seconds"):
            await done_of(b, ask(AudioBlock(data=wav(1.0))))
    finally:
        b.close()
    assert b._mtmd.closed


async def test_no_projector_refuses_media(smollm2_path: Path) -> None:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=512, n_threads=2, parallel=1)
    try:
        assert not b.capabilities().vision
        with pytest.raises(InvalidRequest, match="vision"):
            await done_of(b, ask(ImageBlock(data=png(8, 8))))
        with pytest.raises(InvalidRequest, match="audio"):
            await done_of(b, ask(AudioBlock(data=wav(0.1))))
    finally:
        b.close()


def test_mismatched_projector_is_a_load_error(smollm2_path: Path, synth_vision: Any) -> None:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    with pytest.raises(ModelLoadError, match="n_embd"):
        LlamaCpp(smollm2_path, mmproj=synth_vision.mmproj, n_ctx=512, n_threads=2, parallel=1)
    with pytest.raises(ModelLoadError, match="neither a file nor a model"):
        LlamaCpp(smollm2_path, mmproj="no-such-projector", n_ctx=512, n_threads=2, parallel=1)


# ---------------------------------------------------------------- daemon, bridge, CLI


async def test_the_daemon_wire_carries_media(synth_vision: Any) -> None:
    """Inline bytes and an attachment cross the NDJSON wire and reach the projector: the
    prompt counts the media cells as it does in-process."""
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.serve.client import Client
    from inferd.serve.daemon import Daemon
    from tests.serve_helpers import short_tmpdir

    b = LlamaCpp(synth_vision.model, mmproj=synth_vision.mmproj, n_ctx=512, n_threads=2)
    request = Request(
        (Message.user((ImageBlock(data=png(16, 16)), ImageBlock(attachment="a"), TextBlock("?"))),),
        max_tokens=2,
        temperature=0,
        ignore_eos=True,
        attachments=(Attachment("a", "image", png(8, 8), "image/png"),),
    )
    direct = await done_of(b, request)
    with short_tmpdir() as d:
        daemon = Daemon(b, d / "infer.sock")  # closes b when it stops
        await daemon.start()
        client = Client(d / "infer.sock")
        try:
            remote = await done_of(client, request)
        finally:
            await client.aclose()
            await daemon.close()
    assert remote.usage.input_tokens == direct.usage.input_tokens
    assert direct.usage.input_tokens > 2 * IMAGE_TOKENS


def data_uri(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(url: str) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 2,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    }


@pytest.fixture()
async def image_host() -> Any:
    """A plain HTTP server on 127.0.0.1 serving /a.png (a PNG) and /big.png (5 KB)."""
    from aiohttp import web

    app = web.Application()

    async def small(_: web.Request) -> web.Response:
        return web.Response(body=png(16, 16), content_type="image/png")

    async def big(_: web.Request) -> web.Response:
        return web.Response(body=png(8, 8) + bytes(5000), content_type="image/png")

    app.router.add_get("/a.png", small)
    app.router.add_get("/big.png", big)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_bridge_images(vision: Any, image_host: str) -> None:
    """data: URIs work; remote URLs are refused by default (naming the option), fetched
    from allowed hosts only, within the size limit."""
    import aiohttp

    from inferd.serve.image_urls import ImageUrlPolicy
    from tests.serve_helpers import bridge_in_process

    policy = ImageUrlPolicy(("127.0.0.1",), max_bytes=2000)
    async with aiohttp.ClientSession() as http:
        async with bridge_in_process(vision) as (url, _, _):
            r = await http.post(f"{url}/v1/chat/completions", json=chat_body(data_uri(png(16, 16))))
            assert r.status == 200, await r.text()
            inline = (await r.json())["usage"]["prompt_tokens"]
            r = await http.post(f"{url}/v1/chat/completions", json=chat_body(f"{image_host}/a.png"))
            assert r.status == 400 and "allow_image_urls" in await r.text()
        async with bridge_in_process(vision, image_urls=policy) as (url, _, _):
            r = await http.post(f"{url}/v1/chat/completions", json=chat_body(f"{image_host}/a.png"))
            assert r.status == 200, await r.text()
            assert (await r.json())["usage"]["prompt_tokens"] == inline
            other = image_host.replace("127.0.0.1", "localhost")
            r = await http.post(f"{url}/v1/chat/completions", json=chat_body(f"{other}/a.png"))
            assert r.status == 400 and "allow list" in await r.text()
            r = await http.post(
                f"{url}/v1/chat/completions", json=chat_body(f"{image_host}/big.png")
            )
            assert r.status == 400 and "larger than 2000 bytes" in await r.text()


def test_bridge_flags_make_the_policy() -> None:
    import argparse

    from inferd.serve import bridge

    parser = argparse.ArgumentParser()
    bridge.add_arguments(parser)
    assert bridge._image_url_policy(parser.parse_args([])) is None
    args = parser.parse_args(
        [
            "--allow-image-url",
            "Img.Example",
            "--image-url-max-bytes",
            "99",
            "--image-url-timeout",
            "2",
        ]
    )
    p = bridge._image_url_policy(args)
    assert p.hosts == ("img.example",) and p.max_bytes == 99 and p.timeout_s == 2


def test_bridge_toml_makes_the_policy(tmp_path: Path) -> None:
    """``[bridge]`` in the --config file: hosts add to the flags', flags win on bounds;
    a bad key or value stops the bridge with its name."""
    import argparse

    from inferd.serve import bridge
    from inferd.serve.config import load_config

    cfg = tmp_path / "inferd.toml"
    cfg.write_text(
        '[[backend]]\ntype = "mock"\n\n[bridge]\nallow_image_urls = ["a.example"]\n'
        "image_url_max_bytes = 1000\nimage_url_timeout_s = 3.5\n"
    )
    load_config(cfg)  # the daemon's parser accepts the section
    parser = argparse.ArgumentParser()
    bridge.add_arguments(parser)
    p = bridge._image_url_policy(parser.parse_args(["--config", str(cfg)]))
    assert p.hosts == ("a.example",) and p.max_bytes == 1000 and p.timeout_s == 3.5
    args = ["--config", str(cfg), "--allow-image-url", "b.example", "--image-url-max-bytes", "7"]
    p = bridge._image_url_policy(parser.parse_args(args))
    assert p.hosts == ("a.example", "b.example") and p.max_bytes == 7
    cfg.write_text('[bridge]\nallow_image_url = ["typo.example"]\n')
    with pytest.raises(bridge.BridgeError, match="allow_image_urls"):
        bridge._image_url_policy(parser.parse_args(["--config", str(cfg)]))
    cfg.write_text('[bridge]\nallow_image_urls = ["a"]\nimage_url_timeout_s = "soon"\n')
    with pytest.raises(bridge.BridgeError, match="image URL settings"):
        bridge._image_url_policy(parser.parse_args(["--config", str(cfg)]))


def test_cli_run_with_an_image(synth_vision: Any, tmp_path: Path, capsys: Any) -> None:
    require_llama_core()
    from inferd.cli import main

    img = tmp_path / "photo.png"
    img.write_bytes(png(16, 16))
    base = ["run", "--model", str(synth_vision.model), "--threads", "2", "--max-tokens", "3"]
    rc = main([*base, "--mmproj", str(synth_vision.mmproj), "--image", str(img), "--json", "Hi"])
    assert rc == 0
    out = capsys.readouterr().out
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    done = [e for e in events if e.get("type") == "done"]
    assert done and done[-1]["usage"]["input_tokens"] > IMAGE_TOKENS
    rc = main(
        [*base, "--mmproj", str(synth_vision.mmproj), "--image", str(tmp_path / "no.png"), "Hi"]
    )
    assert rc != 0 and "--image" in capsys.readouterr().err
