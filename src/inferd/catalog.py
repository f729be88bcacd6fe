"""Store entries: names and aliases, multi-file models, removal by reference count.

Why a module of its own: :mod:`inferd.models` keeps files by sha256 and a name per
file; a model from the Hub can be several files (split parts, an ``mmproj``
projector) known by several names (``owner/repo:Q4_K_M`` and ``--name qwen3-4b``).
An index record here is ``{"sha256": first part, "files": [...], "mmproj": {...},
"source": ..., "specs": [...]}``: records without ``files`` (older pulls, local files,
the pinned models) are one-file entries, so old stores read unchanged. Every change to
the index and every blob rename or unlink happens under the index lock, so a removal
never races a pull of the same bytes. A split model is loaded through a folder of links
named as its parts were (llama.cpp finds parts 2..N by the name of part 1).
See docs/adr/0017-hugging-face-pulls-and-store-entries.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferd import models
from inferd.errors import ModelLoadError
from inferd.limits import echo

if TYPE_CHECKING:
    from inferd.gguf_meta import GGUFInfo
    from inferd.hub import HubFile, Plan

#: Folder (in the store) of per-entry link folders for split models.
LINKS_DIR = "links"

digests_equal = models.digests_equal


def store() -> Path:
    """The store folder, created private if needed."""
    return models._make_store(models.store_dir())


def verified_blob(store_: Path, sha256: str) -> Path | None:
    """The blob for ``sha256`` if present and whole; a damaged one is removed."""
    p = models.blob_path(sha256, store_)
    if not p.exists():
        return None
    if digests_equal(models.hash_file(p), sha256):
        return p
    p.unlink(missing_ok=True)
    return None


def _files(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    files = record.get("files")
    if isinstance(files, list) and files:
        return files
    return [{"path": "", "sha256": str(record.get("sha256")), "size": None}]


def shas(record: Mapping[str, Any]) -> set[str]:
    """Every blob a record uses (its parts and its projector)."""
    out = {str(f["sha256"]) for f in _files(record)}
    mmproj = record.get("mmproj")
    if isinstance(mmproj, dict):
        out.add(str(mmproj["sha256"]))
    return out


@dataclass(frozen=True, slots=True)
class Entry:
    """One named model in the store."""

    name: str
    record: Mapping[str, Any]
    store: Path

    @property
    def parts(self) -> list[Path]:
        return [models.blob_path(str(f["sha256"]), self.store) for f in _files(self.record)]

    @property
    def model_path(self) -> Path:
        """What to hand to llama.cpp: the blob, or part 1 in the entry's link folder."""
        files = _files(self.record)
        if len(files) == 1:
            return self.parts[0]
        return self.store / LINKS_DIR / str(files[0]["sha256"]) / Path(files[0]["path"]).name

    @property
    def mmproj_path(self) -> Path | None:
        m = self.record.get("mmproj")
        return models.blob_path(str(m["sha256"]), self.store) if isinstance(m, dict) else None

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.parts if p.exists())

    def present(self) -> bool:
        paths = [*self.parts, self.model_path, *filter(None, [self.mmproj_path])]
        return all(p.exists() for p in paths)

    def info(self) -> GGUFInfo:
        from inferd.gguf_meta import read_info

        return read_info(self.parts)


def hub_record(
    spec: str, plan: Plan, fetched: Sequence[tuple[str, Path]], proj: tuple[str, Path] | None
) -> dict[str, Any]:
    """The index record of a Hub pull (digests are the bytes' own sha256)."""

    def one(f: HubFile, sha: str) -> dict[str, Any]:
        return {"path": f.path, "sha256": sha, "size": f.size}

    record: dict[str, Any] = {
        "sha256": fetched[0][0],
        "source": f"hf://{plan.repo}/{plan.parts[0].path}@{plan.commit}",
        "specs": [spec],
        "repo": plan.repo,
        "revision": plan.commit,
        "quant": plan.quant,
        "files": [one(f, sha) for f, (sha, _) in zip(plan.parts, fetched, strict=True)],
    }
    if proj is not None and plan.mmproj is not None:
        record["mmproj"] = one(plan.mmproj, proj[0])
    return record


def default_name(plan: Plan) -> str:
    """``owner/repo:QUANT`` (Ollama's ``hf.co/owner/repo:QUANT`` without the host)."""
    return f"{plan.repo}:{plan.quant}" if plan.quant else f"{plan.repo}/{plan.parts[0].path}"


def _link_parts(store_: Path, record: Mapping[str, Any]) -> None:
    files = _files(record)
    if len(files) < 2:
        return
    folder = store_ / LINKS_DIR / str(files[0]["sha256"])
    folder.mkdir(mode=models.STORE_DIR_MODE, parents=True, exist_ok=True)
    for f in files:
        link = folder / Path(str(f["path"])).name
        target = os.path.join("..", "..", models.blob_path(str(f["sha256"]), store_).name)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        link.unlink(missing_ok=True)
        os.symlink(target, link)


