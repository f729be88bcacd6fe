"""M-RoPE vision models (the Qwen2-VL family) through libmtmd under our scheduler (issue 16).

docs/adr/0028-media-through-libmtmd.md. Under M-RoPE an image of ``n`` KV cells advances
the position by ``n_pos`` (its token grid's longer side), fewer than ``n``; its cells
share one temporal position and spread over the grid in the other components, and every
later token's position is shifted. The model is the synthetic Qwen2-VL pair of
``bench/synth_vision.py`` (``ensure_qwen2vl``: a ``qwen2vl`` text model with rope
sections, a ``qwen2vl_merger`` projector; random weights, no download). Greedy with EOS
ignored, text + image + text, our tokens must equal ``llama-mtmd-cli``'s (built from the
vendored tree) alone, inside a batch of four (split layout), after a reused prefix that
holds the image, and with the image decoded a piece per step.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    SYNTH_VISION_CACHE,
    require_llama_core,
    require_mtmd_core,
    tokenizer_only_gguf,
)
from tests.test_mtmd_differential import png_bytes

MTMD_DIR = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "tools" / "mtmd"
IMAGE = MTMD_DIR / "test-1.jpeg"
#: Text before and after the image (text + image + text inside the chat template).
BEFORE, AFTER = "Look at this: ", " Describe it."
#: A second question about the same image (prefix reuse: the image's cells are shared).
OTHER_AFTER = " What colour is it?"
#: Tokens generated per run: several decode steps past the image.
N_PREDICT = 24
#: A peer run (load + encode + decode of the tiny model) takes seconds; generous for CI.
PEER_TIMEOUT_S = 300
#: Slots and context of our backend (the split layout gives each slot CTX / SLOTS cells).
SLOTS = 4
CTX = 4096


# ---------------------------------------------------------------- positions, no model


def test_positions_of_a_prompt_with_mrope_spans() -> None:
    """A span of 80 cells over 10 positions shifts what follows it by -70; a prefix that
    would end inside a span is moved back to its start (its cells share a position)."""
    from inferd.backends.llamacpp.media import MediaPrompt

    m = MediaPrompt(None, None, {3: (1, 80), 90: (3, 20)}, {3: 10})
    assert [m.shift_at(i) for i in (0, 3, 83, 90, 110, 200)] == [0, 0, -70, -70, -70, -70]
    assert m.prefix_cut(3) == (3, 3)
    assert m.prefix_cut(50) == (3, 3)  # inside the image: back to its start
    assert m.prefix_cut(83) == (83, 13)  # just after it: 3 + its 10 positions
    assert m.prefix_cut(100) == (90, 20)  # inside the second span (no M-RoPE: n_pos = n)
    assert m.prefix_cut(115) == (115, 45)
    plain = MediaPrompt(None, None, {2: (1, 64)})
    assert plain.prefix_cut(70) == (70, 70) and plain.prefix_cut(30) == (2, 2)


def test_qwen2vl_pair_files_are_what_the_converter_writes(tmp_path: Path) -> None:
    """The text model is ``qwen2vl`` with rope sections covering half a head; the projector
    is ``qwen2vl_merger`` with the Conv3D split in two, no position table, and a merger
    MLP over 2x2 patches into the text width; ``ensure_qwen2vl`` writes once."""
    from bench import synth_vision as sv
    from bench.synth_model import _gguf

    gguf = _gguf()
    src = tokenizer_only_gguf(tmp_path / "tok.gguf")
    pair = sv.ensure_qwen2vl(src, tmp_path / "cache")
    model = gguf.GGUFReader(str(pair.model))
    arch = model.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen2vl"
    sec = model.fields["qwen2vl.rope.dimension_sections"]
    sections = [int(sec.parts[i][0]) for i in sec.data]
    text = sv.TextShape()
    assert 2 * sum(sections) == text.hidden // text.heads and len(sections) == 4
    assert "blk.0.attn_q.bias" in {t.name for t in model.tensors}
    proj = gguf.GGUFReader(str(pair.mmproj))
    ptype = proj.fields["clip.projector_type"]
    assert bytes(ptype.parts[ptype.data[0]]).decode() == "qwen2vl_merger"
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in proj.tensors}
    v = sv.Qwen2VLShape()
    assert tensors["v.patch_embd.weight.1"] == tensors["v.patch_embd.weight"]
    assert "v.position_embd.weight" not in tensors and "v.class_embd" not in tensors
    assert tensors["mm.2.weight"] == (4 * v.hidden, text.hidden)  # ggml order
    mtime = pair.mmproj.stat().st_mtime_ns
    assert sv.ensure_qwen2vl(src, tmp_path / "cache") == pair
    assert pair.mmproj.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- the binding


@pytest.fixture(scope="module")
def qwen2vl(smollm2_path: Path) -> Any:
    """The synthetic Qwen2-VL pair, written once and cached (bench/synth_vision.py)."""
    from bench.synth_vision import ensure_qwen2vl

    return ensure_qwen2vl(smollm2_path, SYNTH_VISION_CACHE)


@pytest.fixture(scope="module")
def L() -> Any:
    return require_mtmd_core()


@pytest.fixture(scope="module")
def q_model(L: Any, qwen2vl: Any) -> Iterator[Any]:
    m = L.Model(str(qwen2vl.model))
    yield m
    m.close()


@pytest.fixture()
def q_proj(L: Any, q_model: Any, qwen2vl: Any) -> Iterator[Any]:
    p = L.Mtmd(q_model, str(qwen2vl.mmproj), n_threads=1)
    yield p
    p.close()


def test_an_image_takes_fewer_positions_than_cells(q_proj: Any) -> None:
    """mtmd counts the image's cells as its grid (nx * ny) and its positions as the
    grid's longer side."""
    assert q_proj.mrope is True and q_proj.vision
    chunks = q_proj.tokenize(f"a{q_proj.marker}b", [q_proj.bitmap(IMAGE.read_bytes())])
    assert [chunks.kind(i) for i in range(len(chunks))] == ["text", "image", "text"]
    n, n_pos = chunks.n_tokens(1), chunks.n_pos(1)
    assert 1 < n_pos < n and n % n_pos == 0 and n_pos * n_pos >= n
    emb = q_proj.encode(chunks, 1)
    assert (emb.mrope, emb.n_pos, emb.n_tokens) == (True, n_pos, n)


