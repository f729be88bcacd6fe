"""``OpenAICompat``: the stream contract over any OpenAI Chat Completions upstream.

Requests go out through :func:`inferd.openai_wire.request_to_openai`; every byte that
comes back goes through :class:`inferd.toolcalls.ChatStreamDecoder` (the fast SSE +
tool-call accumulator), which turns upstream quirks (BOMs, CRLF, keep-alive comments,
missing or shared tool-call indexes, usage in a ``choices: []`` chunk, no ``[DONE]``)
into complete inferd events. This module only wires the two to HTTP
(:mod:`.client`) and adds what the contract needs: retries before the first event
only, exactly one ``Done`` with timings, and closing the response the moment a
caller leaves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from inferd.backend import Backend
from inferd.errors import BackendUnavailable, InternalError, NotReady, redact_url
from inferd.openai_wire import (
    embed_request_to_openai,
    embed_result_from_openai,
    request_to_openai,
)
from inferd.toolcalls import ChatStreamDecoder
from inferd.types import (
    AcceleratorInfo,
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    StopReason,
    Timings,
)

from .client import (
    DEFAULT_BACKOFF_BASE_S,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_BASE_URL,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_AFTER_S,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    WIRE_ERRORS,
    HttpClient,
    RetryPolicy,
    Secret,
    connection_error,
    endpoint_url,
    url_basic_auth,
)

log = logging.getLogger("inferd.openai_compat")

#: Model asked for when neither the request nor the backend names one.
DEFAULT_MODEL = "gpt-4o-mini"
#: Embedding model asked for by :meth:`OpenAICompat.embed` unless configured.
DEFAULT_EMBED_MODEL = "text-embedding-3-small"
#: Largest single SSE event accepted from an upstream; a bigger one is a broken or
#: hostile upstream, and buffering it without limit would let it exhaust memory.
DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024
#: After ``Done``, how long to wait for the end of the body so the connection can be
#: reused, and how many trailing bytes to accept; past either, it is closed instead.
POOL_DRAIN_TIMEOUT_S = 0.25
POOL_DRAIN_MAX_BYTES = 64 * 1024
#: Environment variables read for the API key, in order, when ``api_key`` is None.
API_KEY_ENV = ("INFERD_OPENAI_API_KEY", "OPENAI_API_KEY")


def _key_from_env() -> str:
    for name in API_KEY_ENV:
        value = os.environ.get(name)
        if value:
            return value
    return ""


async def _drained(resp: aiohttp.ClientResponse) -> bool:
    """True when the body is read to its end, waiting briefly for the last bytes.

    After ``[DONE]`` only the chunked-encoding terminator is normally left. Reading it
    lets the connection go back to the pool (no new TCP/TLS handshake for the next
    request); a body that does not end promptly is closed instead.
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


async def _next_events(
    chunks: AsyncIterator[bytes], decoder: ChatStreamDecoder, url: str
) -> list[Event]:
    """The events of the next body read; at the end of the body, the decoder's last ones
    (never empty: a truncated stream raises, see :func:`_at_eof`)."""
    try:
        data = await chunks.__anext__()
    except StopAsyncIteration:
        return _at_eof(decoder, url)
    return decoder.feed(data)


def _at_eof(decoder: ChatStreamDecoder, url: str) -> list[Event]:
    """The decoder's last events at end of body, or an error for a truncated stream.

    A body may end without ``[DONE]`` (several upstreams never send it), but one that
    ends before any ``finish_reason`` was cut off: the decoder reports that as
    ``Done(stop_reason=ERROR)``, which must surface as a failure, not as a short reply.
    """
    batch = decoder.close()
    done = batch[-1] if batch else None
    if not isinstance(done, Done) or done.stop_reason is StopReason.ERROR:
        raise BackendUnavailable(
            f"the stream from {redact_url(url)} ended before the upstream finished "
            "the reply (no finish_reason, no [DONE]); the connection was probably cut"
        )
    return batch


