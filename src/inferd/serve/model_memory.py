"""What a model costs in memory: the estimate before a load, and returning it after.

The estimate is the GGUF file plus its KV cache at the configured ``n_ctx``, read from
the header with :mod:`inferd.gguf`'s bounds-checked reader, so the pool can make room
before it loads (docs/adr/0015-several-models-load-on-demand.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferd.errors import ModelLoadError
from inferd.serve.config import ModelSpec

#: Bytes per KV cache element in the estimate (llama.cpp's default f16 cache).
KV_BYTES_PER_ELEMENT = 2


def release_freed_memory() -> None:
    """Give memory freed by an unload back to the OS (glibc's ``malloc_trim``).

    glibc raises its mmap threshold each time a large mapped block is freed, so the KV
    cache of a model loaded a second time comes from the heap and stays in the process
    after ``free`` (measured: +66 MB per SmolLM2 pair on the second load/unload cycle);
    trimming returns it, so idle memory goes back to its level before the load. A no-op
    where libc has no ``malloc_trim`` (macOS, musl).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def estimate(spec: ModelSpec) -> tuple[Path | None, int]:
    """Resolve ``spec.source`` (a store name, a path, ``hf://``) and estimate its memory.

    Runs in a worker thread (a store name may be pulled). The estimate is the file size
    plus the KV cache at the configured ``n_ctx`` from the GGUF header; ``memory_bytes``
    in the config replaces it.
    """
    path: Path | None = None
    if spec.source is not None:
        from inferd import models

        try:
            path = models.resolve(spec.source)
        except ModelLoadError as e:
            raise ModelLoadError(f"model {spec.name!r}: {e.message}") from None
    if spec.memory_bytes is not None:
        return path, spec.memory_bytes
    if path is None:
        return None, 0
    n_ctx = int(spec.backend.options.get("n_ctx", 4096))
    return path, path.stat().st_size + kv_cache_bytes(path, n_ctx)


def kv_cache_bytes(path: Path, n_ctx: int) -> int:
    """KV cache bytes at ``n_ctx`` from the GGUF metadata (0 when the header lacks it)."""
    try:
        meta = _metadata_ints(path)
    except (ModelLoadError, OSError):
        return 0
    arch = meta.get("__arch__")
    layers = meta.get(f"{arch}.block_count", 0)
    heads = meta.get(f"{arch}.attention.head_count", 0)
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    embd = meta.get(f"{arch}.embedding_length", 0)
    if not (layers and heads and embd):
        return 0
    head_dim_k = meta.get(f"{arch}.attention.key_length", embd // heads)
    head_dim_v = meta.get(f"{arch}.attention.value_length", embd // heads)
    per_token = layers * kv_heads * (head_dim_k + head_dim_v) * KV_BYTES_PER_ELEMENT
    return int(n_ctx * per_token)


#: GGUF metadata types read as integers for the estimate (u8 .. i64) and their format.
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


def _metadata_ints(path: Path) -> dict[str, Any]:
    """Integer metadata and ``__arch__`` from the header, with :mod:`inferd.gguf`'s
    bounds-checked reader (a corrupt header is a ``ModelLoadError``, caught above)."""
    import mmap
    import struct

    from inferd import gguf

    out: dict[str, Any] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = gguf._Reader(mm, str(path))
        if r.size < 24 or bytes(mm[:4]) != gguf.GGUF_MAGIC:
            return out
        r.pos = 8
        r.u64("the tensor count")
        for i in range(r.u64("the metadata count")):
            key = r.string(f"metadata key #{i}", keep=True) or ""
            vtype = r.u32(f"the type of {key!r}")
            fmt = _INT_FORMATS.get(vtype)
            if fmt is not None:
                r.need(struct.calcsize(fmt), key)
                (out[key],) = struct.unpack_from(fmt, mm, r.pos)
                r.pos += struct.calcsize(fmt)
            elif key == "general.architecture" and vtype == gguf._STRING:
                out["__arch__"] = r.string(key, keep=True)
            else:
                gguf._skip_value(r, vtype, key)
    return out
