"""Images and audio through libmtmd, checked against llama.cpp's own tools (issue 16).

The model is the synthetic pair of ``bench/synth_vision.py`` (a LLaVA-style CLIP + MLP
projector and Ultravox's audio encoder, random weights): no download, and the pipeline must
be exact. Greedy with EOS ignored, our tokens must equal ``llama-mtmd-cli``'s and
``llama-server --mmproj``'s for the same files, image (``tools/mtmd/test-1.jpeg``) and
audio (``test-2.mp3``).

First the peers alone: the pair loads in llama.cpp's tools, and the media changes the
answer (a projector whose output were ignored would pass a differential test trivially).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_mtmd_core, tokenizer_only_gguf
from tests.test_llama_server import _serve, llama_server_bin  # noqa: F401

MTMD_DIR = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "tools" / "mtmd"
IMAGE = MTMD_DIR / "test-1.jpeg"
AUDIO = MTMD_DIR / "test-2.mp3"
PROMPT = "Describe it."
#: Tokens generated per differential run: enough to cover several decode steps past the
#: media, small enough for a loaded 2-core box.
N_PREDICT = 24
#: A peer run (load + encode + decode of the tiny model) takes seconds; generous for CI.
PEER_TIMEOUT_S = 300


def png_bytes(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    """A plain RGB PNG of one colour (a second image, unlike test-1.jpeg)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def mtmd_cli(binary: Path, pair, *media: str, n_predict: int = N_PREDICT) -> str:
    """The text ``llama-mtmd-cli`` prints for PROMPT (greedy, EOS ignored, 2 threads)."""
    cmd = [
        str(binary),
        "-m",
        str(pair.model),
        "--mmproj",
        str(pair.mmproj),
        *media,
        "-p",
        PROMPT,
        "-n",
        str(n_predict),
        "--temp",
        "0",
        "--ignore-eos",
        "-t",
        "2",
        "-c",
        "2048",
        "--jinja",  # the model's own template, as llama-server and we render it
    ]
    p = subprocess.run(cmd, capture_output=True, timeout=PEER_TIMEOUT_S)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")[-3000:]
    return p.stdout.decode("utf-8", "replace")


@pytest.mark.slow
def test_peer_loads_the_pair_and_media_changes_the_answer(
    llama_mtmd_cli_bin, synth_vision, tmp_path
):
    other = tmp_path / "red.png"
    other.write_bytes(png_bytes(40, 30, (200, 10, 10)))
    with_image = mtmd_cli(llama_mtmd_cli_bin, synth_vision, "--image", str(IMAGE))
    with_other = mtmd_cli(llama_mtmd_cli_bin, synth_vision, "--image", str(other))
    with_audio = mtmd_cli(llama_mtmd_cli_bin, synth_vision, "--audio", str(AUDIO))
    answers = [with_image, with_other, with_audio]
    assert all(a.strip() for a in answers), answers
    assert len(set(answers)) == 3, answers
    # deterministic: the same image gives the same answer
    assert mtmd_cli(llama_mtmd_cli_bin, synth_vision, "--image", str(IMAGE)) == with_image


# ---------------------------------------------------------------- the pair's files


def test_pair_files_have_what_mtmd_reads(tmp_path):
    """Shapes line up where mtmd checks them (projector width = model width, one position
    per patch plus the class token), a vision-only projector has no audio, and ``ensure``
    writes once per shape."""
    from bench import synth_vision as sv
    from bench.synth_model import _gguf

    gguf = _gguf()
    src = tokenizer_only_gguf(tmp_path / "tok.gguf")
    pair = sv.ensure(src, tmp_path / "cache", vision=sv.VisionShape(), audio=None)
    proj = gguf.GGUFReader(str(pair.mmproj))
    keys = set(proj.fields)
    assert "clip.has_vision_encoder" in keys and "clip.has_audio_encoder" not in keys
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in proj.tensors}
    width = sv.TextShape().hidden
    assert tensors["mm.2.weight"] == (sv.VisionShape().proj_hidden, width)  # ggml order
    assert tensors["v.position_embd.weight"] == (sv.VisionShape().hidden, 65)
    model = gguf.GGUFReader(str(pair.model))
    assert {t.name: tuple(int(x) for x in t.shape) for t in model.tensors}["token_embd.weight"] == (
        width,
        300,
    )
    mtime = pair.mmproj.stat().st_mtime_ns
    assert sv.ensure(src, tmp_path / "cache", vision=sv.VisionShape(), audio=None) == pair
    assert pair.mmproj.stat().st_mtime_ns == mtime  # cached, not rewritten
    both = sv.ensure(src, tmp_path / "cache")
    assert both.mmproj.parent != pair.mmproj.parent
    assert "clip.has_audio_encoder" in gguf.GGUFReader(str(both.mmproj)).fields


# ---------------------------------------------------------------- llama-server --mmproj

#: Slots and context of the peer server and of our backend: a batch of 4, each slot
#: holding an audio clip's 30 s chunk (375 tokens) and the reply.
SLOTS = 4
CTX = 8192
MEDIA = {"image": IMAGE, "audio": AUDIO}


