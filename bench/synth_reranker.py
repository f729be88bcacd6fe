"""Write a small BERT cross-encoder reranker GGUF with random weights (issue 19).

Why: no reranker is in the model index, and tests of ``LlamaCpp.rerank`` and the
bridge's ``/v1/rerank`` need one that libllama and ``llama-server --reranking`` both
load. This is the architecture of ``cross-encoder/ms-marco-MiniLM`` and the BERT-based
``bge-reranker`` conversions (``convert_hf_to_gguf.py``'s ``BertForSequenceClassification``
path): token, position and token-type embeddings, post-norm encoder blocks, then the
classification head ``cls`` (dense + tanh) and ``cls.output`` (one logit), with
``bert.pooling_type = RANK``. The tokenizer is a tiny WordPiece vocabulary written the
way the converter writes BERT's (word starts carry the phantom space ``U+2581``,
continuations do not), covering every lowercase letter and digit so any ASCII text
tokenizes without ``[UNK]``. Scores are meaningless; they are the same function of the
input for every runtime that loads the file, which is what a differential test needs.

    python bench/synth_reranker.py rerank.gguf          # ~0.4 MB

Needs llama.cpp's ``gguf`` Python package from the vendored tree (``synth_model._gguf``).
"""

from __future__ import annotations

import argparse
import string
from dataclasses import dataclass
from pathlib import Path

from bench.synth_model import _gguf

#: Whole words in the vocabulary (anything else falls back to letter pieces).
WORDS = (
    "the a an of to in and is are was for on with what which who how why where when "
    "paris france capital city river berlin germany cat dog animal pet food eat "
    "llama model fast slow cpu gpu memory token text search query document rank score "
    "weather rain sun cold hot water ocean sea mountain tree forest book read write"
).split()
#: BERT's special tokens, at the head of the vocabulary.
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PHANTOM = "\u2581"


@dataclass(frozen=True)
class Shape:
    """BERT hyper-parameters (MiniLM-like, shrunk for CI)."""

    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    heads: int = 4
    context: int = 512


def vocabulary() -> list[str]:
    """Specials, then word starts and continuations for every character, then words."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = list(SPECIALS)
    tokens += [PHANTOM + c for c in chars]
    tokens += list(dict.fromkeys(c for c in chars))
    tokens += [PHANTOM + w for w in WORDS]
    return list(dict.fromkeys(tokens))  # one id per text (libllama asserts it)


def _tokenizer(gguf, writer, tokens: list[str]) -> None:
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (
        len(tokens) - len(SPECIALS)
    )
    types[SPECIALS.index("[UNK]")] = gguf.TokenType.UNKNOWN
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    ids = {t: i for i, t in enumerate(SPECIALS)}
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_eos_token_id(ids["[SEP]"])
    writer.add_mask_token_id(ids["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_sep_token(True)


def write(dst: Path, shape: Shape = Shape(), *, seed: int = 0) -> Path:
    """Write ``dst`` (float32 weights drawn from ``seed``) and return it."""
    gguf = _gguf()
    import numpy as np

    rng = np.random.default_rng(seed)
    s = shape
    tokens = vocabulary()
    writer = gguf.GGUFWriter(str(dst), "bert")
    writer.add_name("synthetic reranker")
    writer.add_context_length(s.context)
    writer.add_embedding_length(s.hidden)
    writer.add_feed_forward_length(s.ffn)
    writer.add_block_count(s.layers)
    writer.add_head_count(s.heads)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_classifier_output_labels(["LABEL_0"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _tokenizer(gguf, writer, tokens)

    def mat(*dims: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    def norm(prefix: str) -> None:
        writer.add_tensor(prefix + ".weight", 1.0 + mat(s.hidden, scale=0.05))
        writer.add_tensor(prefix + ".bias", mat(s.hidden, scale=0.05))

    h, f = s.hidden, s.ffn
    writer.add_tensor("token_embd.weight", mat(len(tokens), h, scale=0.5))
    writer.add_tensor("token_types.weight", mat(2, h))
    writer.add_tensor("position_embd.weight", mat(s.context, h))
    norm("token_embd_norm")
    for i in range(s.layers):
        b = f"blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(b + name + ".weight", mat(h, h))
            writer.add_tensor(b + name + ".bias", mat(h, scale=0.02))
        norm(b + "attn_output_norm")
        writer.add_tensor(b + "ffn_up.weight", mat(f, h))
        writer.add_tensor(b + "ffn_up.bias", mat(f, scale=0.02))
        writer.add_tensor(b + "ffn_down.weight", mat(h, f))
        writer.add_tensor(b + "ffn_down.bias", mat(h, scale=0.02))
        norm(b + "layer_output_norm")
    writer.add_tensor("cls.weight", mat(h, h, scale=0.3))
    writer.add_tensor("cls.bias", mat(h, scale=0.1))
    writer.add_tensor("cls.output.weight", mat(1, h, scale=1.0))
    writer.add_tensor("cls.output.bias", mat(1, scale=0.1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write(args.out, seed=args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
