"""Types shared by both twins of the streaming cores (``_sse_*`` and ``_chunks_*``).

They live here, not in a twin, so that the C and the Python twin return *the same*
classes: events from either compare equal, and ``except SSEError`` catches both.
"""

from __future__ import annotations

from typing import NamedTuple

from inferd.errors import BackendUnavailable, cut_body

#: Default bound on one event (and one line): far above any real chat chunk, far
#: below what would hurt a process if an upstream streams garbage without newlines.
DEFAULT_MAX_EVENT_BYTES = 64 * 1024 * 1024

#: Malformed payloads are logged cut to this many characters.
LOG_PAYLOAD_CHARS = 200

#: Tool-call arguments kept for one call / for one whole stream before the stream is
#: refused: far above any real call, far below what would hurt a process when an
#: upstream streams argument deltas forever
#: (docs/adr/0012-openai-compat-bounds-hostile-upstreams.md). Counted in characters
#: plus :data:`FRAGMENT_COST` per kept fragment and per call, so a flood of
#: one-character deltas is bounded too.
DEFAULT_MAX_CALL_ARGS = 16 * 1024 * 1024
DEFAULT_MAX_STREAM_ARGS = 64 * 1024 * 1024
#: What one kept fragment (or call) costs beyond its characters: about a small str.
FRAGMENT_COST = 64


class SSEEvent(NamedTuple):
    """One dispatched server-sent event.

    ``id`` is the *last event ID* in effect (it persists across events, "" until an
    ``id`` field sets it); ``retry`` is the reconnection time (ms) from a ``retry``
    field seen since the previous dispatched event, else ``None``. A NamedTuple keeps
    construction cheap on the hot path.
    """

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


class SSEError(BackendUnavailable, ValueError):
    """The event stream broke a limit (an event or line over ``max_event_bytes``).

    A :class:`~inferd.errors.BackendUnavailable`, so a backend that lets it escape
    mid-stream still honours the stream contract.
    """


def too_big_message(what: str, limit: int) -> str:
    """The one message both twins use when a limit is crossed."""
    return (
        f"server-sent {what} exceeds max_event_bytes={limit}: the upstream sent more "
        "without an event boundary than this parser accepts; raise max_event_bytes if "
        "such events are expected"
    )


def args_too_big_message(scope: str, option: str, limit: int) -> str:
    """The one message both twins use when tool-call arguments cross a limit."""
    return (
        f"tool-call arguments for {scope} exceed {option}={limit} (characters, plus "
        f"{FRAGMENT_COST} per fragment): the upstream streams more than any real tool call "
        f"needs; raise {option} if such calls are expected"
    )


def upstream_error_message(error: object) -> str:
    """Message for a ``{"error": ...}`` payload: its ``message`` plus type/code if any."""
    if isinstance(error, dict):
        msg = error.get("message")
        text = msg if isinstance(msg, str) and msg else "no message given"
        extra = [
            f"{k}={error[k]}"
            for k in ("type", "code")
            if isinstance(error.get(k), (str, int)) and not isinstance(error.get(k), bool)
        ]
        if extra:
            text = f"{text} ({', '.join(extra)})"
    elif isinstance(error, str) and error:
        text = error
    else:
        text = "no message given"
    return f"upstream reported an error in the stream: {cut_body(text)}"
