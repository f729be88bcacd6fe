"""Models from the Hugging Face Hub: ``hf://owner/repo[:QUANT | /path/file.gguf][@revision]``.

Why a module of its own: the store (:mod:`inferd.models`) knows files and names; this
module knows the Hub's repo layout (which GGUF file a quantisation tag means, split
parts, ``mmproj`` projectors) and talks to the Hub only through ``huggingface_hub`` (its
retries, range-resumed downloads, ``HF_TOKEN`` / ``HF_ENDPOINT`` handling and error
classes), never through HTTP code of ours.

Every file is checked against the Hub's own digest (the LFS sha256, or the git blob id
for a small non-LFS file) and its GGUF header is walked before it is renamed into the
store; a partial download waits in ``models/.partial`` (keyed by the expected sha256)
so the next pull resumes it with a range request. See
docs/adr/0017-hugging-face-pulls-and-store-entries.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferd import catalog
from inferd.errors import ModelLoadError
from inferd.gguf import COPY_CHUNK_BYTES, Progress, read_header_of
from inferd.limits import echo

#: Prefixes that mark a Hub source (``hf.co/`` is Ollama's spelling).
HUB_PREFIXES = ("hf://", "hf.co/")
#: The quantisation picked when the source names none (llama-server's first choice too).
DEFAULT_QUANT = "Q4_K_M"
#: Seconds a metadata call (the repo listing) may take.
HUB_TIMEOUT_S = 30.0
#: Most files (split parts plus projector) one entry may have.
MAX_FILES_PER_ENTRY = 128
#: Where partial downloads wait, inside the store (same filesystem: the rename is atomic).
PARTIAL_DIR = ".partial"

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_SOURCE_RE = re.compile(
    rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev1>[A-Za-z0-9._-]{{1,100}}))?"
    r"(?:(?P<path>/[^:@]+\.gguf)|:(?P<tag>[A-Za-z0-9_.-]{1,40}))?"
    r"(?:@(?P<rev2>[A-Za-z0-9._-]{1,100}))?$"
)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_GIT_OID_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_SPLIT_RE = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG_RE = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
#: What a quantisation tag looks like (``Q4_K_M``, ``IQ4_XS``, ``F16``, ``BF16``, ``TQ1_0``,
#: ``MXFP4``): a file named ``model-final.gguf`` has no quantisation called ``FINAL``.
QUANT_TAG_RE = re.compile(r"^(?:I?Q[0-9]\w*|B?F[0-9]+|TQ[0-9]\w*|MXFP[0-9]\w*)$")
#: File-name words that mark a GGUF as something other than a model (as llama-server's).
NOT_MODEL_WORDS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


@dataclass(frozen=True, slots=True)
class HubSource:
    """A parsed ``hf://`` source: a repo and at most one of a tag or a file path."""

    repo: str
    tag: str | None = None
    path: str | None = None
    revision: str | None = None

    @property
    def spec(self) -> str:
        """The canonical text of this source (tags upper-cased), as the index records it."""
        what = f"/{self.path}" if self.path else (f":{self.tag}" if self.tag else "")
        return f"hf://{self.repo}{what}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of a repo as the Hub lists it, with the digest it must hash to."""

    path: str
    size: int
    sha256: str | None  # the LFS sha256; None for a small file kept in git
    blob_id: str | None  # the git blob id (sha1 of ``blob <size>\\0<bytes>``)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a pull fetches: the model's parts in order, an optional projector, why."""

    repo: str
    commit: str
    parts: tuple[HubFile, ...]
    mmproj: HubFile | None
    quant: str | None  # None when the file name carries no quantisation tag
    reason: str


def is_hub_source(text: str) -> bool:
    """True when ``text`` names a Hub source rather than a store name or a path."""
    return text.startswith(HUB_PREFIXES)


