"""Find, check and (optionally) verify a GGUF file before libllama sees it.

Why check in Python first: libllama trusts its input. A file that is not GGUF, or whose
header lies about its sizes, should fail here with a :class:`ModelLoadError` that says
what is wrong, never reach C code that might read past a buffer. We walk the whole GGUF
header (metadata and tensor table) with bounds checks against the real file size, so a
truncated or hostile header is caught without allocating what it claims; tensor data
beyond the end of the file is caught by libllama's own bounds check, whose reason we
forward in the error.

With ``sha256=`` the file is copied into a private temporary directory while it is
hashed, compared in constant time, and loaded from that copy: the bytes that were
verified are the bytes that load, even if the original is swapped in between. The copy
is removed by :meth:`ModelFile.cleanup` (the backend calls it on close).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mmap
import os
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from inferd.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
#: GGUF versions libllama reads.
SUPPORTED_VERSIONS = (2, 3)
COPY_CHUNK_BYTES = 4 * 1024 * 1024

# GGUF metadata value types -> fixed size in bytes (strings and arrays are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    """What the header walk learned (enough to reject a file; libllama reads the rest)."""

    version: int
    n_tensors: int
    n_kv: int
    architecture: str | None
    data_offset: int
    file_size: int


@dataclass(slots=True)
class ModelFile:
    """A checked model file ready for libllama. ``path`` may be a private verified copy."""

    path: Path
    source: Path
    header: GGUFHeader
    sha256: str | None = None
    _tmpdir: str | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        """Remove the verified copy, if one was made. Safe to call twice."""
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


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
    name = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 4 or f.read(4) != GGUF_MAGIC:
                f.seek(0)
                head = f.read(4)
                raise ModelLoadError(
                    f"{name} is not a GGUF model (it starts with {head!r}, not b'GGUF'). "
                    "inferd runs GGUF files; convert other formats with llama.cpp's "
                    "convert_hf_to_gguf.py."
                )
            if size < 24:
                raise ModelLoadError(
                    f"{name} is truncated: {size} bytes is too short for a GGUF header"
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _walk(_Reader(mm, name), size)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file {name}: {e.strerror or e}") from None


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
            for _ in range(n):
                r.string(repr(key))
        else:
            raise ModelLoadError(
                f"{r.name}: metadata {key!r} is an array of type {etype}, "
                "which GGUF does not define (corrupt file?)"
            )
    else:
        raise ModelLoadError(f"{r.name}: metadata {key!r} has unknown type {vtype} (corrupt file?)")


def check_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as an existing regular file, or a ModelLoadError saying what it is instead."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"model file {p} does not exist") from None
    except OSError as e:
        raise ModelLoadError(f"cannot access model file {p}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelLoadError(f"model path {p} is a directory; give the .gguf file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"model path {p} is not a regular file")
    return p


def _normalise_sha(expected: str) -> str:
    exp = expected.strip().lower()
    exp = exp.removeprefix("sha256:")
    if len(exp) != 64 or any(c not in "0123456789abcdef" for c in exp):
        raise ModelLoadError(f"sha256={expected!r} is not 64 hex digits")
    return exp


def _copy_and_hash(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        while chunk := fin.read(COPY_CHUNK_BYTES):
            h.update(chunk)
            fout.write(chunk)
    return h.hexdigest()


def prepare(path: str | os.PathLike[str], *, sha256: str | None = None) -> ModelFile:
    """Check ``path`` and return a :class:`ModelFile` to hand to libllama.

    Without ``sha256`` the file is used in place. With it, the file is copied into a
    private temp directory (mode 0700) while hashed; a mismatch removes the copy and
    raises; a match loads from the copy.
    """
    src = check_path(path)
    if sha256 is None:
        return ModelFile(src, src, read_header(src))
    expected = _normalise_sha(sha256)
    tmpdir = tempfile.mkdtemp(prefix="inferd-model-")
    try:
        dst = Path(tmpdir) / "model.gguf"
        try:
            actual = _copy_and_hash(src, dst)
        except OSError as e:
            raise ModelLoadError(f"cannot copy {src} for verification: {e.strerror or e}") from None
        if not hmac.compare_digest(actual, expected):
            raise ModelLoadError(
                f"sha256 mismatch for {src}: expected {expected}, got {actual}. The file is "
                "not the model you pinned; download it again or fix the pin."
            )
        header = read_header(dst)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return ModelFile(dst, src, header, actual, tmpdir)


@contextlib.contextmanager
def prepared(path: str | os.PathLike[str], *, sha256: str | None = None):  # type: ignore[no-untyped-def]
    """``with prepared(path) as mf:`` -- :func:`prepare` with cleanup on exit."""
    mf = prepare(path, sha256=sha256)
    try:
        yield mf
    finally:
        mf.cleanup()
