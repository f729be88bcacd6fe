"""HTTP plumbing for OpenAI-compatible upstreams: URLs, one session, retries, errors.

Why a module of its own: the adapter speaks events; this speaks HTTP. Everything
that decides *whether to try again* and *what to tell the user* when an upstream
fails lives here, so the rules are read (and tested) in one place:

* retry 408/409/429/5xx and connection failures with exponential backoff plus
  jitter, honouring ``Retry-After`` (seconds or an HTTP date) - but only before the
  first event: once a caller has seen output, a retry would duplicate it;
* 400/404/422 are the request's fault -> :class:`InvalidRequest` (no retry, and a
  router must not fail over on them);
* everything else -> :class:`BackendUnavailable` with the status and the body cut to
  4 KiB on a character boundary, naming the URL without credentials;
* the API key never reaches a message, a log line or a ``repr``: it lives in a
  :class:`Secret`, and upstream bodies are scrubbed of it before they are kept;
* redirects are followed by hand: 307/308 within the same origin with every header,
  to another origin only with ``follow_redirects=True`` and then without the key, the
  basic auth or the custom ``headers=`` (any of which may be a credential); other 3xx
  are errors (a POST cannot follow them unchanged). See
  docs/adr/0012-openai-compat-bounds-hostile-upstreams.md.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import aiohttp
import orjson
from yarl import URL

from inferd import tracing
from inferd.errors import (
    MAX_ERROR_BODY_BYTES,
    BackendUnavailable,
    InvalidRequest,
    cut_body,
    redact_url,
)

log = logging.getLogger("inferd.openai_compat")

# --------------------------------------------------------------------------- limits

#: Default upstream when none is given (a config default, not a hard-coded dependency).
DEFAULT_BASE_URL = "https://api.openai.com"
#: Whole request, first byte to last, seconds. Long generations need minutes.
DEFAULT_TIMEOUT_S = 300.0
#: TCP + TLS connect, seconds. A healthy upstream connects in well under this.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: Longest silence between two reads, seconds (covers prompt processing before the
#: first byte, and reasoning models that think before they stream).
DEFAULT_READ_TIMEOUT_S = 120.0
#: Retries after the first attempt (so up to 3 attempts in all).
DEFAULT_MAX_RETRIES = 2
#: First backoff step, seconds; doubled per retry, with jitter.
DEFAULT_BACKOFF_BASE_S = 0.5
#: Longest backoff step, seconds.
DEFAULT_BACKOFF_MAX_S = 8.0
#: A ``Retry-After`` longer than this is not waited for: the request fails at once
#: so a router can go elsewhere instead of stalling a user for minutes.
DEFAULT_MAX_RETRY_AFTER_S = 60.0
#: Connections kept per backend (aiohttp ``TCPConnector(limit=...)``).
DEFAULT_MAX_CONNECTIONS = 100
#: Immediate resends, per request and outside ``max_retries``, when a request could not
#: be written on a pooled connection the upstream had silently closed.
STALE_CONNECTION_RETRIES = 2
#: Largest non-streamed response body (embeddings) read into memory.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
#: Redirect hops followed per request before giving up.
MAX_REDIRECTS = 5
#: Whether a redirect to another origin is followed (without credentials) by default.
DEFAULT_FOLLOW_REDIRECTS = False

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
INVALID_STATUSES = frozenset({400, 404, 422})
AUTH_STATUSES = frozenset({401, 403})
#: Redirects that keep the method and body (the only ones a POST can follow).
FOLLOWED_REDIRECTS = frozenset({307, 308})
REDIRECT_STATUSES = frozenset({301, 302, 303, *FOLLOWED_REDIRECTS})

_DNS_ERROR: type[BaseException] = getattr(aiohttp, "ClientConnectorDNSError", ())  # type: ignore[assignment]
_TLS_ERRORS = (aiohttp.ClientSSLError,)
_CONNECT_TIMEOUT: type[BaseException] = getattr(aiohttp, "ConnectionTimeoutError", ())  # type: ignore[assignment]


# --------------------------------------------------------------------------- secrets


class Secret:
    """A string that prints as ``'***'``: repr, str, format and f-strings all hide it.

    The adapter keeps the API key in one of these so that no accidental
    ``log.debug(config)`` or traceback of locals can show it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> Any:  # never pickle the key into a file or a queue
        raise TypeError("Secret values cannot be pickled")


# --------------------------------------------------------------------------- URLs


