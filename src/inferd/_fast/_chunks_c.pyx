# cython: language_level=3
"""C twin of ``_chunks_py``: chat-chunk accumulation and the fused bytes->events decoder.

Same API, behaviour and messages as the pure-Python twin. The decoder compiles the
SSE framing in (``_sse_scan.pxi``) and hands each ``data`` payload, as bytes straight
from the scanner, to ``orjson.loads``; no Python-level SSE event objects are made.
``Text``/``Thinking`` events are built without running the frozen dataclass
``__init__`` (which costs more than parsing the chunk).
"""

include "_sse_scan.pxi"

from cpython.object cimport PyObject_GenericSetAttr

import logging
import uuid

import orjson

from inferd._fast._stream_common import (
    DEFAULT_MAX_CALL_ARGS,
    DEFAULT_MAX_STREAM_ARGS,
    FRAGMENT_COST,
    LOG_PAYLOAD_CHARS,
    args_too_big_message,
    upstream_error_message,
)
from inferd.errors import BackendUnavailable
from inferd.openai_wire import STOP_REASONS
from inferd.types import Done, StopReason, Text, Thinking, ToolUse, ToolUseDelta, Usage

__all__ = ["IMPLEMENTATION", "ChatStreamDecoder", "ChunkAccumulator"]

IMPLEMENTATION = "c"

log = logging.getLogger("inferd.toolcalls")

cdef object _loads = orjson.loads
cdef object _dumps = orjson.dumps
cdef object _JSONDecodeError = orjson.JSONDecodeError
cdef object _object_new = object.__new__
cdef object _Text = Text
cdef object _Thinking = Thinking
cdef str _S_TEXT = "text"

# OpenAI finish_reason -> StopReason: the one table, owned by inferd.openai_wire.
cdef dict _FINISH = STOP_REASONS
cdef object _END_TURN = StopReason.END_TURN
cdef object _TOOL_USE = StopReason.TOOL_USE
cdef object _ERROR = StopReason.ERROR


cdef inline object _text_event(object cls, str text):
    cdef object ev = _object_new(cls)
    PyObject_GenericSetAttr(ev, _S_TEXT, text)
    return ev


cdef inline object _as_int(object v):
    return v if type(v) is int else 0


def _new_call_id():
    return "call_" + uuid.uuid4().hex[:24]


cdef class _Call:
    cdef public object index
    cdef public Py_ssize_t seq
    cdef public object id
    cdef public object name
    cdef public object type
    cdef public list parts
    cdef public Py_ssize_t size
    cdef public bint emitted
    cdef public Py_ssize_t sent

    def __init__(self, object index, Py_ssize_t seq):
        self.index = index
        self.seq = seq
        self.id = None
        self.name = None
        self.type = None
        self.parts = []
        self.size = 0
        self.emitted = False
        self.sent = -1  # parts forwarded as ToolUseDelta (-1: none yet, no id+name)


def _call_key(_Call c):
    return (c.index, c.seq)


