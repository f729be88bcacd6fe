"""The inferd error taxonomy.

One base class, one subclass per wire code (the daemon and the HTTP bridge send
``code``). Every message says what was wrong and what to do about it. Nothing here
ever formats a secret: callers pass URLs through :func:`redact_url` and never put
headers into messages.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

#: Upstream bodies kept on an error are cut to this many bytes (UTF-8), on a
#: character boundary, so a 50 MB HTML error page never lands in a log.
MAX_ERROR_BODY_BYTES = 4096


class InferdError(Exception):
    """Base of every error inferd raises on purpose."""

    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class NotReady(InferdError):
    """The backend cannot take requests yet (loading, stopped, marked not ready)."""

    code = "not_ready"


class InvalidRequest(InferdError, ValueError):
    """The request itself is wrong; retrying it elsewhere will not help.

    The one rule for bad values (``docs/architecture.md``, "Errors"): anything a
    request, a wire frame, a config file or a constructor argument can carry raises
    ``InvalidRequest`` naming the field. It subclasses :class:`ValueError`, so code
    that catches ``ValueError`` (the Python convention for a bad argument) catches it
    too, and a caller never has to know which of the two a given check used.
    """

    code = "invalid_request"


class BackendUnavailable(InferdError):
    """The backend failed: refused, unreachable, or the stream broke mid-way.

    ``status`` and ``body`` are set when the failure came from an HTTP response;
    ``body`` is cut to :data:`MAX_ERROR_BODY_BYTES` on a character boundary.
    """

    code = "backend_unavailable"

    def __init__(self, message: str, *, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = cut_body(body) if body is not None else None


class InternalError(InferdError):
    """A bug or an impossible state inside inferd; please report it."""

    code = "internal"


class EmbedUnsupported(InferdError):
    """This backend (or its model) cannot produce embeddings."""

    code = "embed_unsupported"


class ModelLoadError(InferdError):
    """A model file is missing, not a file, not GGUF, fails its hash, or fails to load."""

    code = "model_load_error"


class QueueFull(InferdError):
    """Admission refused: the request queue is at its limit. Retry later."""

    code = "queue_full"


ERRORS_BY_CODE: dict[str, type[InferdError]] = {
    cls.code: cls
    for cls in (
        NotReady,
        InvalidRequest,
        BackendUnavailable,
        InternalError,
        EmbedUnsupported,
        ModelLoadError,
        QueueFull,
    )
}


def ended_without_done(backend: str | None = None) -> BackendUnavailable:
    """The one error for a stream that stopped before its ``Done`` (the stream contract).

    Raised wherever a stream is consumed (``Response.collect``, the Router, the bridge),
    so every caller sees the same message naming the backend when it is known. It lives
    here, in the bottom layer, so :mod:`inferd.types` can raise it without importing
    up (``inferd.backend`` re-exports it).
    """
    who = f"backend {backend!r}" if backend else "the backend"
    return BackendUnavailable(f"{who} ended its stream without a Done event")


def cut_body(text: str, limit: int = MAX_ERROR_BODY_BYTES) -> str:
    """Cut ``text`` to at most ``limit`` UTF-8 bytes without splitting a character."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore") + "…"


def redact_url(url: str) -> str:
    """Return ``url`` without user-info or query string (both may carry credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