def test_pieces_at_mrope_positions_equal_mtmds_helper(L: Any, q_model: Any, q_proj: Any) -> None:
    """encode + decode_embeddings a piece at a time (what the scheduler does a piece per
    step) lays the image out as mtmd's own helper does: the text after it, at the
    helper's next position, sees the same logits."""
    chunks = q_proj.tokenize(f"a {q_proj.marker} b", [q_proj.bitmap(IMAGE.read_bytes())])
    head, tail = chunks.tokens(0), chunks.tokens(2)
    n, n_pos = chunks.n_tokens(1), chunks.n_pos(1)
    out = []
    for split in (False, True):
        ctx = L.Context(q_model, n_ctx=512, n_batch=128, n_seq_max=1, n_threads=1)
        try:
            batch = L.Batch(128, 1)
            batch.add_sequence(head, 0, 0, False)
            ctx.decode(batch)
            if split:
                emb = q_proj.encode(chunks, 1)
                for at in range(0, n, 16):
                    L.decode_embeddings(ctx, emb, at, min(16, n - at), len(head), 0)
                nxt = len(head) + n_pos
            else:
                nxt = q_proj.eval_chunk(ctx, chunks, 1, len(head), 0, 128)
                assert nxt == len(head) + n_pos
            assert ctx.seq_pos_max(0) == len(head)  # every image cell at one temporal pos
            batch.clear()
            batch.add_sequence(tail, nxt, 0, True)
            ctx.decode(batch)
            out.append(list(ctx.logits(-1)))
        finally:
            ctx.close()
    whole, pieces = out
    top = max(range(len(whole)), key=whole.__getitem__)
    assert top == max(range(len(pieces)), key=pieces.__getitem__)
    assert max(abs(a - b) for a, b in zip(whole, pieces, strict=True)) < 1e-2


# ---------------------------------------------------------------- llama-mtmd-cli


def mtmd_cli(binary: Path, pair: Any, prompt: str, *media: Path) -> str:
    """The text ``llama-mtmd-cli`` prints (greedy, EOS ignored, one thread); ``prompt``
    holds the media marker where the image goes."""
    cmd = [str(binary), "-m", str(pair.model), "--mmproj", str(pair.mmproj)]
    for path in media:
        cmd += ["--image", str(path)]
    cmd += ["-p", prompt, "-n", str(N_PREDICT), "--temp", "0", "--ignore-eos"]
    cmd += ["-t", "1", "-c", "2048", "--jinja", "--no-warmup"]
    p = subprocess.run(cmd, capture_output=True, timeout=PEER_TIMEOUT_S)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")[-3000:]
    return p.stdout.decode("utf-8", "replace").strip("\n")