def endpoint_url(base_url: str, endpoint: str) -> str:
    """``base_url`` + ``/v1/<endpoint>``, tolerating a trailing slash or a ``/v1`` base.

    ``https://h``, ``https://h/``, ``https://h/v1`` and ``https://h/v1/`` all give
    ``https://h/v1/chat/completions``; a base that already names the endpoint is kept
    as is. A query string (Azure's ``api-version``) is kept. User-info is dropped from
    the URL (see :func:`url_basic_auth`), so it can never be echoed in an error.
    """
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequest(
            f"base_url {redact_url(base_url)!r} must be an http:// or https:// URL with a host"
        )
    path = parts.path.rstrip("/")
    tail = "/" + endpoint
    if path.endswith("/v1" + tail) or path.endswith(tail):
        new_path = path
    elif path.endswith("/v1"):
        new_path = path + tail
    else:
        new_path = path + "/v1" + tail
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, new_path, parts.query, ""))


def url_basic_auth(base_url: str) -> Secret:
    """The ``Authorization: Basic ...`` value for ``user:pass@`` in ``base_url`` ("" if none).

    Some self-hosted gateways sit behind basic auth; a Bearer key, when set, wins.
    """
    parts = urlsplit(base_url.strip())
    if parts.username is None:
        return Secret("")
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return Secret("Basic " + base64.b64encode(pair).decode("ascii"))


# --------------------------------------------------------------------------- retry policy


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        secs = when.timestamp() - (time.time() if now is None else now)
    if secs != secs:  # NaN
        return None
    return max(0.0, secs)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait before trying an upstream again."""

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_max_s: float = DEFAULT_BACKOFF_MAX_S
    max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise InvalidRequest(f"max_retries={self.max_retries} must be >= 0")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.max_retry_after_s < 0:
            raise InvalidRequest("backoff and Retry-After limits must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Delay before retry ``attempt`` (0-based): exponential, "equal jitter".

        Half fixed, half random, so many clients that failed together do not come
        back together, yet nobody retries at once.
        """
        step = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        return step / 2 + random.uniform(0, step / 2)


# --------------------------------------------------------------------------- errors


