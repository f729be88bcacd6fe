"""HTTP for Anthropic upstreams: :class:`~inferd.backends.openai_compat.client.HttpClient`
with Anthropic's credentials and statuses.

Everything about sessions, retries before the first event, backoff, ``Retry-After``,
redirects and keeping the key secret is the OpenAI-compatible client's
(docs/adr/0007-openai-compat-retries-and-connections.md); only what differs is here:
the key goes in ``x-api-key`` (never ``Authorization``), every request carries
``anthropic-version``, and HTTP 529 (Anthropic's "overloaded") is retried like 503.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import aiohttp

from inferd.anthropic_wire import ANTHROPIC_VERSION
from inferd.backends.openai_compat.client import (
    RETRY_STATUSES,
    HttpClient,
)
from inferd.errors import BackendUnavailable, redact_url

#: Default upstream (a config default, not a hard-coded dependency).
DEFAULT_BASE_URL = "https://api.anthropic.com"
#: Statuses retried before the first event: OpenAI's set plus 529 (overloaded).
ANTHROPIC_RETRY_STATUSES = RETRY_STATUSES | {529}
#: Environment variables read for the API key, in order, when ``api_key`` is None.
API_KEY_ENV = ("INFERD_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")


@dataclass
class AnthropicHttpClient(HttpClient):
    """:class:`HttpClient` sending ``x-api-key`` and ``anthropic-version``."""

    version: str = ANTHROPIC_VERSION
    retry_statuses: ClassVar[frozenset[int]] = ANTHROPIC_RETRY_STATUSES

    def _credentials(self) -> dict[str, str]:
        h = {"anthropic-version": self.version}
        if self.api_key:
            h["x-api-key"] = self.api_key.get()
        elif self.basic_auth:
            h["Authorization"] = self.basic_auth.get()
        h.update(self.headers)
        return h

    def _status_error(self, resp: aiohttp.ClientResponse, body: str, url: str) -> Exception:
        """A refused key names the variables to set; the rest is :class:`HttpClient`'s
        mapping with 529 retried too (docs/adr/0014-anthropic-messages-both-ways.md)."""
        if resp.status in (401, 403):
            return BackendUnavailable(
                f"upstream {redact_url(url)} refused the API key (HTTP {resp.status}); set a "
                "valid key with api_key= or " + " / ".join(API_KEY_ENV),
                status=resp.status,
                body=body,
            )
        return super()._status_error(resp, body, url)
