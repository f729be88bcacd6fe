"""The daemon's wire format: NDJSON frames, one JSON object per line.

Why NDJSON: any language (and ``socat``) can speak it, a frame boundary is a byte
that JSON never leaves unescaped inside a value, and a reader can resynchronise after
garbage by skipping to the next newline, which is what lets a connection survive a
malformed or oversized frame.

Frames, client to daemon (each carries a client-chosen ``id``, unique among the
connection's in-flight requests):

* ``{"type": "generate", "id": ..., <Request.to_dict()>}``; ``type`` may be omitted;
* ``{"type": "embed", "id": ..., <EmbedRequest.to_dict()>}``;
* ``{"type": "cancel", "id": ...}``: stop that request; nothing more is sent for it;
* ``{"type": "capabilities", "id": ...}``: what the daemon's backend can do.

Daemon to client:

* ``{"type": "frame", "id", "block": {"type": "text"|"thinking"|"tool_use", ...}}``;
* ``{"type": "done", "id", "stop_reason", "usage", "timings", "backend"}``;
* ``{"type": "error", "id", "code", "message"}``; ``id`` is ``null`` when the frame
  it answers had none (unparseable, or too large to read);
* ``{"type": "embedding", "id", <EmbedResult.to_dict()>}``;
* ``{"type": "capabilities", "id", "capabilities": {...}, "ready": bool}``.

Every generate ends in exactly one ``done`` or one ``error`` frame (unless cancelled).

Oversized frames: a line longer than :data:`MAX_FRAME_BYTES` is *skipped up to the
next newline* (never buffered whole), answered with a ``frame_too_large`` error whose
``id`` is null, and the connection goes on. Closing would also be defensible, but
skipping costs nothing extra and keeps the client's other requests alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from inferd.errors import ERRORS_BY_CODE, InferdError, InternalError, InvalidRequest
from inferd.types import AcceleratorInfo, Capabilities, Done, Event, event_from_dict

#: The largest frame (one line, newline excluded) either side will read: 64 MiB.
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: How much a reader asks the socket for at a time.
READ_CHUNK_BYTES = 256 * 1024

# Error codes on the wire (the taxonomy's codes, plus one that only framing can raise).
QUEUE_FULL = "queue_full"
BACKEND_UNAVAILABLE = "backend_unavailable"
INVALID_REQUEST = "invalid_request"
FRAME_TOO_LARGE = "frame_too_large"
INTERNAL = "internal"
ERROR_CODES = (QUEUE_FULL, BACKEND_UNAVAILABLE, INVALID_REQUEST, FRAME_TOO_LARGE, INTERNAL)


class FrameTooLarge(InvalidRequest):
    """A frame exceeded :data:`MAX_FRAME_BYTES`; it was skipped, not read."""

    code = FRAME_TOO_LARGE


class FrameError(InvalidRequest):
    """A frame is not a JSON object, or lacks what its type needs."""


def encode(obj: Mapping[str, Any]) -> bytes:
    """One frame: compact JSON plus the newline."""
    return orjson.dumps(obj) + b"\n"


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse one frame (without or with its newline); ``FrameError`` names the problem."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise FrameError(f"malformed frame: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FrameError(f"malformed frame: expected a JSON object, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- frames


def event_frame(rid: Any, event: Event) -> dict[str, Any]:
    """The frame for one stream event."""
    if isinstance(event, Done):
        return {
            "type": "done",
            "id": rid,
            "stop_reason": event.stop_reason.value,
            "usage": event.usage.to_dict(),
            "timings": event.timings.to_dict(),
            "backend": event.backend,
        }
    return {"type": "frame", "id": rid, "block": event.to_dict()}


def event_from_frame(frame: Mapping[str, Any]) -> Event:
    """Inverse of :func:`event_frame`."""
    kind = frame.get("type")
    try:
        if kind == "frame":
            return event_from_dict(frame["block"])
        if kind == "done":
            return event_from_dict({**frame, "type": "done"})
    except (KeyError, TypeError, ValueError) as e:
        raise InternalError(f"daemon sent a malformed {kind} frame: {e}") from None
    raise InternalError(f"daemon sent an unexpected frame type {kind!r}")


def error_frame(rid: Any, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "id": rid, "code": code, "message": message}


def error_frame_for(rid: Any, exc: BaseException) -> dict[str, Any]:
    """An error frame for an exception; non-inferd exceptions become ``internal``."""
    if isinstance(exc, InferdError):
        return error_frame(rid, exc.code, exc.message)
    return error_frame(rid, INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def error_from_frame(frame: Mapping[str, Any]) -> InferdError:
    """The inferd exception an error frame stands for (unknown codes: ``InternalError``)."""
    code = str(frame.get("code") or INTERNAL)
    message = str(frame.get("message") or code)
    if code == FRAME_TOO_LARGE:
        return FrameTooLarge(message)
    cls = ERRORS_BY_CODE.get(code, InternalError)
    return cls(message)


def capabilities_from_dict(d: Mapping[str, Any]) -> Capabilities:
    """Inverse of ``Capabilities.to_dict()`` (unknown keys ignored, for newer daemons)."""
    acc = d.get("accelerator")
    accel = None
    if isinstance(acc, Mapping):
        accel = AcceleratorInfo(
            kind=acc.get("kind", "cpu"),
            gpu_layers=int(acc.get("gpu_layers", 0)),
            device_name=str(acc.get("device_name", "")),
            vram_total_bytes=int(acc.get("vram_total_bytes", 0)),
        )
    flags = {k: bool(d.get(k, False)) for k in ("tools", "vision", "audio", "thinking", "embed")}
    return Capabilities(v2=bool(d.get("v2", True)), accelerator=accel, **flags)


# --------------------------------------------------------------------------- reading


class FrameReader:
    """Split a byte stream into frames without ever holding more than one frame.

    Yields ``bytes`` for each complete line, or a :class:`FrameTooLarge` instance (not
    raised: the stream goes on) for each line that passed ``max_frame_bytes``; the rest
    of such a line is discarded as it arrives. Blank lines are ignored. A partial
    last line at EOF is yielded as a frame (a peer may omit the final newline).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        chunk_bytes: int = READ_CHUNK_BYTES,
    ) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be >= 1")
        self._reader = reader
        self._max = max_frame_bytes
        self._chunk = chunk_bytes

    async def __aiter__(self) -> AsyncIterator[bytes | FrameTooLarge]:
        buf = bytearray()
        skipping = False  # inside an oversized line, waiting for its newline
        while True:
            chunk = await self._reader.read(self._chunk)
            if not chunk:
                if buf.strip() and not skipping:
                    yield bytes(buf)
                return
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                if nl < 0:
                    break
                if skipping:
                    skipping = False
                    buf.clear()
                else:
                    if len(buf) + (nl - start) > self._max:
                        buf.clear()
                        yield self._too_large()
                    else:
                        buf += chunk[start:nl]
                        if buf.strip():
                            yield bytes(buf)
                        buf.clear()
                start = nl + 1
            if not skipping:
                buf += chunk[start:]
                if len(buf) > self._max:
                    buf.clear()
                    skipping = True
                    yield self._too_large()

    def _too_large(self) -> FrameTooLarge:
        return FrameTooLarge(
            f"frame too large: a frame may be at most {self._max} bytes "
            "(MAX_FRAME_BYTES); it was skipped up to the next newline"
        )