cdef class ChunkAccumulator:
    """OpenAI ``chat.completion.chunk`` dicts in, inferd events out.

    The rules are listed in :mod:`inferd.toolcalls`.
    """

    cdef list _calls
    cdef dict _by_index
    cdef _Call _open
    cdef object _next_index
    cdef object _finish_reason
    cdef object _usage
    cdef Py_ssize_t _named
    cdef bint _finalized
    cdef Py_ssize_t _max_call_args
    cdef Py_ssize_t _max_stream_args
    cdef Py_ssize_t _args_size
    cdef bint _stream_args

    def __init__(self, max_call_args=DEFAULT_MAX_CALL_ARGS,
                 max_stream_args=DEFAULT_MAX_STREAM_ARGS, stream_args=False):
        self._stream_args = stream_args
        self._max_call_args = max_call_args
        self._max_stream_args = max_stream_args
        self._args_size = 0
        self._calls = []
        self._by_index = {}
        self._open = None
        self._next_index = 0
        self._finish_reason = None
        self._usage = None
        self._named = 0
        self._finalized = False

    @property
    def finish_reason(self):
        """The last ``finish_reason`` seen, as the upstream spelled it."""
        return self._finish_reason

    @property
    def usage(self):
        """The last ``usage`` seen, ``None`` until one arrives."""
        return self._usage

    def ingest(self, chunk):
        """Take one chunk; return the events it completes (text at once, tools at finish)."""
        cdef list out = []
        self._ingest(chunk, out)
        return out

    cdef int _ingest(self, object chunk, list out) except -1:
        cdef dict d, u
        cdef object err, usage, details, cached, choices, choice, cidx, delta, fr
        if self._finalized:
            raise InternalError("ChunkAccumulator.ingest() called after finalize()")
        if type(chunk) is not dict:
            log.warning("ignoring a stream chunk that is not a JSON object: %.200r", chunk)
            return 0
        d = <dict> chunk
        err = d.get("error")
        if err:
            raise BackendUnavailable(upstream_error_message(err))
        usage = d.get("usage")
        if type(usage) is dict:
            u = <dict> usage
            details = u.get("prompt_tokens_details")
            cached = (<dict> details).get("cached_tokens") if type(details) is dict else 0
            self._usage = Usage(
                _as_int(u.get("prompt_tokens")),
                _as_int(u.get("completion_tokens")),
                _as_int(cached),
            )
        choices = d.get("choices")
        if type(choices) is not list:
            return 0
        for choice in <list> choices:
            if type(choice) is not dict:
                continue
            cidx = (<dict> choice).get("index")
            if cidx is not None and cidx != 0:
                continue
            delta = (<dict> choice).get("delta")
            if type(delta) is dict:
                self._delta(<dict> delta, out)
            fr = (<dict> choice).get("finish_reason")
            if type(fr) is str and fr:
                self._finish_reason = fr
                self._emit_calls(out)
        return 0

    cdef int _delta(self, dict delta, list out) except -1:
        # Same lookups as the Python twin, but once every key of the (small) delta is
        # accounted for, the remaining lookups are skipped: they would all miss.
        cdef object think = None, text, calls = None, tc, fc = None
        cdef Py_ssize_t n = len(delta), found = 0
        text = delta.get("content")
        if text is not None:
            found += 1
        if found < n:
            calls = delta.get("tool_calls")
            if calls is not None:
                found += 1
        if found < n:
            think = delta.get("reasoning_content")
            if think is not None:
                found += 1
            if (type(think) is not str or not think) and found < n:
                think = delta.get("reasoning")
                if think is not None:
                    found += 1
            if found < n:
                fc = delta.get("function_call")
        if type(think) is str and think:
            out.append(_text_event(_Thinking, <str> think))
        if type(text) is str and text:
            out.append(_text_event(_Text, <str> text))
        if type(calls) is list:
            for tc in <list> calls:
                if type(tc) is dict:
                    self._tool_delta(<dict> tc, (<dict> tc).get("function"),
                                     (<dict> tc).get("index"), out)
        if type(fc) is dict:
            self._tool_delta(<dict> fc, fc, None, out)
        return 0

    cdef int _tool_delta(self, dict tc, object fn, object idx_obj, list out) except -1:
        cdef object call_id, ctype, name = None, args = None
        cdef _Call call
        cdef object idx
        cdef bint has_idx = type(idx_obj) is int
        cdef Py_ssize_t found = (idx_obj is not None) + (fn is not None and fn is not tc)
        call_id = ctype = None
        if found < len(tc):  # continuation deltas carry only index and function
            call_id = tc.get("id")
            if type(call_id) is not str or not call_id:
                call_id = None
            ctype = tc.get("type")
            if type(ctype) is not str or not ctype:
                ctype = None
        if type(fn) is dict:
            args = (<dict> fn).get("arguments")
            if args is None or len(<dict> fn) > 1:
                name = (<dict> fn).get("name")
                if type(name) is not str or not name:
                    name = None
        if has_idx:
            call = self._by_index.get(idx_obj)
        else:
            call = self._open
        if call is None or call.emitted or _starts_new(call, call_id, name):
            idx = idx_obj if has_idx else self._next_index
            call = _Call(idx, len(self._calls))
            self._charge(call, FRAGMENT_COST)
            self._calls.append(call)
            self._by_index[idx] = call
            if idx >= self._next_index:
                self._next_index = idx + 1
        self._open = call
        if call_id is not None and call.id is None:
            call.id = call_id
        if ctype is not None and call.type is None:
            call.type = ctype
        if name is not None and call.name is None:
            call.name = name
            self._named += 1
        if type(args) is str:
            if args:
                self._charge(call, len(<str> args) + FRAGMENT_COST)
                call.parts.append(args)
        elif args is not None:
            text = _dumps(args).decode()
            self._charge(call, len(text) + FRAGMENT_COST)
            call.parts.append(text)
        if self._stream_args and call.id is not None and call.name is not None:
            _forward(call, out)
        return 0

    cdef int _charge(self, _Call call, Py_ssize_t cost) except -1:
        # Refuse before keeping: an endless argument stream must not exhaust memory.
        call.size += cost
        self._args_size += cost
        if call.size > self._max_call_args:
            raise BackendUnavailable(
                args_too_big_message("one call", "max_call_args", self._max_call_args))
        if self._args_size > self._max_stream_args:
            raise BackendUnavailable(
                args_too_big_message("one stream", "max_stream_args", self._max_stream_args))
        return 0

    cdef int _emit_calls(self, list out) except -1:
        cdef list pending = [c for c in self._calls if not (<_Call> c).emitted]
        cdef _Call c
        if not pending:
            return 0
        pending.sort(key=_call_key)
        for c in pending:
            c.emitted = True
            out.append(_tool_use(c))
        return 0

    cdef object _stop_reason(self):
        fr = self._finish_reason
        if fr is None:
            return _ERROR
        reason = _FINISH.get(fr, _END_TURN)
        if reason is _END_TURN and self._named:
            return _TOOL_USE
        return reason

    def finalize(self):
        """End of stream: the tool calls not yet emitted, then exactly one ``Done``."""
        cdef list out = []
        self._finalize(out)
        return out

    cdef int _finalize(self, list out) except -1:
        if self._finalized:
            raise InternalError("ChunkAccumulator.finalize() called twice")
        self._emit_calls(out)
        self._finalized = True
        out.append(Done(self._stop_reason(), self._usage if self._usage is not None else Usage()))
        return 0


