"""Find, check and (optionally) verify a GGUF file before libllama sees it.

Why check in Python first: libllama trusts its input. A file that is not GGUF, or whose
header lies about its sizes, should fail here with a :class:`ModelLoadError` that says
what is wrong, never reach C code that might read past a buffer. We walk the whole GGUF
header (metadata and tensor table) with bounds checks against the real file size, so a
truncated or hostile header is caught without allocating what it claims (the walk
lives in :mod:`inferd.gguf`, shared with the model store); tensor data beyond the end
of the file is caught by libllama's own bounds check, whose reason we forward in the
error.

With ``sha256=`` the file is copied into a private temporary directory while it is
hashed, compared in constant time, and loaded from that copy: the bytes that were
verified are the bytes that load, even if the original is swapped in between. The copy
is removed by :meth:`ModelFile.cleanup` (the backend calls it on close).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferd.errors import ModelLoadError
from inferd.gguf import GGUFHeader, copy_hashing, read_header

if TYPE_CHECKING:
    from inferd.backends.llamacpp.options import LlamaCppOptions
    from inferd.types import RpcDevice

__all__ = [
    "GGUFHeader",
    "ModelFile",
    "check_path",
    "load_model",
    "prepare",
    "prepared",
    "read_header",
]


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
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fout:
        return copy_hashing([lambda: open(src, "rb")], fout, durable=False)


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


def load_model(L: Any, path: str | os.PathLike[str], opts: LlamaCppOptions) -> Any:
    """``L.Model`` of a checked file with ``opts``' device settings.

    With ``rpc_servers`` every worker is probed first (version and devices,
    :mod:`.rpc_probe`), because ggml aborts the process on an unreachable worker; an
    ``n_gpu_layers`` of 0 then means every layer (the workers would hold nothing
    otherwise). Run in a process that may die: a worker lost later still aborts it
    (docs/adr/0019-rpc-backend.md)."""
    kwargs: dict[str, Any] = {}
    layers = opts.n_gpu_layers
    if opts.rpc_servers:
        from inferd.backends.llamacpp.rpc_probe import probe_all

        probe_all(opts.rpc_servers)
        kwargs["rpc_servers"] = opts.rpc_servers
        layers = layers or -1
    if opts.tensor_split:
        kwargs["tensor_split"] = opts.tensor_split
    if opts.split_mode != "layer" or opts.main_gpu or opts.use_mlock:  # ADR 0026
        kwargs.update(split_mode=opts.split_mode, main_gpu=opts.main_gpu, use_mlock=opts.use_mlock)
    return L.Model(
        str(path), n_gpu_layers=layers, use_mmap=opts.use_mmap, progress=opts.progress, **kwargs
    )


def load_lora(L: Any, model: Any, ctx: Any, opts: LlamaCppOptions) -> tuple[Any, ...]:
    """Load ``opts.lora``'s adapters for ``model`` and apply them to ``ctx`` at their
    scales. Each file is checked as a GGUF first (a missing or non-GGUF file gets a
    ModelLoadError naming it); what libllama refuses (not a LoRA, another architecture,
    shapes that do not fit) comes back as ModelLoadError naming the file too
    (docs/adr/0026-grammar-fast-path-and-context-knobs.md)."""
    adapters = []
    for path, _scale in opts.lora:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelLoadError(f"LoRA adapter file {p} does not exist or is not a file")
        try:
            read_header(p)
        except ModelLoadError as e:
            raise ModelLoadError(f"LoRA adapter {p}: {e}") from None
        adapters.append(L.LoraAdapter(model, str(p)))
    if adapters:
        L.set_lora(ctx, adapters, [scale for _path, scale in opts.lora])
    return tuple(adapters)


def request_lora_scales(request_lora: Any, opts: LlamaCppOptions) -> tuple[float, ...] | None:
    """A request's LoRA scale set: one scale per adapter loaded at start, in load order
    (None: the model has no adapters and the request asks for none). Without ``lora``
    the model's own scales; with it, llama-server's rule: the adapters it names (by
    index or by the path they were loaded from) at its scales, every other one off
    (0.0). Sequences of different sets never share a decode (:mod:`.lora_groups`,
    docs/adr/0026-grammar-fast-path-and-context-knobs.md). ``InvalidRequest`` naming
    ``lora`` for an adapter that is not loaded, or any on a model without adapters;
    the scales' range is checked when the Request is built (``MAX_LORA_SCALE``)."""
    start = tuple(scale for _p, scale in opts.lora)
    if request_lora is None:
        return start or None
    from inferd.errors import InvalidRequest
    from inferd.limits import echo

    by_path = {p: i for i, (p, _s) in enumerate(opts.lora)}
    wanted = [0.0] * len(start)
    for key, scale in request_lora.items():
        idx = key if isinstance(key, int) else by_path.get(key)
        if idx is None or not 0 <= idx < len(start):
            raise InvalidRequest(
                f"lora: no adapter {echo(key)} is loaded (this model has {len(start)}; "
                "give an index or the path it was loaded from)"
            )
        wanted[idx] = float(scale)
    return tuple(wanted) or None


def request_lora_check(request_lora: Any, opts: LlamaCppOptions) -> None:
    """(pre-stream) ``InvalidRequest`` naming ``lora`` when :func:`request_lora_scales`
    refuses the request's override."""
    request_lora_scales(request_lora, opts)


def rpc_devices(L: Any, servers: tuple[str, ...]) -> tuple[RpcDevice, ...]:
    """The remote devices of a loaded split, with memory from each worker
    (``ggml_backend_rpc_get_device_memory`` over the model's own connections)."""
    from inferd.types import RpcDevice

    return tuple(
        RpcDevice(d["endpoint"], d["name"], d["memory_total"], d["memory_free"])
        for s in servers
        for d in L.rpc_devices(s)
    )
