"""``inferd serve``: one long-lived process that owns warm backends and serves many programs.

Why a daemon: loading a model takes seconds and gigabytes; a program that runs for a
moment should borrow a warm one. The daemon listens on a Unix socket (file-system
permissions are the access control: the socket is 0600 in a 0700 directory), speaks
the NDJSON frames of :mod:`inferd.serve.wire`, and serves whatever backend it was
given (normally a :class:`~inferd.router.Router` over the configured backends).

Behaviour worth knowing:

* **One daemon per socket.** An ``flock`` on ``<socket>.lock`` decides; a socket file
  left by a crashed daemon (nobody holds the lock, nobody answers) is removed.
* **Multiplexing.** Requests on one connection run concurrently, told apart by ``id``.
* **Admission.** At most ``max_concurrent`` generations run; up to ``max_queued`` more
  wait for a slot; beyond that a request gets ``queue_full`` at once (a fast "no" beats
  an unbounded queue whose latency nobody asked for).
* **Disconnect = cancel.** When a connection reaches EOF, its generations are
  cancelled (a client that half-closes its write side has disconnected).
* **SIGTERM drains.** Stop accepting, refuse new requests with ``backend_unavailable``,
  let in-flight ones finish for up to ``drain_timeout_s``, cancel the rest with an
  error frame, exit 0.
* **Admin socket** (``admin.sock`` beside the inference socket): send any line, get one
  JSON line back: status (starting / loading with progress / ready / draining),
  capabilities, accelerator, queue depth, counters and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import math
import os
import signal
import socket
import stat
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from inferd.backend import Backend
from inferd.errors import BackendUnavailable, InferdError, InvalidRequest, NotReady, QueueFull
from inferd.serve import wire
from inferd.serve.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_LOAD_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_QUEUED,
    ConfigError,
    admin_socket_path,
    build_backends,
    default_socket_path,
    load_config,
)
from inferd.types import Capabilities, Done, EmbedRequest, EmbedResult, Event, Request

log = logging.getLogger("inferd.serve")

#: Latency samples kept for the admin percentiles (a sliding window, bounded memory).
METRICS_WINDOW = 1024
#: Pending connections the listening socket queues (asyncio's default of 100 refuses
#: bursts of clients that connect at once).
LISTEN_BACKLOG = 1024
#: How often the loading phase polls its backends for readiness.
LOAD_POLL_S = 0.05

Status = Literal["starting", "loading", "ready", "draining"]


class DaemonError(Exception):
    """The daemon cannot start (socket held by another daemon, path unusable)."""


class _Loading(Backend):
    """Stands in while the configured backends load: requests get a clear ``NotReady``."""

    name = "loading"

    def ready(self) -> bool:
        return False

    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        raise NotReady(
            "the daemon is still loading its backends; retry shortly "
            "(the admin socket shows the progress)"
        )
        yield  # pragma: no cover - makes this an async generator

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        raise NotReady("the daemon is still loading its backends; retry shortly")


#: Builds the backend in a worker thread; gets ``progress(index, fraction)``.
Loader = Callable[[Callable[[int, float], None]], Backend]


# --------------------------------------------------------------------------- metrics


def percentiles(samples: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 by nearest rank; ``None`` without samples."""
    if not samples:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(samples)
    n = len(s)

    def rank(p: float) -> float:
        return s[min(n - 1, max(0, math.ceil(p * n - 1e-9) - 1))]  # rank = ceil(p*n)

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99)}


class Metrics:
    """Counters since start and a window of TTFT / tokens-per-second samples."""

    def __init__(self, window: int = METRICS_WINDOW) -> None:
        self.requests = 0
        self.embeddings = 0
        self.tokens = 0
        self.errors = 0
        self.queue_full = 0
        self.cancelled = 0
        self.ttft_s: deque[float] = deque(maxlen=window)
        self.tokens_per_s: deque[float] = deque(maxlen=window)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "embeddings": self.embeddings,
            "tokens": self.tokens,
            "errors": self.errors,
            "queue_full": self.queue_full,
            "cancelled": self.cancelled,
            "ttft_s": percentiles(self.ttft_s),
            "tokens_per_s": percentiles(self.tokens_per_s),
        }