class _Retryable(Exception):
    """Internal: an attempt failed in a way worth retrying (carries the final error)."""

    def __init__(self, error: BackendUnavailable, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


class _Stale(_Retryable):
    """Internal: the request could not be sent on a pooled connection.

    Servers may close a keep-alive connection right after a streamed response without
    saying so (llama-server does); the next request written on it fails before the
    server has read it. Retrying that at once, outside the ``max_retries`` budget,
    is safe: nothing reached the upstream.
    """


def scrub(text: str, secret: Secret | None) -> str:
    """``text`` with the secret (if any) replaced, so echoed keys never survive."""
    if secret and secret.get() in text:
        return text.replace(secret.get(), "***")
    return text


def _upstream_message(body: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body itself."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.strip()
    if isinstance(obj, Mapping):
        err = obj.get("error", obj)
        if isinstance(err, Mapping) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    return body.strip()


def status_error(status: int, body: str, url: str) -> BackendUnavailable | InvalidRequest:
    """The inferd error for an upstream answering ``status`` with ``body``."""
    where = redact_url(url)
    detail = cut_body(_upstream_message(body), 512)
    if status in INVALID_STATUSES:
        return InvalidRequest(
            f"upstream {where} rejected the request (HTTP {status}): {detail}; "
            "fix the request (model name, fields) - retrying will not help"
        )
    if status in AUTH_STATUSES:
        return BackendUnavailable(
            f"upstream {where} refused the API key (HTTP {status}); set a valid key with "
            "api_key= or INFERD_OPENAI_API_KEY / OPENAI_API_KEY",
            status=status,
            body=body,
        )
    return BackendUnavailable(
        f"upstream {where} answered HTTP {status}: {detail}", status=status, body=body
    )


def connection_error(
    exc: BaseException, url: str, *, timeouts: aiohttp.ClientTimeout, mid_stream: bool = False
) -> BackendUnavailable:
    """A :class:`BackendUnavailable` naming what went wrong on the wire, and where."""
    where = redact_url(url)
    phase = "mid-stream" if mid_stream else "before the reply"
    if isinstance(exc, _TLS_ERRORS):
        cause = "TLS handshake failed"
    elif _DNS_ERROR and isinstance(exc, _DNS_ERROR):
        cause = "DNS lookup failed"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        os_err = exc.os_error
        cause = f"connection failed ({os_err.strerror or type(os_err).__name__})"
    elif isinstance(exc, _CONNECT_TIMEOUT) or (
        isinstance(exc, aiohttp.ServerTimeoutError) and "connect" in str(exc).lower()
    ):
        cause = f"connect timed out after {timeouts.connect or timeouts.sock_connect}s"
    elif isinstance(exc, aiohttp.ServerTimeoutError):
        cause = f"read timed out: no data for {timeouts.sock_read}s"
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        cause = f"timed out (total limit {timeouts.total}s)"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        cause = "the upstream closed the connection"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        cause = "the upstream dropped the connection before the reply was complete"
    elif isinstance(exc, OSError):
        # not exc.strerror: aiohttp puts the full URL (query string included) there
        code = errno.errorcode.get(exc.errno or 0)
        cause = f"connection error ({code or type(exc).__name__})"
    else:
        cause = f"connection error ({type(exc).__name__})"
    return BackendUnavailable(f"{cause} {phase}, talking to {where}")


WIRE_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, TimeoutError)


# --------------------------------------------------------------------------- redirects


def same_origin(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` share scheme, host and port (the web's origin rule)."""
    ua, ub = URL(a), URL(b)
    return (ua.scheme, ua.host, ua.port) == (ub.scheme, ub.host, ub.port)


def redirect_target(status: int, location: str, current: str, origin: str, follow: bool) -> str:
    """Where a redirect from ``current`` leads, or the error saying why it is not followed.

    ``origin`` is the configured URL: only it gets credentials. User-info in a
    ``Location`` is dropped (an upstream must not choose the credentials either).
    """
    where = redact_url(current)
    target = urljoin(current, location.strip()) if location.strip() else ""
    parts = urlsplit(target)
    if status not in FOLLOWED_REDIRECTS or parts.scheme not in ("http", "https"):
        raise BackendUnavailable(
            f"upstream {where} answered HTTP {status} (a redirect to "
            f"{redact_url(target) if target else 'nowhere'}) that a POST cannot follow "
            "unchanged; set base_url to the new address",
            status=status,
        )
    target = urlunsplit(
        (parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, "")
    )
    if not follow and not same_origin(origin, target):
        raise BackendUnavailable(
            f"upstream {where} redirected (HTTP {status}) to another origin, "
            f"{redact_url(target)}; not followed, so neither the key, the headers nor the "
            "prompt go there. Set base_url to the new address, or follow_redirects=True "
            "to follow such redirects without credentials",
            status=status,
        )
    return target


# --------------------------------------------------------------------------- client


@dataclass
class HttpClient:
    """One aiohttp session per backend, created on first use and reused.

    The session is created lazily because aiohttp binds it to the running event
    loop; the backend may be constructed outside any loop.
    """

    timeout: aiohttp.ClientTimeout
    headers: dict[str, str]
    api_key: Secret
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    basic_auth: Secret = field(default_factory=lambda: Secret(""))
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    follow_redirects: bool = DEFAULT_FOLLOW_REDIRECTS
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)
    _closed: bool = False
    #: Statuses retried before the first event (a class setting, not a field).
    retry_statuses: ClassVar[frozenset[int]] = RETRY_STATUSES

    def __repr__(self) -> str:
        return (
            f"HttpClient(max_connections={self.max_connections}, "
            f"retries={self.retry.max_retries}, api_key={self.api_key!r})"
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise BackendUnavailable("the backend is closed; create a new one")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                headers={"Content-Type": "application/json", "User-Agent": "inferd"},
                json_serialize=lambda o: orjson.dumps(o).decode(),
                read_bufsize=2**18,
            )
        return self._session

    def _credentials(self) -> dict[str, str]:
        """Headers only the configured origin gets: the key, basic auth, ``headers=``."""
        h: dict[str, str] = {}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key.get()}"
        elif self.basic_auth:
            h["Authorization"] = self.basic_auth.get()
        h.update(self.headers)
        return h

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            s, self._session = self._session, None
            await s.close()

    async def _read_error_body(self, resp: aiohttp.ClientResponse) -> str:
        """At most a few KiB of an error body: enough to explain, never a flood."""
        limit = MAX_ERROR_BODY_BYTES * 2
        buf = bytearray()
        try:
            while len(buf) < limit:
                chunk = await resp.content.read(limit - len(buf))
                if not chunk:
                    break
                buf += chunk
        except WIRE_ERRORS:
            pass
        return scrub(bytes(buf).decode("utf-8", "replace"), self.api_key)

    async def _attempt(self, url: str, payload: bytes, accept: str) -> aiohttp.ClientResponse:
        """One request, following redirects by the rules in the module docstring."""
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept": accept, **tracing.outgoing_headers()}  # ADR 0016
            if same_origin(url, target):
                headers.update(self._credentials())
            resp = await self._send(target, payload, headers)
            if resp.status not in REDIRECT_STATUSES:
                return await self._checked(resp, target)
            try:
                location = resp.headers.get("Location", "")
                target = redirect_target(resp.status, location, target, url, self.follow_redirects)
            finally:
                resp.close()
        raise BackendUnavailable(
            f"upstream {redact_url(url)} redirected more than {MAX_REDIRECTS} times; "
            "set base_url to the final address"
        )

    async def _send(
        self, url: str, payload: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        try:
            return await self.session().post(
                url, data=payload, headers=headers, allow_redirects=False
            )
        except WIRE_ERRORS as e:
            err = connection_error(e, url, timeouts=self.timeout)
            if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)) and (
                not isinstance(e, aiohttp.ClientConnectorError)
            ):
                raise _Stale(err) from e
            raise _Retryable(err) from e

    async def _checked(self, resp: aiohttp.ClientResponse, url: str) -> aiohttp.ClientResponse:
        """``resp`` when it is a 2xx; else the error (retryable or not) it stands for."""
        if 200 <= resp.status < 300:
            return resp
        try:
            body = await self._read_error_body(resp)
        finally:
            resp.close()
        raise self._status_error(resp, body, url)

    def _status_error(self, resp: aiohttp.ClientResponse, body: str, url: str) -> Exception:
        """The error a non-2xx reply stands for, wrapped in ``_Retryable`` when its status
        is in :attr:`retry_statuses` (docs/adr/0007-openai-compat-retries-and-connections.md);
        the one place both HTTP clients decide this (``AnthropicHttpClient`` overrides)."""
        err = status_error(resp.status, body, url)
        if resp.status in self.retry_statuses and isinstance(err, BackendUnavailable):
            return _Retryable(err, parse_retry_after(resp.headers.get("Retry-After")))
        return err

    async def post(
        self, url: str, payload: bytes, *, accept: str = "application/json", attempt: int = 0
    ) -> tuple[aiohttp.ClientResponse, int]:
        """POST, retrying per :class:`RetryPolicy`: an open 2xx response, or an error.

        ``attempt`` is how many retries were already spent (the adapter re-enters
        here when a stream breaks before its first event); the count after this call
        is returned with the response.
        """
        stale_left = STALE_CONNECTION_RETRIES
        while True:
            try:
                return await self._attempt(url, payload, accept), attempt
            except _Stale as r:
                if stale_left > 0:
                    stale_left -= 1
                    log.debug("pooled connection was closed by the upstream; resending")
                    continue
                attempt = await self.wait_before_retry(r.error, attempt, r.retry_after)
            except _Retryable as r:
                attempt = await self.wait_before_retry(r.error, attempt, r.retry_after)

    async def wait_before_retry(
        self, error: BackendUnavailable, attempt: int, retry_after: float | None = None
    ) -> int:
        """Sleep before the next attempt, or raise ``error`` if none is left.

        Returns the new attempt count.
        """
        if attempt >= self.retry.max_retries:
            if attempt:
                error.message = f"{error.message} (gave up after {attempt + 1} attempts)"
                error.args = (error.message,)
            raise error
        if retry_after is not None and retry_after > self.retry.max_retry_after_s:
            error.message = (
                f"{error.message}; the upstream asked to retry after "
                f"{retry_after:.0f}s, more than max_retry_after "
                f"({self.retry.max_retry_after_s:.0f}s), so not waiting"
            )
            error.args = (error.message,)
            raise error
        delay = retry_after if retry_after is not None else self.retry.backoff(attempt)
        log.info(
            "retrying in %.2fs (attempt %d of %d): %s",
            delay,
            attempt + 2,
            self.retry.max_retries + 1,
            error.message,
        )
        await asyncio.sleep(delay)
        return attempt + 1

    async def post_json(self, url: str, body: Mapping[str, Any]) -> Any:
        """POST a JSON body and read a JSON reply (retries as :meth:`post`)."""
        payload = orjson.dumps(body)
        attempt = 0
        while True:
            resp, attempt = await self.post(url, payload, attempt=attempt)
            try:
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    if len(buf) > MAX_RESPONSE_BYTES:
                        raise BackendUnavailable(
                            f"upstream {redact_url(url)} sent more than "
                            f"{MAX_RESPONSE_BYTES} bytes; refusing to buffer it"
                        )
            except WIRE_ERRORS as e:
                resp.close()
                attempt = await self.wait_before_retry(
                    connection_error(e, url, timeouts=self.timeout), attempt
                )
                continue
            finally:
                resp.release()
            try:
                return orjson.loads(buf)
            except orjson.JSONDecodeError:
                raise BackendUnavailable(
                    f"upstream {redact_url(url)} sent a reply that is not JSON",
                    status=resp.status,
                    body=scrub(bytes(buf).decode("utf-8", "replace"), self.api_key),
                ) from None