@pytest.fixture(scope="module")
def vision_server(llama_server_bin: Path, synth_vision) -> Iterator[str]:  # noqa: F811
    with _serve(
        llama_server_bin,
        synth_vision.model,
        "--mmproj",
        str(synth_vision.mmproj),
        "-c",
        str(CTX),
        "-np",
        str(SLOTS),
    ) as url:
        yield url


def openai_part(kind: str, data: bytes, mime: str = "image/jpeg") -> dict[str, Any]:
    """An OpenAI content part for ``data``: ``image_url`` with a data URI, or
    ``input_audio``."""
    b64 = base64.b64encode(data).decode("ascii")
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}}
    return {"type": "input_audio", "input_audio": {"data": b64, "format": "mp3"}}


def server_chat(url: str, parts: list[dict[str, Any]], n: int = N_PREDICT) -> dict[str, Any]:
    """One greedy chat completion (EOS ignored): the media parts, then PROMPT."""
    content = [*parts, {"type": "text", "text": PROMPT}] if parts else PROMPT
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=PEER_TIMEOUT_S) as r:  # loopback only
        return json.loads(r.read())


def _answer(reply: dict[str, Any]) -> str:
    return reply["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def cli_answers(llama_mtmd_cli_bin, synth_vision) -> dict[str, str]:
    """llama-mtmd-cli's greedy text for the image and for the audio clip."""
    return {
        kind: mtmd_cli(llama_mtmd_cli_bin, synth_vision, f"--{kind}", str(path))
        for kind, path in MEDIA.items()
    }


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MEDIA))
def test_llama_server_equals_mtmd_cli(vision_server, cli_answers, kind):
    """The two peers agree on the pair (so either is a fair reference for ours)."""
    reply = server_chat(vision_server, [openai_part(kind, MEDIA[kind].read_bytes())])
    assert _answer(reply) == cli_answers[kind].strip("\n")
    assert reply["usage"]["completion_tokens"] == N_PREDICT


@pytest.mark.server
@pytest.mark.slow
def test_media_tokens_are_mtmds_count(vision_server):
    """An image adds exactly (image_size / patch_size)^2 prompt tokens (LLaVA: one per
    patch); the audio clip adds one 30 s Whisper chunk's."""
    from bench.synth_vision import AudioShape, VisionShape

    text_only = server_chat(vision_server, [], n=1)["usage"]["prompt_tokens"]
    image = server_chat(vision_server, [openai_part("image", IMAGE.read_bytes())], n=1)
    audio = server_chat(vision_server, [openai_part("audio", AUDIO.read_bytes())], n=1)
    assert image["usage"]["prompt_tokens"] - text_only == VisionShape().n_tokens
    # 3000 mel frames -> 1500 after the stride-2 conv -> stacked by stack_factor
    assert audio["usage"]["prompt_tokens"] - text_only == 1500 // AudioShape().stack_factor


def _four_cases() -> list[list[dict[str, Any]]]:
    """The parts of four requests: the image, another image, the audio clip, text only."""
    red = png_bytes(40, 30, (200, 10, 10))
    return [
        [openai_part("image", IMAGE.read_bytes())],
        [openai_part("image", red, "image/png")],
        [openai_part("audio", AUDIO.read_bytes())],
        [],
    ]


@pytest.mark.server
@pytest.mark.slow
async def test_llama_server_batch_of_four_equals_one_at_a_time(vision_server):
    """The synthetic model's greedy choice survives batched decoding (its top logit
    stands clear of the next): the premise of comparing our batch with the peers."""
    loop = asyncio.get_running_loop()
    cases = _four_cases()
    alone = [_answer(server_chat(vision_server, parts)) for parts in cases]
    together = await asyncio.gather(
        *(loop.run_in_executor(None, server_chat, vision_server, parts) for parts in cases)
    )
    assert [_answer(r) for r in together] == alone
    assert len(set(alone)) == 4


# ---------------------------------------------------------------- ours: LlamaCpp(mmproj=)


@pytest.fixture(scope="module")
def vision_backend(synth_vision) -> Iterator[Any]:
    """Our engine on the pair: SLOTS sequences, the peers' context and threads."""
    require_mtmd_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(
        synth_vision.model, mmproj=synth_vision.mmproj, n_ctx=CTX, n_threads=2, parallel=SLOTS
    )
    yield b
    b.close()


def media_block(kind: str, data: bytes, mime: str = "image/jpeg") -> Any:
    from inferd.types import AudioBlock, ImageBlock

    if kind == "image":
        return ImageBlock(data=data, media_type=mime)
    return AudioBlock(data=data, format="mp3")


def media_request(*blocks: Any, n: int = N_PREDICT) -> Any:
    """The request the peers get: the media blocks, then PROMPT; greedy, EOS ignored."""
    from inferd.types import Message, Request, TextBlock

    content = (*blocks, TextBlock(PROMPT)) if blocks else PROMPT
    return Request((Message.user(content),), max_tokens=n, temperature=0, ignore_eos=True)


