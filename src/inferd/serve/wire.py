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
* ``{"type": "capabilities", "id": ...}``: what the daemon's backend can do;
* ``tokenize``, ``token_pieces``, ``detokenize``, ``apply_template``, ``rerank``: the
  tokenizer and rerank methods of the Backend (:mod:`inferd.serve.token_wire`).

Any request frame may carry ``"trace": {"traceparent", "tracestate"}`` (W3C trace
context, each at most ``tracing.MAX_TRACE_HEADER_CHARS``): the daemon's request span
continues the client's trace (docs/adr/0016-metrics-traces-cors.md).

Daemon to client:

* one frame per stream event, every event in the same shape:
  ``{"type": <the event's type>, "id", "event": <Event.to_dict()>}``, where the type
  is ``text``, ``thinking``, ``tool_use`` or ``done`` (the last frame of a stream). The
  event's own keys stay inside ``event``, so a ``ToolUse``'s ``id`` never meets the
  frame's, and a reader knows a stream ended from the frame's ``type`` alone;
* ``{"type": "error", "id", "code", "message"}``; ``id`` is ``null`` when the frame
  it answers had none (unparseable, or too large to read);
* ``{"type": "embedding", "id", <EmbedResult.to_dict()>}``;
* ``{"type": "capabilities", "id", "capabilities": {...}, "ready": bool}``;
* one answer per tokenizer/rerank request, typed as ``token_wire.REPLY_TYPES`` says.

Every generate ends in exactly one ``done`` or one ``error`` frame (unless cancelled).

Oversized frames: a line longer than :data:`MAX_FRAME_BYTES` is *skipped up to the
next newline* (never buffered whole), answered with a ``frame_too_large`` error whose
``id`` is null, and the connection goes on. Closing would also be defensible, but
skipping costs nothing extra and keeps the client's other requests alive.

Hostile frames (ADR 0010): a frame with more than :data:`MAX_FRAME_ELEMENTS` JSON
elements is refused before it is parsed (parsing ``{},{},...`` costs ~25 bytes of
memory per input byte); ids are at most :data:`MAX_ID_CHARS`; nesting is bounded by
``inferd.limits.check_depth``; every error message is cut (``inferd.limits``), and an
unexpected exception reaches the client as its type only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

import orjson

from inferd.errors import ERRORS_BY_CODE, InferdError, InternalError, InvalidRequest, QueueFull
from inferd.limits import check_depth, cut_message, echo
from inferd.serve import token_wire
from inferd.tracing import MAX_TRACE_HEADER_CHARS, TRACE_HEADERS
from inferd.types import Capabilities, EmbedRequest, Event, Request, event_from_dict

#: The largest frame (one line, newline excluded) either side will read: 64 MiB.
MAX_FRAME_BYTES = 64 * 1024 * 1024
#: How much a reader asks the socket for at a time.
READ_CHUNK_BYTES = 256 * 1024
#: Most JSON elements in one client frame, counted (before parsing) as the bytes ``,``
#: ``[`` and ``{`` anywhere in it: an upper bound that base64 never trips and prose only
#: far beyond any context window. Parsing 250,000 empty objects takes ~20 MB and ~50 ms.
MAX_FRAME_ELEMENTS = 250_000
#: Longest string ``id`` a client may give a request (it is echoed in every reply frame).
MAX_ID_CHARS = 256
#: Frame types a client may send.
CLIENT_FRAME_TYPES = ("generate", "embed", "cancel", "capabilities", *token_wire.CALL_TYPES)

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


class FrameTimeout(InvalidRequest):
    """A started frame did not reach its newline within the frame timeout."""


class BufferFull(QueueFull):
    """Unfinished frames across all connections hold the whole byte budget."""


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


#: The framing keys this module adds to every frame; bodies never carry them.
FRAME_KEYS = ("id", "type", "trace")


def frame_body(frame: Mapping[str, Any]) -> dict[str, Any]:
    """A request frame without its framing (``id``, ``type``): what ``from_dict`` reads."""
    return {k: v for k, v in frame.items() if k not in FRAME_KEYS}


def event_frame(rid: Any, event: Event) -> dict[str, Any]:
    """The frame for one stream event: framing keys outside, the event's dict inside.

    Every event, ``Done`` included, has the same shape (see the module docstring), so
    ``types`` knows nothing of framing and :func:`event_from_frame` is its exact inverse.
    """
    body = event.to_dict()
    return {"type": body["type"], "id": rid, "event": body}


#: Frame types that carry a stream event (the event's own ``type``).
EVENT_FRAME_TYPES = frozenset({"text", "thinking", "tool_use", "tool_use_delta", "done"})


def event_from_frame(frame: Mapping[str, Any]) -> Event:
    """Inverse of :func:`event_frame`; a malformed frame is the daemon's fault."""
    kind = frame.get("type")
    body = frame.get("event")
    if kind not in EVENT_FRAME_TYPES or not isinstance(body, dict) or body.get("type") != kind:
        raise InternalError(f"daemon sent an unexpected frame (type {echo(kind)})")
    try:
        return event_from_dict(body, f"{kind} frame")
    except InvalidRequest as e:
        raise InternalError(f"daemon sent a malformed {kind} frame: {e.message}") from None


def error_frame(rid: Any, code: str, message: str) -> dict[str, Any]:
    """An error frame; the message is cut (``limits.cut_message``) whatever built it."""
    return {"type": "error", "id": rid, "code": code, "message": cut_message(message)}


def error_frame_for(rid: Any, exc: BaseException) -> dict[str, Any]:
    """An error frame for an exception; non-inferd exceptions become ``internal``.

    An unexpected exception's text may hold paths, hosts or keys: the client gets its
    type and the request id, the server's log gets the detail (the caller logs it).
    """
    if isinstance(exc, InferdError):
        return error_frame(rid, exc.code, exc.message)
    return error_frame(
        rid,
        INTERNAL,
        f"internal error ({type(exc).__name__}) serving request {echo(rid)}; "
        "the daemon's log has the detail",
    )


def error_from_frame(frame: Mapping[str, Any]) -> InferdError:
    """The inferd exception an error frame stands for (unknown codes: ``InternalError``)."""
    code = str(frame.get("code") or INTERNAL)
    message = str(frame.get("message") or code)
    if code == FRAME_TOO_LARGE:
        return FrameTooLarge(message)
    cls = ERRORS_BY_CODE.get(code, InternalError)
    return cls(message)


#: Kept for callers of the old name; the reader lives on the type.
capabilities_from_dict = Capabilities.from_dict


# --------------------------------------------------------------------------- client frames


@dataclass(frozen=True, slots=True)
class ClientFrame:
    """One client frame, parsed: its id and type, and the request or what was wrong.

    ``rid`` is ``None`` when the frame's id could not be read; ``error`` is set instead
    of ``request`` for a frame that must be refused.
    """

    rid: str | int | None
    kind: str
    request: Request | EmbedRequest | token_wire.Call | None = None
    error: InferdError | None = None
    #: The client's W3C trace headers (``traceparent``, ``tracestate``), checked.
    trace: Mapping[str, str] | None = None


def count_elements(raw: bytes) -> int:
    """An upper bound on the JSON elements in ``raw``: its ``,``, ``[`` and ``{`` bytes."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def valid_id(rid: Any) -> bool:
    """A request id: an integer, or a string of at most :data:`MAX_ID_CHARS` characters."""
    if isinstance(rid, str):
        return len(rid) <= MAX_ID_CHARS
    return isinstance(rid, int) and not isinstance(rid, bool)


def parse_client_frame(raw: bytes, max_elements: int = MAX_FRAME_ELEMENTS) -> ClientFrame:
    """Parse and check one client frame; never raises for anything a client can send.

    Pure (no I/O, no shared state), so the daemon may run it in a worker thread for a
    large frame. The element count is checked before parsing: refuse before amplifying.
    """
    if len(raw) > max_elements and (n := count_elements(raw)) > max_elements:
        return ClientFrame(
            None,
            "",
            error=FrameError(
                f"frame too complex: up to {n} JSON elements, more than "
                f"max_frame_elements={max_elements} (MAX_FRAME_ELEMENTS); refused unparsed"
            ),
        )
    try:
        frame = decode(raw)
    except FrameError as e:
        return ClientFrame(None, "", error=e)
    rid = frame.get("id")
    if not valid_id(rid):
        return ClientFrame(
            None,
            "",
            error=FrameError(
                f"malformed frame: 'id' must be a string of at most {MAX_ID_CHARS} "
                f"characters (MAX_ID_CHARS) or an integer, got {echo(rid)}"
            ),
        )
    kind = frame.get("type", "generate")
    name = kind if isinstance(kind, str) and len(kind) <= MAX_ID_CHARS else "?"
    try:
        check_depth(frame, what="frame")
        trace = trace_of(frame.get("trace"))
        return ClientFrame(rid, name, request=_request_of(kind, frame), trace=trace)
    except InferdError as e:
        return ClientFrame(rid, name, error=e)
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as e:
        detail = cut_message(f"{type(e).__name__}: {e}", 200)
        return ClientFrame(rid, name, error=InvalidRequest(f"malformed {name} frame: {detail}"))


#: Keys each frame type accepts beside :data:`FRAME_KEYS` (``generate`` bodies are
#: checked by ``Request.from_dict`` itself); one rule for all: an unknown key is refused
#: by name.
_EXTRA_KEYS: dict[str, frozenset[str]] = {
    "embed": frozenset(f.name for f in fields(EmbedRequest)),
    "cancel": frozenset(),
    "capabilities": frozenset(),
}


def trace_of(value: Any) -> dict[str, str] | None:
    """A frame's ``trace``: W3C trace headers, bounded; anything else is refused."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not set(value) <= set(TRACE_HEADERS)
        or not all(isinstance(v, str) and len(v) <= MAX_TRACE_HEADER_CHARS for v in value.values())
    ):
        raise InvalidRequest(
            f"trace must be an object with only {' and '.join(TRACE_HEADERS)} strings of at "
            f"most {MAX_TRACE_HEADER_CHARS} characters (MAX_TRACE_HEADER_CHARS), got "
            f"{echo(value)}"
        )
    return value or None


