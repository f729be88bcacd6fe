"""Build llama.cpp's own tools (``llama-bench``, ``llama-server``, ``rpc-server``,
``llama-mtmd-cli``) from the vendored tree.

Why: every benchmark claim is a ratio against a peer measured on the same machine and
the same llama.cpp; and the OpenAI-compatible backend's integration tests need a real
upstream. Both come from the exact source our binding links (vendor/README.md), built
once into ``build/peers`` (git-ignored) and reused.

    python -m bench.peers build          # build (or reuse) and print the paths
    python bench/peers.py build llama-server

    from bench.peers import ensure_peer
    server = ensure_peer("llama-server")  # -> Path of the executable

``CMAKE_ARGS`` passes through (``-DGGML_CUDA=on`` for a CUDA build); ``INFERD_PEERS_DIR``
moves the build folder; ``INFERD_PEERS_JOBS`` sets the parallelism (default 2).

The tools are built with ggml's RPC backend (``-DGGML_RPC=ON``): ``rpc-server`` is the
interoperability peer of ``inferd rpc-worker`` and ``llama-server --rpc`` the peer of a
split model (docs/adr/0019-rpc-backend.md). ``llama-mtmd-cli`` is the differential peer of
images and audio through libmtmd (issue 16; llama-server already links mtmd). A tree
configured before that is reconfigured once, and the tools already in it are rebuilt, when
an RPC peer is asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR_CMAKE = ROOT / "vendor" / "llama.cmake"
PEERS = ("llama-bench", "llama-server", "rpc-server", "llama-mtmd-cli")
#: Peers that must come from a tree configured with GGML_RPC=ON.
RPC_PEERS = ("rpc-server",)
#: CMake target (and executable name) of a peer whose name differs from it.
_TARGETS = {"rpc-server": "ggml-rpc-server"}


def build_dir() -> Path:
    return Path(os.environ.get("INFERD_PEERS_DIR") or ROOT / "build" / "peers")


def source_dir() -> Path:
    """The llama.cpp tree: ``INFERD_LLAMA_CPP_DIR`` or the pinned, verified vendor copy."""
    override = os.environ.get("INFERD_LLAMA_CPP_DIR")
    if override:
        return Path(override)
    src = ROOT / "vendor" / "llama.cpp"
    # The CMake glue owns download + sha256 check + extraction; reuse it in script mode.
    subprocess.run(
        ["cmake", f"-DPython_EXECUTABLE={sys.executable}", "-P", str(VENDOR_CMAKE)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return src


def peer_path(name: str) -> Path:
    return build_dir() / "bin" / _TARGETS.get(name, name)


def build(
    names: tuple[str, ...] = PEERS,
    *,
    jobs: int | None = None,
    quiet: bool = False,
    rpc: bool = False,
) -> dict[str, Path]:
    """Configure (once) and build ``names``; return their paths. Reuses what exists.

    ``rpc`` (implied by ``rpc-server``): the tools must speak ggml RPC (``--rpc``); a tree
    configured without it is reconfigured and its tools rebuilt, under the lock."""
    for n in names:
        if n not in PEERS:
            raise ValueError(f"unknown peer {n!r}; choose from {PEERS}")
    rpc = rpc or any(n in RPC_PEERS for n in names)
    if any(not peer_path(n).is_file() for n in names) or (rpc and not rpc_enabled()):
        with _build_lock():  # another process building the same tree: wait for it
            if rpc and not rpc_enabled():
                names = tuple(dict.fromkeys((*names, *_enable_rpc(quiet))))
            _build_missing(names, jobs, quiet)
    missing = [n for n in names if not peer_path(n).is_file()]
    if missing:
        raise RuntimeError(f"build finished but {missing} are not in {build_dir() / 'bin'}")
    return {n: peer_path(n) for n in names}


def rpc_enabled() -> bool:
    """True when the peers' tree is configured with GGML_RPC=ON."""
    cache = build_dir() / "CMakeCache.txt"
    return cache.is_file() and "GGML_RPC:BOOL=ON" in cache.read_text(errors="replace")


def _enable_rpc(quiet: bool) -> tuple[str, ...]:
    """Turn GGML_RPC on in an existing tree. The tools built without it are removed, and
    returned, so that the build rebuilds them too (a running one keeps its unlinked file)."""
    out = build_dir()
    if not (out / "CMakeCache.txt").exists():
        return ()  # the first configure passes -DGGML_RPC=ON
    _run(["cmake", "-S", str(source_dir()), "-B", str(out), "-DGGML_RPC=ON"], quiet)
    built = tuple(n for n in PEERS if peer_path(n).is_file())
    for n in built:
        peer_path(n).unlink()
    return built


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """An exclusive lock on the build folder: two benchmarks or tests that both find a peer
    missing build it once, one after the other, instead of racing in one CMake tree."""
    build_dir().mkdir(parents=True, exist_ok=True)
    with open(build_dir() / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_missing(names: tuple[str, ...], jobs: int | None, quiet: bool) -> None:
    todo = [n for n in names if not peer_path(n).is_file()]  # re-read under the lock
    if todo:
        src, out = source_dir(), build_dir()
        jobs = jobs or int(os.environ.get("INFERD_PEERS_JOBS", "2"))
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        if not (out / "CMakeCache.txt").exists():
            args = [
                "cmake",
                "-S",
                str(src),
                "-B",
                str(out),
                *gen,
                "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_COMMON=ON",
                "-DLLAMA_BUILD_TOOLS=ON",
                "-DLLAMA_BUILD_SERVER=ON",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_APP=OFF",
                "-DLLAMA_BUILD_UI=OFF",
                "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DGGML_RPC=ON",
                f"-DGGML_CCACHE={'ON' if shutil.which('ccache') else 'OFF'}",
                *shlex.split(os.environ.get("CMAKE_ARGS", "")),
            ]
            _run(args, quiet)
        t0 = time.perf_counter()
        targets = [_TARGETS.get(n, n) for n in todo]
        _run(["cmake", "--build", str(out), "--target", *targets, "-j", str(jobs)], quiet)
        if not quiet:
            print(f"built {', '.join(todo)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def _run(args: list[str], quiet: bool) -> None:
    p = subprocess.run(args, capture_output=quiet, text=True)
    if p.returncode != 0:
        tail = (p.stderr or "")[-3000:] if quiet else ""
        raise RuntimeError(f"command failed ({p.returncode}): {shlex.join(args)}\n{tail}")


def ensure_peer(name: str, *, quiet: bool = True, rpc: bool = False) -> Path:
    """Path of peer ``name`` (``llama-server``, ``llama-bench``, ``rpc-server`` or
    ``llama-mtmd-cli``), building it if needed; ``rpc``: built with ggml RPC
    (``llama-server --rpc``)."""
    return build((name,), quiet=quiet, rpc=rpc)[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    ap.add_argument("command", nargs="?", default="build", choices=["build", "path"])
    ap.add_argument("names", nargs="*", default=list(PEERS))
    ap.add_argument("-j", "--jobs", type=int, default=None)
    a = ap.parse_args(argv)
    if a.command == "path":
        for n in a.names:
            print(peer_path(n))
        return 0
    for n, p in build(tuple(a.names), jobs=a.jobs).items():
        print(f"{n}\t{p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
