"""``AnthropicCompat``: the stream contract over Anthropic's ``/v1/messages``.

Requests go out through :func:`inferd.anthropic_wire.request_to_anthropic`; the body
comes back through :class:`.stream.MessagesStreamDecoder`. What the contract needs
comes from the base it shares with :class:`~inferd.backends.openai_compat.OpenAICompat`
(:class:`inferd.backends.openai_compat._http_adapter.HttpAdapter`): retries
before the first event only (an ``overloaded_error`` event before any output counts as
a failed attempt), exactly one ``Done`` with timings, and closing the response the
moment a caller leaves (docs/adr/0014-anthropic-messages-both-ways.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp

from inferd.anthropic_wire import (
    ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    DEFAULT_THINKING_BUDGET,
    MIN_THINKING_BUDGET,
    request_to_anthropic,
)
from inferd.backend import Backend
from inferd.backends.openai_compat._http_adapter import HttpAdapter, key_from_env
from inferd.backends.openai_compat._http_adapter import client_timeouts as _timeouts
from inferd.backends.openai_compat.client import (
    DEFAULT_BACKOFF_BASE_S,
    DEFAULT_BACKOFF_MAX_S,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_FOLLOW_REDIRECTS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_AFTER_S,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    RetryPolicy,
    Secret,
    endpoint_url,
    url_basic_auth,
)
from inferd.errors import EmbedUnsupported, InvalidRequest
from inferd.sse import DEFAULT_MAX_EVENT_BYTES
from inferd.types import (
    AcceleratorInfo,
    Capabilities,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
)

from .client import API_KEY_ENV, DEFAULT_BASE_URL, AnthropicHttpClient
from .stream import (
    MAX_STREAM_TOOL_INPUT_BYTES,
    MAX_TOOL_INPUT_BYTES,
    MessagesStreamDecoder,
    UpstreamStreamError,
)

#: Model asked for when neither the request nor the backend names one.
DEFAULT_MODEL = "claude-sonnet-4-5"


def _key_from_env() -> str:
    return key_from_env(API_KEY_ENV)


def _check_options(
    *, max_tokens: int, thinking_budget: int, max_connections: int, **sizes: int
) -> None:
    """Constructor options out of range are refused, never clamped."""
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens={max_tokens} must be >= 1")
    if thinking_budget < MIN_THINKING_BUDGET:
        raise InvalidRequest(f"thinking_budget={thinking_budget} must be >= {MIN_THINKING_BUDGET}")
    if max_connections < 1:
        raise InvalidRequest(f"max_connections={max_connections} must be >= 1")
    for label, v in sizes.items():
        if v < 1024:
            raise InvalidRequest(f"{label}={v} must be >= 1024")


class _MessagesBody:
    """Events from one streamed Messages body, read batch by batch (ADR 0014)."""

    __slots__ = ("_chunks", "decoder", "quiet_end")

    def __init__(self, resp: aiohttp.ClientResponse, decoder: MessagesStreamDecoder) -> None:
        self._chunks = resp.content.iter_any()
        self.decoder = decoder
        self.quiet_end = False  # the body's end is required: close() raises without it

    @property
    def finished(self) -> bool:
        return self.decoder.finished

    async def next_events(self) -> list[Event]:
        try:
            data = await self._chunks.__anext__()
        except StopAsyncIteration:
            return self.decoder.close()
        return self.decoder.feed(data)


class AnthropicCompat(HttpAdapter, Backend):
    """A backend that streams from an Anthropic Messages API ``/v1/messages``.

    ``api_key=None`` reads ``INFERD_ANTHROPIC_API_KEY`` then ``ANTHROPIC_API_KEY``; the
    key is sent as ``x-api-key``, held in a :class:`Secret`, and never appears in a
    repr, a log line or an error; an empty key sends none (local servers).
    ``max_tokens`` is sent when a request sets none, since the API requires it
    (default :data:`~inferd.anthropic_wire.DEFAULT_MAX_TOKENS`, 4096).
    ``thinking_budget`` is the ``budget_tokens`` for ``Request(thinking=True)``.
    ``extra_body`` is merged under the mapped fields; ``headers`` are added to every
    request (``anthropic-beta``, ...). Embeddings: the Messages API has none, so
    :meth:`embed` raises ``EmbedUnsupported`` and ``capabilities().embed`` is False.
    """

    #: An ``error`` event before any output (``overloaded_error``) is a failed attempt.
    _retry_on = (UpstreamStreamError,)

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        model: str = DEFAULT_MODEL,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        thinking_budget: int = DEFAULT_THINKING_BUDGET,
        anthropic_version: str = ANTHROPIC_VERSION,
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
        max_call_args: int = MAX_TOOL_INPUT_BYTES,
        max_stream_args: int = MAX_STREAM_TOOL_INPUT_BYTES,
        follow_redirects: bool = DEFAULT_FOLLOW_REDIRECTS,
        tools: bool = True,
        vision: bool = True,
        thinking: bool = True,
        name: str = "anthropic_compat",
    ) -> None:
        _check_options(
            max_tokens=max_tokens,
            thinking_budget=thinking_budget,
            max_connections=max_connections,
            max_event_bytes=max_event_bytes,
            max_call_args=max_call_args,
            max_stream_args=max_stream_args,
        )
        self.name = name
        self.base_url = base_url
        self.messages_url = endpoint_url(base_url, "messages")
        self.model = model
        self.max_tokens = max_tokens
        self.thinking_budget = thinking_budget
        self.extra_body = dict(extra_body or {})
        self._limits = (max_event_bytes, max_call_args, max_stream_args)
        self._caps = Capabilities(
            v2=True,
            tools=tools,
            vision=vision,
            thinking=thinking,
            embed=False,
            accelerator=AcceleratorInfo(kind="remote"),
        )
        self._api_key = Secret(_key_from_env() if api_key is None else api_key)
        self._client = AnthropicHttpClient(
            timeout=_timeouts(timeout, connect_timeout, read_timeout),
            headers=dict(headers or {}),
            api_key=self._api_key,
            max_connections=max_connections,
            basic_auth=url_basic_auth(base_url),
            retry=RetryPolicy(max_retries, backoff_base, backoff_max, max_retry_after),
            follow_redirects=follow_redirects,
            version=anthropic_version,
        )
        self._active = 0

    def messages_body(self, request: Request) -> dict[str, Any]:
        """The exact JSON body :meth:`generate` sends for ``request``."""
        body = dict(self.extra_body)
        body.update(
            request_to_anthropic(
                request,
                model=request.model or self.model,
                max_tokens=self.max_tokens,
                thinking_budget=self.thinking_budget,
            )
        )
        body["stream"] = True
        return body

    def _stream_target(self, request: Request) -> tuple[str, dict[str, Any]]:
        return self.messages_url, self.messages_body(request)

    def _event_source(self, resp: aiohttp.ClientResponse, url: str) -> _MessagesBody:
        return _MessagesBody(resp, MessagesStreamDecoder(*self._limits))

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """The Messages API has no embeddings."""
        raise EmbedUnsupported(
            f"backend {self.name!r} speaks the Anthropic Messages API, which has no embeddings"
        )
