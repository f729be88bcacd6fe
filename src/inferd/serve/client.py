"""``inferd.Client``: the daemon, seen as one more :class:`~inferd.backend.Backend`.

Why a Backend: a program switches between an in-process model and the shared daemon
by changing one line (``LlamaCpp(...)`` -> ``Client()``); the router, the bridge and
the contract suite treat it like any other backend.

One connection carries every request of the client, multiplexed by ``id``. Frames are
routed to a bounded queue per request; when a consumer is slow its queue fills, the
reader stops reading, the socket fills, and the daemon's generation waits: memory stays
bounded at the price of head-of-line blocking on this connection (open a second
``Client`` for an independent lane). Leaving a stream early sends a ``cancel`` frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from inferd.backend import Backend
from inferd.errors import BackendUnavailable, InternalError, NotReady
from inferd.serve import wire
from inferd.serve.config import admin_socket_path, default_socket_path
from inferd.types import (
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
)

#: Seconds to wait for the daemon to accept a connection.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Frames buffered per request before the connection's reader waits for the consumer.
DEFAULT_STREAM_BUFFER_FRAMES = 1024
#: Seconds the blocking capabilities probe (used before connecting) may take.
CAPABILITIES_PROBE_TIMEOUT_S = 2.0
#: While the daemon says "not ready" (loading), ``ready()`` re-asks at most this often.
READY_RECHECK_S = 1.0

_LOST = object()  # queue sentinel: the connection is gone


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
        name: str = "daemon",
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.connect_timeout_s = connect_timeout_s
        self.stream_buffer_frames = stream_buffer_frames
        self.max_frame_bytes = max_frame_bytes
        self.name = name
        self._ids = itertools.count(1)
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._caps: Capabilities | None = None
        self._daemon_ready = False
        self._ready_checked = 0.0
        self._lost_reason = "the connection to the daemon closed"
        self._closed = False

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def active_streams(self) -> int:
        """Requests of this client still waiting for frames."""
        return len(self._streams)

    async def connect(self) -> None:
        """Open the connection (done lazily by the first request) and read capabilities."""
        if self._closed:
            raise NotReady("client is closed; create a new one")
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self.connected:
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.socket_path), self.connect_timeout_s
                )
            except (OSError, TimeoutError) as e:
                raise BackendUnavailable(
                    f"cannot connect to the inferd daemon at {self.socket_path} "
                    f"({type(e).__name__}: {e}); is `inferd serve` running?"
                ) from None
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_loop(reader))
        await self.refresh()

    async def refresh(self) -> Capabilities:
        """Ask the daemon for its capabilities and readiness (cached for the sync API)."""
        frame = await self._request({"type": "capabilities"}, "capabilities")
        self._caps = wire.capabilities_from_dict(frame.get("capabilities") or {})
        self._daemon_ready = bool(frame.get("ready"))
        self._ready_checked = time.monotonic()
        return self._caps

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            async for item in wire.FrameReader(reader, self.max_frame_bytes):
                if isinstance(item, wire.FrameTooLarge):
                    self._lost_reason = f"the daemon sent a frame too large: {item.message}"
                    break
                try:
                    frame = wire.decode(item)
                except wire.FrameError as e:
                    self._lost_reason = f"the daemon sent a malformed frame: {e.message}"
                    break
                q = self._streams.get(frame.get("id"))  # type: ignore[arg-type]
                if q is not None:  # frames of cancelled requests are dropped
                    await q.put(frame)
        except (ConnectionError, OSError) as e:
            self._lost_reason = f"the connection to the daemon broke ({e})"
        finally:
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.close()
            for q in list(self._streams.values()):
                _put_lost(q)

    def _send_nowait(self, frame: dict[str, Any]) -> None:
        w = self._writer
        if w is not None and not w.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                w.write(wire.encode(frame))

    async def _open_stream(self, frame: dict[str, Any]) -> tuple[int, asyncio.Queue[Any]]:
        if self._closed:
            raise NotReady("client is closed; create a new one")
        if not self.connected:
            await self.connect()
        rid = next(self._ids)
        q: asyncio.Queue[Any] = asyncio.Queue(self.stream_buffer_frames)
        self._streams[rid] = q
        w = self._writer
        if w is None:
            del self._streams[rid]
            raise BackendUnavailable(f"{self._lost_reason}; retry")
        try:
            w.write(wire.encode({**frame, "id": rid}))
            await w.drain()
        except (ConnectionError, RuntimeError) as e:
            del self._streams[rid]
            raise BackendUnavailable(f"cannot send to the inferd daemon: {e}") from None
        return rid, q

    def _forget(self, rid: int) -> None:
        """Drop a request's queue; emptying it frees a reader blocked on a full queue."""
        q = self._streams.pop(rid, None)
        while q is not None and not q.empty():
            q.get_nowait()

    async def _request(self, frame: dict[str, Any], want: str) -> dict[str, Any]:
        """Send one frame and wait for its single answer of type ``want``."""
        rid, q = await self._open_stream(frame)
        try:
            reply = await q.get()
        finally:
            self._forget(rid)
        if reply is _LOST:
            raise BackendUnavailable(f"{self._lost_reason}; retry")
        if reply.get("type") == "error":
            raise wire.error_from_frame(reply)
        if reply.get("type") != want:
            raise InternalError(f"daemon answered {reply.get('type')!r} where {want!r} was due")
        return reply  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ Backend

    def ready(self) -> bool:
        if self._closed:
            return False
        if self.connected:
            if not self._daemon_ready and time.monotonic() - self._ready_checked > READY_RECHECK_S:
                # loading daemons become ready; ready() is sync, so a short blocking probe
                self._ready_checked = time.monotonic()
                probed = _probe(self.socket_path)
                if probed is not None:
                    self._caps, self._daemon_ready = probed
            return self._daemon_ready
        return self.socket_path.exists()

    def capabilities(self) -> Capabilities:
        """Cached from the last connect; before that, a short blocking probe."""
        if self._caps is None:
            probed = _probe(self.socket_path)
            self._caps = probed[0] if probed is not None else Capabilities()
        return self._caps

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        rid, q = await self._open_stream({"type": "generate", **request.to_dict()})
        finished = False
        try:
            while True:
                frame = await q.get()
                if frame is _LOST:
                    finished = True
                    raise BackendUnavailable(f"{self._lost_reason} before the reply finished")
                if frame.get("type") == "error":
                    finished = True
                    raise wire.error_from_frame(frame)
                event = wire.event_from_frame(frame)
                if isinstance(event, Done):
                    finished = True
                    yield event
                    return
                yield event
        finally:
            self._forget(rid)
            if not finished:  # left early: the daemon stops generating for us
                self._send_nowait({"type": "cancel", "id": rid})

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        reply = await self._request({"type": "embed", **request.to_dict()}, "embedding")
        return EmbedResult.from_dict(reply)

    async def aclose(self) -> None:
        """Close the connection; the daemon cancels whatever is still running for us."""
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        task, self._reader_task = self._reader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def __repr__(self) -> str:
        return f"<Client socket={str(self.socket_path)!r} connected={self.connected}>"


def _put_lost(q: asyncio.Queue[Any]) -> None:
    while True:
        try:
            q.put_nowait(_LOST)
            return
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()


def _probe(path: Path) -> tuple[Capabilities, bool] | None:
    """Blocking one-shot capabilities and readiness query (the Backend API's are sync)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CAPABILITIES_PROBE_TIMEOUT_S)
    try:
        s.connect(str(path))
        s.sendall(wire.encode({"type": "capabilities", "id": 0}))
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return None
            buf += chunk
        frame = orjson.loads(buf.split(b"\n", 1)[0])
        caps = wire.capabilities_from_dict(frame.get("capabilities") or {})
        return caps, bool(frame.get("ready"))
    except (OSError, ValueError):
        return None
    finally:
        s.close()


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
