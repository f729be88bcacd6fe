"""The libmtmd binding (``_mtmd.pxi``): projector, bitmaps, chunks, media into a sequence.

Issue 16, docs/adr/0028-media-through-libmtmd.md. The synthetic pair of
``bench/synth_vision.py`` (LLaVA MLP vision, 64 media tokens per image; Ultravox audio)
and the vendored test files of tools/mtmd; SmolLM2 for the refusals.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from inferd.errors import ModelLoadError, NotReady
from tests.conftest import require_mtmd_core

MTMD_DIR = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "tools" / "mtmd"
IMAGE = MTMD_DIR / "test-1.jpeg"
AUDIO = MTMD_DIR / "test-2.mp3"
#: The synthetic projector's tokens per image: (image_size / patch_size) ** 2.
IMAGE_TOKENS = 64


@pytest.fixture(scope="module")
def L() -> Any:
    return require_mtmd_core()


@pytest.fixture(scope="module")
def pair_model(L: Any, synth_vision: Any) -> Any:
    m = L.Model(str(synth_vision.model))
    yield m
    m.close()


@pytest.fixture()
def proj(L: Any, pair_model: Any, synth_vision: Any) -> Any:
    p = L.Mtmd(pair_model, str(synth_vision.mmproj), n_threads=2)
    yield p
    p.close()


def test_default_marker(L: Any) -> None:
    assert L.mtmd_default_media_marker() == "<__media__>"


def test_a_text_model_is_not_a_projector(L: Any, smollm2_path: Path) -> None:
    m = L.Model(str(smollm2_path), vocab_only=False)
    try:
        with pytest.raises(ModelLoadError, match="projector"):
            L.Mtmd(m, str(smollm2_path))
    finally:
        m.close()


def test_projector_of_another_width_is_refused(L: Any, smollm2_path: Path, synth_vision) -> None:
    """SmolLM2 (576 wide) with the synthetic projector (64 wide): mtmd's own check says
    so, at load, before any compute."""
    m = L.Model(str(smollm2_path))
    try:
        with pytest.raises(ModelLoadError, match="n_embd"):
            L.Mtmd(m, str(synth_vision.mmproj))
    finally:
        m.close()


def test_capabilities(proj: Any) -> None:
    assert proj.vision and proj.audio
    assert proj.audio_sample_rate == 16000
    assert proj.marker == "<__media__>"
    assert proj.mrope is False


def test_bitmaps(proj: Any) -> None:
    data = IMAGE.read_bytes()
    bm = proj.bitmap(data)
    assert not bm.is_audio and bm.nx > 0 and bm.ny > 0
    assert bm.n_bytes == bm.nx * bm.ny * 3
    assert bm.id == hashlib.sha256(data).hexdigest()
    au = proj.bitmap(AUDIO.read_bytes())
    assert au.is_audio and au.n_bytes % 4 == 0 and au.n_bytes > 0


@pytest.mark.parametrize("data", [b"", b"\x00" * 64, b"not an image at all, just words"])
def test_bad_bitmaps_raise(proj: Any, data: bytes) -> None:
    with pytest.raises(ValueError):
        proj.bitmap(data)


def test_objects_come_from_the_projector(L: Any) -> None:
    with pytest.raises(TypeError):
        L.Bitmap()
    with pytest.raises(TypeError):
        L.Chunks()


def test_tokenize_splits_at_markers(proj: Any) -> None:
    bm = proj.bitmap(IMAGE.read_bytes())
    chunks = proj.tokenize("before <__media__> after", [bm])
    kinds = [chunks.kind(i) for i in range(len(chunks))]
    assert kinds == ["text", "image", "text"]
    assert chunks.n_tokens(1) == IMAGE_TOKENS and chunks.n_pos(1) == IMAGE_TOKENS
    assert chunks.id(1) == bm.id and chunks.id(0) is None
    assert chunks.tokens(0) and chunks.tokens(2) and chunks.tokens(1) == []
    with pytest.raises(IndexError):
        chunks.kind(3)
    with pytest.raises(ValueError, match="markers"):
        proj.tokenize("no marker here", [bm])
    with pytest.raises(ValueError, match="markers"):
        proj.tokenize("<__media__> <__media__>", [bm])


def test_eval_chunk_into_any_sequence(L: Any, pair_model: Any, proj: Any) -> None:
    """The image goes into sequence 1 at position 5; the text after it then decodes at
    the position eval_chunk returned, and the cells are where they should be."""
    ctx = L.Context(pair_model, n_ctx=512, n_batch=64, n_seq_max=2, n_threads=2)
    try:
        bm = proj.bitmap(IMAGE.read_bytes())
        chunks = proj.tokenize("a <__media__> b", [bm])
        head = chunks.tokens(0)
        batch = L.Batch(64, 1)
        batch.add_sequence(head, 0, 1, False)
        ctx.decode(batch)
        pos = proj.eval_chunk(ctx, chunks, 1, len(head), 1, 16)  # 4 pieces of 16
        assert pos == len(head) + IMAGE_TOKENS
        tail = chunks.tokens(2)
        batch.clear()
        batch.add_sequence(tail, pos, 1, True)
        ctx.decode(batch)
        assert ctx.seq_pos_max(1) == pos + len(tail) - 1
        assert ctx.seq_pos_max(0) == -1  # sequence 0 untouched
        with pytest.raises(ValueError, match="text"):
            proj.eval_chunk(ctx, chunks, 0, 0, 0, 16)
    finally:
        ctx.close()


def test_closing_the_model_closes_the_projector(L: Any, synth_vision: Any) -> None:
    m = L.Model(str(synth_vision.model))
    p = L.Mtmd(m, str(synth_vision.mmproj))
    m.close()
    assert p.closed
    with pytest.raises(NotReady):
        p.bitmap(IMAGE.read_bytes())


def test_bitmaps_and_tokenize_run_beside_an_encode(L: Any, pair_model: Any, proj: Any) -> None:
    """A request's media is decoded and tokenized in the event-loop thread while the
    scheduler thread encodes another's: the readers never meet 'in use' (they only read
    the projector), and every call completes (a race the first engine had)."""
    import threading

    ctx = L.Context(pair_model, n_ctx=2048, n_batch=64, n_seq_max=1, n_threads=2)
    data = IMAGE.read_bytes()
    chunks = proj.tokenize("<__media__>", [proj.bitmap(data)])
    errors: list[BaseException] = []
    done = threading.Event()

    def encode() -> None:
        try:
            for k in range(6):
                proj.eval_chunk(ctx, chunks, 0, k * IMAGE_TOKENS, 0, 64)
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=encode)
    t.start()
    reads = 0
    try:
        while not done.is_set() or reads < 3:
            proj.tokenize("x <__media__> y", [proj.bitmap(data)])
            reads += 1
    finally:
        t.join()
        ctx.close()
    assert not errors, errors
    assert reads >= 3 and ctx.closed


def test_embeddings_decoded_in_pieces_equal_one_eval(L: Any, pair_model: Any, proj: Any) -> None:
    """encode + decode_embeddings in four pieces (what the scheduler does a piece per
    step) leaves the same next-token logits as mtmd's own encode-and-decode."""
    bm = proj.bitmap(IMAGE.read_bytes())
    chunks = proj.tokenize("a <__media__> b", [bm])
    head, tail = chunks.tokens(0), chunks.tokens(2)
    out = []
    for split in (False, True):
        ctx = L.Context(pair_model, n_ctx=512, n_batch=64, n_seq_max=1, n_threads=2)
        try:
            batch = L.Batch(64, 1)
            batch.add_sequence(head, 0, 0, False)
            ctx.decode(batch)
            if split:
                emb = proj.encode(chunks, 1)
                assert (emb.n_tokens, emb.non_causal) == (IMAGE_TOKENS, False)
                for at in range(0, IMAGE_TOKENS, 16):
                    L.decode_embeddings(ctx, emb, at, 16, len(head), 0)  # the chunk's pos
            else:
                proj.eval_chunk(ctx, chunks, 1, len(head), 0, 64)
            batch.clear()
            batch.add_sequence(tail, len(head) + IMAGE_TOKENS, 0, True)
            ctx.decode(batch)
            out.append(list(ctx.logits(-1)))
        finally:
            ctx.close()
    whole, pieces = out
    top = max(range(len(whole)), key=whole.__getitem__)
    assert top == max(range(len(pieces)), key=pieces.__getitem__)
    assert max(abs(a - b) for a, b in zip(whole, pieces, strict=True)) < 1e-2


def test_decode_embeddings_checks_its_piece(L: Any, pair_model: Any, proj: Any) -> None:
    chunks = proj.tokenize("<__media__>", [proj.bitmap(IMAGE.read_bytes())])
    emb = proj.encode(chunks, 0)
    ctx = L.Context(pair_model, n_ctx=512, n_batch=32, n_seq_max=1, n_threads=2)
    try:
        with pytest.raises(ValueError, match="bad piece"):
            L.decode_embeddings(ctx, emb, 60, 8, 0, 0)
        with pytest.raises(ValueError, match="n_batch"):
            L.decode_embeddings(ctx, emb, 0, 64, 0, 0)
        with pytest.raises(TypeError):
            L.Embeddings()
    finally:
        ctx.close()