def commit(
    store_: Path, names: Sequence[str], record: dict[str, Any], files: Sequence[tuple[str, Path]]
) -> Entry:
    """Rename staged, verified files into the store and name the entry, under the lock."""
    with models._locked_index(store_) as index:
        for sha, path in files:
            final = models.blob_path(sha, store_)
            if path == final or (not path.exists() and final.exists()):
                continue  # already in place (a concurrent pull of the same file moved it)
            os.chmod(path, models.STORE_FILE_MODE)
            os.replace(path, final)
        _link_parts(store_, record)
        same = [r for r in index.values() if isinstance(r, dict) and shas(r) == shas(record)]
        specs = [s for r in [*same, record] for s in r.get("specs", [])]
        for name in dict.fromkeys(n for n in names if n):
            index[name] = {
                **record,
                "specs": list(dict.fromkeys(specs)),
                "pulled_at": int(time.time()),
            }
    return Entry(names[0], record, store_)


def entries() -> list[Entry]:
    """Every named entry, sorted by name."""
    s = models.store_dir()
    index = models._read_index(s) if s.is_dir() else {}
    return [Entry(n, r, s) for n, r in sorted(index.items()) if isinstance(r, dict)]


def get(name: str) -> Entry:
    """The entry called ``name`` (ModelLoadError listing the names if there is none)."""
    found = {e.name: e for e in entries()}
    if name not in found:
        names = ", ".join(found) or "none; try: inferd pull hf://owner/repo"
        raise ModelLoadError(f"no model named {echo(name)} in the store; names: {names}")
    return found[name]


def aliases(entry: Entry) -> list[str]:
    """The other names of the same files."""
    mine = shas(entry.record)
    return [e.name for e in entries() if e.name != entry.name and shas(e.record) == mine]


def find_source(spec: str) -> Entry | None:
    """A stored, present entry pulled from ``spec`` (``hf://...``), if any."""
    for e in entries():
        if spec in e.record.get("specs", ()) and e.present():
            return e
    return None


def add_name(name: str, target: str) -> Entry:
    """Give entry ``target`` (a name, or a store path) one more ``name``."""
    s = store()
    with models._locked_index(s) as index:
        record = index.get(target)
        if record is None:
            sha = Path(target).name.removeprefix("sha256-").removesuffix(".gguf")
            record = next((r for r in index.values() if r.get("sha256") == sha), None)
        if record is None:
            raise ModelLoadError(f"no model {echo(target)} in the store to name {name!r}")
        index[name] = {**record, "pulled_at": int(time.time())}
    return Entry(name, record, s)


def remove(name: str) -> tuple[list[Path], list[Path]]:
    """Drop ``name``; delete its files unless another name uses them.

    Returns ``(deleted, kept)`` blob paths.
    """
    s = store()
    with models._locked_index(s) as index:
        record = index.pop(name, None)
        if not isinstance(record, dict):
            raise ModelLoadError(f"no model named {echo(name)} in the store")
        used = set().union(*(shas(r) for r in index.values() if isinstance(r, dict)))
        deleted, kept = [], []
        for sha in sorted(shas(record)):
            blob = models.blob_path(sha, s)
            if sha in used:
                kept.append(blob)
                continue
            blob.unlink(missing_ok=True)
            deleted.append(blob)
            link_dir = s / LINKS_DIR / sha
            if link_dir.is_dir():
                for link in link_dir.iterdir():
                    link.unlink()
                with contextlib.suppress(OSError):
                    link_dir.rmdir()
    return deleted, kept


def describe(e: Entry) -> dict[str, Any]:
    """The facts ``inferd models`` and ``inferd show`` print, read from the GGUF header."""
    from inferd.chat.fingerprints import detect_format, detect_thinking
    from inferd.gguf_meta import template_family

    out: dict[str, Any] = {"name": e.name, "size": e.size, "quant": e.record.get("quant")}
    try:
        info = e.info()
    except (ModelLoadError, OSError) as err:
        return {**out, "error": str(getattr(err, "message", err))}
    return {
        **out,
        "quant": out["quant"] or info.file_type or "?",
        "architecture": info.architecture or "?",
        "model_name": info.name,
        "parameters": info.parameters,
        "context_length": info.context_length,
        "template": template_family(info.chat_template),
        "tools": detect_format(info.chat_template) if info.chat_template else "-",
        "thinking": detect_thinking(info.chat_template),
    }


def human(n: float, unit: str = "") -> str:
    """``1234567`` -> ``1.2M`` (sizes and parameter counts in listings)."""
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n}{unit}"  # pragma: no cover


def entry_for_path(path: str | os.PathLike[str]) -> Entry | None:
    """The stored entry that ``path`` (as :func:`inferd.models.resolve` returned it) loads."""
    p = Path(path)
    return next((e for e in entries() if e.model_path == p), None)


def model_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes a resolved model takes on disk: every split part (not only part 1's file)."""
    entry = entry_for_path(path)
    return entry.size if entry is not None else Path(path).stat().st_size