async def run(b: Any, request: Any) -> tuple[str, Any]:
    """The reply's text and its one Done."""
    from inferd.types import Done, Text

    events = [ev async for ev in b.generate(request)]
    assert isinstance(events[-1], Done), events[-1]
    assert sum(isinstance(e, Done) for e in events) == 1
    return "".join(e.text for e in events if isinstance(e, Text)), events[-1]


@pytest.mark.slow
def test_capabilities_report_the_projector(vision_backend):
    caps = vision_backend.capabilities()
    assert caps.vision and caps.audio


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MEDIA))
async def test_single_stream_equals_mtmd_cli(vision_backend, cli_answers, kind):
    text, done = await run(
        vision_backend, media_request(media_block(kind, MEDIA[kind].read_bytes()))
    )
    assert text == cli_answers[kind].strip("\n")
    assert done.usage.output_tokens == N_PREDICT


@pytest.mark.server
@pytest.mark.slow
async def test_usage_counts_media_tokens_as_llama_server(vision_backend, vision_server):
    from bench.synth_vision import VisionShape

    loop = asyncio.get_running_loop()
    for kind in sorted(MEDIA):
        data = MEDIA[kind].read_bytes()
        peer = await loop.run_in_executor(
            None, server_chat, vision_server, [openai_part(kind, data)], 1
        )
        vision_backend.clear_prefix_cache()
        _, done = await run(vision_backend, media_request(media_block(kind, data), n=1))
        assert done.usage.input_tokens == peer["usage"]["prompt_tokens"], kind
    _, text_only = await run(vision_backend, media_request(n=1))
    _, image = await run(
        vision_backend, media_request(media_block("image", IMAGE.read_bytes()), n=1)
    )
    assert image.usage.input_tokens - text_only.usage.input_tokens == VisionShape().n_tokens


@pytest.mark.server
@pytest.mark.slow
async def test_batch_of_four_equals_llama_server(vision_backend, vision_server, cli_answers):
    """Four streams at once (two images, the audio clip, text only): each reply equals the
    peer's for the same request, and the media ones llama-mtmd-cli's."""
    red = png_bytes(40, 30, (200, 10, 10))
    cases = [
        (
            "image",
            [media_block("image", IMAGE.read_bytes())],
            [openai_part("image", IMAGE.read_bytes())],
        ),
        ("red", [media_block("image", red, "image/png")], [openai_part("image", red, "image/png")]),
        (
            "audio",
            [media_block("audio", AUDIO.read_bytes())],
            [openai_part("audio", AUDIO.read_bytes())],
        ),
        ("text", [], []),
    ]
    loop = asyncio.get_running_loop()
    peers = [
        _answer(await loop.run_in_executor(None, server_chat, vision_server, parts))
        for _, _, parts in cases
    ]
    vision_backend.clear_prefix_cache()
    ours = await asyncio.gather(*(run(vision_backend, media_request(*b)) for _, b, _ in cases))
    assert [t for t, _ in ours] == peers
    assert ours[0][0] == cli_answers["image"].strip("\n")
    assert ours[2][0] == cli_answers["audio"].strip("\n")


@pytest.mark.slow
async def test_prefix_reuse_keys_media_by_content(vision_backend):
    """The same image after the same text reuses its cells (cached tokens cover it); a
    different image does not: nothing from the image on is reported cached."""
    from bench.synth_vision import VisionShape

    jpeg = IMAGE.read_bytes()
    vision_backend.clear_prefix_cache()
    first_text, first = await run(vision_backend, media_request(media_block("image", jpeg)))
    assert first.usage.cached_tokens == 0
    again_text, again = await run(vision_backend, media_request(media_block("image", jpeg)))
    assert again_text == first_text
    assert again.usage.cached_tokens >= VisionShape().n_tokens
    red = png_bytes(40, 30, (200, 10, 10))
    _, other = await run(vision_backend, media_request(media_block("image", red, "image/png")))
    n_after_image = first.usage.input_tokens - again.usage.cached_tokens  # the text after it
    assert other.usage.cached_tokens <= first.usage.input_tokens - VisionShape().n_tokens
    assert other.usage.cached_tokens < again.usage.cached_tokens
    assert n_after_image >= 1


@pytest.mark.slow
async def test_concurrent_streams_with_and_without_media_each_end_once(vision_backend):
    """Eight streams at once, half with an image or the clip: every one ends with exactly
    one Done and the text it has alone."""
    red = png_bytes(40, 30, (200, 10, 10))
    blocks = [
        [media_block("image", IMAGE.read_bytes())],
        [],
        [media_block("image", red, "image/png")],
        [],
        [media_block("audio", AUDIO.read_bytes())],
        [],
        [media_block("image", IMAGE.read_bytes())],
        [],
    ]
    n = 8
    alone = [await run(vision_backend, media_request(*b, n=n)) for b in blocks[:5]]
    together = await asyncio.gather(*(run(vision_backend, media_request(*b, n=n)) for b in blocks))
    assert [t for t, _ in together[:5]] == [t for t, _ in alone]
    assert together[6][0] == alone[0][0] and together[7][0] == alone[1][0]
    assert all(d.usage.output_tokens == n for _, d in together)
