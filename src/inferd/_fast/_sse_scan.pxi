# cython: language_level=3
# Shared SSE framing for _sse_c.pyx and _chunks_c.pyx (included by both, so each
# compiled module stands alone). C twin of _SSEScanner in _sse_py.py: keep in step.
#
# Lines are split on bytes with memchr (CR/LF never occur inside a UTF-8 multi-byte
# sequence); only the partial last line is copied between feeds, into a bytearray.
# Subclasses override _emit(event_or_None, data_bytes).

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp

from inferd._fast._stream_common import (
    DEFAULT_MAX_EVENT_BYTES,
    SSEError,
    SSEEvent,
    too_big_message,
)
from inferd.errors import InternalError, InvalidRequest
from inferd.limits import echo

cdef const unsigned char* _BOM = b"\xef\xbb\xbf"


cdef class _SSEScanner:
    cdef Py_ssize_t _max
    cdef bytearray _pend
    cdef int _bom_pos
    cdef bint _skip_lf
    cdef bytes _data1          # the first data line (the common, single-line case)
    cdef list _data            # further data lines, or None
    cdef Py_ssize_t _ndata
    cdef Py_ssize_t _data_size
    cdef object _event         # bytes or None
    cdef str _id
    cdef object _retry
    cdef bint _stop
    cdef bint _closed

    def __init__(self, max_event_bytes=DEFAULT_MAX_EVENT_BYTES):
        if not isinstance(max_event_bytes, int) or max_event_bytes < 1:
            raise InvalidRequest(
                f"max_event_bytes must be a positive integer, got {echo(max_event_bytes)}")
        self._max = max_event_bytes
        self._pend = bytearray()
        self._bom_pos = 0
        self._skip_lf = False
        self._data1 = None
        self._data = None
        self._ndata = 0
        self._data_size = 0
        self._event = None
        self._id = ""
        self._retry = None
        self._stop = False
        self._closed = False

    cdef int _emit(self, object event, bytes data) except -1:
        raise NotImplementedError

    cdef int _scan(self, bytes chunk) except -1:
        cdef const unsigned char* p
        cdef const unsigned char* hit
        cdef Py_ssize_t n, i, end, lf, cr, plen
        cdef bytes line
        if self._closed:
            raise InternalError("feed() called after close(); make a new parser per stream")
        p = <const unsigned char*> PyBytes_AS_STRING(chunk)
        n = PyBytes_GET_SIZE(chunk)
        i = 0
        if self._bom_pos < 3:
            while i < n and self._bom_pos < 3 and p[i] == _BOM[self._bom_pos]:
                self._bom_pos += 1
                i += 1
            if self._bom_pos < 3:
                if i == n:
                    return 0
                self._pend += b"\xef\xbb\xbf"[:self._bom_pos]
                self._bom_pos = 3
        if self._skip_lf and i < n:
            if p[i] == 10:
                i += 1
            self._skip_lf = False
        lf = -2
        cr = -2
        while i < n and not self._stop:
            if lf != -1 and lf < i:
                hit = <const unsigned char*> memchr(p + i, 10, <size_t> (n - i))
                lf = -1 if hit == NULL else hit - p
            if cr != -1 and cr < i:
                hit = <const unsigned char*> memchr(p + i, 13, <size_t> (n - i))
                cr = -1 if hit == NULL else hit - p
            if lf == -1:
                end = cr
            elif cr == -1:
                end = lf
            else:
                end = lf if lf < cr else cr
            if end == -1:
                break
            plen = PyByteArray_GET_SIZE(self._pend)
            if plen:
                if plen + end - i > self._max:
                    raise SSEError(too_big_message("line", self._max))
                self._pend += chunk[i:end]
                line = bytes(self._pend)
                del self._pend[:]
                self._line(<const unsigned char*> PyBytes_AS_STRING(line),
                           PyBytes_GET_SIZE(line))
            else:
                if end - i > self._max:
                    raise SSEError(too_big_message("line", self._max))
                self._line(p + i, end - i)
            i = end + 1
            if p[end] == 13:
                if i < n:
                    if p[i] == 10:
                        i += 1
                else:
                    self._skip_lf = True
        if i < n and not self._stop:
            plen = PyByteArray_GET_SIZE(self._pend)
            if plen + n - i > self._max:
                raise SSEError(too_big_message("line", self._max))
            self._pend += chunk[i:]
        return 0

    cdef int _line(self, const unsigned char* q, Py_ssize_t n) except -1:
        cdef const unsigned char* colon
        cdef Py_ssize_t nlen, vstart, vlen, size, k
        cdef bytes value
        if n == 0:
            return self._dispatch()
        if q[0] == 58:  # ':' comment
            return 0
        colon = <const unsigned char*> memchr(q, 58, <size_t> n)
        if colon == NULL:
            nlen = n
            vstart = n
        else:
            nlen = colon - q
            vstart = nlen + 1
            if vstart < n and q[vstart] == 32:
                vstart += 1
        vlen = n - vstart
        if nlen == 4 and memcmp(q, b"data", 4) == 0:
            size = self._data_size + vlen + (1 if self._ndata else 0)
            if size > self._max:
                raise SSEError(too_big_message("event", self._max))
            self._data_size = size
            value = PyBytes_FromStringAndSize(<const char*> q + vstart, vlen)
            if self._ndata == 0:
                self._data1 = value
            else:
                if self._data is None:
                    self._data = [self._data1]
                self._data.append(value)
            self._ndata += 1
        elif nlen == 5 and memcmp(q, b"event", 5) == 0:
            self._event = PyBytes_FromStringAndSize(<const char*> q + vstart, vlen)
        elif nlen == 2 and memcmp(q, b"id", 2) == 0:
            if memchr(q + vstart, 0, <size_t> vlen) == NULL:
                self._id = (<const char*> q)[vstart:n].decode("utf-8", "replace")
        elif nlen == 5 and memcmp(q, b"retry", 5) == 0:
            if vlen == 0:
                return 0
            for k in range(vstart, n):
                if q[k] < 48 or q[k] > 57:
                    return 0
            try:
                self._retry = int(PyBytes_FromStringAndSize(<const char*> q + vstart, vlen))
            except ValueError:  # more digits than int() accepts: ignore the field
                pass
        return 0

    cdef int _dispatch(self) except -1:
        cdef bytes payload
        cdef object event
        if self._ndata == 0:
            self._event = None
            return 0
        if self._ndata == 1:
            payload = self._data1
        else:
            payload = b"\n".join(self._data)
        event = self._event
        self._data1 = None
        self._data = None
        self._ndata = 0
        self._data_size = 0
        self._event = None
        self._emit(event, payload)
        self._retry = None
        return 0

    cdef void _finish(self):
        self._closed = True
        del self._pend[:]
        self._data1 = None
        self._data = None
        self._ndata = 0
        self._data_size = 0
        self._event = None
