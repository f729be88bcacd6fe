"""``OpenAICompat``: the stream contract over any OpenAI Chat Completions upstream.

Requests go out through :func:`inferd.openai_wire.request_to_openai`; every byte that
comes back goes through :class:`inferd.toolcalls.ChatStreamDecoder` (the fast SSE +
tool-call accumulator), which turns upstream quirks (BOMs, CRLF, keep-alive comments,
missing or shared tool-call indexes, usage in a ``choices: []`` chunk, no ``[DONE]``)
into complete inferd events. This module only wires the two to HTTP
(:mod:`.client`); what the contract needs on top (retries before the first event
only, exactly one ``Done`` with timings, closing the response the moment a caller
leaves) is :class:`._http_adapter.HttpAdapter`, shared with ``AnthropicCompat``.
It also bounds what a hostile upstream can make the caller hold or wait for
(:class:`StreamLimits`): tool-call arguments per call and per stream, and a short grace
after the finish reason for an upstream that never ends the body
(docs/adr/0012-openai-compat-bounds-hostile-upstreams.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from inferd._fast._stream_common import DEFAULT_MAX_CALL_ARGS, DEFAULT_MAX_STREAM_ARGS
from inferd.backend import Backend
from inferd.backends.openai_compat._http_adapter import (
    HttpAdapter,
    key_from_env,
)
from inferd.backends.openai_compat._http_adapter import client_timeouts as _timeouts
from inferd.completions_wire import CompletionStreamDecoder, request_to_completions
from inferd.errors import (
    BackendUnavailable,
    EmbedUnsupported,
    InvalidRequest,
    redact_url,
)
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
)

from .choices import ChoicesStreamDecoder
from .client import (
    DEFAULT_BACKOFF_BASE_S,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_BASE_URL,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_FOLLOW_REDIRECTS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_AFTER_S,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    HttpClient,
    RetryPolicy,
    Secret,
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
#: After ``finish_reason`` and ``usage``, seconds the upstream has to send ``[DONE]`` or
#: end the body before the (complete) reply is ended with ``Done`` anyway.
DEFAULT_DONE_GRACE_S = 1.0
#: The same wait after ``finish_reason`` while the asked-for ``usage`` has not come.
DEFAULT_USAGE_GRACE_S = 5.0
#: Environment variables read for the API key, in order, when ``api_key`` is None.
API_KEY_ENV = ("INFERD_OPENAI_API_KEY", "OPENAI_API_KEY")


def _key_from_env() -> str:
    return key_from_env(API_KEY_ENV)


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


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """What one chat stream may make the caller hold or wait for (all constructor options).

    ``done_grace``: once ``finish_reason`` and ``usage`` are in, how long the upstream
    has to send ``[DONE]`` or end the body before the reply is ended with ``Done``
    anyway; ``usage_grace`` is the same wait when usage has not come (it was asked for,
    and OpenAI sends it after the finish reason). A reply the upstream finished is never
    turned into a read timeout (docs/adr/0012-openai-compat-bounds-hostile-upstreams.md).
    """

    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    max_call_args: int = DEFAULT_MAX_CALL_ARGS
    max_stream_args: int = DEFAULT_MAX_STREAM_ARGS
    done_grace: float = DEFAULT_DONE_GRACE_S
    usage_grace: float = DEFAULT_USAGE_GRACE_S

    def __post_init__(self) -> None:
        if self.max_event_bytes < 1024:
            raise InvalidRequest(f"max_event_bytes={self.max_event_bytes} must be >= 1024")
        for label in ("max_call_args", "max_stream_args"):
            if getattr(self, label) < 1024:
                raise InvalidRequest(f"{label}={getattr(self, label)} must be >= 1024")
        for label in ("done_grace", "usage_grace"):
            if not getattr(self, label) > 0:
                raise InvalidRequest(f"{label}={getattr(self, label)!r} must be > 0 seconds")

    def decoder(self) -> ChatStreamDecoder:
        # Argument deltas always: the adapter drops them for requests that did not ask.
        return ChatStreamDecoder(
            self.max_event_bytes, self.max_call_args, self.max_stream_args, stream_args=True
        )


class _Body:
    """Events from one streamed response body, read by the adapter batch by batch.

    The end of the body always gives events (or raises, see :func:`_at_eof`). After the
    finish reason, the upstream gets a short grace to end the body; past it the reply,
    which is complete, ends with ``Done`` (``quiet_end`` is then True).
    """

    __slots__ = ("_chunks", "_deadline", "decoder", "limits", "quiet_end", "url")

    def __init__(self, resp: aiohttp.ClientResponse, limits: StreamLimits, url: str) -> None:
        self._chunks = resp.content.iter_any()
        self.decoder = limits.decoder()
        self.limits = limits
        self.url = url
        self._deadline: float | None = None
        self.quiet_end = False

    def _grace_deadline(self) -> float | None:
        d = self.decoder
        if d.finish_reason is None:
            return None
        now = asyncio.get_running_loop().time()
        grace = self.limits.done_grace if d.usage is not None else self.limits.usage_grace
        if self._deadline is None or now + grace < self._deadline:
            self._deadline = now + grace
        return self._deadline

    @property
    def finished(self) -> bool:
        return self.decoder.finished

    async def next_events(self) -> list[Event]:
        deadline = self._grace_deadline()
        try:
            if deadline is None:  # the hot path: no timer per read
                data = await self._chunks.__anext__()
            else:
                data = await self._read_before(deadline)
        except StopAsyncIteration:
            return _at_eof(self.decoder, self.url)
        if data is None:
            log.info(
                "upstream %s sent finish_reason %r but neither [DONE] nor the end of the "
                "body; ending the complete reply",
                redact_url(self.url),
                self.decoder.finish_reason,
            )
            self.quiet_end = True
            return self.decoder.close()
        return self.decoder.feed(data)

    async def _read_before(self, deadline: float) -> bytes | None:
        """The next read, or ``None`` when the grace deadline passes first."""
        guard = asyncio.timeout_at(deadline)
        try:
            async with guard:
                return await self._chunks.__anext__()
        except TimeoutError:
            if not guard.expired():
                raise  # aiohttp's own read or total timeout
            return None


class OpenAICompat(HttpAdapter, Backend):
    """A backend that streams from an OpenAI-compatible ``/v1/chat/completions``.

    ``api_key=None`` reads ``INFERD_OPENAI_API_KEY`` then ``OPENAI_API_KEY``; an empty
    key sends no ``Authorization`` header (local servers). The key is held in a
    :class:`~.client.Secret` and never appears in a repr, a log line or an error.

    ``extra_body`` is merged into every chat request under the mapped fields (so a
    request's own ``top_k`` wins over a configured default); use it for upstream
    extensions (``top_k``, ``min_p``, ``chat_template_kwargs``, ...). ``headers`` are
    added to every request (never to a redirect to another origin; see
    :class:`~.client.HttpClient`). ``tools``, ``vision``, ``thinking`` and ``embed``
    say what the upstream serves: :meth:`capabilities` reports them, so a
    :class:`~inferd.router.Router` never sends a request there that it cannot serve,
    and a request needing a missing one is refused with :class:`InvalidRequest`.
    ``max_call_args``/``max_stream_args``/``done_grace``/``usage_grace`` are the
    stream's limits (:class:`StreamLimits`).
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
        max_call_args: int = DEFAULT_MAX_CALL_ARGS,
        max_stream_args: int = DEFAULT_MAX_STREAM_ARGS,
        done_grace: float = DEFAULT_DONE_GRACE_S,
        usage_grace: float = DEFAULT_USAGE_GRACE_S,
        follow_redirects: bool = DEFAULT_FOLLOW_REDIRECTS,
        tools: bool = True,
        vision: bool = False,
        thinking: bool = True,
        embed: bool = True,
        embed_model: str = DEFAULT_EMBED_MODEL,
        name: str = "openai_compat",
    ) -> None:
        self.name = name
        self.base_url = base_url
        self.chat_url = endpoint_url(base_url, "chat/completions")
        self.completions_url = endpoint_url(base_url, "completions")  # raw prompts (ADR 0025)
        self.embeddings_url = endpoint_url(base_url, "embeddings")
        self.model = model
        self.embed_model = embed_model
        self.vision = vision
        self._caps = Capabilities(
            v2=True,
            tools=tools,
            vision=vision,
            thinking=thinking,
            embed=embed,
            accelerator=AcceleratorInfo(kind="remote"),
        )
        self.extra_body = dict(extra_body or {})
        self.limits = StreamLimits(
            max_event_bytes, max_call_args, max_stream_args, done_grace, usage_grace
        )
        self.max_event_bytes = max_event_bytes
        if max_connections < 1:
            raise InvalidRequest(f"max_connections={max_connections} must be >= 1")
        self._api_key = Secret(_key_from_env() if api_key is None else api_key)
        self._client = HttpClient(
            timeout=_timeouts(timeout, connect_timeout, read_timeout),
            headers=dict(headers or {}),
            api_key=self._api_key,
            max_connections=max_connections,
            basic_auth=url_basic_auth(base_url),
            retry=RetryPolicy(max_retries, backoff_base, backoff_max, max_retry_after),
            follow_redirects=follow_redirects,
        )
        self._active = 0

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

    def completions_body(self, request: Request) -> dict[str, Any]:
        """The ``/v1/completions`` body :meth:`generate` sends for a raw completion
        (``Request.completion``; docs/adr/0025-raw-completions-and-reasoning.md)."""
        body = dict(self.extra_body)
        body.update(request_to_completions(request, model=request.model or self.model))
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        return body

    def _stream_target(self, request: Request) -> tuple[str, dict[str, Any]]:
        if request.prompt is not None:
            return self.completions_url, self.completions_body(request)
        return self.chat_url, self.chat_body(request)

    def _event_source(self, resp: aiohttp.ClientResponse, url: str) -> _Body:
        body = _Body(resp, self.limits, url)
        if url == self.completions_url != self.chat_url:  # text_completion chunks
            body.decoder = CompletionStreamDecoder(self.limits.max_event_bytes)  # type: ignore[assignment]
        return body

    def _choices_source(self, resp: aiohttp.ClientResponse, url: str, request: Request) -> _Body:
        """``n`` choices and logprobs read back per choice (docs/adr/0022-*.md)."""
        body = self._event_source(resp, url)
        if url == self.chat_url:
            lim = self.limits
            body.decoder = ChoicesStreamDecoder(  # type: ignore[assignment]
                request.n, lim.max_event_bytes, lim.max_call_args, lim.max_stream_args
            )
        return body

    # ------------------------------------------------------------------ embed

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed via ``/v1/embeddings``; vectors come back in input order."""
        self._check_open()
        if not self._caps.embed:
            raise EmbedUnsupported(
                f"backend {self.name!r} was configured with embed=False (its upstream "
                "serves no embeddings)"
            )
        body = embed_request_to_openai(request, model=self.embed_model)
        reply = await self._client.post_json(self.embeddings_url, body)
        return embed_result_from_openai(reply, count=len(request.input))
