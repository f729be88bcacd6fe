"""Write a small text model and a multimodal projector (vision + audio) with random weights.

Why: no vision or audio model is in the package index, and the tests of images and audio
through libmtmd (issue 16) must run without downloading one. Random weights give nonsense
text, but the pipeline is exact: the same files, image and audio through our engine and
through llama.cpp's own ``llama-mtmd-cli`` / ``llama-server --mmproj`` must give the same
tokens. So the projector is of real architectures the vendored mtmd supports, with every
hyper-parameter and tensor its loader (``tools/mtmd/clip.cpp``) requires:

- vision: a LLaVA-1.5-style CLIP ViT with an MLP projector (``mlp``: ``mm.0`` + GELU +
  ``mm.2``), fixed-size preprocessing (resize and pad to ``image_size``), one token per
  patch: ``(image_size / patch_size) ** 2`` media tokens;
- audio: Ultravox's Whisper encoder (two conv1d, a ViT, frames stacked by
  ``stack_factor``, SwiGLU projector), 16 kHz mono in 30 s chunks;
- M-RoPE (``--qwen2vl``, :func:`ensure_qwen2vl`): a Qwen2-VL pair, as the vendored
  ``conversion/qwenvl.py`` writes it: a ``qwen2vl`` text model (q/k/v biases, rope
  ``dimension_sections``) and a ``qwen2vl_merger`` projector (the Conv3D patch embedding
  split into two Conv2D, a ViT with 2-D rotary positions and no position table, the
  merger's LayerNorm and 2x2-patch MLP). Images keep their aspect ratio (resized to
  multiples of ``2 * patch_size``), one token per 2x2 patches: ``test-1.jpeg`` (640x488)
  gives a 10 x 8 grid with the default 32-pixel patches, 80 cells over 10 positions.

Both live in one projector file (``clip.vision.projector_type`` and
``clip.audio.projector_type``, as Qwen2.5-Omni's does), or either alone. The text model is a
Llama with SmolLM2's tokenizer and chat template (copied from the suite's model, as
``bench/synth_model.py`` does), whose embedding width equals the projector's output.

The logits of a random model are nearly flat, and greedy decoding of flat logits flips on
float noise (batch shape, thread count). The output matrix (untied: tied embeddings would
make every step repeat its input token) is therefore drawn with a large scale, so the top
logit stands well clear of the next one and two correct engines agree token for token.

    python bench/synth_vision.py --from smollm2-135m.gguf model.gguf mmproj.gguf
    python bench/synth_vision.py --from smollm2-135m.gguf --image-size 224 --patch-size 14 \\
        model.gguf mmproj.gguf   # 256 media tokens per image, for the benchmark

Files are a few MB and take about a second; ``ensure`` caches them by content of the
arguments (the tests keep them in the pytest cache directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synth_model import _gguf  # noqa: E402

#: Bump when the files written change, so that cached copies are rewritten.
FORMAT_VERSION = 1
#: CLIP's normalisation (LLaVA-1.5's preprocessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Whisper's encoder sees 30 s chunks: 3000 mel frames, 1500 positions after the conv.
WHISPER_POSITIONS = 1500
#: Qwen2-VL's text M-RoPE sections (temporal, height, width, unused) in rotary pairs,
#: summing to half the head width (Qwen2-VL-2B: 16, 24, 24, 0 of 64; ours: of 8).
QWEN2VL_SECTIONS = (2, 3, 3, 0)


@dataclass(frozen=True)
class TextShape:
    """The Llama text model: small, with the output scale that keeps greedy stable."""

    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 4096
    output_scale: float = 0.5


@dataclass(frozen=True)
class VisionShape:
    """CLIP ViT + LLaVA MLP projector. ``layers`` >= 2: LLaVA reads the next-to-last."""

    image_size: int = 64
    patch_size: int = 8
    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    heads: int = 4
    proj_hidden: int = 128

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class AudioShape:
    """Ultravox: Whisper encoder, frames stacked ``stack_factor`` at a time, SwiGLU MLP."""

    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    heads: int = 4
    mel_bins: int = 128
    stack_factor: int = 4
    proj_hidden: int = 128


@dataclass(frozen=True)
class Qwen2VLShape:
    """Qwen2-VL's vision tower and merger. mtmd's graph merges 2x2 patches (fixed), so an
    image is resized to multiples of ``2 * patch_size``; ``image_size`` is only what the
    converter writes by default (560)."""

    patch_size: int = 32
    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    heads: int = 4
    image_size: int = 560


class _Rand:
    """Deterministic random tensors: F16 matrices (as converted models ship them), F32
    vectors; matrices scaled by 1/sqrt(fan-in) so activations stay finite."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)

    def mat(self, *shape: int, scale: float | None = None):
        np = self.np
        fan_in = int(np.prod(shape[1:]))
        s = scale if scale is not None else fan_in**-0.5
        return (self.rng.standard_normal(shape, dtype=np.float32) * s).astype(np.float16)

    def vec(self, *shape: int, scale: float = 0.02):
        np = self.np
        return (self.rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def ones(self, *shape: int):
        return self.np.ones(shape, dtype=self.np.float32)


#: GGUF scalar value types -> struct format (gguf-py's GGUFValueType numbering).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


def read_tokenizer(src: Path) -> list[tuple[str, int, int | None, Any]]:
    """``(key, type, array element type, value)`` of every ``tokenizer.*`` metadata entry of
    ``src``, read straight from the header: gguf-py's reader takes ~20 s on SmolLM2's
    100k-string vocabulary and merges, this well under one."""
    import mmap
    import struct

    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            (v,) = struct.unpack_from("<" + fmt, m, pos)
            pos += struct.calcsize("<" + fmt)
            return v

        def string() -> str:
            nonlocal pos
            n = take("Q")
            pos += n
            return m[pos - n : pos].decode("utf-8")

        def value(t: int) -> Any:
            return string() if t == _STRING else take(_SCALARS[t])

        if m[:4] != b"GGUF" or take("4xI") < 2:
            raise ValueError(f"{src} is not a GGUF v2+ file")
        _n_tensors, n_kv = take("Q"), take("Q")
        out = []
        for _ in range(n_kv):
            key, t = string(), take("I")
            if t == _ARRAY:
                sub, n = take("I"), take("Q")
                val: Any = [value(sub) for _ in range(n)]
            else:
                sub, val = None, value(t)
            if key.startswith("tokenizer."):
                out.append((key, t, sub, val))
        return out


def _copy_tokens(gguf: Any, src: Path, w: Any) -> int:
    """Copy ``src``'s tokenizer fields with their exact types; return the vocabulary size."""
    vocab = 0
    for key, t, sub, val in read_tokenizer(src):
        if t == _ARRAY:
            w.add_key_value(key, val, gguf.GGUFValueType(t), sub_type=gguf.GGUFValueType(sub))
            vocab = len(val) if key == "tokenizer.ggml.tokens" else vocab
        else:
            w.add_key_value(key, val, gguf.GGUFValueType(t))
    if not vocab:
        raise ValueError(f"{src} has no tokenizer.ggml.tokens")
    return vocab


def write_text_model(
    src: Path, dst: Path, shape: TextShape = TextShape(), seed: int = 0, *, qwen2vl: bool = False
) -> int:
    """Write the text model with ``src``'s tokenizer; return the vocabulary size. A Llama,
    or with ``qwen2vl`` Qwen2-VL's (M-RoPE with :data:`QWEN2VL_SECTIONS`, q/k/v biases)."""
    gguf = _gguf()
    w = gguf.GGUFWriter(str(dst), "qwen2vl" if qwen2vl else "llama")
    vocab = _copy_tokens(gguf, src, w)
    s, r = shape, _Rand(seed)
    w.add_name("synthetic vision text model")
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(s.hidden // s.heads)
    if qwen2vl:
        if 2 * sum(QWEN2VL_SECTIONS) != s.hidden // s.heads:
            raise ValueError("the M-RoPE sections must cover half the head width")
        w.add_rope_dimension_sections(list(QWEN2VL_SECTIONS))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    kv = s.hidden // s.heads * s.kv_heads
    w.add_tensor("token_embd.weight", r.mat(vocab, s.hidden, scale=1.0))
    w.add_tensor("output.weight", r.mat(vocab, s.hidden, scale=s.output_scale))
    w.add_tensor("output_norm.weight", r.ones(s.hidden))
    for i in range(s.layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", r.ones(s.hidden))
        w.add_tensor(b + "attn_q.weight", r.mat(s.hidden, s.hidden))
        w.add_tensor(b + "attn_k.weight", r.mat(kv, s.hidden))
        w.add_tensor(b + "attn_v.weight", r.mat(kv, s.hidden))
        if qwen2vl:
            for name, width in (("attn_q", s.hidden), ("attn_k", kv), ("attn_v", kv)):
                w.add_tensor(b + name + ".bias", r.vec(width))
        w.add_tensor(b + "attn_output.weight", r.mat(s.hidden, s.hidden))
        w.add_tensor(b + "ffn_norm.weight", r.ones(s.hidden))
        w.add_tensor(b + "ffn_gate.weight", r.mat(s.ffn, s.hidden))
        w.add_tensor(b + "ffn_up.weight", r.mat(s.ffn, s.hidden))
        w.add_tensor(b + "ffn_down.weight", r.mat(s.hidden, s.ffn))
    _finish(w)
    return vocab


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _vit_blocks(w, r: _Rand, prefix: str, hidden: int, ffn: int, layers: int, k_bias: bool):
    """The pre-norm transformer blocks CLIP and Whisper share (Whisper's k has no bias)."""
    for i in range(layers):
        b = f"{prefix}.blk.{i}."
        for norm in ("ln1", "ln2"):
            w.add_tensor(b + norm + ".weight", r.ones(hidden))
            w.add_tensor(b + norm + ".bias", r.vec(hidden))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(b + proj + ".weight", r.mat(hidden, hidden))
            if proj != "attn_k" or k_bias:
                w.add_tensor(b + proj + ".bias", r.vec(hidden))
        w.add_tensor(b + "ffn_up.weight", r.mat(ffn, hidden))
        w.add_tensor(b + "ffn_up.bias", r.vec(ffn))
        w.add_tensor(b + "ffn_down.weight", r.mat(hidden, ffn))
        w.add_tensor(b + "ffn_down.bias", r.vec(hidden))


def _vit_header(w, v: VisionShape | Qwen2VLShape) -> None:
    """The ViT keys both vision towers write: input size, widths, depth, normalisation."""
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden)
    w.add_vision_feed_forward_length(v.ffn)
    w.add_vision_block_count(v.layers)
    w.add_vision_head_count(v.heads)
    w.add_vision_image_mean(list(CLIP_MEAN))
    w.add_vision_image_std(list(CLIP_STD))


def _add_vision(w, r: _Rand, v: VisionShape, text_hidden: int) -> None:
    w.add_clip_has_vision_encoder(True)
    w.add_clip_vision_projector_type("mlp")
    _vit_header(w, v)
    w.add_vision_projection_dim(text_hidden)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_use_gelu(False)  # CLIP's quick GELU
    n_pos = v.n_tokens + 1  # + the class embedding
    w.add_tensor("v.patch_embd.weight", r.mat(v.hidden, 3, v.patch_size, v.patch_size))
    w.add_tensor("v.class_embd", r.vec(v.hidden, scale=1.0))
    w.add_tensor("v.position_embd.weight", r.vec(n_pos, v.hidden, scale=0.5))
    w.add_tensor("v.pre_ln.weight", r.ones(v.hidden))
    w.add_tensor("v.pre_ln.bias", r.vec(v.hidden))
    _vit_blocks(w, r, "v", v.hidden, v.ffn, v.layers, k_bias=True)
    w.add_tensor("mm.0.weight", r.mat(v.proj_hidden, v.hidden))
    w.add_tensor("mm.0.bias", r.vec(v.proj_hidden))
    w.add_tensor("mm.2.weight", r.mat(text_hidden, v.proj_hidden))
    w.add_tensor("mm.2.bias", r.vec(text_hidden))


def _add_audio(w, r: _Rand, a: AudioShape, text_hidden: int) -> None:
    gguf = _gguf()
    K = gguf.Keys.ClipAudio
    w.add_clip_has_audio_encoder(True)
    w.add_string("clip.audio.projector_type", "ultravox")
    w.add_uint32(K.EMBEDDING_LENGTH, a.hidden)
    w.add_uint32(K.FEED_FORWARD_LENGTH, a.ffn)
    w.add_uint32(K.BLOCK_COUNT, a.layers)
    w.add_uint32(K.Attention.HEAD_COUNT, a.heads)
    w.add_float32(K.Attention.LAYERNORM_EPS, 1e-5)
    w.add_uint32(K.PROJECTION_DIM, text_hidden)
    w.add_uint32(K.NUM_MEL_BINS, a.mel_bins)
    w.add_uint32(K.Projector.STACK_FACTOR, a.stack_factor)
    # conv biases are [C, 1] so they broadcast over frames (convert_hf_to_gguf unsqueezes)
    w.add_tensor("a.conv1d.1.weight", r.mat(a.hidden, a.mel_bins, 3))
    w.add_tensor("a.conv1d.1.bias", r.vec(a.hidden, 1))
    w.add_tensor("a.conv1d.2.weight", r.mat(a.hidden, a.hidden, 3))
    w.add_tensor("a.conv1d.2.bias", r.vec(a.hidden, 1))
    w.add_tensor("a.position_embd.weight", r.vec(WHISPER_POSITIONS, a.hidden, scale=0.5))
    _vit_blocks(w, r, "a", a.hidden, a.ffn, a.layers, k_bias=False)
    w.add_tensor("a.post_ln.weight", r.ones(a.hidden))
    w.add_tensor("a.post_ln.bias", r.vec(a.hidden))
    stacked = a.hidden * a.stack_factor
    w.add_tensor("mm.a.norm_pre.weight", r.ones(stacked))
    w.add_tensor("mm.a.mlp.1.weight", r.mat(2 * a.proj_hidden, stacked))
    w.add_tensor("mm.a.norm_mid.weight", r.ones(a.proj_hidden))
    w.add_tensor("mm.a.mlp.2.weight", r.mat(text_hidden, a.proj_hidden))


def write_projector(
    dst: Path,
    text_hidden: int,
    vision: VisionShape | None = VisionShape(),
    audio: AudioShape | None = AudioShape(),
    seed: int = 1,
) -> None:
    """Write the projector GGUF (``general.architecture`` ``clip``) for a text model whose
    embedding width is ``text_hidden``; ``None`` leaves that modality out."""
    if vision is None and audio is None:
        raise ValueError("a projector needs vision, audio or both")
    gguf = _gguf()
    w = gguf.GGUFWriter(str(dst), "clip")
    w.add_name("synthetic projector")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    r = _Rand(seed)
    if vision is not None:
        _add_vision(w, r, vision, text_hidden)
    if audio is not None:
        _add_audio(w, r, audio, text_hidden)
    _finish(w)


def _add_qwen2vl(w, r: _Rand, v: Qwen2VLShape, text_hidden: int) -> None:
    """Qwen2-VL's tower as conversion/qwenvl.py writes it (``clip.projector_type``
    ``qwen2vl_merger``; quick GELU, mtmd's default when no ``use_gelu`` key is set)."""
    gguf = _gguf()
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.QWEN2VL)
    w.add_vision_projection_dim(text_hidden)
    _vit_header(w, v)
    w.add_vision_attention_layernorm_eps(1e-6)
    # the Conv3D over two frames, split into one Conv2D per frame
    for suffix in ("", ".1"):
        w.add_tensor("v.patch_embd.weight" + suffix, r.mat(v.hidden, 3, v.patch_size, v.patch_size))
    _vit_blocks(w, r, "v", v.hidden, v.ffn, v.layers, k_bias=True)
    w.add_tensor("v.post_ln.weight", r.ones(v.hidden))  # the merger's ln_q
    w.add_tensor("v.post_ln.bias", r.vec(v.hidden))
    merged = 4 * v.hidden  # 2x2 patches concatenated
    w.add_tensor("mm.0.weight", r.mat(merged, merged))
    w.add_tensor("mm.0.bias", r.vec(merged))
    w.add_tensor("mm.2.weight", r.mat(text_hidden, merged))
    w.add_tensor("mm.2.bias", r.vec(text_hidden))


def write_qwen2vl_projector(
    dst: Path, text_hidden: int, vision: Qwen2VLShape = Qwen2VLShape(), seed: int = 1
) -> None:
    """Write a Qwen2-VL projector (``qwen2vl_merger``) for a text model ``text_hidden``
    wide."""
    gguf = _gguf()
    w = gguf.GGUFWriter(str(dst), "clip")
    w.add_name("synthetic qwen2-vl projector")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _add_qwen2vl(w, _Rand(seed), vision, text_hidden)
    _finish(w)


@dataclass(frozen=True)
class Pair:
    """A text model and its projector."""

    model: Path
    mmproj: Path


def ensure(
    src: Path,
    cache_dir: Path,
    *,
    text: TextShape = TextShape(),
    vision: VisionShape | None = VisionShape(),
    audio: AudioShape | None = AudioShape(),
) -> Pair:
    """The pair for these shapes under ``cache_dir``, written once (keyed by the shapes, the
    tokenizer source's name and size, and ``FORMAT_VERSION``); concurrent callers are safe
    (each writes a private temporary and renames it into place)."""
    spec = {
        "v": FORMAT_VERSION,
        "src": [src.name, src.stat().st_size],
        "text": asdict(text),
        "vision": asdict(vision) if vision else None,
        "audio": asdict(audio) if audio else None,
    }
    return _ensure_pair(
        cache_dir / "synth-vision-",
        spec,
        lambda model: write_text_model(src, model, text),
        lambda proj: write_projector(proj, text.hidden, vision, audio),
    )


def ensure_qwen2vl(
    src: Path,
    cache_dir: Path,
    *,
    text: TextShape = TextShape(),
    vision: Qwen2VLShape = Qwen2VLShape(),
) -> Pair:
    """The Qwen2-VL (M-RoPE) pair under ``cache_dir``, written once, as :func:`ensure`."""
    spec = {
        "v": FORMAT_VERSION,
        "src": [src.name, src.stat().st_size],
        "text": asdict(text),
        "qwen2vl": asdict(vision),
        "sections": QWEN2VL_SECTIONS,
    }
    return _ensure_pair(
        cache_dir / "synth-qwen2vl-",
        spec,
        lambda model: write_text_model(src, model, text, qwen2vl=True),
        lambda proj: write_qwen2vl_projector(proj, text.hidden, vision),
    )


def _ensure_pair(prefix: Path, spec: dict[str, Any], write_model: Any, write_proj: Any) -> Pair:
    """The pair in ``prefix`` + the spec's hash: written through private temporaries and
    renamed into place, so concurrent callers are safe and a torn write is never used."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = prefix.with_name(prefix.name + key)
    pair = Pair(folder / "model.gguf", folder / "mmproj.gguf")
    if pair.model.is_file() and pair.mmproj.is_file():
        return pair
    folder.mkdir(parents=True, exist_ok=True)
    tmp = f".tmp{os.getpid()}"
    model_tmp = pair.model.with_suffix(tmp)
    proj_tmp = pair.mmproj.with_suffix(tmp)
    write_model(model_tmp)
    write_proj(proj_tmp)
    os.replace(proj_tmp, pair.mmproj)
    os.replace(model_tmp, pair.model)
    return pair


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="src", type=Path, required=True, help="tokenizer source")
    ap.add_argument("--image-size", type=int, default=VisionShape.image_size)
    ap.add_argument("--patch-size", type=int, default=VisionShape.patch_size)
    ap.add_argument("--no-vision", action="store_true", help="an audio-only projector")
    ap.add_argument("--no-audio", action="store_true", help="a vision-only projector")
    ap.add_argument("--qwen2vl", action="store_true", help="a Qwen2-VL (M-RoPE) pair")
    ap.add_argument("model", type=Path)
    ap.add_argument("mmproj", type=Path)
    a = ap.parse_args(argv)
    if a.qwen2vl:
        t0 = time.perf_counter()
        write_text_model(a.src, a.model, TextShape(), qwen2vl=True)
        write_qwen2vl_projector(a.mmproj, TextShape().hidden)
        took = time.perf_counter() - t0
        print(f"wrote {a.model} + {a.mmproj} (Qwen2-VL) in {took:.1f} s", file=sys.stderr)
        return 0
    if a.no_vision and a.no_audio:
        ap.error("--no-vision and --no-audio leave nothing to project")
    vision = None if a.no_vision else VisionShape(a.image_size, a.patch_size)
    audio = None if a.no_audio else AudioShape()
    t0 = time.perf_counter()
    text = TextShape()
    write_text_model(a.src, a.model, text)
    write_projector(a.mmproj, text.hidden, vision, audio)
    mib = (a.model.stat().st_size + a.mmproj.stat().st_size) / 2**20
    tokens = f"{vision.n_tokens} tokens per image" if vision else "audio only"
    took = time.perf_counter() - t0
    print(
        f"wrote {a.model} + {a.mmproj} ({mib:.1f} MiB, {tokens}) in {took:.1f} s", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
