"""GGUF files without libllama: a bounds-checked header walk, and copy-while-hashing.

Why a module of its own: the loader (before libllama sees a file) and the model store
(before ``inferd pull`` keeps one) both need to know that a file really is GGUF, and
both copy files while hashing them; neither may import the other (the store must work
without the compiled llama.cpp core). See docs/adr/0013-model-store-lock-private-gguf-only.md.

The walk reads the whole GGUF header (metadata and tensor table) with bounds checks
against the real file size, so a truncated or hostile header is caught without
allocating what it claims.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from inferd.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
#: GGUF versions libllama reads.
SUPPORTED_VERSIONS = (2, 3)
#: Bytes read or written per step while copying and hashing.
COPY_CHUNK_BYTES = 4 * 1024 * 1024

# GGUF metadata value types -> fixed size in bytes (strings and arrays are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    """What the header walk learned (enough to reject a file; libllama reads the rest)."""

    version: int
    n_tensors: int
    n_kv: int
    architecture: str | None
    data_offset: int
    file_size: int


class _Reader:
    """Bounds-checked little-endian reads from a buffer; every overrun is a clear error."""

    __slots__ = ("buf", "name", "pos", "size")

    def __init__(self, buf: mmap.mmap | bytes, name: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.name = name

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelLoadError(
                f"{self.name} is truncated or corrupt: the GGUF header needs {n} more bytes "
                f"for {what} at offset {self.pos}, but the file is {self.size} bytes. "
                "Download the model again."
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return int(v)

    def string(self, what: str, *, keep: bool = False) -> str | None:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        start = self.pos
        self.pos += n
        if not keep:
            return None
        return bytes(self.buf[start : start + n]).decode("utf-8", "replace")

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n


def read_header(path: Path) -> GGUFHeader:
    """Walk the GGUF header of ``path`` with bounds checks; raise ModelLoadError if bad."""
    try:
        with open(path, "rb") as f:
            return read_header_of(f, str(path))
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {path}: {e.strerror or e}") from None


def read_header_of(f: BinaryIO, name: str) -> GGUFHeader:
    """:func:`read_header` on an open file (the bytes checked are the bytes then used)."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(4)
    if size < 4 or head != GGUF_MAGIC:
        raise ModelLoadError(
            f"{name} is not a GGUF model (it starts with {head!r}, not b'GGUF'). "
            "inferd runs GGUF files; convert other formats with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    if size < 24:
        raise ModelLoadError(f"{name} is truncated: {size} bytes is too short for a GGUF header")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _walk(_Reader(mm, name), size)


def _walk(r: _Reader, size: int) -> GGUFHeader:
    r.pos = 4
    version = r.u32("the version")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(
            f"{r.name} is GGUF version {version}; this llama.cpp reads versions "
            f"{SUPPORTED_VERSIONS}. Re-convert the model or upgrade inferd."
        )
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the metadata count")
    # Each metadata entry takes at least 12 bytes and each tensor entry at least 28, so
    # counts larger than the file allows are lies; reject before looping over them.
    if n_kv * 12 > size or n_tensors * 28 > size:
        raise ModelLoadError(
            f"{r.name} is corrupt: its header claims {n_kv} metadata entries and "
            f"{n_tensors} tensors, more than a {size}-byte file can hold"
        )
    arch: str | None = None
    alignment = 32
    for i in range(n_kv):
        key = r.string(f"metadata key #{i}", keep=True) or ""
        vtype = r.u32(f"the type of {key!r}")
        if key == "general.architecture" and vtype == _STRING:
            arch = r.string(key, keep=True)
        elif key == "general.alignment" and vtype == 4:
            alignment = r.u32(key)
            if alignment == 0 or alignment & (alignment - 1):
                raise ModelLoadError(f"{r.name}: general.alignment={alignment} is not a power of 2")
        else:
            _skip_value(r, vtype, key)
    max_end = 0
    for i in range(n_tensors):
        tname = r.string(f"tensor name #{i}", keep=True)
        n_dims = r.u32(f"the dimension count of tensor {tname!r}")
        if n_dims > _MAX_DIMS:
            raise ModelLoadError(f"{r.name}: tensor {tname!r} has {n_dims} dimensions (max 4)")
        r.skip(8 * n_dims, f"the shape of tensor {tname!r}")
        r.u32(f"the type of tensor {tname!r}")
        off = r.u64(f"the offset of tensor {tname!r}")
        max_end = max(max_end, off)
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    if n_tensors and data_offset + max_end >= size:
        raise ModelLoadError(
            f"{r.name} is truncated: tensor data should extend past byte "
            f"{data_offset + max_end}, but the file ends at {size}. Download the model again."
        )
    return GGUFHeader(version, n_tensors, n_kv, arch, data_offset, size)


def _skip_value(r: _Reader, vtype: int, key: str) -> None:
    if vtype in _FIXED:
        r.skip(_FIXED[vtype], repr(key))
    elif vtype == _STRING:
        r.string(repr(key))
    elif vtype == _ARRAY:
        etype = r.u32(f"the element type of {key!r}")
        n = r.u64(f"the length of {key!r}")
        if etype in _FIXED:
            r.skip(_FIXED[etype] * n, repr(key))
        elif etype == _STRING:
            # Every string costs at least its 8-byte length: reject absurd counts first.
            r.need(8 * n, f"{n} strings of {key!r}")
            _skip_strings(r, n, repr(key))
        else:
            raise ModelLoadError(
                f"{r.name}: metadata {key!r} is an array of type {etype}, "
                "which GGUF does not define (corrupt file?)"
            )
    else:
        raise ModelLoadError(f"{r.name}: metadata {key!r} has unknown type {vtype} (corrupt file?)")


def _skip_strings(r: _Reader, n: int, what: str) -> None:
    """Skip ``n`` length-prefixed strings: the tokenizer's arrays hold about 100,000 of
    them, and reading each through :meth:`_Reader.string` took half a second of every
    model load. Same bounds checks, same errors, one tight loop."""
    buf, pos, size = r.buf, r.pos, r.size
    length = _U64.unpack_from
    for _ in range(n):
        if pos + 8 > size:
            r.pos = pos
            r.need(8, f"the length of {what}")
        (k,) = length(buf, pos)
        pos += 8
        if pos + k > size:
            r.pos = pos
            r.need(k, what)
        pos += k
    r.pos = pos


Opener = Callable[[], BinaryIO]
Progress = Callable[[str, int, int], None]  # (stage, done_bytes, total_bytes)


def copy_hashing(
    sources: Iterable[Opener],
    dest: BinaryIO,
    *,
    total: int = 0,
    progress: Progress | None = None,
    durable: bool = True,
) -> str:
    """Copy ``sources`` (opened in order, concatenated) into ``dest``; return the sha256.

    The one copy-while-hashing loop of inferd (the model store's pulls and the loader's
    verified private copies): constant memory, and a full disk is a
    :class:`ModelLoadError` saying so. ``durable`` fsyncs ``dest`` before returning, so
    a file renamed into a store after this call survives a crash whole
    (docs/adr/0004-content-addressed-model-store.md).
    """
    h = hashlib.sha256()
    done = 0
    for open_src in sources:
        with open_src() as src:
            while chunk := src.read(COPY_CHUNK_BYTES):
                h.update(chunk)
                try:
                    dest.write(chunk)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise ModelLoadError(
                            "disk full while copying the model; free space and try again "
                            "(nothing was stored)"
                        ) from None
                    raise
                done += len(chunk)
                if progress:
                    progress("copy", done, total)
    dest.flush()
    if durable:
        os.fsync(dest.fileno())
    return h.hexdigest()