def parse(text: str) -> HubSource:
    """Parse ``hf://owner/repo[:TAG | /path/file.gguf][@revision]`` (ModelLoadError if bad)."""
    body = next((text[len(p) :] for p in HUB_PREFIXES if text.startswith(p)), None)
    m = _SOURCE_RE.match(body) if body is not None else None
    if m is None or (m["rev1"] and m["rev2"]) or (m["path"] and ".." in m["path"].split("/")):
        raise ModelLoadError(
            f"{echo(text)} is not a Hub source; write hf://owner/repo, hf://owner/repo:Q8_0, "
            "hf://owner/repo/path/file.gguf, optionally followed by @revision"
        )
    tag = m["tag"].upper() if m["tag"] else None
    path = m["path"][1:] if m["path"] else None
    return HubSource(m["repo"], tag, path, m["rev1"] or m["rev2"])


# ---------------------------------------------------------------- choosing files


def split_info(path: str) -> tuple[str, str, int, int]:
    """``(prefix, TAG, index, count)`` of a GGUF file name, as llama-server reads it."""
    prefix = path[: -len(".gguf")] if path.lower().endswith(".gguf") else path
    index = count = 1
    if m := _SPLIT_RE.match(prefix):
        prefix, index, count = m[1], int(m[2]), int(m[3])
    t = _TAG_RE.search(prefix)
    return prefix, (t[1].upper() if t else ""), index, count


def quant_bits(path: str) -> int:
    """Bits of the quantisation in a file name (``Q4_K_M`` -> 4, ``F16`` -> 16), 0 if none."""
    tag = split_info(path)[1]
    m = re.search(r"[0-9]+", tag)
    return int(m[0]) if m else 0


def is_model_file(path: str) -> bool:
    """A GGUF that holds a model (not a projector, imatrix or draft head)."""
    name = path.rsplit("/", 1)[-1]
    return name.lower().endswith(".gguf") and not any(w in name for w in NOT_MODEL_WORDS)


def _parts_of(files: Sequence[HubFile], first: HubFile) -> tuple[HubFile, ...]:
    prefix, _, _, count = split_info(first.path)
    if count <= 1:
        return (first,)
    parts = sorted(
        (
            f
            for f in files
            if f.path.lower().endswith(".gguf")
            and split_info(f.path)[0] == prefix
            and split_info(f.path)[3] == count
        ),
        key=lambda f: split_info(f.path)[2],
    )
    if [split_info(f.path)[2] for f in parts] != list(range(1, count + 1)):
        raise ModelLoadError(
            f"{first.path} is part 1 of {count}, but the repo lists "
            f"{len(parts)} of its parts; the upload is incomplete"
        )
    return tuple(parts)


def _heads(files: Sequence[HubFile]) -> list[HubFile]:
    """Model files that start an entry (single files and first split parts)."""
    return [f for f in files if is_model_file(f.path) and split_info(f.path)[2] == 1]


def _tag_matches(path: str, tag: str) -> bool:
    return re.search(re.escape(tag) + r"[.-]", path, re.IGNORECASE) is not None


def choose(source: HubSource, files: Sequence[HubFile]) -> tuple[HubFile, str]:
    """The first (or only) part of the model file ``source`` means, and why it was chosen."""
    heads = _heads(files)
    if source.path is not None:
        exact = [f for f in files if f.path == source.path]
        if not exact:
            raise ModelLoadError(f"{source.repo} has no file {source.path}; {_listing(files)}")
        if split_info(source.path)[2] != 1:
            first = [h for h in heads if split_info(h.path)[0] == split_info(source.path)[0]]
            if first:
                return first[0], f"file {first[0].path} (all parts)"
        return exact[0], f"file {source.path}"
    if not heads:
        raise ModelLoadError(f"{source.repo} holds no GGUF model file; {_listing(files)}")
    if source.tag is not None:
        for f in heads:
            if _tag_matches(f.path, source.tag):
                return f, f"quantisation {source.tag} ({f.path})"
        raise ModelLoadError(
            f"{source.repo} has no {source.tag} file; quantisations there: {_quants(heads)}"
        )
    for f in heads:
        if _tag_matches(f.path, DEFAULT_QUANT):
            return f, f"default quantisation {DEFAULT_QUANT} ({f.path})"
    sized = sorted(heads, key=lambda h: (sum(p.size for p in _parts_of(files, h)), h.path))
    four = [h for h in sized if quant_bits(h.path) == 4]
    pick = (four or sized)[0]
    kind = "the smallest 4-bit file" if four else "no 4-bit file; the smallest model file"
    return pick, f"{kind}, {split_info(pick.path)[1] or pick.path} ({pick.path})"


