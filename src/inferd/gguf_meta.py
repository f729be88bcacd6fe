"""What ``inferd models`` / ``inferd show`` print about a GGUF model, read from its header.

Why a module of its own: :mod:`inferd.gguf` walks a header to *reject* bad files and
keeps only what that needs; listing a store wants a few more keys (context length,
file type, chat template) and the parameter count from the tensor table, without
libllama. It reuses the same bounds-checked reader, so a hostile header costs no more
here than there (docs/adr/0017-hugging-face-pulls-and-store-entries.md).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from inferd.errors import ModelLoadError
from inferd.gguf import _STRING, GGUF_MAGIC, _Reader, _skip_value

#: llama.cpp's ``llama_ftype`` values -> the quantisation names people use.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip
#: Chat-template families by a marker their templates use, most specific first.
TEMPLATE_FAMILIES = (
    ("gemma4", "<|turn>"),
    ("gemma", "<start_of_turn>"),
    ("llama3", "<|start_header_id|>"),
    ("chatml", "<|im_start|>"),
    ("mistral", "[INST]"),
    ("deepseek", "<｜Assistant｜>"),
    ("phi", "<|assistant|>"),
)
#: Longest chat template kept from a header (longer ones are cut for detection only).
MAX_TEMPLATE_CHARS = 1_000_000
_U32, _U64 = 4, 10


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """The facts a listing shows; ``None`` where the header does not say."""

    architecture: str | None
    name: str | None
    file_type: str | None
    context_length: int | None
    parameters: int
    chat_template: str | None


def template_family(template: str | None) -> str:
    """The chat-template family (``chatml``, ``llama3``, ...), ``none`` or ``other``."""
    if not template:
        return "none"
    return next((fam for fam, mark in TEMPLATE_FAMILIES if mark in template), "other")


def read_info(paths: Sequence[Path]) -> GGUFInfo:
    """Facts from the first part's metadata, parameters summed over every part."""
    keys: dict[str, object] = {}
    params = 0
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                kv, n = _walk(f, str(path), keep=i == 0)
        except OSError as e:
            raise ModelLoadError(f"cannot read model file {path}: {e.strerror or e}") from None
        keys = keys or kv
        params += n
    arch = keys.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    ctx = keys.get(f"{arch}.context_length") if arch else None
    ftype = keys.get("general.file_type")
    name, tmpl = keys.get("general.name"), keys.get("tokenizer.chat_template")
    return GGUFInfo(
        arch,
        name if isinstance(name, str) else None,
        FILE_TYPES.get(ftype) if isinstance(ftype, int) else None,
        ctx if isinstance(ctx, int) else None,
        params,
        tmpl if isinstance(tmpl, str) else None,
    )


def _walk(f, name: str, *, keep: bool) -> tuple[dict[str, object], int]:  # type: ignore[no-untyped-def]
    size = os.fstat(f.fileno()).st_size
    if size < 24 or f.read(4) != GGUF_MAGIC:
        raise ModelLoadError(f"{name} is not a GGUF file")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = _Reader(mm, name)
        r.pos = 8  # magic + version (checked when the file entered the store)
        n_tensors, n_kv = r.u64("the tensor count"), r.u64("the metadata count")
        if n_kv * 12 > size or n_tensors * 28 > size:
            raise ModelLoadError(f"{name} is corrupt: its counts exceed its size")
        kv: dict[str, object] = {}
        for i in range(n_kv):
            key = r.string(f"metadata key #{i}", keep=True) or ""
            vtype = r.u32(f"the type of {key!r}")
            if keep and vtype in (_STRING, _U32, _U64):
                kv[key] = _value(r, vtype, key)
            else:
                _skip_value(r, vtype, key)
        params = 0
        for i in range(n_tensors):
            r.string(f"tensor name #{i}")
            dims = r.u32("a tensor's dimension count")
            if dims > 4:
                raise ModelLoadError(f"{name}: a tensor has {dims} dimensions (max 4)")
            count = 1
            for _ in range(dims):
                count *= r.u64("a tensor dimension")
            params += count
            r.skip(12, "a tensor's type and offset")
        return kv, params


def _value(r: _Reader, vtype: int, key: str) -> object:
    if vtype == _STRING:
        n = r.u64(f"the length of {key!r}")
        r.need(n, repr(key))
        start = r.pos
        r.pos += n
        return bytes(r.buf[start : start + min(n, MAX_TEMPLATE_CHARS)]).decode("utf-8", "replace")
    return r.u32(repr(key)) if vtype == _U32 else r.u64(repr(key))
