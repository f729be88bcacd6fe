"""Pure-Python twin of ``_sse_c``: WHATWG "event stream interpretation" over bytes.

The stream is split into lines on bytes (CR, LF and CRLF are ASCII, so they never
occur inside a multi-byte UTF-8 sequence) and each *complete* line is decoded with
``errors="replace"``. That equals decoding the whole stream first: a character split
across two ``feed`` calls is still whole when its line is decoded, and an invalid
sequence ends at the line break either way. Only the partial last line is buffered,
so work is linear in the input and memory is bounded by ``max_event_bytes``.

:class:`_SSEScanner` does the framing and calls :meth:`_SSEScanner._emit` per
dispatched event with the raw bytes; :class:`SSEParser` turns that into
:class:`SSEEvent` objects and the fused chat decoder (``_chunks_py``) reuses the
scanner without building them. Keep in step with ``_sse_scan.pxi``.
"""

from __future__ import annotations

from inferd._fast._stream_common import (
    DEFAULT_MAX_EVENT_BYTES,
    SSEError,
    SSEEvent,
    too_big_message,
)
from inferd.errors import InternalError, InvalidRequest
from inferd.limits import echo

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "IMPLEMENTATION", "SSEError", "SSEEvent", "SSEParser"]

IMPLEMENTATION = "py"

_BOM = b"\xef\xbb\xbf"
_CR = 13
_LF = 10


class _SSEScanner:
    """Line framing and field interpretation; subclasses implement ``_emit``."""

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if not isinstance(max_event_bytes, int) or max_event_bytes < 1:
            raise InvalidRequest(
                f"max_event_bytes must be a positive integer, got {echo(max_event_bytes)}"
            )
        self._max = max_event_bytes
        self._pend = bytearray()  # the partial line carried between feeds
        self._bom_pos = 0  # bytes of a leading BOM matched so far; 3 = decided
        self._skip_lf = False  # the previous line ended in CR: a next LF belongs to it
        self._data: list[bytes] = []
        self._data_size = 0
        self._event: bytes | None = None
        self._id = ""
        self._retry: int | None = None
        self._stop = False  # a subclass may end scanning (``[DONE]``)
        self._closed = False

    # -- subclass hook ------------------------------------------------------

    def _emit(self, event: bytes | None, data: bytes) -> None:  # pragma: no cover
        raise NotImplementedError

    # -- framing ------------------------------------------------------------

    def _scan(self, chunk: bytes) -> None:
        if self._closed:
            raise InternalError("feed() called after close(); make a new parser per stream")
        n = len(chunk)
        i = 0
        if self._bom_pos < 3:
            while i < n and self._bom_pos < 3 and chunk[i] == _BOM[self._bom_pos]:
                self._bom_pos += 1
                i += 1
            if self._bom_pos < 3:
                if i == n:
                    return  # all of it may still be a BOM
                # Not a BOM: the bytes matched so far belong to the first line.
                self._pend += _BOM[: self._bom_pos]
                self._bom_pos = 3
        if self._skip_lf and i < n:
            if chunk[i] == _LF:
                i += 1
            self._skip_lf = False
        pend = self._pend
        find_lf = chunk.find
        lf = cr = -2  # cached positions of the next LF / CR at or after i (-1: none)
        while i < n and not self._stop:
            if lf != -1 and lf < i:
                lf = find_lf(b"\n", i)
            if cr != -1 and cr < i:
                cr = find_lf(b"\r", i)
            if lf == -1:
                end = cr
            elif cr == -1:
                end = lf
            else:
                end = min(lf, cr)
            if end == -1:
                break
            if pend:
                if len(pend) + end - i > self._max:
                    raise SSEError(too_big_message("line", self._max))
                pend += chunk[i:end]
                line = bytes(pend)
                pend.clear()
            else:
                if end - i > self._max:
                    raise SSEError(too_big_message("line", self._max))
                line = chunk[i:end]
            i = end + 1
            if chunk[end] == _CR:
                if i < n:
                    if chunk[i] == _LF:
                        i += 1
                else:
                    self._skip_lf = True
            self._line(line)
        if i < n and not self._stop:
            if len(pend) + n - i > self._max:
                raise SSEError(too_big_message("line", self._max))
            pend += chunk[i:]

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line[0] == 58:  # ":" comment
            return
        colon = line.find(b":")
        if colon == -1:
            name = line
            value = b""
        else:
            name = line[:colon]
            start = colon + 1
            if start < len(line) and line[start] == 32:
                start += 1
            value = line[start:]
        if name == b"data":
            size = self._data_size + len(value) + (1 if self._data else 0)
            if size > self._max:
                raise SSEError(too_big_message("event", self._max))
            self._data_size = size
            self._data.append(value)
        elif name == b"event":
            self._event = value
        elif name == b"id":
            if b"\x00" not in value:
                self._id = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value and value.isdigit():  # bytes.isdigit is ASCII-only
                try:
                    self._retry = int(value)
                except ValueError:  # more digits than int() accepts: ignore the field
                    pass
        # any other field name is ignored, as the standard says

    def _dispatch(self) -> None:
        data = self._data
        if not data:
            self._event = None
            return
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        event = self._event
        self._data = []
        self._data_size = 0
        self._event = None
        self._emit(event, payload)
        self._retry = None

    def _finish(self) -> None:
        """End of stream: an incomplete event is discarded, as the standard says."""
        self._closed = True
        self._pend.clear()
        self._data = []
        self._data_size = 0
        self._event = None


class SSEParser(_SSEScanner):
    """Incremental ``text/event-stream`` parser (see :mod:`inferd.sse`)."""

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        super().__init__(max_event_bytes)
        self._out: list[SSEEvent] = []

    @property
    def last_event_id(self) -> str:
        """The last event ID so far ("" until an ``id`` field sets one)."""
        return self._id

    def _emit(self, event: bytes | None, data: bytes) -> None:
        self._out.append(
            SSEEvent(
                event.decode("utf-8", "replace") if event else "message",
                data.decode("utf-8", "replace"),
                self._id,
                self._retry,
            )
        )

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Parse the next piece of the stream; return the events it completed."""
        self._scan(bytes(data) if not isinstance(data, bytes) else data)
        out = self._out
        self._out = []
        return out

    def close(self) -> list[SSEEvent]:
        """End of stream. An event without its final blank line is discarded."""
        if not self._closed:
            self._finish()
        return []