def _mmproj(files: Sequence[HubFile], model: str) -> HubFile | None:
    """The projector beside ``model``: deepest shared folder, then closest quant bits."""
    model_dir = model.rsplit("/", 1)[0] + "/" if "/" in model else ""
    bits = quant_bits(model)
    best: tuple[int, int, str] | None = None
    pick = None
    for f in files:
        name = f.path.rsplit("/", 1)[-1]
        f_dir = f.path[: len(f.path) - len(name)]
        if "mmproj" not in name or not name.endswith(".gguf") or not model_dir.startswith(f_dir):
            continue
        key = (-len(f_dir), abs(quant_bits(f.path) - bits), f.path)
        if best is None or key < best:
            best, pick = key, f
    return pick


def plan(source: HubSource, commit: str, files: Sequence[HubFile]) -> Plan:
    """The files a pull of ``source`` fetches from a repo listing at ``commit``."""
    first, reason = choose(source, files)
    parts = _parts_of(files, first)
    mmproj = _mmproj(files, first.path)
    if len(parts) + 1 > MAX_FILES_PER_ENTRY:
        raise ModelLoadError(f"{first.path} has {len(parts)} parts; at most {MAX_FILES_PER_ENTRY}")
    tag = split_info(first.path)[1]
    quant = source.tag or (tag if QUANT_TAG_RE.match(tag) else None)
    return Plan(source.repo, commit, parts, mmproj, quant, reason)


def _listing(files: Sequence[HubFile]) -> str:
    names = [f.path for f in files][:20]
    more = f" and {len(files) - 20} more" if len(files) > 20 else ""
    return "the repo has: " + (", ".join(names) + more if names else "no files")


def _quants(heads: Sequence[HubFile]) -> str:
    return ", ".join(sorted({split_info(h.path)[1] or h.path for h in heads}))


# ---------------------------------------------------------------- talking to the Hub


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _token_hint() -> str:
    if os.environ.get("HF_TOKEN"):
        return "the token in HF_TOKEN has no access to it (accept its terms on the Hub page)"
    return "set HF_TOKEN to a token with access (accept its terms on the Hub page first)"


