"""Server-sent events (``text/event-stream``), parsed the way browsers do.

:class:`SSEParser` follows the WHATWG HTML "event stream interpretation" rules exactly,
at any split of the input into chunks: UTF-8 with invalid bytes replaced (never an
exception), one leading BOM stripped (also when split across chunks), CR / LF / CRLF
line ends (``\\r\\r`` dispatches at once), comments, ``data`` lines joined with ``\\n``,
the last event ID kept across events, ``retry`` only when all ASCII digits, and an
incomplete event at end of stream discarded. Python SSE clients commonly get some of
this wrong (a BOM that eats the first event, an ``event:``-only block that raises,
``UnicodeDecodeError`` on a bad byte); upstreams do send all of these.

Work is linear in the input and memory is bounded: an event, or a line, larger than
``max_event_bytes`` raises :class:`SSEError` (a
:class:`~inferd.errors.BackendUnavailable`) instead of growing without limit.

The implementation is the compiled core when it is available, else its pure-Python
twin (``INFERD_NO_EXTENSIONS=1`` forces the latter); :data:`IMPLEMENTATION` says which.
Chat streams should use :class:`inferd.toolcalls.ChatStreamDecoder`, which fuses this
framing with JSON decoding and chunk accumulation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inferd._fast import load
from inferd._fast._stream_common import DEFAULT_MAX_EVENT_BYTES, SSEError, SSEEvent

_core = load("sse")

if TYPE_CHECKING:
    # Both twins have this API (``_sse_c.pyi`` states it for the compiled one); the
    # type checker sees the Python twin's class, the runtime gets whichever loaded.
    from inferd._fast._sse_py import SSEParser
else:
    SSEParser = _core.SSEParser

#: ``"c"`` for the compiled core, ``"py"`` for the pure-Python twin.
IMPLEMENTATION: str = _core.IMPLEMENTATION

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "IMPLEMENTATION", "SSEError", "SSEEvent", "SSEParser"]
