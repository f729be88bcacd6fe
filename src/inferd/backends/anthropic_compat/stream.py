"""The Messages API's SSE events -> inferd events, on the compiled SSE parser.

Event types (docs/adr/0014-anthropic-messages-both-ways.md): ``message_start`` (input
usage), ``content_block_start`` / ``content_block_delta`` / ``content_block_stop``
(``text_delta``, ``thinking_delta``, ``signature_delta``, ``input_json_delta``),
``message_delta`` (stop reason, output usage), ``message_stop``, ``ping`` and ``error``.
Unknown event types and unknown block kinds (server tools, future additions) are
skipped, as Anthropic's versioning policy asks of clients. A delta for a block index
never started, or a reply cut before its stop reason, is a broken upstream:
:class:`BackendUnavailable`.

A thinking block's ``signature_delta`` parts are joined at its ``content_block_stop``
and emitted there as one ``Thinking("", signature=...)`` event, after the block's
text, so :meth:`inferd.types.Response.collect` closes the block with it and a
follow-up turn can send it back unchanged; a block without a signature ends with no
extra event. A caller that ignores signatures sees one more, empty, Thinking piece.

A tool call's input arrives as JSON fragments; they are kept as a list and joined
once at ``content_block_stop`` (linear in the input however it is split), with a cap
per call (``max_call_args``) and per stream (``max_stream_args``).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from inferd._fast._stream_common import DEFAULT_MAX_CALL_ARGS, DEFAULT_MAX_STREAM_ARGS
from inferd.anthropic_wire import stop_reason_from_anthropic, usage_from_anthropic
from inferd.errors import BackendUnavailable
from inferd.limits import cut_message, echo
from inferd.sse import DEFAULT_MAX_EVENT_BYTES, SSEParser
from inferd.types import Done, Event, Text, Thinking, ToolUse, Usage

log = logging.getLogger("inferd.anthropic_compat")

#: Largest tool-call input (JSON text) accepted for one call, and for one stream.
MAX_TOOL_INPUT_BYTES = DEFAULT_MAX_CALL_ARGS
MAX_STREAM_TOOL_INPUT_BYTES = DEFAULT_MAX_STREAM_ARGS
#: What one fragment costs against those caps on top of its characters (as the OpenAI
#: stream cores count, ADR 0012): a flood of 1-character fragments is bounded too.
FRAGMENT_OVERHEAD = 64
#: Most content blocks open (started, not stopped) at once; the real API has one.
MAX_OPEN_BLOCKS = 256
#: Largest thinking signature (all its ``signature_delta`` parts); real ones are a few
#: hundred characters to a few KiB.
MAX_SIGNATURE_BYTES = 1 << 20
#: Upstream ``error`` types worth another attempt when no event was shown yet.
RETRYABLE_ERROR_TYPES = frozenset({"overloaded_error", "api_error", "rate_limit_error"})


class UpstreamStreamError(BackendUnavailable):
    """An ``error`` event in the stream; ``error_type`` is Anthropic's (``overloaded_error``)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"the upstream sent an error mid-stream ({error_type}): {message}")
        self.error_type = error_type

    @property
    def retryable(self) -> bool:
        return self.error_type in RETRYABLE_ERROR_TYPES


class _ToolBlock:
    __slots__ = ("id", "initial", "name", "parts", "size")

    def __init__(self, block: dict[str, Any]) -> None:
        self.id = str(block.get("id", ""))
        self.name = str(block.get("name", ""))
        inp = block.get("input")
        self.initial = inp if isinstance(inp, dict) and inp else None
        self.parts: list[str] = []
        self.size = 0


class _ThinkingBlock:
    __slots__ = ("parts", "size")

    def __init__(self, block: dict[str, Any]) -> None:
        sig = block.get("signature")
        self.parts: list[str] = [sig] if isinstance(sig, str) and sig else []
        self.size = sum(map(len, self.parts))