# --------------------------------------------------------------------------- connection


class _Connection:
    """One client connection: its writer and its in-flight requests by id."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.tasks: dict[str | int, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, frame: dict[str, Any]) -> None:
        """Write one whole frame; frames of different requests never interleave."""
        if self.closed:
            return
        data = wire.encode(frame)
        async with self._lock:
            if self.closed:
                return
            try:
                self.writer.write(data)
                await self.writer.drain()  # a slow reader slows its own generations
            except (ConnectionError, RuntimeError):
                self.closed = True

    def send_nowait(self, frame: dict[str, Any]) -> None:
        """Best-effort write without waiting (used while shutting down)."""
        if not self.closed and not self.writer.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.writer.write(wire.encode(frame))


# --------------------------------------------------------------------------- daemon


class Daemon:
    """Serve ``backend`` on a Unix socket; see the module docstring for the behaviour."""

    def __init__(
        self,
        backend: Backend | None,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_queued: int = DEFAULT_MAX_QUEUED,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
        max_frame_bytes: int = wire.MAX_FRAME_BYTES,
    ) -> None:
        if max_concurrent < 1 or max_queued < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queued >= 0")
        self.backend: Backend = backend if backend is not None else _Loading()
        self._load_fractions: dict[int, float] = {}
        self._load_count = 1
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.admin_path = admin_socket_path(self.socket_path)
        self.lock_path = self.socket_path.with_name(self.socket_path.name + ".lock")
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.drain_timeout_s = drain_timeout_s
        self.load_timeout_s = load_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.metrics = Metrics()
        self.status: Status = "starting"
        self.started_at = time.time()
        self._slots: asyncio.Semaphore | None = None
        self._admitted = 0  # running + waiting
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._admin: asyncio.AbstractServer | None = None
        self._lock_fd: int | None = None
        self._shutting_down = False

    # ------------------------------------------------------------------ lifecycle

    def _claim_socket(self) -> None:
        """Take the per-socket lock, make the 0700 directory, remove a stale socket."""
        d = self.socket_path.parent
        if not d.exists():
            try:
                d.mkdir(mode=0o700, parents=True)
            except OSError as e:
                raise DaemonError(f"cannot create socket directory {d}: {e}") from None
        elif d == default_socket_path().parent:
            # a shared /tmp lets anyone pre-create our directory: use it only if it is ours
            if d.stat().st_uid != os.getuid():
                raise DaemonError(
                    f"socket directory {d} belongs to another user; remove it or pass --socket"
                )
            os.chmod(d, 0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(
                f"another inferd daemon is already serving {self.socket_path}; stop it "
                "first or pass a different --socket"
            ) from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        for path in (self.socket_path, self.admin_path):
            if not os.path.lexists(path):
                continue
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                self._release_lock()
                raise DaemonError(
                    f"{path} exists and is not a socket; remove it or choose another --socket"
                )
            if _socket_alive(path):
                self._release_lock()
                raise DaemonError(f"another process is listening on {path}; stop it first")
            log.info("removing stale socket %s", path)
            path.unlink()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    async def start(self) -> None:
        """Bind both sockets (admin first, so loading can be watched), then load."""
        self._claim_socket()
        self._slots = asyncio.Semaphore(self.max_concurrent)
        old = os.umask(0o177)  # sockets are born 0600: no window where others may connect
        try:
            self._admin = await asyncio.start_unix_server(self._serve_admin, self.admin_path)
            self._server = await asyncio.start_unix_server(
                self._serve_client, self.socket_path, backlog=LISTEN_BACKLOG
            )
        except OSError as e:
            self._release_lock()
            raise DaemonError(f"cannot listen on {self.socket_path}: {e}") from None
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        os.chmod(self.admin_path, 0o600)
        log.info("listening on %s (admin %s)", self.socket_path, self.admin_path)

    async def wait_loaded(self) -> None:
        """Report ``loading`` until the backend is ready (or the load timeout passes)."""
        self.status = "loading"
        deadline = time.monotonic() + self.load_timeout_s
        while not self.backend.ready() and time.monotonic() < deadline and not self._shutting_down:
            await asyncio.sleep(LOAD_POLL_S)
        if not self._shutting_down:
            self.status = "ready"
            if not self.backend.ready():
                log.warning("backend not ready after %.0fs; serving anyway", self.load_timeout_s)

    def _report_progress(self, index: int, fraction: float) -> None:
        """Called from the loading thread; a float store is atomic enough for a gauge."""
        self._load_fractions[index] = max(0.0, min(1.0, float(fraction)))

    def load_progress(self) -> float:
        """Fraction loaded: per-backend progress while constructing, then readiness."""
        if isinstance(self.backend, _Loading):
            return sum(self._load_fractions.values()) / max(1, self._load_count)
        backends = list(getattr(self.backend, "backends", (self.backend,)))
        return sum(1.0 for b in backends if b.ready()) / len(backends)

    async def _load(self, loader: Loader, count: int, stop: asyncio.Event) -> bool:
        """Build the backend in a thread while the sockets answer; False if stopped first."""
        self.status = "loading"
        self._load_count = max(1, count)
        job = asyncio.ensure_future(asyncio.to_thread(loader, self._report_progress))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not job.done():  # SIGTERM while loading: the thread finishes on its own
            job.add_done_callback(lambda j: j.exception())
            return False
        try:
            self.backend = job.result()
        except Exception as e:
            msg = getattr(e, "message", None) or str(e)
            raise DaemonError(f"loading the backends failed: {type(e).__name__}: {msg}") from e
        return True

    async def run(self, loader: Loader | None = None, backend_count: int = 1) -> int:
        """Start, (load,) serve until SIGTERM/SIGINT, drain, clean up. Returns 0.

        With a ``loader`` the sockets come up first and the admin socket reports
        ``loading`` with progress while it runs in a worker thread.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            if loader is None or await self._load(loader, backend_count, stop):
                waiter = asyncio.create_task(self.wait_loaded())
                await stop.wait()
                waiter.cancel()
            await self.drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.close()
        return 0

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), cancel the rest."""
        self.status = "draining"
        log.info("draining: %d request(s) in flight", len(self._tasks))
        if self._server is not None:
            self._server.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_timeout_s)
            if pending:
                log.warning(
                    "drain timeout (%.1fs): cancelling %d request(s)",
                    self.drain_timeout_s,
                    len(pending),
                )
                self._shutting_down = True
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=5.0)
        self._shutting_down = True

    async def close(self) -> None:
        """Close connections and sockets, close the backend, remove the socket files."""
        self._shutting_down = True
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        for conn in list(self._conns):
            conn.closed = True
            conn.writer.close()
        for server in (self._server, self._admin):
            if server is not None:
                server.close()
        with contextlib.suppress(Exception):
            await self.backend.aclose()
        for path in (self.socket_path, self.admin_path):
            with contextlib.suppress(OSError):
                path.unlink()
        self._release_lock()

    # ------------------------------------------------------------------ admin

    def status_dict(self) -> dict[str, Any]:
        caps = self.backend.capabilities()
        out: dict[str, Any] = {
            "status": self.status,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "socket": str(self.socket_path),
            "ready": self.backend.ready(),
            "capabilities": caps.to_dict(),
            "accelerator": caps.accelerator.to_dict() if caps.accelerator else None,
            "queue": {
                "running": self._running,
                "queued": self._admitted - self._running,
                "max_concurrent": self.max_concurrent,
                "max_queued": self.max_queued,
            },
            "connections": len(self._conns),
            "counters": self.metrics.to_dict(),
        }
        if self.status == "loading":
            out["progress"] = round(self.load_progress(), 3)
        status = getattr(self.backend, "status", None)
        if callable(status):
            out["backends"] = status()
        return out

    async def _serve_admin(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while await reader.readline():
                writer.write(wire.encode(self.status_dict()))
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    # ------------------------------------------------------------------ clients

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = _Connection(writer)
        self._conns.add(conn)
        try:
            async for item in wire.FrameReader(reader, self.max_frame_bytes):
                if isinstance(item, wire.FrameTooLarge):
                    await conn.send(wire.error_frame(None, wire.FRAME_TOO_LARGE, item.message))
                    continue
                await self._dispatch(conn, item)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            # EOF or a broken connection: its generations are cancelled, not orphaned.
            conn.closed = True
            tasks = list(conn.tasks.values())
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            self._conns.discard(conn)
            writer.close()

    async def _dispatch(self, conn: _Connection, raw: bytes) -> None:
        try:
            frame = wire.decode(raw)
        except wire.FrameError as e:
            await conn.send(wire.error_frame(None, wire.INVALID_REQUEST, e.message))
            return
        rid = frame.get("id")
        kind = frame.get("type", "generate")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            await conn.send(
                wire.error_frame(
                    None,
                    wire.INVALID_REQUEST,
                    f"malformed frame: 'id' must be a string or an integer, got {rid!r:.80}",
                )
            )
            return
        if kind == "cancel":
            task = conn.tasks.pop(rid, None)
            if task is not None:
                task.cancel()
            return
        if kind == "capabilities":
            await conn.send(
                {
                    "type": "capabilities",
                    "id": rid,
                    "capabilities": self.backend.capabilities().to_dict(),
                    "ready": self.backend.ready() and self.status != "draining",
                }
            )
            return
        if kind not in ("generate", "embed"):
            await conn.send(
                wire.error_frame(
                    rid,
                    wire.INVALID_REQUEST,
                    f"unknown frame type {kind!r}; expected generate, embed, cancel or "
                    "capabilities",
                )
            )
            return
        if rid in conn.tasks:
            await conn.send(
                wire.error_frame(
                    rid,
                    wire.INVALID_REQUEST,
                    f"id {rid!r} is already in flight on this connection; ids must be unique",
                )
            )
            return
        try:
            parsed: Request | EmbedRequest = (
                Request.from_dict(wire.frame_body(frame))
                if kind == "generate"
                else EmbedRequest.from_dict(wire.frame_body(frame))
            )
            self._admit()
        except InferdError as e:
            if isinstance(e, QueueFull):
                self.metrics.queue_full += 1
            else:
                self.metrics.errors += 1
            await conn.send(wire.error_frame_for(rid, e))
            return
        except (TypeError, ValueError, KeyError) as e:
            self.metrics.errors += 1
            await conn.send(
                wire.error_frame(rid, wire.INVALID_REQUEST, f"malformed {kind} frame: {e}")
            )
            return
        coro = (
            self._run_generate(conn, rid, parsed)
            if isinstance(parsed, Request)
            else self._run_embed(conn, rid, parsed)
        )
        task = asyncio.create_task(coro)
        conn.tasks[rid] = task
        self._tasks.add(task)

        def _done(t: asyncio.Task[None], rid: str | int = rid) -> None:
            self._tasks.discard(t)
            self._admitted -= 1
            if conn.tasks.get(rid) is t:
                del conn.tasks[rid]

        task.add_done_callback(_done)

    def _admit(self) -> None:
        """Admission, decided synchronously at frame arrival so bursts are counted exactly."""
        if self.status == "draining" or self._shutting_down:
            raise BackendUnavailable(
                "the daemon is draining (shutting down); retry after "
                "it restarts or on another daemon"
            )
        if self._admitted >= self.max_concurrent + self.max_queued:
            raise QueueFull(
                f"queue full: {self.max_concurrent} running and {self.max_queued} queued "
                "(max_concurrent, max_queued); retry later"
            )
        self._admitted += 1

    async def _slot(self) -> None:
        assert self._slots is not None
        await self._slots.acquire()
        self._running += 1

    def _free_slot(self) -> None:
        assert self._slots is not None
        self._running -= 1
        self._slots.release()

    async def _run_generate(self, conn: _Connection, rid: str | int, request: Request) -> None:
        self.metrics.requests += 1
        try:
            await self._slot()
        except asyncio.CancelledError:
            self._on_cancel(conn, rid)
            raise
        start = time.perf_counter()
        first: float | None = None
        stream = self.backend.generate(request)
        try:
            async for event in stream:
                if first is None:
                    first = time.perf_counter()
                    self.metrics.ttft_s.append(first - start)
                if isinstance(event, Done):
                    self.metrics.tokens += event.usage.output_tokens
                    if event.timings.tokens_per_s:
                        self.metrics.tokens_per_s.append(event.timings.tokens_per_s)
                await conn.send(wire.event_frame(rid, event))
        except asyncio.CancelledError:
            self._on_cancel(conn, rid)
            raise
        except Exception as e:  # every failure becomes exactly one error frame
            self.metrics.errors += 1
            if not isinstance(e, InferdError):
                log.exception("request %r failed with an unexpected error", rid)
            await conn.send(wire.error_frame_for(rid, e))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            self._free_slot()

    async def _run_embed(self, conn: _Connection, rid: str | int, request: EmbedRequest) -> None:
        self.metrics.embeddings += 1
        try:
            await self._slot()
        except asyncio.CancelledError:
            self._on_cancel(conn, rid)
            raise
        try:
            result = await self.backend.embed(request)
            await conn.send({"type": "embedding", "id": rid, **result.to_dict()})
        except asyncio.CancelledError:
            self._on_cancel(conn, rid)
            raise
        except Exception as e:
            self.metrics.errors += 1
            await conn.send(wire.error_frame_for(rid, e))
        finally:
            self._free_slot()

    def _on_cancel(self, conn: _Connection, rid: str | int) -> None:
        self.metrics.cancelled += 1
        if self._shutting_down:  # the client is still there: tell it, don't leave it hanging
            conn.send_nowait(
                wire.error_frame(
                    rid,
                    wire.BACKEND_UNAVAILABLE,
                    f"the daemon shut down before the request finished (drain timeout "
                    f"{self.drain_timeout_s:g}s)",
                )
            )


def _socket_alive(path: Path) -> bool:
    """True when something accepts connections on the Unix socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
    except OSError:
        return False
    else:
        return True
    finally:
        s.close()


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``inferd serve`` options (the lead's CLI calls this, then :func:`run_args`)."""
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG_PATH), help="TOML config file (default: %(default)s)"
    )
    parser.add_argument(
        "--socket",
        default=None,
        help="socket path (default: config, else $XDG_RUNTIME_DIR/inferd/infer.sock)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help=f"generations running at once (default {DEFAULT_MAX_CONCURRENT})",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=None,
        help=f"generations waiting for a slot (default {DEFAULT_MAX_QUEUED})",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help=f"seconds to finish in-flight requests on SIGTERM "
        f"(default {DEFAULT_DRAIN_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--load-timeout",
        type=float,
        default=None,
        help=f"seconds to wait for backends to load (default {DEFAULT_LOAD_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--max-frame-bytes",
        type=int,
        default=wire.MAX_FRAME_BYTES,
        help="largest request frame accepted (default 64 MiB)",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


async def serve_main(args: argparse.Namespace) -> int:
    """Build the router from the config and run the daemon until SIGTERM."""
    from inferd.router import Router

    cfg = load_config(args.config)

    def loader(progress: Callable[[int, float], None]) -> Backend:
        return Router(build_backends(cfg, progress), **cfg.router)

    daemon = Daemon(
        None,
        args.socket or cfg.socket,
        max_concurrent=args.max_concurrent or cfg.max_concurrent,
        max_queued=args.max_queued if args.max_queued is not None else cfg.max_queued,
        drain_timeout_s=(
            args.drain_timeout if args.drain_timeout is not None else cfg.drain_timeout_s
        ),
        load_timeout_s=(args.load_timeout if args.load_timeout is not None else cfg.load_timeout_s),
        max_frame_bytes=args.max_frame_bytes,
    )
    return await daemon.run(loader, len(cfg.backends))


def run_args(args: argparse.Namespace) -> int:
    """Run ``inferd serve`` from parsed arguments; one clear line and 1 on failure."""
    logging.basicConfig(
        level=str(args.log_level).upper(), format="inferd serve: %(levelname)s %(message)s"
    )
    try:
        return asyncio.run(serve_main(args))
    except (ConfigError, DaemonError, InvalidRequest, ValueError) as e:
        print(f"inferd serve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m inferd.serve.daemon`` / ``inferd serve``."""
    parser = argparse.ArgumentParser(prog="inferd serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
