"""``inferd serve``: one long-lived process that owns warm backends and serves many programs.

Why a daemon: loading a model takes seconds and gigabytes; a program that runs for a
moment should borrow a warm one. The daemon listens on a Unix socket (file-system
permissions are the access control: the socket is 0600 in a 0700 directory), speaks
the NDJSON frames of :mod:`inferd.serve.wire`, and serves whatever backend it was
given (normally a :class:`~inferd.router.Router` over the configured backends).

Behaviour worth knowing (ADR 0005; the limits and their defaults: ADR 0010):

* **One daemon per socket.** An ``flock`` on ``<socket>.lock`` decides; a socket file
  left by a crashed daemon (nobody holds the lock, nobody answers) is removed.
* **Multiplexing.** Requests on one connection run concurrently, told apart by ``id``.
* **Admission** (:mod:`inferd.serve.admission`). At most ``max_concurrent``
  generations run; up to ``max_queued`` more wait for a slot, at most
  ``max_queued_per_connection`` of them from one connection; beyond that a request
  gets ``queue_full`` at once.
* **Hostile clients.** Connections beyond ``max_connections`` get an error frame and
  are closed; unfinished frames share ``max_buffered_bytes``; a frame must reach its
  newline within ``frame_timeout_s`` or the connection is closed; frames are bounded
  in bytes, elements and depth before they are walked; a stream whose reader takes
  nothing for ``write_stall_timeout_s`` is cancelled and its slot freed; a reply over
  ``max_reply_bytes`` becomes an error frame for that request alone.
* **Disconnect = cancel.** When a connection reaches EOF, its generations are
  cancelled (a client that half-closes its write side has disconnected).
* **SIGTERM drains.** Stop accepting, refuse new requests with ``backend_unavailable``,
  let in-flight ones finish for up to ``drain_timeout_s``, cancel the rest with an
  error frame, close the connections quietly, exit 0.
* **Admin socket** (``admin.sock`` beside the inference socket): send any line, get one
  JSON line back: status (starting / loading with progress / ready / draining),
  capabilities, accelerator, queue depth, limits, counters and latency percentiles
  (:mod:`inferd.serve.metrics`).
* **Several models.** With ``[[model]]`` tables the daemon serves a
  :class:`~inferd.serve.models_pool.ModelPool`: the request's ``model`` picks one,
  loaded on first use and unloaded when idle; the admin status gains ``pool``
  (docs/adr/0015-several-models-load-on-demand.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from inferd import tracing
from inferd.backend import Backend
from inferd.errors import InferdError, InvalidRequest, NotReady, QueueFull
from inferd.limits import echo
from inferd.serve import token_wire, wire
from inferd.serve.admission import Admission, ByteBudget, Limits, Ticket
from inferd.serve.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_LOAD_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_QUEUED,
    ConfigError,
    add_llamacpp_arguments,
    add_router_arguments,
    admin_socket_path,
    build_backends,
    default_socket_path,
    llamacpp_overrides,
    load_config,
    override_llamacpp,
    override_router,
    override_rpc,
    router_overrides,
)
from inferd.serve.metrics import METRICS_WINDOW, Metrics, percentiles
from inferd.serve.observed import ObservedBackend
from inferd.serve.prometheus import Telemetry
from inferd.types import (
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    RerankRequest,
    RerankResult,
)

log = logging.getLogger("inferd.serve")

__all__ = ["METRICS_WINDOW", "Daemon", "DaemonError", "Limits", "Metrics", "percentiles"]

#: Pending connections the listening socket queues (asyncio's default of 100 refuses
#: bursts of clients that connect at once).
LISTEN_BACKLOG = 1024
#: Address ``--metrics-port`` binds: loopback, like the bridge (no TLS, no key).
DEFAULT_METRICS_HOST = "127.0.0.1"
#: How often the loading phase polls its backends for readiness.
LOAD_POLL_S = 0.05
#: Frames at least this large are parsed in a worker thread, one at a time, so their
#: Python-level checks (depth, request mapping) do not hold the event loop and only one
#: frame's parsed objects exist at once (ADR 0010).
THREAD_PARSE_BYTES = 1024 * 1024
#: Seconds shutdown and a closing connection wait for cancelled requests to end.
CLOSE_WAIT_S = 5.0

Status = Literal["starting", "loading", "ready", "draining"]
#: What one admitted request frame asks the backend for.
Work = Request | EmbedRequest | token_wire.Call


class DaemonError(Exception):
    """The daemon cannot start (socket held by another daemon, path unusable)."""


class WriteStalled(Exception):
    """The peer took no bytes for ``write_stall_timeout_s``; the request is cancelled."""


class ReplyTooLarge(wire.FrameTooLarge):
    """A reply frame would pass ``max_reply_bytes``; that request gets an error instead."""


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

    # a tokenizer or rerank request while loading: "retry", not "no tokenizer"
    async def tokenize(self, content: Any, **_kw: Any) -> list[int]:
        raise NotReady("the daemon is still loading its backends; retry shortly")

    async def token_pieces(self, tokens: list[int]) -> list[bytes]:
        raise NotReady("the daemon is still loading its backends; retry shortly")

    async def detokenize(self, tokens: list[int]) -> str:
        raise NotReady("the daemon is still loading its backends; retry shortly")

    async def apply_template(self, request: Request) -> str:
        raise NotReady("the daemon is still loading its backends; retry shortly")

    async def rerank(self, request: RerankRequest) -> RerankResult:
        raise NotReady("the daemon is still loading its backends; retry shortly")


#: Builds the backend in a worker thread; gets ``progress(index, fraction)``.
Loader = Callable[[Callable[[int, float], None]], Backend]


# --------------------------------------------------------------------------- connection


class _Connection:
    """One client connection: its writer and its in-flight requests by id."""

    def __init__(self, writer: asyncio.StreamWriter, limits: Limits) -> None:
        self.writer = writer
        self.tasks: dict[str | int, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._max_reply = limits.max_reply_bytes
        self._stall_s = limits.write_stall_timeout_s
        self.closed = False

    async def send(self, frame: dict[str, Any]) -> None:
        """Write one whole frame; frames of different requests never interleave.

        ``ReplyTooLarge`` (nothing written) for a frame over ``max_reply_bytes``;
        ``WriteStalled`` when the peer took nothing for ``write_stall_timeout_s``,
        waiting for the connection included (a slow reader slows only its own
        connection's streams, and not forever).
        """
        if self.closed:
            return
        data = wire.encode(frame)
        if len(data) > self._max_reply:
            raise ReplyTooLarge(
                f"reply too large: its {frame.get('type')} frame would be {len(data)} bytes, "
                f"over max_reply_bytes={self._max_reply} (MAX_FRAME_BYTES, what a reader "
                "accepts); ask for less (fewer inputs, fewer dimensions)"
            )
        try:
            async with asyncio.timeout(self._stall_s), self._lock:
                if self.closed:
                    return
                self.writer.write(data)
                await self.writer.drain()
        except TimeoutError:
            raise WriteStalled from None
        except (ConnectionError, RuntimeError):
            self.closed = True

    def send_nowait(self, frame: dict[str, Any]) -> None:
        """Best-effort write without waiting (shutting down; a stalled peer's last word)."""
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
        limits: Limits | None = None,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
        metrics_port: int | None = None,
        metrics_host: str = DEFAULT_METRICS_HOST,
    ) -> None:
        self.backend: Backend = backend if backend is not None else _Loading()
        self._load_fractions: dict[int, float] = {}
        self._load_count = 1
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.admin_path = admin_socket_path(self.socket_path)
        self.lock_path = self.socket_path.with_name(self.socket_path.name + ".lock")
        self.limits = limits if limits is not None else Limits()
        self.drain_timeout_s = drain_timeout_s
        self.load_timeout_s = load_timeout_s
        self.admission = Admission(self.limits)
        self.budget = ByteBudget(self.limits.max_buffered_bytes)
        self.metrics = Metrics()
        # Prometheus (docs/adr/0016-metrics-traces-cors.md): counted for every request,
        # served over HTTP only with a metrics port
        self.telemetry = Telemetry()
        self.telemetry.watch(admission=self.admission)
        self._observed: ObservedBackend | None = None
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self.metrics_address: tuple[str, int] | None = None
        self._metrics_runner: Any = None
        self.status: Status = "starting"
        self.started_at = time.time()
        self._big_parse = asyncio.Semaphore(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # connection callbacks, admin too
        self._admin_writers: set[asyncio.StreamWriter] = set()
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
        if self.metrics_port is not None:
            await self._start_metrics()

    async def _start_metrics(self) -> None:
        """``GET /metrics`` on ``metrics_host:metrics_port`` (127.0.0.1 by default)."""
        from aiohttp import web

        from inferd.serve.observed import TELEMETRY_KEY, metrics

        app = web.Application()
        app[TELEMETRY_KEY] = self.telemetry
        app.router.add_get("/metrics", metrics)
        self._metrics_runner = runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.metrics_host, self.metrics_port)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            self._release_lock()
            raise DaemonError(f"cannot serve metrics on port {self.metrics_port}: {e}") from None
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.metrics_address = sock.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", *self.metrics_address)

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
        started = time.perf_counter()
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
        self.telemetry.model_loaded(time.perf_counter() - started, count)
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
        self.admission.draining = True
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
                await asyncio.wait(pending, timeout=CLOSE_WAIT_S)
        self._shutting_down = True

    async def close(self) -> None:
        """Close connections and sockets, close the backend, remove the socket files.

        Connection handlers are let finish (their transports close, their reads see
        EOF) rather than cancelled by the loop's shutdown, which on Python 3.11 logs a
        ``CancelledError`` traceback per open connection: a clean stop is quiet.
        """
        self._shutting_down = True
        self.admission.draining = True
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_WAIT_S)
        for conn in list(self._conns):
            conn.closed = True
            conn.writer.close()
        for writer in list(self._admin_writers):
            writer.close()
        for server in (self._server, self._admin):
            if server is not None:
                server.close()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=CLOSE_WAIT_S)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
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
            "queue": self.admission.status(),
            "connections": len(self._conns),
            "buffered_bytes": self.budget.used,
            "limits": dataclasses.asdict(self.limits),
            "counters": self.metrics.to_dict(),
        }
        if self.status == "loading":
            out["progress"] = round(self.load_progress(), 3)
        status = getattr(self.backend, "status", None)
        if callable(status):
            out["backends"] = status()
        pool = getattr(self.backend, "pool_status", None)
        if callable(pool):  # models loaded on demand (docs/adr/0015-...-load-on-demand.md)
            out["pool"] = pool()
        return out

    async def _serve_admin(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._admin_writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            while await reader.readline():
                writer.write(wire.encode(self.status_dict()))
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.CancelledError):
            pass  # a cancel here is the loop's shutdown: nothing to report
        finally:
            self._admin_writers.discard(writer)
            self._handlers.discard(task)  # type: ignore[arg-type]
            writer.close()

    # ------------------------------------------------------------------ connections

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._conns) >= self.limits.max_connections:
            await self._refuse_connection(writer)
            return
        conn = _Connection(writer, self.limits)
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._read_frames(conn, reader)
        except asyncio.CancelledError:
            pass  # the loop is shutting down; close() already told the client
        finally:
            await self._hang_up(conn)
            self._handlers.discard(task)  # type: ignore[arg-type]

    async def _refuse_connection(self, writer: asyncio.StreamWriter) -> None:
        """One connection too many: say why, then close (``max_connections``)."""
        self.metrics.refused_connections += 1
        limit = self.limits.max_connections
        log.info("refusing a connection: %d open (max_connections)", limit)
        writer.write(
            wire.encode(
                wire.error_frame(
                    None,
                    wire.QUEUE_FULL,
                    f"too many connections: the daemon serves at most {limit} at once "
                    "(max_connections); retry later",
                )
            )
        )
        # a cancel here is the loop's shutdown, which must stay quiet
        with contextlib.suppress(
            ConnectionError, TimeoutError, RuntimeError, asyncio.CancelledError
        ):
            async with asyncio.timeout(self.limits.write_stall_timeout_s):
                await writer.drain()
        writer.close()

    async def _read_frames(self, conn: _Connection, reader: asyncio.StreamReader) -> None:
        """Read, parse and route frames until EOF, a frame timeout or a stalled peer."""
        lim = self.limits
        frames = wire.FrameReader(
            reader, lim.max_frame_bytes, budget=self.budget, frame_timeout_s=lim.frame_timeout_s
        )
        try:
            async with contextlib.aclosing(frames.__aiter__()) as items:
                async for item in items:
                    if isinstance(item, InferdError):  # skipped: too large, or budget spent
                        self._count_refusal(item)
                        await conn.send(wire.error_frame(None, item.code, item.message))
                    else:
                        await self._route(conn, await self._parse(item))
        except wire.FrameTimeout as e:
            self.metrics.closed_connections += 1
            log.info("closing a connection: %s", e.message)
            conn.send_nowait(wire.error_frame(None, e.code, e.message))
        except WriteStalled:
            self.metrics.closed_connections += 1
            log.info(
                "closing a connection that took no reply for %gs (write_stall_timeout_s)",
                lim.write_stall_timeout_s,
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    async def _hang_up(self, conn: _Connection) -> None:
        """EOF or a broken connection: its requests are cancelled, not orphaned."""
        conn.closed = True
        tasks = list(conn.tasks.values())
        if tasks:
            log.info("a client left with %d request(s) in flight; cancelling them", len(tasks))
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
        self._conns.discard(conn)
        conn.writer.close()

    # ------------------------------------------------------------------ frames

    async def _parse(self, raw: bytes) -> wire.ClientFrame:
        """Phase 1: bytes to a checked frame; large frames off the loop, one at a time."""
        max_elements = self.limits.max_frame_elements
        if len(raw) < THREAD_PARSE_BYTES:
            return wire.parse_client_frame(raw, max_elements)
        async with self._big_parse:
            return await asyncio.to_thread(wire.parse_client_frame, raw, max_elements)

    async def _route(self, conn: _Connection, frame: wire.ClientFrame) -> None:
        """Phase 2: answer a refused frame, a cancel or a capabilities query, or admit."""
        rid = frame.rid
        if frame.error is not None:
            self._count_refusal(frame.error)
            await conn.send(wire.error_frame_for(rid, frame.error))
        elif frame.kind == "cancel":
            task = conn.tasks.pop(rid, None)  # type: ignore[arg-type]
            if task is not None:
                task.cancel()
        elif frame.kind == "capabilities":
            await self._reply(conn, rid, self._capabilities_frame(rid))
        elif rid in conn.tasks:
            self.metrics.errors += 1
            await conn.send(
                wire.error_frame(
                    rid,
                    wire.INVALID_REQUEST,
                    f"id {echo(rid)} is already in flight on this connection; ids must be unique",
                )
            )
        else:
            await self._admit(conn, rid, frame.request, frame.trace)  # type: ignore[arg-type]

    def _capabilities_frame(self, rid: str | int | None) -> dict[str, Any]:
        return {
            "type": "capabilities",
            "id": rid,
            "capabilities": self.backend.capabilities().to_dict(),
            "ready": self.backend.ready() and self.status != "draining",
        }

    async def _admit(
        self,
        conn: _Connection,
        rid: str | int,
        request: Work,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """Phase 3: admission at arrival (ADR 0005), then the request runs as a task
        (in the client's trace when its frame carried one: ADR 0016)."""
        try:
            ticket = self.admission.admit(conn)
        except InferdError as e:
            self._count_refusal(e)
            await conn.send(wire.error_frame_for(rid, e))
            return
        task = asyncio.create_task(self._run(conn, rid, request, ticket, trace))
        conn.tasks[rid] = task
        self._tasks.add(task)

        def _done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self.admission.finish(ticket)  # frees its slot or queue place, however it ended
            if conn.tasks.get(rid) is t:
                del conn.tasks[rid]

        task.add_done_callback(_done)

    def _count_refusal(self, error: InferdError) -> None:
        if isinstance(error, QueueFull):
            self.metrics.queue_full += 1
        else:
            self.metrics.errors += 1

    async def _reply(self, conn: _Connection, rid: str | int | None, frame: dict[str, Any]) -> None:
        """Send a one-frame answer; one too large becomes an error frame for ``rid``."""
        try:
            await conn.send(frame)
        except ReplyTooLarge as e:
            self.metrics.errors += 1
            await conn.send(wire.error_frame_for(rid, e))

    # ------------------------------------------------------------------ requests

    async def _run(
        self,
        conn: _Connection,
        rid: str | int,
        request: Work,
        ticket: Ticket,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """Phase 4: wait for a slot, serve, and end in exactly one terminal frame."""
        if isinstance(request, EmbedRequest):
            self.metrics.embeddings += 1
        else:
            self.metrics.requests += 1
        if trace is not None:  # this task's own context: the request span's parent
            tracing.incoming.set(trace)
        try:
            queued_at = time.perf_counter()
            await self.admission.wait(ticket)
            self.telemetry.queue_wait.observe(time.perf_counter() - queued_at)
            if isinstance(request, EmbedRequest):
                result = await self.backend.embed(request)
                await conn.send({"type": "embedding", "id": rid, **result.to_dict()})
            elif isinstance(request, Request):
                await self._stream(conn, rid, request)
            else:  # a tokenizer or rerank request (inferd.serve.token_wire)
                reply = await token_wire.serve(self.backend, request)
                await conn.send({**reply, "id": rid})
        except asyncio.CancelledError:
            self._on_cancel(conn, rid)
            raise
        except WriteStalled:
            self._on_stall(conn, rid)
        except Exception as e:  # every failure becomes exactly one error frame
            self.metrics.errors += 1
            if not isinstance(e, InferdError):  # the detail stays here, the client gets the type
                log.error("request %s failed with an unexpected error", echo(rid), exc_info=e)
            try:
                await conn.send(wire.error_frame_for(rid, e))
            except WriteStalled:
                self._on_stall(conn, rid)

    async def _stream(self, conn: _Connection, rid: str | int, request: Request) -> None:
        start = time.perf_counter()
        first: float | None = None
        if self._observed is None or self._observed.inner is not self.backend:
            self._observed = ObservedBackend(self.backend, self.telemetry)
        stream = self._observed.generate(request)
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
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

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

    def _on_stall(self, conn: _Connection, rid: str | int) -> None:
        """The peer read nothing for the stall timeout: the request ends, its slot is freed."""
        self.metrics.write_stalls += 1
        self.metrics.cancelled += 1
        stall = self.limits.write_stall_timeout_s
        log.info("request %s cancelled: its reader took nothing for %gs", echo(rid), stall)
        conn.send_nowait(
            wire.error_frame(
                rid,
                wire.BACKEND_UNAVAILABLE,
                f"cancelled: the client took no frame for {stall:g}s "
                "(write_stall_timeout_s); its slot was given to other requests",
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
    _add_limit_arguments(parser)
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off; ADR 0016)",
    )
    parser.add_argument(
        "--metrics-host",
        default=DEFAULT_METRICS_HOST,
        help="address for --metrics-port (default %(default)s)",
    )
    add_router_arguments(parser)
    parser.add_argument(
        "--rpc",
        default=None,
        metavar="HOST:PORT,...",
        help="split every llamacpp model over these ggml RPC workers (`inferd rpc-worker`; "
        "overrides rpc_servers; docs/adr/0019-rpc-backend.md)",
    )
    add_llamacpp_arguments(parser)  # every llamacpp model's knobs (ADR 0026)
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Admission, shutdown and frame limits (ADR 0010); the config's ``[daemon]`` table
    sets these and the rest, a flag given here wins."""
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
        default=None,
        help="largest request frame accepted (default 64 MiB); the other limits of ADR "
        "0010 are set in the config's [daemon] table",
    )


async def serve_main(args: argparse.Namespace) -> int:
    """Build the router from the config and run the daemon until SIGTERM."""
    from inferd.router import Router

    cfg = override_router(load_config(args.config), **router_overrides(args))
    cfg = override_rpc(cfg, getattr(args, "rpc", None))
    cfg = override_llamacpp(cfg, llamacpp_overrides(args))  # ADR 0026
    pool = None
    if cfg.models:  # [[model]] tables: nothing loads until a request names a model
        from inferd.serve.models_pool import ModelPool

        pool = ModelPool.from_config(cfg)

    def loader(progress: Callable[[int, float], None]) -> Backend:
        return Router(build_backends(cfg, progress), **cfg.router)

    overrides = {
        "max_concurrent": args.max_concurrent,
        "max_queued": args.max_queued,
        "max_frame_bytes": args.max_frame_bytes,
    }
    daemon = Daemon(
        pool,
        args.socket or cfg.socket,
        limits=dataclasses.replace(
            cfg.limits, **{k: v for k, v in overrides.items() if v is not None}
        ),
        drain_timeout_s=(
            args.drain_timeout if args.drain_timeout is not None else cfg.drain_timeout_s
        ),
        load_timeout_s=(args.load_timeout if args.load_timeout is not None else cfg.load_timeout_s),
        metrics_port=getattr(args, "metrics_port", None),
        metrics_host=getattr(args, "metrics_host", DEFAULT_METRICS_HOST),
    )
    return await daemon.run(None if pool else loader, len(cfg.backends))


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
