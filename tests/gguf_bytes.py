"""Small valid GGUF files for store and loader tests (no tensors, a few metadata keys)."""

from __future__ import annotations

import os
import struct
from pathlib import Path


def gguf_header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


def tiny_gguf(path: Path, *, arch: str = "test", padding: int = 1000) -> Path:
    """Write a GGUF file whose header walks cleanly; ``padding`` random bytes make it unique."""
    path.write_bytes(
        gguf_header(n_kv=1) + kv_string("general.architecture", arch) + os.urandom(padding)
    )
    return path
