"""Write a small synthetic LoRA adapter GGUF for a Llama-architecture model.

Why: the LoRA path (``LlamaCpp(..., lora=[(path, scale)])``,
docs/adr/0026-grammar-fast-path-and-context-knobs.md) needs an adapter that fits the
test model, and no registry is reachable from every machine the tests run on. The
adapter's values are random: with scale 0 the output must equal the base model's, with
a non-zero scale it must change; nothing else about it is meaningful.

    python bench/synth_lora.py --base smollm2-135m.gguf --rank 8 lora.gguf
    python bench/synth_lora.py --base smollm2-135m.gguf --arch gpt2 wrong-arch.gguf

A LoRA GGUF has ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, and a ``<tensor>.lora_a`` / ``<tensor>.lora_b`` pair per adapted
base tensor: for a base weight of ggml shape ``[n_in, n_out]``, ``lora_a`` is
``[n_in, rank]`` and ``lora_b`` is ``[rank, n_out]`` (llama.cpp's llama-adapter.cpp).
Uses the vendored ``gguf-py`` as bench/synth_model.py does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.synth_model import _gguf

#: Base tensors the adapter touches in every block (attention in and out).
TARGETS = ("attn_q.weight", "attn_output.weight")
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0
#: Standard deviation of the random factors: large enough that scale 1 moves greedy
#: output on a 135M model, small enough that it stays finite.
DEFAULT_STD = 0.05


def write_lora(
    base: Path,
    dst: Path,
    *,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    arch: str | None = None,
    seed: int = 0,
    std: float = DEFAULT_STD,
) -> Path:
    """Write an adapter for ``base`` to ``dst`` (``arch`` overrides the architecture
    written, to make an adapter for another model family)."""
    import numpy as np

    gguf = _gguf()
    reader = gguf.GGUFReader(str(base))
    field = reader.fields["general.architecture"]
    base_arch = bytes(field.parts[field.data[0]]).decode()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(dst), arch or base_arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    n = 0
    for t in reader.tensors:
        if not t.name.endswith(TARGETS):
            continue
        n_in, n_out = int(t.shape[0]), int(t.shape[1])  # ggml order
        a = (rng.standard_normal((rank, n_in)) * std).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * std).astype(np.float32)
        writer.add_tensor(t.name.removesuffix(".weight") + ".weight.lora_a", a)
        writer.add_tensor(t.name.removesuffix(".weight") + ".weight.lora_b", b)
        n += 1
    if n == 0:
        raise SystemExit(f"{base} has no tensor named *{TARGETS}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="the base model GGUF")
    ap.add_argument("--rank", type=int, default=DEFAULT_RANK)
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    ap.add_argument("--arch", default=None, help="write this architecture instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    write_lora(
        args.base, args.out, rank=args.rank, alpha=args.alpha, arch=args.arch, seed=args.seed
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