cdef int _forward(_Call call, list out) except -1:
    # stream_args: the parts not forwarded yet, as one ToolUseDelta (the first one,
    # once the call has an id and a name, carries every part so far).
    if call.sent < 0 or len(call.parts) > call.sent:
        frag = "".join(call.parts[max(call.sent, 0):])
        call.sent = len(call.parts)
        out.append(ToolUseDelta(call.seq, call.id, call.name, frag))
    return 0


cdef bint _starts_new(_Call call, object call_id, object name) except -1:
    # A value that differs from the one already set means another call; so does an
    # id or name that arrives after the arguments began (they come first).
    if call_id is not None and call_id != call.id and (call.id is not None or call.parts):
        return True
    return name is not None and name != call.name and (
        call.name is not None or bool(call.parts))


cdef object _tool_use(_Call c):
    call_id = c.id if c.id is not None else _new_call_id()
    name = c.name
    if name is None:
        log.warning(
            "tool call %s (index %d) never got a function name; it is reported "
            "with name '' so the caller can answer it with an error",
            call_id, c.index,
        )
        name = ""
    raw = "".join(c.parts)
    if not raw or raw.isspace():
        return ToolUse(call_id, name, {}, raw)
    try:
        value = _loads(raw)
    except _JSONDecodeError:
        value = None
    if type(value) is not dict:
        log.warning(
            "tool call %s (%s): arguments are not a JSON object; input=None, "
            "raw_arguments kept: %.200r",
            call_id, name, raw,
        )
        return ToolUse(call_id, name, None, raw)
    return ToolUse(call_id, name, value, raw)