@pytest.fixture(scope="module")
def red_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mrope") / "red.png"
    path.write_bytes(png_bytes(80, 60, (200, 10, 10)))
    return path


@pytest.fixture(scope="module")
def cli(llama_mtmd_cli_bin: Path, qwen2vl: Any, red_png: Path) -> dict[str, str]:
    """llama-mtmd-cli's replies: the photo, the red image, the photo with the other
    question (without media the tool runs only interactively: text alone is compared
    with our own single stream instead)."""
    marker = "<__media__>"
    return {
        "image": mtmd_cli(llama_mtmd_cli_bin, qwen2vl, BEFORE + marker + AFTER, IMAGE),
        "red": mtmd_cli(llama_mtmd_cli_bin, qwen2vl, BEFORE + marker + AFTER, red_png),
        "other": mtmd_cli(llama_mtmd_cli_bin, qwen2vl, BEFORE + marker + OTHER_AFTER, IMAGE),
    }


@pytest.mark.slow
def test_peer_answers_depend_on_the_image(cli: dict[str, str]) -> None:
    """A projector whose output were ignored would pass a differential test trivially."""
    assert all(cli.values()), cli
    assert len(set(cli.values())) == 3, cli


# ---------------------------------------------------------------- ours: LlamaCpp(mmproj=)


def _backend(pair: Any, **kw: Any) -> Any:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    return LlamaCpp(pair.model, mmproj=pair.mmproj, n_ctx=CTX, n_threads=1, **kw)


@pytest.fixture(scope="module")
def backend(qwen2vl: Any) -> Iterator[Any]:
    """Our engine on the pair: SLOTS sequences, split layout (the default)."""
    b = _backend(qwen2vl, parallel=SLOTS)
    yield b
    b.close()


def request(
    image: bytes | None,
    after: str = AFTER,
    mime: str = "image/jpeg",
    n: int = 1,
    before: str = BEFORE,
) -> Any:
    """``before``, the image (if any), ``after``; greedy, EOS ignored, N_PREDICT tokens."""
    from inferd.types import ImageBlock, Message, Request, TextBlock

    blocks: list[Any] = [TextBlock(before)]
    if image is not None:
        blocks.append(ImageBlock(data=image, media_type=mime))
    blocks.append(TextBlock(after))
    return Request(
        (Message.user(tuple(blocks)),), max_tokens=N_PREDICT, temperature=0, ignore_eos=True, n=n
    )


async def run(b: Any, req: Any) -> tuple[str, Any]:
    """The reply's text and its one Done."""
    from inferd.types import Done, Text

    events = [ev async for ev in b.generate(req)]
    assert isinstance(events[-1], Done), events[-1]
    assert sum(isinstance(e, Done) for e in events) == req.n
    return "".join(e.text for e in events if isinstance(e, Text)), events[-1]


def _marker_cells(pair: Any, L: Any) -> tuple[int, int]:
    """mtmd's own count of the photo's cells, and of everything its marker becomes
    (Qwen2-VL wraps the image in vision start/end text), from a projector of its own."""
    m = L.Model(str(pair.model))
    try:
        p = L.Mtmd(m, str(pair.mmproj), n_threads=1)
        chunks = p.tokenize(p.marker, [p.bitmap(IMAGE.read_bytes())], add_special=False)
        sizes = {chunks.kind(i): 0 for i in range(len(chunks))}
        for i in range(len(chunks)):
            sizes[chunks.kind(i)] += chunks.n_tokens(i)
        p.close()
        return sizes["image"], sum(sizes.values())
    finally:
        m.close()


@pytest.mark.slow
async def test_single_stream_equals_mtmd_cli_and_usage_counts_mtmds_cells(
    backend: Any, cli: dict[str, str], qwen2vl: Any, L: Any
) -> None:
    """Text + image + text: the reply is llama-mtmd-cli's; usage counts the image as the
    cells mtmd gives it (not its positions), and the M-RoPE projector loads at all."""
    assert backend.capabilities().vision
    backend.clear_prefix_cache()
    text, done = await run(backend, request(IMAGE.read_bytes()))
    assert text == cli["image"]
    assert done.usage.output_tokens == N_PREDICT
    _, text_only = await run(backend, request(None))
    image, marker = _marker_cells(qwen2vl, L)
    assert done.usage.input_tokens - text_only.usage.input_tokens == marker > image