def _request_of(
    kind: Any, frame: dict[str, Any]
) -> Request | EmbedRequest | token_wire.Call | None:
    if kind == "generate":
        return Request.from_dict(frame_body(frame))
    if kind in token_wire.REPLY_TYPES:
        return token_wire.call_from_body(kind, frame_body(frame))
    if not isinstance(kind, str) or kind not in _EXTRA_KEYS:
        raise InvalidRequest(
            f"unknown frame type {echo(kind)}; expected one of {', '.join(CLIENT_FRAME_TYPES)}"
        )
    unknown = set(frame) - set(FRAME_KEYS) - _EXTRA_KEYS[kind]
    if unknown:
        names = ", ".join(echo(k, 40) for k in sorted(unknown)[:8])
        raise InvalidRequest(f"unknown {kind} frame field(s): {names}")
    if kind == "embed":
        return EmbedRequest.from_dict(frame_body(frame))
    return None


# --------------------------------------------------------------------------- reading


class Budget(Protocol):
    """Shared bytes for unfinished frames (``inferd.serve.admission.ByteBudget``)."""

    def take(self, n: int) -> bool: ...

    def give(self, n: int) -> None: ...


class FrameReader:
    """Split a byte stream into frames without ever holding more than one frame.

    Yields ``bytes`` for each complete line, or an error instance (not raised: the
    stream goes on) for a line that was skipped: :class:`FrameTooLarge` for a line past
    ``max_frame_bytes``, :class:`BufferFull` when the shared ``budget`` for unfinished
    frames is spent. The rest of such a line is discarded as it arrives. Blank lines are
    ignored. A partial last line at EOF is yielded as a frame (a peer may omit the final
    newline). With ``frame_timeout_s``, a started frame whose newline has not come after
    that long spent waiting for the peer raises :class:`FrameTimeout` (ADR 0010).
    Iterate it inside ``contextlib.aclosing`` so a budget share is returned at once.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        chunk_bytes: int = READ_CHUNK_BYTES,
        *,
        budget: Budget | None = None,
        frame_timeout_s: float | None = None,
    ) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be >= 1")
        self._reader = reader
        self._max = max_frame_bytes
        self._chunk = chunk_bytes
        self._budget = budget
        self._timeout = frame_timeout_s
        self._held = 0  # bytes of the unfinished frame reserved from the budget
        self._waited = 0.0  # seconds spent waiting for the unfinished frame's bytes

    async def __aiter__(self) -> AsyncIterator[bytes | InferdError]:
        buf = bytearray()
        skipping = False  # inside a skipped line, waiting for its newline
        try:
            while True:
                chunk = await self._read(bool(buf) or skipping)
                if not chunk:
                    if buf.strip() and not skipping:
                        yield bytes(buf)
                    return
                start = 0
                while (nl := chunk.find(b"\n", start)) >= 0:
                    if skipping:
                        skipping = False
                    elif len(buf) + (nl - start) > self._max:
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
                if not self._charge(len(buf)):
                    buf.clear()
                    skipping = True
                    self._charge(0)
                    yield self._budget_full()
                if not buf and not skipping:
                    self._waited = 0.0
        finally:
            self._charge(0)

    async def _read(self, frame_open: bool) -> bytes:
        """The next chunk; bounded by what is left of the frame timeout while a frame is open."""
        if not frame_open or self._timeout is None:
            return await self._reader.read(self._chunk)
        start = time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, self._timeout - self._waited)):
                chunk = await self._reader.read(self._chunk)
        except TimeoutError:
            raise FrameTimeout(
                f"no complete frame: a frame was started and its newline did not come "
                f"within frame_timeout_s={self._timeout:g}; closing the connection"
            ) from None
        self._waited += time.monotonic() - start
        return chunk

    def _charge(self, size: int) -> bool:
        """Hold ``size`` bytes of the budget for the unfinished frame; False if refused."""
        if self._budget is None:
            return True
        delta = size - self._held
        if delta > 0 and not self._budget.take(delta):
            return False
        if delta < 0:
            self._budget.give(-delta)
        self._held = size
        return True

    def _too_large(self) -> FrameTooLarge:
        return FrameTooLarge(
            f"frame too large: a frame may be at most {self._max} bytes "
            "(MAX_FRAME_BYTES); it was skipped up to the next newline"
        )

    def _budget_full(self) -> BufferFull:
        return BufferFull(
            "daemon busy: unfinished frames of all connections hold the whole "
            "max_buffered_bytes budget; this frame was skipped up to its newline; retry"
        )
