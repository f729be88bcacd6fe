"""OpenAI chat-completion streams to inferd events, tool calls made whole.

:class:`ChunkAccumulator` takes ``chat.completion.chunk`` objects one by one:

- ``delta.content`` becomes :class:`~inferd.types.Text` at once; ``delta.reasoning_content``
  (or ``delta.reasoning``) becomes :class:`~inferd.types.Thinking` at once.
- Tool calls are assembled by ``index`` and emitted as *complete*
  :class:`~inferd.types.ToolUse` events when the stream finishes (``finish_reason``,
  ``[DONE]`` or end of stream), in index order. Upstreams disagree on how they stream
  calls, so: a missing or null ``index`` (Gemini) continues the open call, or opens a
  new one when a different id or name arrives; ``id``, ``type`` and ``name`` are set
  once and repeats are ignored (never concatenated); a *different* id on an occupied
  index starts a new call (Ollama puts parallel calls on index 0); ``index`` is a key,
  not a list position. An id or name arriving after that call's arguments began also
  starts a new call. Calls repeated whole with the same name and no ids cannot be told
  apart from one call and are merged.
- Argument fragments are kept in a list and joined once (linear, where re-parsing the
  buffer on every delta is quadratic); ``arguments`` given as a JSON object is
  accepted. Empty arguments mean ``{}``; arguments that are not a JSON object give
  ``ToolUse(input=None, raw_arguments=...)`` with a warning, never an exception. A
  call that never got a name is logged (logger ``inferd.toolcalls``) and still
  reported, with ``name=""``, so the caller can answer it with an error; a call
  without an id gets a generated one (``call_`` + 24 hex digits).
- ``finish_reason``: stop -> end_turn (tool_use when named calls are pending), length
  -> max_tokens, tool_calls / function_call -> tool_use, content_filter (and any
  other value) -> end_turn, none at all -> error (the table is
  :data:`inferd.openai_wire.STOP_REASONS`, shared with every other reader). ``usage``
  from any chunk (also a ``choices: []`` one) fills ``Done.usage``. A
  ``{"error": ...}`` chunk raises :class:`~inferd.errors.BackendUnavailable` with its
  message. Only choice 0 counts.
- :meth:`ChunkAccumulator.finalize` returns the calls not yet emitted and exactly one
  :class:`~inferd.types.Done` (timings are left for the backend to fill with
  ``done.replace(...)``); ``ingest`` after ``finalize`` raises
  :class:`~inferd.errors.InternalError`.

:class:`ChatStreamDecoder` is the hot path of the cloud backend: raw response bytes
in, events out, with SSE framing (:mod:`inferd.sse` rules), ``orjson.loads`` on each
payload, ``[DONE]`` (finishes; later bytes are ignored) and the accumulator fused in
one compiled loop. A payload that is not a JSON object is logged (cut to 200
characters) and skipped; ``event: error`` raises ``BackendUnavailable``; other event
types are ignored. ``close()`` at end of body finishes the stream if ``[DONE]`` never
came (``Done`` with the stop reason seen, ``error`` if none) and returns ``[]`` when
already finished. ``stats`` counts bytes, events and skipped events.

Both come from the compiled core when it is available, else from the pure-Python
twin; :data:`IMPLEMENTATION` says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inferd._fast import load

_core = load("chunks")

if TYPE_CHECKING:
    # Both twins have this API (``_chunks_c.pyi`` states it for the compiled one); the
    # type checker sees the Python twin's classes, the runtime gets whichever loaded.
    from inferd._fast._chunks_py import ChatStreamDecoder, ChunkAccumulator
else:
    ChunkAccumulator = _core.ChunkAccumulator
    ChatStreamDecoder = _core.ChatStreamDecoder

#: ``"c"`` for the compiled core, ``"py"`` for the pure-Python twin.
IMPLEMENTATION: str = _core.IMPLEMENTATION

__all__ = ["IMPLEMENTATION", "ChatStreamDecoder", "ChunkAccumulator"]
