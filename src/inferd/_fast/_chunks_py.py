"""Pure-Python twin of ``_chunks_c``: OpenAI chat-chunk accumulation and the fused decoder.

:class:`ChunkAccumulator` turns ``chat.completion.chunk`` objects into inferd events
(rules in :mod:`inferd.toolcalls`); :class:`ChatStreamDecoder` goes from raw response
bytes to events: SSE framing (the ``_sse_py`` scanner), ``orjson.loads``, ``[DONE]``,
accumulation. Keep in step with ``_chunks_c.pyx``: same behaviour, same messages.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson

from inferd._fast._sse_py import _SSEScanner
from inferd._fast._stream_common import (
    DEFAULT_MAX_CALL_ARGS,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_STREAM_ARGS,
    FRAGMENT_COST,
    LOG_PAYLOAD_CHARS,
    args_too_big_message,
    upstream_error_message,
)
from inferd.errors import BackendUnavailable, InternalError
from inferd.openai_wire import STOP_REASONS
from inferd.types import Done, Event, StopReason, Text, Thinking, ToolUse, ToolUseDelta, Usage

__all__ = ["IMPLEMENTATION", "ChatStreamDecoder", "ChunkAccumulator"]

IMPLEMENTATION = "py"

log = logging.getLogger("inferd.toolcalls")

#: OpenAI finish_reason -> StopReason: the one table, owned by :mod:`inferd.openai_wire`.
_FINISH: dict[str, StopReason] = STOP_REASONS


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _as_int(v: object) -> int:
    return v if type(v) is int else 0


class _Call:
    """One tool call being assembled. ``parts`` are joined once, at the end."""

    __slots__ = ("emitted", "id", "index", "name", "parts", "sent", "seq", "size", "type")

    def __init__(self, index: int, seq: int) -> None:
        self.index = index
        self.seq = seq
        self.id: str | None = None
        self.name: str | None = None
        self.type: str | None = None
        self.parts: list[str] = []
        self.size = 0  # what this call counts against max_call_args
        self.emitted = False
        self.sent = -1  # parts forwarded as ToolUseDelta (-1: none yet, no id+name)


class ChunkAccumulator:
    """OpenAI ``chat.completion.chunk`` dicts in, inferd events out.

    The rules are listed in :mod:`inferd.toolcalls`.
    """

    def __init__(
        self,
        max_call_args: int = DEFAULT_MAX_CALL_ARGS,
        max_stream_args: int = DEFAULT_MAX_STREAM_ARGS,
        stream_args: bool = False,
    ) -> None:
        self._stream_args = stream_args
        self._max_call_args = max_call_args
        self._max_stream_args = max_stream_args
        self._args_size = 0  # what all calls count against max_stream_args
        self._calls: list[_Call] = []
        self._by_index: dict[int, _Call] = {}
        self._open: _Call | None = None  # the call a delta without index continues
        self._next_index = 0  # index given to a new call that came without one
        self._finish_reason: str | None = None
        self._usage: Usage | None = None
        self._named = 0  # calls that got a name (complete enough to act on)
        self._finalized = False

    @property
    def finish_reason(self) -> str | None:
        """The last ``finish_reason`` seen, as the upstream spelled it."""
        return self._finish_reason

    @property
    def usage(self) -> Usage | None:
        """The last ``usage`` seen, ``None`` until one arrives."""
        return self._usage

    # -- ingest ---------------------------------------------------------------

    def ingest(self, chunk: dict[str, Any]) -> list[Event]:
        """Take one chunk; return the events it completes (text at once, tools at finish)."""
        out: list[Event] = []
        self._ingest(chunk, out)
        return out

    def _ingest(self, chunk: object, out: list[Event]) -> None:
        if self._finalized:
            raise InternalError("ChunkAccumulator.ingest() called after finalize()")
        if type(chunk) is not dict:
            log.warning("ignoring a stream chunk that is not a JSON object: %.200r", chunk)
            return
        err = chunk.get("error")
        if err:
            raise BackendUnavailable(upstream_error_message(err))
        usage = chunk.get("usage")
        if type(usage) is dict:
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if type(details) is dict else 0
            self._usage = Usage(
                _as_int(usage.get("prompt_tokens")),
                _as_int(usage.get("completion_tokens")),
                _as_int(cached),
            )
        choices = chunk.get("choices")
        if type(choices) is not list:
            return
        for choice in choices:
            if type(choice) is not dict:
                continue
            cidx = choice.get("index")
            if cidx is not None and cidx != 0:
                continue  # only the first choice becomes events
            delta = choice.get("delta")
            if type(delta) is dict:
                self._delta(delta, out)
            fr = choice.get("finish_reason")
            if type(fr) is str and fr:
                self._finish_reason = fr
                self._emit_calls(out)

    def _delta(self, delta: dict[str, Any], out: list[Event]) -> None:
        think = delta.get("reasoning_content")
        if type(think) is not str or not think:
            think = delta.get("reasoning")
        if type(think) is str and think:
            out.append(Thinking(think))
        text = delta.get("content")
        if type(text) is str and text:
            out.append(Text(text))
        calls = delta.get("tool_calls")
        if type(calls) is list:
            for tc in calls:
                if type(tc) is dict:
                    self._tool_delta(tc, tc.get("function"), tc.get("index"), out)
        fc = delta.get("function_call")  # the legacy single-function form
        if type(fc) is dict:
            self._tool_delta(fc, fc, None, out)

    def _tool_delta(self, tc: dict[str, Any], fn: object, idx: object, out: list[Event]) -> None:
        call_id = tc.get("id")
        if type(call_id) is not str or not call_id:
            call_id = None
        ctype = tc.get("type")
        if type(ctype) is not str or not ctype:
            ctype = None
        name = args = None
        if type(fn) is dict:
            name = fn.get("name")
            if type(name) is not str or not name:
                name = None
            args = fn.get("arguments")
        if type(idx) is not int:
            idx = None
        call = self._open if idx is None else self._by_index.get(idx)
        if call is None or call.emitted or self._starts_new(call, call_id, name):
            if idx is None:
                idx = self._next_index
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
                self._charge(call, len(args) + FRAGMENT_COST)
                call.parts.append(args)
        elif args is not None:
            text = orjson.dumps(args).decode()
            self._charge(call, len(text) + FRAGMENT_COST)
            call.parts.append(text)
        if self._stream_args and call.id is not None and call.name is not None:
            self._forward(call, out)

    @staticmethod
    def _forward(call: _Call, out: list[Event]) -> None:
        # stream_args: the parts not forwarded yet, as one ToolUseDelta (the first one,
        # once the call has an id and a name, carries every part so far).
        if call.sent < 0 or len(call.parts) > call.sent:
            frag = "".join(call.parts[max(call.sent, 0) :])
            call.sent = len(call.parts)
            out.append(ToolUseDelta(call.seq, call.id, call.name, frag))  # type: ignore[arg-type]

    def _charge(self, call: _Call, cost: int) -> None:
        # Refuse before keeping: an endless argument stream must not exhaust memory.
        call.size += cost
        self._args_size += cost
        if call.size > self._max_call_args:
            raise BackendUnavailable(
                args_too_big_message("one call", "max_call_args", self._max_call_args)
            )
        if self._args_size > self._max_stream_args:
            raise BackendUnavailable(
                args_too_big_message("one stream", "max_stream_args", self._max_stream_args)
            )

    @staticmethod
    def _starts_new(call: _Call, call_id: str | None, name: str | None) -> bool:
        # A value that differs from the one already set means another call; so does
        # an id or name that arrives after the arguments began (they come first).
        if call_id is not None and call_id != call.id and (call.id is not None or call.parts):
            return True
        return (
            name is not None and name != call.name and (call.name is not None or bool(call.parts))
        )

    # -- finish ---------------------------------------------------------------

    def _emit_calls(self, out: list[Event]) -> None:
        pending = [c for c in self._calls if not c.emitted]
        if not pending:
            return
        pending.sort(key=lambda c: (c.index, c.seq))
        for c in pending:
            c.emitted = True
            out.append(self._tool_use(c))

    @staticmethod
    def _tool_use(c: _Call) -> ToolUse:
        call_id = c.id if c.id is not None else _new_call_id()
        name = c.name
        if name is None:
            log.warning(
                "tool call %s (index %d) never got a function name; it is reported "
                "with name '' so the caller can answer it with an error",
                call_id,
                c.index,
            )
            name = ""
        raw = "".join(c.parts)
        if not raw or raw.isspace():
            return ToolUse(call_id, name, {}, raw)
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            value = None
        if type(value) is not dict:
            log.warning(
                "tool call %s (%s): arguments are not a JSON object; input=None, "
                "raw_arguments kept: %.200r",
                call_id,
                name,
                raw,
            )
            return ToolUse(call_id, name, None, raw)
        return ToolUse(call_id, name, value, raw)

    def _stop_reason(self) -> StopReason:
        fr = self._finish_reason
        if fr is None:
            return StopReason.ERROR
        reason = _FINISH.get(fr, StopReason.END_TURN)
        if reason is StopReason.END_TURN and self._named:
            return StopReason.TOOL_USE
        return reason

    def finalize(self) -> list[Event]:
        """End of stream: the tool calls not yet emitted, then exactly one ``Done``."""
        out: list[Event] = []
        self._finalize(out)
        return out

    def _finalize(self, out: list[Event]) -> None:
        if self._finalized:
            raise InternalError("ChunkAccumulator.finalize() called twice")
        self._emit_calls(out)
        self._finalized = True
        out.append(Done(self._stop_reason(), self._usage if self._usage is not None else Usage()))


class ChatStreamDecoder(_SSEScanner):
    """Raw ``text/event-stream`` bytes of a chat completion in, inferd events out."""

    def __init__(
        self,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_call_args: int = DEFAULT_MAX_CALL_ARGS,
        max_stream_args: int = DEFAULT_MAX_STREAM_ARGS,
        stream_args: bool = False,
    ) -> None:
        super().__init__(max_event_bytes)
        self._acc = ChunkAccumulator(max_call_args, max_stream_args, stream_args)
        self._out: list[Event] = []
        self._finished = False
        self._bytes_in = 0
        self._events_in = 0
        self._malformed = 0

    @property
    def finished(self) -> bool:
        """True once ``Done`` was produced (at ``[DONE]``, at ``close()``, or on an error)."""
        return self._finished

    @property
    def finish_reason(self) -> str | None:
        """The last ``finish_reason`` seen (the stream may still send usage or ``[DONE]``)."""
        return self._acc._finish_reason

    @property
    def usage(self) -> Usage | None:
        """The last ``usage`` seen, ``None`` until one arrives."""
        return self._acc._usage

    @property
    def stats(self) -> dict[str, int]:
        """Counters: bytes fed, server-sent events seen, events skipped as malformed."""
        return {"bytes": self._bytes_in, "events": self._events_in, "malformed": self._malformed}

    def _emit(self, event: bytes | None, data: bytes) -> None:
        self._events_in += 1
        if event is not None and event != b"message":
            if event == b"error":
                self._error_event(data)
            return  # other event types are not chat chunks
        if data.startswith(b"[DONE]"):
            self._stop = True
            self._finished = True
            self._acc._finalize(self._out)
            return
        obj = self._loads(data)
        if obj is not None:
            self._acc._ingest(obj, self._out)

    def _loads(self, data: bytes) -> object:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            # Invalid UTF-8 becomes U+FFFD, as the event-stream standard says.
            text = data.decode("utf-8", "replace")
            try:
                obj = orjson.loads(text)
            except orjson.JSONDecodeError:
                obj = None
        if type(obj) is not dict:
            self._malformed += 1
            log.warning(
                "skipping a stream event whose data is not a JSON object: %.200r",
                data.decode("utf-8", "replace"),
            )
            return None
        return obj

    def _error_event(self, data: bytes) -> None:
        self._stop = True
        self._finished = True
        try:
            obj = orjson.loads(data.decode("utf-8", "replace"))
        except orjson.JSONDecodeError:
            obj = None
        if type(obj) is dict and obj.get("error"):
            raise BackendUnavailable(upstream_error_message(obj["error"]))
        text = data.decode("utf-8", "replace")[:LOG_PAYLOAD_CHARS]
        raise BackendUnavailable(upstream_error_message(text or obj))

    def feed(self, data: bytes) -> list[Event]:
        """Parse the next piece of the response body; return the events it completed."""
        if self._finished:
            return []
        chunk = bytes(data) if not isinstance(data, bytes) else data
        self._bytes_in += len(chunk)
        try:
            self._scan(chunk)
        except BaseException:
            self._finished = True
            self._out = []
            raise
        out = self._out
        self._out = []
        return out

    def close(self) -> list[Event]:
        """End of the response body: finish the stream if ``[DONE]`` never came."""
        if self._finished:
            return []
        self._finish()
        self._finished = True
        self._acc._finalize(self._out)
        out = self._out
        self._out = []
        return out