class MessagesStreamDecoder:
    """Feed body bytes, get events; :meth:`close` at the end of the body."""

    __slots__ = (
        "_blocks",
        "_max_call",
        "_max_stream",
        "_parser",
        "_pending",
        "_stream_size",
        "finished",
        "stop_reason",
        "usage",
    )

    def __init__(
        self,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_call_args: int = MAX_TOOL_INPUT_BYTES,
        max_stream_args: int = MAX_STREAM_TOOL_INPUT_BYTES,
    ) -> None:
        self._parser = SSEParser(max_event_bytes)
        self._blocks: dict[int, str | _ToolBlock | _ThinkingBlock] = {}
        self._max_call = max_call_args
        self._max_stream = max_stream_args
        self._stream_size = 0
        self._pending: BackendUnavailable | None = None
        self.usage = Usage()
        self.stop_reason: str | None = None
        self.finished = False

    def feed(self, data: bytes) -> list[Event]:
        """Events decoded from ``data``. An error after some events of the same chunk
        is raised by the next call, so those events are still shown first (and the
        error is then, correctly, a mid-stream one)."""
        self._raise_pending()
        out: list[Event] = []
        try:
            for ev in self._parser.feed(data):
                if self.finished:
                    break
                self._event(ev.data, out)
        except BackendUnavailable as e:
            if not out:
                raise
            self._pending = e
        return out

    def _raise_pending(self) -> None:
        if self._pending is not None:
            e, self._pending = self._pending, None
            raise e

    def close(self) -> list[Event]:
        """Events at the end of the body: ``Done`` if the reply was finished."""
        self._raise_pending()
        if self.finished:
            return []
        if self.stop_reason is None:
            raise BackendUnavailable(
                "the Anthropic stream ended before message_delta/message_stop; "
                "the connection was probably cut"
            )
        return [self._done()]

    def _done(self) -> Done:
        self.finished = True
        return Done(stop_reason_from_anthropic(self.stop_reason), self.usage)

    def _event(self, data: str, out: list[Event]) -> None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BackendUnavailable(
                f"the upstream sent an SSE event that is not JSON: {echo(data)}"
            ) from None
        if not isinstance(obj, dict):
            raise BackendUnavailable(f"the upstream sent a non-object event: {echo(obj)}")
        kind = obj.get("type")
        if kind == "content_block_delta":
            self._delta(obj, out)
        elif kind == "content_block_start":
            self._start(obj)
        elif kind == "content_block_stop":
            self._stop(obj, out)
        elif kind == "message_start":
            msg = obj.get("message")
            self.usage = usage_from_anthropic(msg.get("usage") if isinstance(msg, dict) else None)
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.stop_reason = str(delta["stop_reason"])
            self.usage = usage_from_anthropic(obj.get("usage"), self.usage)
        elif kind == "message_stop":
            if self.stop_reason is None:
                raise BackendUnavailable("the upstream sent message_stop without a stop_reason")
            out.append(self._done())
        elif kind == "error":
            raw_err = obj.get("error")
            err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
            raise UpstreamStreamError(
                cut_message(str(err.get("type", "error")), 100),
                cut_message(str(err.get("message", "")), 500),
            )
        # "ping" and event types newer than this code: skipped

    def _index(self, obj: dict[str, Any]) -> int:
        i = obj.get("index")
        if not isinstance(i, int) or isinstance(i, bool):
            raise BackendUnavailable(f"the upstream sent a block index {echo(i)}")
        return i

    def _start(self, obj: dict[str, Any]) -> None:
        block = obj.get("content_block")
        kind = block.get("type") if isinstance(block, dict) else None
        i = self._index(obj)
        if len(self._blocks) >= MAX_OPEN_BLOCKS:
            raise BackendUnavailable(
                f"the upstream opened more than {MAX_OPEN_BLOCKS} content blocks without "
                "closing them (MAX_OPEN_BLOCKS)"
            )
        if kind == "tool_use":
            self._blocks[i] = _ToolBlock(block)  # type: ignore[arg-type]
        elif kind == "thinking":
            self._blocks[i] = _ThinkingBlock(block)  # type: ignore[arg-type]
        else:
            self._blocks[i] = str(kind)

    def _delta(self, obj: dict[str, Any], out: list[Event]) -> None:
        i = self._index(obj)
        block = self._blocks.get(i)
        if block is None:
            raise BackendUnavailable(
                f"the upstream sent content_block_delta for block {i}, which never started"
            )
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return
        dk = delta.get("type")
        if dk == "text_delta":
            t = delta.get("text")
            if isinstance(t, str) and t:
                out.append(Text(t))
        elif dk == "thinking_delta":
            t = delta.get("thinking")
            if isinstance(t, str) and t:
                out.append(Thinking(t))
        elif dk == "input_json_delta" and isinstance(block, _ToolBlock):
            self._tool_part(block, delta.get("partial_json"))
        elif dk == "signature_delta" and isinstance(block, _ThinkingBlock):
            self._signature_part(block, delta.get("signature"))
        # delta types newer than this code: skipped

    def _signature_part(self, block: _ThinkingBlock, part: Any) -> None:
        if not isinstance(part, str) or not part:
            return
        block.size += len(part)
        if block.size > MAX_SIGNATURE_BYTES:
            raise BackendUnavailable(
                f"the upstream sent a thinking signature longer than {MAX_SIGNATURE_BYTES} "
                "characters (MAX_SIGNATURE_BYTES)"
            )
        block.parts.append(part)

    def _tool_part(self, block: _ToolBlock, part: Any) -> None:
        if not isinstance(part, str) or not part:
            return
        cost = len(part) + FRAGMENT_OVERHEAD
        block.size += cost
        self._stream_size += cost
        if block.size > self._max_call or self._stream_size > self._max_stream:
            raise BackendUnavailable(
                f"tool call {echo(block.name)} input is larger than max_call_args "
                f"({self._max_call}) or the stream's max_stream_args ({self._max_stream})"
            )
        block.parts.append(part)

    def _stop(self, obj: dict[str, Any], out: list[Event]) -> None:
        i = self._index(obj)
        block = self._blocks.pop(i, None)
        if block is None:
            raise BackendUnavailable(
                f"the upstream sent content_block_stop for block {i}, which never started"
            )
        if isinstance(block, _ThinkingBlock):
            if block.parts:
                out.append(Thinking("", "".join(block.parts)))
            return
        if not isinstance(block, _ToolBlock):
            return
        raw = "".join(block.parts)
        if not raw:
            inp = block.initial or {}
            out.append(ToolUse(block.id, block.name, inp, orjson.dumps(inp).decode()))
            return
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        out.append(ToolUse(block.id, block.name, parsed if isinstance(parsed, dict) else None, raw))


__all__ = ["MessagesStreamDecoder", "UpstreamStreamError"]
