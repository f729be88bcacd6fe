"""Write a GGUF with a real tokenizer and chat template but synthetic (random) weights.

Why: a GPU benchmark wants a model larger than the 135M one the suite uses, and the
machine that runs it can reach no model registry while its file-transfer budget is far
smaller than any real multi-GB model. Throughput of a dense transformer depends on its
shapes and weight type, not on the weight values, so a file with the tokenizer and chat
template of SmolLM2 (copied from the small model's metadata) and the shapes of a larger
model of the same family measures what the real one would, token for token, as long as
generation ignores end-of-generation (every benchmark here sets ``ignore_eos``). The text
it writes is gibberish; the numbers are not.

    # keep only the tokenizer + template of a real model (a few MB, carried to the GPU box)
    python bench/synth_model.py --from smollm2-135m.gguf --tokenizer-only skel.gguf
    # write a SmolLM2-1.7B-shaped model (F16, 3.4 GB) from it
    python bench/synth_model.py --from skel.gguf --shape smollm2-1.7b big.gguf

Needs llama.cpp's ``gguf`` Python package: it is in the vendored tree
(``vendor/llama.cpp/gguf-py``), which this script puts on ``sys.path`` itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters of a Llama-architecture model (tied embeddings)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    context: int = 8192
    rope_base: float = 130000.0

    def params(self, vocab: int) -> int:
        kv = self.hidden // self.heads * self.kv_heads
        per_layer = (
            2 * self.hidden * self.hidden
            + 2 * kv * self.hidden
            + 3 * self.hidden * self.ffn
            + 2 * self.hidden
        )
        return vocab * self.hidden + self.layers * per_layer + self.hidden


#: Named shapes. ``smollm2-1.7b`` is SmolLM2-1.7B's (same tokenizer as the 135M model);
#: ``tiny`` exists so the pipeline can be checked on a CPU in seconds.
SHAPES = {
    "tiny": Shape(hidden=256, ffn=512, layers=2, heads=4, kv_heads=2),
    "smollm2-360m": Shape(
        hidden=960, ffn=2560, layers=32, heads=15, kv_heads=5, rope_base=100000.0
    ),
    "smollm2-1.7b": Shape(hidden=2048, ffn=8192, layers=24, heads=32, kv_heads=32),
}


def _gguf():
    try:
        import gguf
    except ImportError:
        sys.path.insert(0, str(ROOT / "vendor" / "llama.cpp" / "gguf-py"))
        import gguf
    return gguf


def _copy_tokenizer(gguf, reader, writer) -> int:
    """Copy ``tokenizer.*`` fields with their exact types; return the vocabulary size."""
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            values = field.contents()
            writer.add_key_value(key, values, main, sub_type=sub)
            if key == "tokenizer.ggml.tokens":
                vocab = len(values)
        else:
            writer.add_key_value(key, field.contents(), main)
    if not vocab:
        raise SystemExit("the source GGUF has no tokenizer.ggml.tokens")
    return vocab


def write(src: Path, dst: Path, shape: Shape | None, *, seed: int = 0) -> int:
    """Write ``dst``: ``src``'s tokenizer, and random F16 weights of ``shape`` (or none).
    Returns the vocabulary size."""
    gguf = _gguf()
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), "llama")
    vocab = _copy_tokenizer(gguf, reader, writer)
    writer.add_name("synthetic" if shape else "tokenizer only")
    if shape:
        s = shape
        writer.add_context_length(s.context)
        writer.add_embedding_length(s.hidden)
        writer.add_block_count(s.layers)
        writer.add_feed_forward_length(s.ffn)
        writer.add_head_count(s.heads)
        writer.add_head_count_kv(s.kv_heads)
        writer.add_rope_freq_base(s.rope_base)
        writer.add_rope_dimension_count(s.hidden // s.heads)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(vocab)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        rng = np.random.default_rng(seed)
        # One random block, rotated per tensor: real values (never zeros, which can run
        # faster than data), generated once instead of billions of draws.
        block = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(np.float16)

        def mat(rows: int, cols: int) -> np.ndarray:
            n = rows * cols
            rolled = np.roll(block, int(rng.integers(block.size)))
            return np.resize(rolled, n).reshape(rows, cols)

        def ones(n: int) -> np.ndarray:
            return np.ones(n, dtype=np.float32)

        kv = s.hidden // s.heads * s.kv_heads
        writer.add_tensor("token_embd.weight", mat(vocab, s.hidden))
        writer.add_tensor("output_norm.weight", ones(s.hidden))
        for i in range(s.layers):
            b = f"blk.{i}."
            writer.add_tensor(b + "attn_norm.weight", ones(s.hidden))
            writer.add_tensor(b + "attn_q.weight", mat(s.hidden, s.hidden))
            writer.add_tensor(b + "attn_k.weight", mat(kv, s.hidden))
            writer.add_tensor(b + "attn_v.weight", mat(kv, s.hidden))
            writer.add_tensor(b + "attn_output.weight", mat(s.hidden, s.hidden))
            writer.add_tensor(b + "ffn_norm.weight", ones(s.hidden))
            writer.add_tensor(b + "ffn_gate.weight", mat(s.ffn, s.hidden))
            writer.add_tensor(b + "ffn_up.weight", mat(s.ffn, s.hidden))
            writer.add_tensor(b + "ffn_down.weight", mat(s.hidden, s.ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--from",
        dest="src",
        type=Path,
        required=True,
        help="GGUF whose tokenizer and chat template are copied",
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), help="model shape to write")
    ap.add_argument(
        "--tokenizer-only",
        action="store_true",
        help="write the tokenizer metadata alone (no tensors)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    if bool(a.shape) == a.tokenizer_only:
        ap.error("give exactly one of --shape or --tokenizer-only")
    shape = SHAPES[a.shape] if a.shape else None
    t0 = time.perf_counter()
    vocab = write(a.src, a.out, shape, seed=a.seed)
    size = a.out.stat().st_size
    what = f"{a.shape}, {shape.params(vocab) / 1e9:.2f} B params" if shape else "tokenizer only"
    print(
        f"wrote {a.out} ({what}, {size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
