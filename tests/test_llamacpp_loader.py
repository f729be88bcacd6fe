"""Model files that are missing, wrong, truncated or hostile: clear errors, never a crash.

Every case that reaches libllama runs in a subprocess, so a segfault shows up as a
crashed child (a test failure naming the signal), not as a dead test runner.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from inferd.backends.llamacpp import loader
from inferd.errors import ModelLoadError

from .conftest import missing
from .gguf_bytes import gguf_header, kv_string

SRC = str(Path(__file__).resolve().parents[1] / "src")

_CHILD = textwrap.dedent("""
    import sys
    from inferd.errors import InferdError
    try:
        from inferd._fast import _llama  # noqa: F401
    except ImportError:
        print("NO-CORE"); sys.exit(0)
    from inferd.backends.llamacpp import LlamaCpp
    try:
        b = LlamaCpp(sys.argv[1], n_ctx=64, n_threads=1, **eval(sys.argv[2]))
    except InferdError as e:
        print(type(e).__name__ + ": " + e.message)
    else:
        print("LOADED"); b.close()
""")


def load_in_child(path: Path | str, **kwargs) -> str:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), repr(kwargs)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert p.returncode == 0, (
        f"loading {path} crashed the process (exit {p.returncode}):\n{p.stderr[-2000:]}"
    )
    out = p.stdout.strip().splitlines()[-1]
    if out == "NO-CORE":
        missing("the compiled llama.cpp core inferd._fast._llama")
    return out


# ---------------------------------------------------------------- pure Python checks


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        loader.prepare(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory"):
        loader.prepare(tmp_path)


def test_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF model"):
        loader.prepare(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a GGUF model"):
        loader.prepare(p)


def test_bad_version(tmp_path):
    p = tmp_path / "v9.gguf"
    p.write_bytes(gguf_header(version=9) + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="version 9"):
        loader.prepare(p)


def test_absurd_counts_are_rejected_before_looping(tmp_path):
    p = tmp_path / "huge.gguf"
    p.write_bytes(gguf_header(n_tensors=2**62, n_kv=2**62) + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="more than a"):
        loader.prepare(p)


def test_string_length_past_end(tmp_path):
    p = tmp_path / "liar.gguf"
    p.write_bytes(gguf_header(n_kv=1) + struct.pack("<Q", 2**60) + b"general.name")
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        loader.prepare(p)


def test_huge_string_array_claim(tmp_path):
    key = b"tokenizer.ggml.tokens"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, 2**40)
    p = tmp_path / "arr.gguf"
    p.write_bytes(gguf_header(n_kv=1) + body + b"\0" * 32)
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        loader.prepare(p)


def _string_array(key: bytes, n: int, tail: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, n) + tail


@pytest.mark.parametrize(
    ("n", "tail", "needs"),
    [
        # the second string's length prefix is cut: 8 bytes needed for it, 4 there
        (2, struct.pack("<Q", 10) + b"x" * 10 + b"\0" * 4, "needs 8 more bytes for the length"),
        # one string claims 100 bytes where 20 remain
        (1, struct.pack("<Q", 100) + b"y" * 20, "needs 100 more bytes"),
    ],
)
def test_string_array_cut_inside_names_the_key(tmp_path, n, tail, needs):
    p = tmp_path / "cut-array.gguf"
    p.write_bytes(gguf_header(n_kv=1) + _string_array(b"tokenizer.ggml.merges", n, tail))
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as e:
        loader.prepare(p)
    assert needs in str(e.value) and "tokenizer.ggml.merges" in str(e.value)


def test_string_array_is_walked_to_the_next_key(tmp_path):
    """The strings' lengths are followed exactly: the key after the array is read."""
    words = [b"a", b"", b"\xc3\xa9t\xc3\xa9", b"x" * 300]
    tail = b"".join(struct.pack("<Q", len(w)) + w for w in words)
    p = tmp_path / "arr-then-arch.gguf"
    p.write_bytes(
        gguf_header(n_kv=2)
        + _string_array(b"tokenizer.ggml.tokens", len(words), tail)
        + kv_string("general.architecture", "llama")
        + b"\0" * 64
    )
    assert loader.read_header(p).architecture == "llama"


def test_unknown_value_type(tmp_path):
    key = b"x"
    p = tmp_path / "type.gguf"
    p.write_bytes(
        gguf_header(n_kv=1) + struct.pack("<Q", 1) + key + struct.pack("<I", 77) + b"\0" * 32
    )
    with pytest.raises(ModelLoadError, match="unknown type 77"):
        loader.prepare(p)


def test_real_header_is_read(smollm2_path):
    h = loader.read_header(smollm2_path)
    assert h.version == 3 and h.architecture == "llama" and h.n_tensors > 100


def test_truncated_header_of_real_model(smollm2_path, tmp_path):
    p = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(100_000))  # inside the tokenizer metadata
    with pytest.raises(ModelLoadError, match="truncated"):
        loader.prepare(p)


def test_sha256_mismatch_leaves_no_copy(smollm2_path, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        loader.prepare(smollm2_path, sha256="0" * 64)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ModelLoadError, match="64 hex digits"):
        loader.prepare(smollm2_path, sha256="abc")


def test_sha256_match_loads_a_private_copy(smollm2_path, tmp_path, monkeypatch):
    import hashlib

    digest = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    mf = loader.prepare(smollm2_path, sha256="sha256:" + digest.upper())
    assert mf.path != smollm2_path and mf.path.is_file()
    assert mf.sha256 == digest
    assert oct(mf.path.parent.stat().st_mode & 0o777) == oct(0o700)
    mf.cleanup()
    mf.cleanup()
    assert not mf.path.exists()


# ---------------------------------------------------------------- through libllama


def test_child_missing_directory_and_garbage(tmp_path):
    assert load_in_child(tmp_path / "nope.gguf").startswith("ModelLoadError")
    assert "is a directory" in load_in_child(tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    assert "not a GGUF model" in load_in_child(junk)


def test_child_tensor_data_cut_short(smollm2_path, tmp_path):
    data = smollm2_path.read_bytes()
    for n, cut in enumerate((len(data) - 1_000_000, len(data) - 10, len(data) // 2)):
        p = tmp_path / f"cut{n}.gguf"
        p.write_bytes(data[:cut])
        out = load_in_child(p)
        assert out.startswith("ModelLoadError"), out


def test_child_corrupted_metadata_values(smollm2_path, tmp_path):
    """Flip the architecture string so libllama meets an unknown architecture."""
    data = bytearray(smollm2_path.read_bytes())
    i = data.find(b"llama", 0, 4096)
    assert i > 0
    data[i : i + 5] = b"zzzzz"
    p = tmp_path / "arch.gguf"
    p.write_bytes(bytes(data))
    out = load_in_child(p)
    assert out.startswith("ModelLoadError"), out


def test_child_minimal_valid_header_without_tensors(tmp_path):
    p = tmp_path / "tiny.gguf"
    p.write_bytes(gguf_header(n_kv=1) + kv_string("general.architecture", "llama") + b"\0" * 64)
    out = load_in_child(p)
    assert out.startswith("ModelLoadError"), out


def test_child_hash_verified_load(smollm2_path):
    import hashlib

    digest = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    assert load_in_child(smollm2_path, sha256=digest) == "LOADED"
    assert "sha256 mismatch" in load_in_child(smollm2_path, sha256="f" * 64)
