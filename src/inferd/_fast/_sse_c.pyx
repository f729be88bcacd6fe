# cython: language_level=3
"""C twin of ``_sse_py``: WHATWG event-stream parsing with memchr line scanning.

Same API, behaviour and error messages as the pure-Python twin (the test suite runs
both and a differential property test compares them). The framing itself lives in
``_sse_scan.pxi`` so the fused chat decoder in ``_chunks_c`` compiles the same code
without going through Python-level events.
"""

include "_sse_scan.pxi"

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "IMPLEMENTATION", "SSEError", "SSEEvent", "SSEParser"]

IMPLEMENTATION = "c"

cdef object _SSEEvent_new = tuple.__new__


cdef class SSEParser(_SSEScanner):
    """Incremental ``text/event-stream`` parser (see :mod:`inferd.sse`)."""

    cdef list _out

    def __init__(self, max_event_bytes=DEFAULT_MAX_EVENT_BYTES):
        _SSEScanner.__init__(self, max_event_bytes)
        self._out = []

    @property
    def last_event_id(self):
        """The last event ID so far ("" until an ``id`` field sets one)."""
        return self._id

    cdef int _emit(self, object event, bytes data) except -1:
        self._out.append(_SSEEvent_new(SSEEvent, (
            (<bytes> event).decode("utf-8", "replace") if event else "message",
            data.decode("utf-8", "replace"),
            self._id,
            self._retry,
        )))
        return 0

    def feed(self, data):
        """Parse the next piece of the stream; return the events it completed."""
        cdef list out
        self._scan(data if type(data) is bytes else bytes(data))
        out = self._out
        self._out = []
        return out

    def close(self):
        """End of stream. An event without its final blank line is discarded."""
        if not self._closed:
            self._finish()
        return []