cdef class ChatStreamDecoder(_SSEScanner):
    """Raw ``text/event-stream`` bytes of a chat completion in, inferd events out."""

    cdef ChunkAccumulator _acc
    cdef list _out
    cdef bint _finished
    cdef Py_ssize_t _bytes_in
    cdef Py_ssize_t _events_in
    cdef Py_ssize_t _malformed

    def __init__(self, max_event_bytes=DEFAULT_MAX_EVENT_BYTES,
                 max_call_args=DEFAULT_MAX_CALL_ARGS, max_stream_args=DEFAULT_MAX_STREAM_ARGS,
                 stream_args=False):
        _SSEScanner.__init__(self, max_event_bytes)
        self._acc = ChunkAccumulator(max_call_args, max_stream_args, stream_args)
        self._out = []
        self._finished = False
        self._bytes_in = 0
        self._events_in = 0
        self._malformed = 0

    @property
    def finished(self):
        """True once ``Done`` was produced (at ``[DONE]``, at ``close()``, or on an error)."""
        return self._finished

    @property
    def finish_reason(self):
        """The last ``finish_reason`` seen (the stream may still send usage or ``[DONE]``)."""
        return self._acc._finish_reason

    @property
    def usage(self):
        """The last ``usage`` seen, ``None`` until one arrives."""
        return self._acc._usage

    @property
    def stats(self):
        """Counters: bytes fed, server-sent events seen, events skipped as malformed."""
        return {"bytes": self._bytes_in, "events": self._events_in, "malformed": self._malformed}

    cdef int _emit(self, object event, bytes data) except -1:
        cdef object obj
        self._events_in += 1
        if event is not None and event != b"message":
            if event == b"error":
                self._error_event(data)
            return 0
        if PyBytes_GET_SIZE(data) >= 6 and memcmp(PyBytes_AS_STRING(data), b"[DONE]", 6) == 0:
            self._stop = True
            self._finished = True
            self._acc._finalize(self._out)
            return 0
        try:
            obj = _loads(data)
        except _JSONDecodeError:
            obj = self._loads_slow(data)
        if type(obj) is not dict:
            self._malformed += 1
            log.warning(
                "skipping a stream event whose data is not a JSON object: %.200r",
                data.decode("utf-8", "replace"),
            )
            return 0
        self._acc._ingest(obj, self._out)
        return 0

    cdef object _loads_slow(self, bytes data):
        # Invalid UTF-8 becomes U+FFFD, as the event-stream standard says.
        try:
            return _loads(data.decode("utf-8", "replace"))
        except _JSONDecodeError:
            return None

    cdef int _error_event(self, bytes data) except -1:
        self._stop = True
        self._finished = True
        try:
            obj = _loads(data.decode("utf-8", "replace"))
        except _JSONDecodeError:
            obj = None
        if type(obj) is dict and obj.get("error"):
            raise BackendUnavailable(upstream_error_message(obj["error"]))
        text = data.decode("utf-8", "replace")[:LOG_PAYLOAD_CHARS]
        raise BackendUnavailable(upstream_error_message(text or obj))

    def feed(self, data):
        """Parse the next piece of the response body; return the events it completed."""
        cdef list out
        if self._finished:
            return []
        chunk = data if type(data) is bytes else bytes(data)
        self._bytes_in += PyBytes_GET_SIZE(chunk)
        try:
            self._scan(chunk)
        except BaseException:
            self._finished = True
            self._out = []
            raise
        out = self._out
        self._out = []
        return out

    def close(self):
        """End of the response body: finish the stream if ``[DONE]`` never came."""
        cdef list out
        if self._finished:
            return []
        self._finish()
        self._finished = True
        self._acc._finalize(self._out)
        out = self._out
        self._out = []
        return out
