"""Build llama.cpp's own tools (``llama-bench``, ``llama-server``) from the vendored tree.

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
PEERS = ("llama-bench", "llama-server")


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
    return build_dir() / "bin" / name


def build(
    names: tuple[str, ...] = PEERS, *, jobs: int | None = None, quiet: bool = False
) -> dict[str, Path]:
    """Configure (once) and build ``names``; return their paths. Reuses what exists."""
    for n in names:
        if n not in PEERS:
            raise ValueError(f"unknown peer {n!r}; choose from {PEERS}")
    if any(not peer_path(n).is_file() for n in names):
        with _build_lock():  # another process building the same tree: wait for it
            _build_missing(names, jobs, quiet)
    missing = [n for n in names if not peer_path(n).is_file()]
    if missing:
        raise RuntimeError(f"build finished but {missing} are not in {build_dir() / 'bin'}")
    return {n: peer_path(n) for n in names}


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
                f"-DGGML_CCACHE={'ON' if shutil.which('ccache') else 'OFF'}",
                *shlex.split(os.environ.get("CMAKE_ARGS", "")),
            ]
            _run(args, quiet)
        t0 = time.perf_counter()
        _run(["cmake", "--build", str(out), "--target", *todo, "-j", str(jobs)], quiet)
        if not quiet:
            print(f"built {', '.join(todo)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def _run(args: list[str], quiet: bool) -> None:
    p = subprocess.run(args, capture_output=quiet, text=True)
    if p.returncode != 0:
        tail = (p.stderr or "")[-3000:] if quiet else ""
        raise RuntimeError(f"command failed ({p.returncode}): {shlex.join(args)}\n{tail}")


def ensure_peer(name: str, *, quiet: bool = True) -> Path:
    """Path of peer ``name`` (``llama-server`` or ``llama-bench``), building it if needed."""
    return build((name,), quiet=quiet)[name]


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