class OpenAICompat(Backend):
    """A backend that streams from an OpenAI-compatible ``/v1/chat/completions``.

    ``api_key=None`` reads ``INFERD_OPENAI_API_KEY`` then ``OPENAI_API_KEY``; an empty
    key sends no ``Authorization`` header (local servers). The key is held in a
    :class:`~.client.Secret` and never appears in a repr, a log line or an error.

    ``extra_body`` is merged into every chat request under the mapped fields (so a
    request's own ``top_k`` wins over a configured default); use it for upstream
    extensions (``top_k``, ``min_p``, ``chat_template_kwargs``, ...). ``headers`` are
    added to every request. ``vision=True`` lets images through (as data URLs).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff_base: float = DEFAULT_BACKOFF_BASE_S,
        backoff_max: float = DEFAULT_BACKOFF_MAX_S,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER_S,
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        vision: bool = False,
        embed_model: str = DEFAULT_EMBED_MODEL,
        name: str = "openai_compat",
    ) -> None:
        self.name = name
        self.base_url = base_url
        self.chat_url = endpoint_url(base_url, "chat/completions")
        self.embeddings_url = endpoint_url(base_url, "embeddings")
        self.model = model
        self.embed_model = embed_model
        self.vision = vision
        self.extra_body = dict(extra_body or {})
        self.max_event_bytes = max_event_bytes
        for label, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{label}={value!r} must be > 0 seconds")
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections} must be >= 1")
        if max_event_bytes < 1024:
            raise ValueError(f"max_event_bytes={max_event_bytes} must be >= 1024")
        self._api_key = Secret(_key_from_env() if api_key is None else api_key)
        self._client = HttpClient(
            timeout=aiohttp.ClientTimeout(
                total=timeout, connect=connect_timeout, sock_read=read_timeout
            ),
            headers=dict(headers or {}),
            api_key=self._api_key,
            max_connections=max_connections,
            basic_auth=url_basic_auth(base_url),
            retry=RetryPolicy(max_retries, backoff_base, backoff_max, max_retry_after),
        )
        self._active = 0

    # ------------------------------------------------------------------ status

    def __repr__(self) -> str:
        return (
            f"<OpenAICompat name={self.name!r} base_url={redact_url(self.base_url)!r} "
            f"model={self.model!r} api_key={'set' if self._api_key else 'unset'} "
            f"ready={self.ready()}>"
        )

    @property
    def active(self) -> int:
        """Responses currently open (0 once every stream has ended or been left)."""
        return self._active

    def ready(self) -> bool:
        return not self._client.closed

    def capabilities(self) -> Capabilities:
        return Capabilities(
            v2=True,
            tools=True,
            vision=self.vision,
            thinking=True,
            embed=True,
            accelerator=AcceleratorInfo(kind="remote"),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _check_open(self) -> None:
        if self._client.closed:
            raise NotReady(f"backend {self.name!r} is closed; create a new OpenAICompat")

    # ------------------------------------------------------------------ generate

    def chat_body(self, request: Request) -> dict[str, Any]:
        """The exact JSON body :meth:`generate` sends for ``request``."""
        body = dict(self.extra_body)
        body.update(
            request_to_openai(request, model=request.model or self.model, vision=self.vision)
        )
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Stream the reply; see the module docstring and DESIGN.md for the contract."""
        self._check_open()
        payload = orjson.dumps(self.chat_body(request))
        url = self.chat_url
        start = time.perf_counter()
        first: float | None = None
        count = 0
        resp: aiohttp.ClientResponse | None = None
        self._active += 1
        try:
            attempt = 0
            # Phase 1: connect, retrying until the first event is in hand. Nothing has
            # been shown to the caller yet, so another attempt cannot duplicate output.
            while True:
                resp, attempt = await self._client.post(
                    url, payload, accept="text/event-stream", attempt=attempt
                )
                decoder = ChatStreamDecoder(max_event_bytes=self.max_event_bytes)
                chunks = resp.content.iter_any()
                try:
                    batch: list[Event] = []
                    while not batch:  # the end of the body always gives events (or raises)
                        batch = await _next_events(chunks, decoder, url)
                    break
                except WIRE_ERRORS as e:
                    resp.close()
                    resp = None
                    err = connection_error(e, url, timeouts=self._client.timeout)
                    attempt = await self._client.wait_before_retry(err, attempt)
            # Phase 2: stream. Any failure from here on is mid-stream.
            first = time.perf_counter()
            try:
                while True:
                    for ev in batch:
                        if isinstance(ev, Done):
                            tokens = ev.usage.output_tokens or count
                            yield ev.replace(
                                timings=Timings.measure(start, first, time.perf_counter(), tokens),
                                backend=self.name,
                            )
                            if await _drained(resp):
                                resp.release()  # fully read: safe to reuse
                                resp = None
                            return
                        count += 1
                        yield ev
                    if decoder.finished:  # pragma: no cover - the decoder ends with Done
                        raise InternalError("the stream decoder finished without a Done")
                    batch = await _next_events(chunks, decoder, url)
            except WIRE_ERRORS as e:
                raise connection_error(
                    e, url, timeouts=self._client.timeout, mid_stream=True
                ) from None
        finally:
            # close(), not release(): a half-read connection must never be pooled
            # (a fully read one was released above and is None here).
            if resp is not None:
                resp.close()
            self._active -= 1

    # ------------------------------------------------------------------ embed

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed via ``/v1/embeddings``; vectors come back in input order."""
        self._check_open()
        body = embed_request_to_openai(request, model=self.embed_model)
        reply = await self._client.post_json(self.embeddings_url, body)
        return embed_result_from_openai(reply, count=len(request.input))
