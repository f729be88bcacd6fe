"""``inferd rpc-worker``: serve this host's devices to a head that splits a model.

The worker is ggml's own RPC server (``ggml_backend_rpc_start_server``) from the
compiled core this inferd was built with, so head and worker speak the same RPC
protocol version by construction; a head built from another ggml is refused at load
with a clear error (the head's probe, :mod:`inferd.backends.llamacpp.rpc_probe`).

Why a supervised child process: ggml's server loop never returns and cannot be told to
stop, and it runs with the GIL released. The command validates its flags, starts the
server in a child process and waits; SIGINT or SIGTERM end the child
(SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`) and the command exits 0.

The RPC protocol has no authentication: a client may allocate and write memory on the
worker's devices and run graphs there. The worker binds 127.0.0.1 by default and
refuses any other address without ``--allow-remote``; put it on a private network only
(docs/adr/0019-rpc-backend.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from inferd.backends.llamacpp.rpc_probe import check_bind_host
from inferd.errors import InvalidRequest

#: ggml's conventional RPC port (llama.cpp's rpc-server uses it too).
DEFAULT_PORT = 50052
DEFAULT_HOST = "127.0.0.1"
#: Seconds the server child gets to exit after SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0
_POLL_S = 0.2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help="IPv4 address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default 50052)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument(
        "--device",
        default=None,
        help="comma-separated ggml device names to serve (default: the GPUs, else the CPU)",
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="keep tensors a head sent in DIR, so a reload sends only their hashes",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="listen on an address other machines can reach (no authentication: private "
        "networks only)",
    )


def worker_config(args: argparse.Namespace) -> dict[str, object]:
    """The child's settings from the flags; ``InvalidRequest`` names a bad one."""
    host = check_bind_host(args.host, args.allow_remote)
    if isinstance(args.port, bool) or not 0 < args.port < 65536:
        raise InvalidRequest(f"--port {args.port} must be 1..65535")
    threads = args.threads if args.threads is not None else (os.cpu_count() or 1)
    if threads < 1:
        raise InvalidRequest(f"--threads {threads} must be >= 1")
    cache = None
    if args.cache is not None:
        cache = str(Path(args.cache).expanduser().resolve())
        Path(cache).mkdir(parents=True, exist_ok=True)
    devices = [d.strip() for d in args.device.split(",") if d.strip()] if args.device else None
    return {
        "endpoint": f"{host}:{args.port}",
        "cache_dir": cache,
        "n_threads": threads,
        "devices": devices,
    }


def _child_main(config_json: str) -> int:
    """The server process: ggml's accept loop until the process ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    # ggml's warnings and errors (a refused client's reason) go to stderr
    logging.basicConfig(level=logging.WARNING, format="inferd rpc-worker: %(message)s")
    from inferd._fast import _llama

    cfg = json.loads(config_json)
    try:
        _llama.rpc_serve(cfg["endpoint"], cfg["cache_dir"], int(cfg["n_threads"]), cfg["devices"])
    except (OSError, ValueError) as e:
        sys.stderr.write(f"inferd rpc-worker: {e}\n")
        return 1
    return 1  # rpc_serve returns only by raising


def supervise(config: dict[str, object]) -> int:
    """Run the server child until it exits or a signal asks us to stop."""
    code = "import sys, inferd.rpc_worker as w; sys.exit(w._child_main(sys.argv[1]))"
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps(config)])
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        if child.poll() is None:
            child.terminate()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline: float | None = None
    try:
        while True:
            try:
                rc = child.wait(timeout=_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if stopping and deadline is None:
                    deadline = time.monotonic() + STOP_GRACE_S
                if deadline is not None and time.monotonic() > deadline:
                    child.kill()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if child.poll() is None:
            child.kill()
            child.wait()
    return 0 if stopping else (rc or 1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="inferd rpc-worker",
        description="Serve this host's devices to an inferd head over ggml RPC "
        "(docs/adr/0019-rpc-backend.md). No authentication: private networks only.",
    )
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        config = worker_config(args)
    except (InvalidRequest, OSError) as e:
        sys.stderr.write(f"inferd rpc-worker: error: {getattr(e, 'message', None) or e}\n")
        return 2
    if args.host != DEFAULT_HOST:
        sys.stderr.write(
            f"inferd rpc-worker: listening on {args.host}: anyone who can reach this port "
            "controls the worker's devices; keep it on a private network\n"
        )
    return supervise(config)


if __name__ == "__main__":
    sys.exit(main())
