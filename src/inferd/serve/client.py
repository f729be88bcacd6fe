"""``inferd.Client``: the daemon, seen as one more :class:`~inferd.backend.Backend`.

Why a Backend: a program switches between an in-process model and the shared daemon
by changing one line (``LlamaCpp(...)`` -> ``Client()``); the router, the bridge and
the contract suite treat it like any other backend.

Connections (ADR ``docs/adr/0011-client-connection-per-request.md``): each request
borrows a connection of its own from a small pool, up to ``max_connections``, so the
socket's flow control is per request: a consumer that stops reading fills *its*
connection and pauses *its* generation, and nobody else's. Frames are still routed by
``id`` into a bounded queue per request (stale frames of a cancelled request are
dropped). A stream left early sends ``cancel`` and closes its connection (the daemon
cancels on EOF too); a finished one returns its connection to the idle pool. When all
connections are busy a request waits up to ``pool_timeout_s`` for one, then gets
``QueueFull``.

``ready()`` and ``capabilities()`` are synchronous in the Backend API and are called
per request by routers, so they never touch the socket: they answer from state cached
from the daemon's last ``capabilities`` reply and start a background refresh when
that state is older than :data:`READY_RECHECK_S`. :meth:`refresh_state` (awaited by
the Router) fetches it the first time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from inferd import tracing
from inferd.backend import Backend
from inferd.errors import BackendUnavailable, InferdError, InternalError, NotReady, QueueFull
from inferd.serve import token_wire, wire
from inferd.serve.config import admin_socket_path, default_socket_path
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

log = logging.getLogger("inferd.client")

#: Seconds to wait for the daemon to accept a connection.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Frames buffered per request before the connection's reader waits for the consumer.
DEFAULT_STREAM_BUFFER_FRAMES = 1024
#: Seconds a state refresh (the daemon's capabilities and readiness) may take.
CAPABILITIES_PROBE_TIMEOUT_S = 2.0
#: Cached readiness and capabilities older than this are refreshed in the background.
READY_RECHECK_S = 1.0
#: Most connections (hence requests in flight) one Client opens to the daemon.
DEFAULT_MAX_CONNECTIONS = 64
#: Finished requests' connections kept open for reuse.
DEFAULT_MAX_IDLE_CONNECTIONS = 8
#: Seconds a request waits for a free connection before ``QueueFull``.
DEFAULT_POOL_TIMEOUT_S = 30.0

#: What ``capabilities()`` claims before the daemon has answered once: everything, so
#: nothing is refused on a guess; the daemon then refuses what it cannot do itself.
ASSUMED_CAPABILITIES = Capabilities(
    tools=True, vision=True, audio=True, thinking=True, embed=True, tokenize=True, rerank=True
)

_LOST = object()  # queue sentinel: the connection is gone


class _Conn:
    """One connection to the daemon; its reader routes frames by ``id`` to queues."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame_bytes: int
    ) -> None:
        self.writer = writer
        self.streams: dict[int, asyncio.Queue[Any]] = {}
        self.lost_reason = "the connection to the daemon closed"
        self.task = asyncio.create_task(self._read_loop(reader, max_frame_bytes))

    @property
    def alive(self) -> bool:
        return not self.writer.is_closing() and not self.task.done()

    async def _read_loop(self, reader: asyncio.StreamReader, max_frame_bytes: int) -> None:
        try:
            async for item in wire.FrameReader(reader, max_frame_bytes):
                if isinstance(item, InferdError):  # too large, or over the buffer budget
                    self.lost_reason = f"the daemon sent a frame that was skipped: {item.message}"
                    break
                try:
                    frame = wire.decode(item)
                except wire.FrameError as e:
                    self.lost_reason = f"the daemon sent a malformed frame: {e.message}"
                    break
                q = self.streams.get(frame.get("id"))  # type: ignore[arg-type]
                if q is not None:  # frames of cancelled requests are dropped
                    await q.put(frame)
        except (ConnectionError, OSError) as e:
            self.lost_reason = f"the connection to the daemon broke ({e})"
        finally:
            self.writer.close()
            for q in list(self.streams.values()):
                _put_lost(q)

    async def open_stream(self, rid: int, frame: dict[str, Any], size: int) -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue(size)
        self.streams[rid] = q
        try:
            self.writer.write(wire.encode({**frame, "id": rid}))
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as e:
            del self.streams[rid]
            raise BackendUnavailable(f"cannot send to the inferd daemon: {e}") from None
        return q

    def forget(self, rid: int) -> None:
        """Drop a request's queue; emptying it frees a reader blocked on a full queue."""
        q = self.streams.pop(rid, None)
        while q is not None and not q.empty():
            q.get_nowait()

    def send_nowait(self, frame: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.writer.write(wire.encode(frame))

    def close(self) -> None:
        self.writer.close()
        self.task.cancel()

    async def wait_closed(self) -> None:
        self.close()
        with contextlib.suppress(BaseException):
            await self.writer.wait_closed()
        with contextlib.suppress(BaseException):
            await self.task


class Client(Backend):
    """Async client for the ``inferd serve`` socket, with the Backend surface."""

    name = "daemon"

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        stream_buffer_frames: int = DEFAULT_STREAM_BUFFER_FRAMES,
        max_frame_bytes: int = wire.MAX_FRAME_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_idle_connections: int = DEFAULT_MAX_IDLE_CONNECTIONS,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        name: str = "daemon",
    ) -> None:
        if max_connections < 1 or max_idle_connections < 0:
            raise ValueError("max_connections must be >= 1 and max_idle_connections >= 0")
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.connect_timeout_s = connect_timeout_s
        self.stream_buffer_frames = stream_buffer_frames
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.max_idle_connections = max_idle_connections
        self.pool_timeout_s = pool_timeout_s
        self.name = name
        self._ids = itertools.count(1)
        self._conns: set[_Conn] = set()
        self._idle: list[_Conn] = []
        self._slots: asyncio.Semaphore | None = None
        self._caps: Capabilities | None = None
        self._daemon_ready = False
        self._state_at: float | None = None  # when the daemon last answered (or failed to)
        self._refresh_task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ connections

    @property
    def connected(self) -> bool:
        """True while at least one connection to the daemon is open."""
        return any(c.alive for c in self._conns)

    @property
    def active_streams(self) -> int:
        """Requests of this client still waiting for frames."""
        return sum(len(c.streams) for c in self._conns)

    def pool_stats(self) -> dict[str, int]:
        """Open, idle and busy daemon connections (tests and the bridge's /health)."""
        idle = sum(1 for c in self._idle if c.alive)
        open_ = sum(1 for c in self._conns if c.alive)
        return {"open": open_, "idle": idle, "busy": open_ - idle}

    async def connect(self) -> None:
        """Check the daemon answers and cache its state (requests also connect lazily)."""
        if self._closed:
            raise NotReady("client is closed; create a new one")
        await self.refresh()

    async def _open(self) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as e:
            self._daemon_ready, self._state_at = False, time.monotonic()
            raise BackendUnavailable(
                f"cannot connect to the inferd daemon at {self.socket_path} "
                f"({type(e).__name__}: {e}); is `inferd serve` running?"
            ) from None
        conn = _Conn(reader, writer, self.max_frame_bytes)
        self._conns.add(conn)
        return conn

    async def _acquire(self) -> _Conn:
        """A connection for one request: an idle one, or a new one under the limit."""
        if self._closed:
            raise NotReady("client is closed; create a new one")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        try:
            async with asyncio.timeout(self.pool_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise QueueFull(
                f"all {self.max_connections} connections to the daemon stayed busy for "
                f"{self.pool_timeout_s:g}s (max_connections, pool_timeout_s); retry later"
            ) from None
        if self._closed:  # closed while this request waited for a connection
            self._slots.release()
            raise NotReady("client is closed; create a new one")
        while self._idle:
            conn = self._idle.pop()
            if conn.alive:
                return conn
            self._discard(conn)
        try:
            return await self._open()
        except BaseException:
            self._slots.release()
            raise

    def _release(self, conn: _Conn, *, reuse: bool) -> None:
        """Give a request's connection back: to the idle pool when clean, else close it."""
        if (
            reuse
            and conn.alive
            and not self._closed
            and len(self._idle) < self.max_idle_connections
        ):
            self._idle.append(conn)
        else:
            self._discard(conn)
        if self._slots is not None:
            self._slots.release()

    def _discard(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        conn.close()

    async def _request(self, frame: dict[str, Any], want: str) -> dict[str, Any]:
        """Send one frame and wait for its single answer of type ``want``."""
        conn = await self._acquire()
        rid = next(self._ids)
        reuse = False
        try:
            q = await conn.open_stream(rid, frame, 1)
            reply = await q.get()
            reuse = reply is not _LOST
        finally:
            conn.forget(rid)
            self._release(conn, reuse=reuse)
        if reply is _LOST:
            raise BackendUnavailable(f"{conn.lost_reason}; retry")
        if reply.get("type") == "error":
            raise wire.error_from_frame(reply)
        if reply.get("type") != want:
            raise InternalError(f"daemon answered {reply.get('type')!r} where {want!r} was due")
        return reply  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ cached state

    async def refresh(self) -> Capabilities:
        """Ask the daemon for its capabilities and readiness (cached for the sync API).

        While every connection is busy the cached state is kept rather than re-asked:
        a full pool says the daemon is in use, not that it went away.
        """
        if self._caps is not None and self._slots is not None and self._slots.locked():
            self._state_at = time.monotonic()
            return self._caps
        try:
            async with asyncio.timeout(CAPABILITIES_PROBE_TIMEOUT_S):
                frame = await self._request({"type": "capabilities"}, "capabilities")
        except TimeoutError:
            self._daemon_ready, self._state_at = False, time.monotonic()
            raise BackendUnavailable(
                f"the inferd daemon at {self.socket_path} did not answer within "
                f"{CAPABILITIES_PROBE_TIMEOUT_S:g}s (CAPABILITIES_PROBE_TIMEOUT_S)"
            ) from None
        except InferdError:
            self._daemon_ready, self._state_at = False, time.monotonic()
            raise
        self._caps = Capabilities.from_dict(frame.get("capabilities") or {})
        self._daemon_ready = bool(frame.get("ready"))
        self._state_at = time.monotonic()
        return self._caps

    async def refresh_state(self) -> None:
        """Fetch the state the first time; afterwards only refresh it in the background."""
        if self._closed:
            return
        if self._state_at is None:
            with contextlib.suppress(InferdError):
                await self.refresh()
        else:
            self._kick_refresh()

    def _kick_refresh(self) -> None:
        """Start a background refresh when the cached state is stale (never blocks)."""
        if self._closed or (self._refresh_task is not None and not self._refresh_task.done()):
            return
        if self._state_at is not None and time.monotonic() - self._state_at < READY_RECHECK_S:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside a loop: the cached answer is all there is
        self._refresh_task = loop.create_task(self._background_refresh())

    async def _background_refresh(self) -> None:
        try:
            await self.refresh()
        except InferdError as e:
            log.debug("daemon state refresh failed: %s", e.message)
        except Exception as e:  # a bug: keep the cached state, say so in the log
            log.warning("daemon state refresh failed with %s", type(e).__name__, exc_info=e)

    # ------------------------------------------------------------------ Backend

    def ready(self) -> bool:
        """Cached readiness; before the first answer, whether the socket exists."""
        if self._closed:
            return False
        self._kick_refresh()
        if self._state_at is None:
            return self.socket_path.exists()
        return self._daemon_ready

    def capabilities(self) -> Capabilities:
        """Cached from the daemon's last answer (:data:`ASSUMED_CAPABILITIES` before one)."""
        if self._caps is None:
            self._kick_refresh()
            return ASSUMED_CAPABILITIES
        return self._caps

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        conn = await self._acquire()
        rid = next(self._ids)
        finished = False
        dones = 0
        try:
            frame = _traced({"type": "generate", **request.to_dict()})
            q = await conn.open_stream(rid, frame, self.stream_buffer_frames)
            while True:
                frame = await q.get()
                if frame is _LOST:
                    finished = True
                    raise BackendUnavailable(f"{conn.lost_reason} before the reply finished")
                if frame.get("type") == "error":
                    finished = True
                    raise wire.error_from_frame(frame)
                event = wire.event_from_frame(frame)
                if isinstance(event, Done):
                    dones += 1  # one per choice (docs/adr/0022-n-choices-and-logprobs.md)
                    if dones >= request.n:
                        finished = True
                        yield event
                        return
                yield event
        finally:
            conn.forget(rid)
            if not finished:  # left early: the daemon stops generating for us
                conn.send_nowait({"type": "cancel", "id": rid})
            self._release(conn, reuse=finished)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        reply = await self._request(_traced({"type": "embed", **request.to_dict()}), "embedding")
        return EmbedResult.from_dict(reply)

    # The tokenizer and rerank methods run on the daemon's backend, one frame each way
    # (inferd.serve.token_wire); what it cannot do comes back as its own error.

    async def _call(self, kind: str, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._request(_traced(frame), token_wire.REPLY_TYPES[kind])

    async def tokenize(
        self,
        content: str | list[str | int],
        *,
        add_special: bool = False,
        parse_special: bool = True,
    ) -> list[int]:
        frame = token_wire.call_frame(
            "tokenize",
            content=token_wire.content_of(content),
            add_special=add_special,
            parse_special=parse_special,
        )
        return token_wire.tokens_of(await self._call("tokenize", frame))

    async def token_pieces(self, tokens: list[int]) -> list[bytes]:
        ids = token_wire.token_ids(tokens)
        frame = token_wire.call_frame("token_pieces", tokens=ids)
        return token_wire.pieces_of(await self._call("token_pieces", frame), len(ids))

    async def detokenize(self, tokens: list[int]) -> str:
        frame = token_wire.call_frame("detokenize", tokens=token_wire.token_ids(tokens))
        return token_wire.text_of(await self._call("detokenize", frame), "content")

    async def apply_template(self, request: Request) -> str:
        frame = token_wire.call_frame("apply_template", request=request)
        return token_wire.text_of(await self._call("apply_template", frame), "prompt")

    async def rerank(self, request: RerankRequest) -> RerankResult:
        reply = await self._call("rerank", token_wire.rerank_frame(request))
        return token_wire.rerank_result_of(reply, len(request.documents))

    async def aclose(self) -> None:
        """Close every connection; the daemon cancels whatever is still running for us."""
        self._closed = True
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        conns, self._idle = list(self._conns), []
        self._conns.clear()
        for conn in conns:
            await conn.wait_closed()

    def __repr__(self) -> str:
        return f"<Client socket={str(self.socket_path)!r} connected={self.connected}>"


def _traced(frame: dict[str, Any]) -> dict[str, Any]:
    """``frame`` with the caller's W3C trace context, when there is one, so the
    daemon's request span continues the caller's trace (ADR 0016)."""
    headers = tracing.outgoing_headers()
    if headers:
        frame["trace"] = headers
    return frame


def _put_lost(q: asyncio.Queue[Any]) -> None:
    while True:
        try:
            q.put_nowait(_LOST)
            return
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()


async def admin_status(
    socket_path: str | os.PathLike[str] | None = None, *, timeout_s: float = 5.0
) -> dict[str, Any]:
    """The daemon's admin status (give the inference socket path or the admin one)."""
    path = Path(socket_path) if socket_path else default_socket_path()
    if path.name != "admin.sock":
        path = admin_socket_path(path)

    async def ask() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(b'{"type":"status"}\n')
            await writer.drain()
            return wire.decode(await reader.readline())
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(ask(), timeout_s)
    except (OSError, TimeoutError) as e:
        raise BackendUnavailable(f"cannot reach the inferd admin socket {path}: {e}") from None
