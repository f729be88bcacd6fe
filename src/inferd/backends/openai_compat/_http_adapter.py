"""What the HTTP adapters (``OpenAICompat``, ``AnthropicCompat``) share, written once.

Each adapter keeps its own request body and stream decoder; this base class owns the
rest of the stream contract: retries before the first event only, so another attempt
never duplicates output (docs/adr/0007-openai-compat-retries-and-connections.md),
exactly one ``Done`` with timings, a fully read connection back to the pool and a
half-read one closed the moment a caller leaves
(docs/adr/0012-openai-compat-bounds-hostile-upstreams.md,
docs/adr/0014-anthropic-messages-both-ways.md).
It lives in ``openai_compat`` next to the shared :class:`.client.HttpClient`, which
``anthropic_compat`` already builds on; importing it always initialises this package
first, so there is no import cycle.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import aiohttp
import orjson

from inferd.call_stop import CallTracker
from inferd.errors import InternalError, InvalidRequest, NotReady, redact_url
from inferd.types import Capabilities, Done, Event, Request, Timings, ToolUse, ToolUseDelta

from .client import WIRE_ERRORS, HttpClient, Secret, connection_error

#: How long to wait for the end of a finished body so its connection can be pooled.
POOL_DRAIN_TIMEOUT_S = 0.25
#: Most bytes read past the end of a reply to pool its connection; more and it is closed.
POOL_DRAIN_MAX_BYTES = 64 * 1024


def key_from_env(names: Sequence[str]) -> str:
    """The first non-empty environment variable of ``names`` (an API key), else ``""``."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return ""


def client_timeouts(total: float, connect: float, read: float) -> aiohttp.ClientTimeout:
    """The session's timeouts, each checked to be a positive number of seconds."""
    for label, value in (("timeout", total), ("connect_timeout", connect), ("read_timeout", read)):
        if not value > 0:
            raise InvalidRequest(f"{label}={value!r} must be > 0 seconds")
    return aiohttp.ClientTimeout(total=total, connect=connect, sock_read=read)


async def drained(resp: aiohttp.ClientResponse) -> bool:
    """True when the body is read to its end, waiting briefly for the last bytes.

    After the reply's last event only the chunked-encoding terminator is normally left.
    Reading it lets the connection go back to the pool (no new TCP/TLS handshake for the
    next request); a body that does not end promptly is closed instead.
    """
    if resp.content.at_eof():
        return True
    seen = 0
    try:
        async with asyncio.timeout(POOL_DRAIN_TIMEOUT_S):
            while data := await resp.content.readany():
                seen += len(data)
                if seen > POOL_DRAIN_MAX_BYTES:
                    return False
    except (TimeoutError, *WIRE_ERRORS):
        return False
    return resp.content.at_eof()


class EventSource(Protocol):
    """One streamed response body as batches of events (each adapter's decoder)."""

    #: True when a complete reply ended without its terminator: the connection is not pooled.
    quiet_end: bool

    @property
    def finished(self) -> bool: ...

    async def next_events(self) -> list[Event]: ...