@pytest.mark.slow
async def test_batch_of_four_equals_mtmd_cli(
    backend: Any, cli: dict[str, str], red_png: Path
) -> None:
    """Four streams at once in the split layout (two images, the photo with another
    question, text alone): each media reply is llama-mtmd-cli's for the same prompt,
    the text one what it is alone."""
    backend.clear_prefix_cache()
    text_alone, _ = await run(backend, request(None))
    cli = {**cli, "text": text_alone}
    photo = IMAGE.read_bytes()
    cases = [
        ("image", request(photo)),
        ("red", request(red_png.read_bytes(), mime="image/png")),
        ("text", request(None)),
        ("other", request(photo, OTHER_AFTER)),
    ]
    ours = await asyncio.gather(*(run(backend, r) for _, r in cases))
    assert [t for t, _ in ours] == [cli[k] for k, _ in cases]
    assert all(d.usage.output_tokens == N_PREDICT for _, d in ours)


@pytest.mark.slow
@pytest.mark.parametrize("kv_layout", ["split", "unified"])
async def test_reused_image_prefix_keeps_its_positions(
    qwen2vl: Any, cli: dict[str, str], L: Any, kv_layout: str
) -> None:
    """The photo with one question, then with another: the second reuses the cells up to
    the end of the image (cached tokens cover it) and, cut at the shifted position, its
    reply is still llama-mtmd-cli's; the same request again is served from the cache
    and answers the same; a different image is not reported cached past the text."""
    b = _backend(qwen2vl, parallel=2, kv_layout=kv_layout)
    try:
        photo = IMAGE.read_bytes()
        first_text, first = await run(b, request(photo))
        assert first.usage.cached_tokens == 0 and first_text == cli["image"]
        other_text, other = await run(b, request(photo, OTHER_AFTER))
        cells, _ = _marker_cells(qwen2vl, L)
        assert other.usage.cached_tokens >= cells
        assert other_text == cli["other"]
        again_text, again = await run(b, request(photo))
        assert again.usage.cached_tokens >= other.usage.cached_tokens
        assert again_text == cli["image"]
        red = png_bytes(80, 60, (200, 10, 10))
        red_text, red_done = await run(b, request(red, mime="image/png"))
        assert red_done.usage.cached_tokens < cells and red_text == cli["red"]
    finally:
        b.close()


@pytest.mark.slow
async def test_a_cached_image_keeps_its_positions_behind_other_text(qwen2vl: Any) -> None:
    """The media cache under M-RoPE (ADR 0032): the photo behind other text is not
    encoded again, and its cached floats, laid out at the new prompt's positions, give
    the reply a fresh encode gives."""
    b = _backend(qwen2vl, parallel=1)
    fresh = _backend(qwen2vl, parallel=1, media_cache_mib=0)
    try:
        photo = IMAGE.read_bytes()
        await run(b, request(photo))
        other_lead = request(photo, before="Something else comes first here. " + BEFORE)
        text, done = await run(b, other_lead)
        assert b.batching_stats()["media_cache_hits"] == 1
        want, want_done = await run(fresh, other_lead)
        assert text == want and done.usage.input_tokens == want_done.usage.input_tokens
    finally:
        b.close()
        fresh.close()


@pytest.mark.slow
async def test_image_decoded_a_piece_per_step_beside_a_text_stream(
    qwen2vl: Any, cli: dict[str, str]
) -> None:
    """With 16-token steps the image's cells go in several pieces, all at the image's
    temporal position, while a text stream decodes beside it: both replies are the
    peer's (the text one what it is alone), and the media took more than one piece."""
    b = _backend(qwen2vl, parallel=2, step_tokens=16)
    try:
        text_alone, _ = await run(b, request(None))
        b.clear_prefix_cache()
        ours = await asyncio.gather(run(b, request(IMAGE.read_bytes())), run(b, request(None)))
        stats = b.batching_stats()
        assert [t for t, _ in ours] == [cli["image"], text_alone]
        assert stats["media_pieces"] > stats["media_chunks"] >= 1
    finally:
        b.close()


@pytest.mark.slow
async def test_choices_share_the_image_prefill(qwen2vl: Any, cli: dict[str, str]) -> None:
    """n=2 greedy choices: the leader decodes the image, the follower gets its cells and
    its position shift; both replies are the peer's."""
    from inferd.types import Text

    b = _backend(qwen2vl, parallel=2)
    try:
        texts = ["", ""]
        async for ev in b.generate(request(IMAGE.read_bytes(), n=2)):
            if isinstance(ev, Text):
                texts[ev.index] += ev.text
        assert texts == [cli["image"], cli["image"]]
    finally:
        b.close()
