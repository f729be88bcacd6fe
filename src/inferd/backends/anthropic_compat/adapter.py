"""``AnthropicCompat``: the stream contract over Anthropic's ``/v1/messages``.

Requests go out through :func:`inferd.anthropic_wire.request_to_anthropic`; the body
comes back through :class:`.stream.MessagesStreamDecoder`. This module adds what the
contract needs, as :class:`~inferd.backends.openai_compat.OpenAICompat` does: retries
before the first event only (an ``overloaded_error`` event before any output counts as
a failed attempt), exactly one ``Done`` with timings, and closing the response the
moment a caller leaves (docs/adr/0014-anthropic-messages-both-ways.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

from inferd.anthropic_wire import (
    ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    DEFAULT_THINKING_BUDGET,
    MIN_THINKING_BUDGET,
    request_to_anthropic,
)
from inferd.backend import Backend
from inferd.backends.openai_compat.adapter import _drained, _timeouts
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
    WIRE_ERRORS,
    RetryPolicy,
    Secret,
    connection_error,
    endpoint_url,
    url_basic_auth,
)
from inferd.errors import EmbedUnsupported, InvalidRequest, NotReady, redact_url
from inferd.sse import DEFAULT_MAX_EVENT_BYTES
from inferd.types import (
    AcceleratorInfo,
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    Timings,
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
    for name in API_KEY_ENV:
        value = os.environ.get(name)
        if value:
            return value
    return ""


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


class AnthropicCompat(Backend):
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

    def __repr__(self) -> str:
        return (
            f"<AnthropicCompat name={self.name!r} base_url={redact_url(self.base_url)!r} "
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
        return self._caps

    async def aclose(self) -> None:
        await self._client.aclose()

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

    async def _open_stream(
        self, payload: bytes
    ) -> tuple[
        aiohttp.ClientResponse,
        MessagesStreamDecoder,
        aiohttp.streams.AsyncStreamIterator[bytes],
        list[Event],
    ]:
        """POST and read up to the first events, retrying per the client's policy while
        nothing has been shown (connection failures, retryable ``error`` events)."""
        url = self.messages_url
        attempt = 0
        while True:
            resp, attempt = await self._client.post(
                url, payload, accept="text/event-stream", attempt=attempt
            )
            decoder = MessagesStreamDecoder(*self._limits)
            chunks = resp.content.iter_any()
            try:
                batch: list[Event] = []
                while not batch:
                    try:
                        data = await chunks.__anext__()
                    except StopAsyncIteration:
                        batch = decoder.close()
                        break
                    batch = decoder.feed(data)
                return resp, decoder, chunks, batch
            except WIRE_ERRORS as e:
                resp.close()
                err = connection_error(e, url, timeouts=self._client.timeout)
                attempt = await self._client.wait_before_retry(err, attempt)
            except UpstreamStreamError as e:
                resp.close()
                if not e.retryable:
                    raise
                attempt = await self._client.wait_before_retry(e, attempt)
            except BaseException:
                resp.close()
                raise

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Stream the reply: retries before the first event only, then exactly one ``Done``."""
        if self._client.closed:
            raise NotReady(f"backend {self.name!r} is closed; create a new AnthropicCompat")
        lacks = self._caps.covers(request)
        if lacks is not None:
            raise InvalidRequest(f"backend {self.name!r} cannot serve this request: {lacks}")
        payload = orjson.dumps(self.messages_body(request))
        start = time.perf_counter()
        count = 0
        self._active += 1
        resp: aiohttp.ClientResponse | None = None
        try:
            resp, decoder, chunks, batch = await self._open_stream(payload)
            first = time.perf_counter()
            while True:
                for ev in batch:
                    if isinstance(ev, Done):
                        tokens = ev.usage.output_tokens or count
                        yield ev.replace(
                            timings=Timings.measure(start, first, time.perf_counter(), tokens),
                            backend=self.name,
                        )
                        if await _drained(resp):
                            resp.release()
                            resp = None
                        return
                    count += 1
                    yield ev
                try:
                    data = await chunks.__anext__()
                except StopAsyncIteration:
                    batch = decoder.close()
                    continue
                batch = decoder.feed(data)
        except WIRE_ERRORS as e:
            if resp is None:
                raise
            raise connection_error(
                e, self.messages_url, timeouts=self._client.timeout, mid_stream=True
            ) from None
        finally:
            if resp is not None:
                resp.close()
            self._active -= 1

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """The Messages API has no embeddings."""
        raise EmbedUnsupported(
            f"backend {self.name!r} speaks the Anthropic Messages API, which has no embeddings"
        )