class HttpAdapter:
    """Base of the HTTP adapters: status, and ``generate`` over the subclass's hooks
    :meth:`_stream_target` (URL and JSON body) and :meth:`_event_source` (decoder)."""

    name: str
    base_url: str
    model: str
    _client: HttpClient
    _caps: Capabilities
    _api_key: Secret
    _active: int
    #: Errors raised while reading the first events that count as a failed attempt when
    #: their ``retryable`` is true (Anthropic's ``overloaded_error`` event).
    _retry_on: tuple[type[Exception], ...] = ()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} name={self.name!r} "
            f"base_url={redact_url(self.base_url)!r} model={self.model!r} "
            f"api_key={'set' if self._api_key else 'unset'} ready={self.ready()}>"
        )

    @property
    def active(self) -> int:
        """Responses currently open (0 once every stream has ended or been left)."""
        return self._active

    def ready(self) -> bool:
        return not self._client.closed

    def capabilities(self) -> Capabilities:
        return self._caps

    async def aclose(self) -> None:
        await self._client.aclose()

    def _check_open(self) -> None:
        if self._client.closed:
            raise NotReady(f"backend {self.name!r} is closed; create a new {type(self).__name__}")

    def _stream_target(self, request: Request) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def _event_source(self, resp: aiohttp.ClientResponse, url: str) -> EventSource:
        raise NotImplementedError

    def _choices_source(
        self, resp: aiohttp.ClientResponse, url: str, request: Request
    ) -> EventSource:
        """The decoder for a request with ``n > 1`` or ``logprobs`` (ADR 0022)."""
        raise InvalidRequest(f"backend {self.name!r} cannot return n choices or logprobs")

    async def _open_stream(
        self, url: str, payload: bytes, choices: Request | None = None
    ) -> tuple[aiohttp.ClientResponse, EventSource, list[Event]]:
        """POST and read up to the first events, retrying per the client's policy while
        nothing has been shown (ADR 0007). The caller owns (and must close) the response."""
        attempt = 0
        retry_on: Any = self._retry_on
        while True:
            resp, attempt = await self._client.post(
                url, payload, accept="text/event-stream", attempt=attempt
            )
            source = (
                self._event_source(resp, url)
                if choices is None
                else self._choices_source(resp, url, choices)
            )
            try:
                batch: list[Event] = []
                while not batch:  # the end of the body always gives events (or raises)
                    batch = await source.next_events()
                return resp, source, batch
            except WIRE_ERRORS as e:
                resp.close()
                err = connection_error(e, url, timeouts=self._client.timeout)
                attempt = await self._client.wait_before_retry(err, attempt)
            except retry_on as e:
                resp.close()
                if not e.retryable:
                    raise
                attempt = await self._client.wait_before_retry(e, attempt)
            except BaseException:
                resp.close()
                raise

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Stream the reply: retries before the first event only, then exactly one ``Done``
        (docs/adr/0007-openai-compat-retries-and-connections.md). The stop reason follows
        the one rule for calls (:mod:`inferd.call_stop`), and argument deltas reach only a
        request that asked for them (ADR 0023)."""
        self._check_open()
        lacks = self._caps.covers(request)
        if lacks is not None:
            raise InvalidRequest(f"backend {self.name!r} cannot serve this request: {lacks}")
        url, body = self._stream_target(request)
        payload = orjson.dumps(body)
        start = time.perf_counter()
        count = 0
        self._active += 1
        resp: aiohttp.ClientResponse | None = None
        dones = 0  # one Done per choice; the stream ends at the n-th (ADR 0022)
        calls, deltas = CallTracker(), _Deltas(request.stream_tool_arguments)
        try:
            choices = request if request.n > 1 or request.logprobs else None
            resp, source, batch = await self._open_stream(url, payload, choices)
            first = time.perf_counter()  # any failure from here on is mid-stream
            while True:
                for ev in deltas.pass_on(batch):
                    calls.see(ev)
                    if isinstance(ev, Done):
                        tokens = ev.usage.output_tokens or count
                        yield ev.replace(
                            stop_reason=calls.stop_reason(request, ev.stop_reason),
                            timings=Timings.measure(start, first, time.perf_counter(), tokens),
                            backend=self.name,
                        )
                        dones += 1
                        if dones < request.n:
                            continue
                        if not source.quiet_end and await drained(resp):
                            resp.release()  # fully read: safe to reuse
                            resp = None
                        return
                    count += not isinstance(ev, ToolUseDelta)
                    yield ev
                if source.finished:  # pragma: no cover - the decoder ends with Done
                    raise InternalError("the stream decoder finished without a Done")
                batch = await source.next_events()
        except WIRE_ERRORS as e:
            if resp is None:
                raise
            raise connection_error(e, url, timeouts=self._client.timeout, mid_stream=True) from None
        finally:
            # close(), not release(): a half-read connection must never be pooled
            # (a fully read one was released above and is None here).
            if resp is not None:
                resp.close()
            self._active -= 1


class _Deltas:
    """``ToolUseDelta`` events for a request that asked for them (each call gets at
    least one, its whole arguments when the upstream streamed none), none otherwise."""

    __slots__ = ("_sent", "wanted")

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self._sent: set[str] = set()

    def pass_on(self, batch: list[Event]) -> list[Event]:
        out: list[Event] = []
        for ev in batch:
            if isinstance(ev, ToolUseDelta):
                if self.wanted:
                    self._sent.add(ev.id)
                    out.append(ev)
                continue
            if self.wanted and isinstance(ev, ToolUse) and ev.id not in self._sent:
                out.append(ToolUseDelta(len(self._sent), ev.id, ev.name, ev.raw_arguments))
                self._sent.add(ev.id)
            out.append(ev)
        return out


__all__ = [
    "POOL_DRAIN_MAX_BYTES",
    "POOL_DRAIN_TIMEOUT_S",
    "EventSource",
    "HttpAdapter",
    "client_timeouts",
    "drained",
    "key_from_env",
]