def hub_error(e: BaseException, repo: str, what: str = "") -> ModelLoadError:
    """A huggingface_hub or transport error as one clear line (never with the token)."""
    from huggingface_hub import errors as hf

    where = hub_endpoint() or "the Hub"
    code = getattr(getattr(e, "response", None), "status_code", None)
    gated = code in (401, 403) and not isinstance(e, hf.RepositoryNotFoundError)
    if isinstance(e, hf.GatedRepoError) or gated:
        return ModelLoadError(f"{repo} is gated or private ({code}): {_token_hint()}")
    if isinstance(e, hf.RepositoryNotFoundError):
        private = "" if os.environ.get("HF_TOKEN") else "; if it is private, set HF_TOKEN"
        return ModelLoadError(f"{repo} is not a model repo on {where}{private}")
    if isinstance(e, hf.RevisionNotFoundError):
        return ModelLoadError(f"{repo} has no revision {what or '(as given)'}")
    if isinstance(e, hf.EntryNotFoundError):
        return ModelLoadError(f"{repo} has no file {what}")
    if isinstance(e, hf.OfflineModeIsEnabled):
        return ModelLoadError(f"HF_HUB_OFFLINE is set and {repo} is not in the store")
    if isinstance(e, hf.HfHubHTTPError):
        return ModelLoadError(f"the Hub answered {code} for {repo}{' ' + what if what else ''}")
    if isinstance(e, OSError) and not isinstance(e, ConnectionError):
        first = (str(e).splitlines() or [""])[0][:200]
        return ModelLoadError(f"downloading {what or repo} from {repo} failed: {first}")
    return ModelLoadError(f"cannot reach {where} for {repo}: {type(e).__name__}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's error base (``httpx2`` in huggingface_hub 2.x, ``httpx`` in 1.x)."""
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            return (importlib.import_module(module).HTTPError,)
    return ()


def list_files(source: HubSource) -> tuple[str, list[HubFile]]:
    """The commit ``source``'s revision names and the repo's files with their digests."""
    from huggingface_hub import HfApi, errors

    api = HfApi(endpoint=hub_endpoint(), library_name="inferd")
    failures: tuple[type[BaseException], ...] = (
        errors.HfHubHTTPError,
        errors.OfflineModeIsEnabled,
        *_transport_errors(),
        OSError,
    )
    try:
        info = api.model_info(
            source.repo, revision=source.revision, files_metadata=True, timeout=HUB_TIMEOUT_S
        )
    except failures as e:
        raise hub_error(e, source.repo, source.revision or "") from None
    if not info.sha:
        raise ModelLoadError(f"{source.repo}: the Hub listing names no commit")
    return info.sha, [_hub_file(source.repo, s) for s in info.siblings or []]


def _hub_file(repo: str, s: Any) -> HubFile:
    """One listed file; digests checked for shape, since they name files in the store
    (a hostile mirror's ``../..`` must never become a path)."""
    sha = str(s.lfs.sha256).lower() if s.lfs else None
    blob = str(s.blob_id).lower() if s.blob_id else None
    size = s.lfs.size if s.lfs else s.size
    if (sha is None and blob is None) or (sha is not None and not _SHA256_RE.match(sha)):
        raise ModelLoadError(f"{repo}: the Hub listed no valid sha256 for {echo(s.rfilename)}")
    if sha is None and not _GIT_OID_RE.match(blob or ""):
        raise ModelLoadError(f"{repo}: the Hub listed no valid blob id for {echo(s.rfilename)}")
    if not isinstance(size, int) or size < 0:
        raise ModelLoadError(f"{repo}: the Hub listed no valid size for {echo(s.rfilename)}")
    return HubFile(str(s.rfilename), size, sha, blob)


class _Bar:
    """A tqdm stand-in for ``huggingface_hub.file_download.http_get`` that reports to a
    :data:`inferd.gguf.Progress` callback (nothing at all when there is none)."""

    progress: Progress | None = None

    def __init__(self, *, total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.total = total or 0
        self.n = initial

    def update(self, n: int) -> None:
        self.n += n
        if self.progress is not None:
            self.progress("download", self.n, self.total)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@contextlib.contextmanager
def _partial(store: Path, key: str) -> Iterator[Path]:
    """The partial file for digest ``key``, locked so two pulls never write it at once.

    The lock lives on the file itself, and a finished pull renames that file to
    ``.ok``: a pull that waited on the old file would then hold a lock on nothing
    and write to a path that is gone. So after the lock is granted, the path must still
    name the locked file, or the pull opens it afresh and waits again. An empty part
    left by a pull that found the work done is removed on the way out.
    """
    d = store / PARTIAL_DIR
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / f"{key}.part"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names_locked_file(path, fd):
                try:
                    yield path
                finally:
                    if os.fstat(fd).st_size == 0 and _names_locked_file(path, fd):
                        path.unlink()
                return
        finally:
            os.close(fd)


def _names_locked_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd`` (it may have been renamed)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _download(plan_: Plan, f: HubFile, part: Path, progress: Progress | None) -> None:
    """Fetch ``f`` into ``part``, resuming from what is already there (range request)."""
    from huggingface_hub import errors, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    have = part.stat().st_size
    if have > f.size:
        os.truncate(part, 0)
        have = 0
    free = shutil.disk_usage(part.parent).free
    if f.size - have > free:
        raise ModelLoadError(
            f"{f.path} needs {f.size - have} more bytes and the store's disk has {free} free; "
            "free space and pull again (nothing was stored)"
        )
    url = hf_hub_url(plan_.repo, f.path, revision=plan_.commit, endpoint=hub_endpoint())
    bar = type("_B", (_Bar,), {"progress": staticmethod(progress) if progress else None})
    failures: tuple[type[BaseException], ...] = (
        errors.HfHubHTTPError,
        *_transport_errors(),
        OSError,
    )
    with open(part, "r+b") as out:
        out.seek(have)
        try:
            http_get(
                url,
                out,
                resume_size=have,
                headers=build_hf_headers(library_name="inferd"),
                expected_size=f.size,
                tqdm_class=bar,  # type: ignore[arg-type]
            )
        except failures as e:
            raise hub_error(e, plan_.repo, f.path) from None
        out.flush()
        os.fsync(out.fileno())


def _digest_ok(path: Path, f: HubFile, progress: Progress | None) -> str:
    """The file's sha256 once it matches the Hub's digest for ``f``; ModelLoadError if not."""
    sha = hashlib.sha256()
    git = hashlib.sha1(b"blob %d\0" % path.stat().st_size)  # the git blob id the Hub lists
    done = 0
    with path.open("rb") as fh:
        while chunk := fh.read(COPY_CHUNK_BYTES):
            sha.update(chunk)
            git.update(chunk)
            done += len(chunk)
            if progress:
                progress("verify", done, f.size)
    digest = sha.hexdigest()
    want, got = (f.sha256, digest) if f.sha256 else (f.blob_id, git.hexdigest())
    if want is None or not catalog.digests_equal(want, got):
        raise ModelLoadError(
            f"{f.path}: the download does not match the Hub's digest (expected {want}, got "
            f"{got}); it was discarded and the store is unchanged"
        )
    with path.open("rb") as fh:
        read_header_of(fh, f.path)  # only GGUF files enter the store
    return digest


def fetch(plan_: Plan, f: HubFile, store: Path, progress: Progress | None) -> tuple[str, Path]:
    """``f`` verified: ``(sha256, path)`` of the store blob or of a staged, checked file.

    Staged files (``.partial/<key>.ok``) wait for :func:`inferd.catalog.commit`; a pull
    that finds one (an earlier pull failed on a later part, or runs alongside) reuses it.
    """
    if f.sha256 is not None and (have := catalog.verified_blob(store, f.sha256)) is not None:
        return f.sha256, have
    key = f.sha256 or f"git-{f.blob_id}"
    with _partial(store, key) as part:
        # Staged before stored: a concurrent pull's commit moves ``.ok`` into the store,
        # so looking at the store second never misses a file on its way there.
        staged = part.with_name(f"{key}.ok")
        if staged.exists():
            try:
                return _digest_ok(staged, f, progress), staged
            except FileNotFoundError:  # a concurrent pull committed it meanwhile
                pass
            except ModelLoadError:
                staged.unlink(missing_ok=True)
        if f.sha256 is not None and (have := catalog.verified_blob(store, f.sha256)) is not None:
            return f.sha256, have  # another pull finished it while we waited
        _download(plan_, f, part, progress)
        try:
            digest = _digest_ok(part, f, progress)
        except ModelLoadError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, staged)
        return digest, staged


def pull(
    text: str, *, names: Sequence[str] = (), progress: Progress | None = None
) -> catalog.Entry:
    """Fetch what ``text`` names into the store and name it; return the stored entry.

    Offline (``HF_HUB_OFFLINE``), only an entry already in the store is returned.
    """
    source = parse(text)
    store = catalog.store()
    if offline():
        found = catalog.find_source(source.spec)
        if found is None:
            raise ModelLoadError(f"HF_HUB_OFFLINE is set and {source.spec} is not in the store")
        return found
    commit, files = list_files(source)
    p = plan(source, commit, files)
    fetched = [fetch(p, f, store, progress) for f in p.parts]
    proj = fetch(p, p.mmproj, store, progress) if p.mmproj else None
    record = catalog.hub_record(source.spec, p, fetched, proj)
    record["chosen"] = p.reason
    canonical = catalog.default_name(p)
    return catalog.commit(store, [canonical, *names], record, [*fetched, *([proj] if proj else [])])


def resolve(text: str, *, pull_: bool = True, progress: Progress | None = None) -> Path:
    """The path to load for a Hub source: the stored entry's, pulling it when absent."""
    source = parse(text)
    found = catalog.find_source(source.spec)
    if found is not None:
        return found.model_path
    if not pull_:
        raise ModelLoadError(f"{source.spec} is not in the store; run: inferd pull {source.spec}")
    return pull(text, progress=progress).model_path
