"""The ``Backend`` interface every model location implements.

The stream contract (``docs/architecture.md``, tested once for all in ``tests/contract``):

* ``generate(request)`` returns an async iterator of events;
* a problem found before the first event raises from the first ``__anext__``
  (pre-stream: the only point where a router may fail over);
* a completed stream yields Text/Thinking/ToolUse and then exactly one ``Done``;
* a failure after the first event raises ``BackendUnavailable``;
* leaving early (break, ``aclose()``, cancellation) cancels the work;
* a slow consumer slows the producer; memory does not grow.

Backends write ``generate`` as an async generator, which gives the pre-stream rule
for free: nothing runs until the first ``__anext__``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType

from inferd.errors import EmbedUnsupported, InvalidRequest, ended_without_done
from inferd.types import (
    Capabilities,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    RerankRequest,
    RerankResult,
)

__all__ = ["Backend", "ended_without_done"]


class Backend(abc.ABC):
    """One place a chat model runs. Use it as an async context manager."""

    #: Short name shown in ``Done.backend``, router diagnostics and logs.
    name: str = "backend"

    @abc.abstractmethod
    def ready(self) -> bool:
        """True when a request sent now would be served (model loaded, not closed)."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend can do (tools, vision, embeddings, accelerator)."""

    @abc.abstractmethod
    def generate(self, request: Request) -> AsyncIterator[Event]:
        """Stream the reply to ``request`` as events ending in one ``Done``."""

    async def refresh_state(self) -> None:  # noqa: B027 - optional hook, not abstract on purpose
        """Make ``ready()`` and ``capabilities()`` current without blocking the loop.

        Routers await this before asking either. Backends whose state is local answer
        those from memory and need nothing; one whose state lives elsewhere (the daemon
        ``Client``) fetches it the first time and refreshes it in the background after.
        """

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed ``request.input``; backends without embeddings raise ``EmbedUnsupported``."""
        raise EmbedUnsupported(f"backend {self.name!r} does not produce embeddings")

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """Score ``request.documents`` against the query; only reranker models can
        (``capabilities().rerank``); others raise ``EmbedUnsupported``."""
        raise EmbedUnsupported(f"backend {self.name!r} does not rerank")

    def _no_tokenizer(self) -> InvalidRequest:
        return InvalidRequest(
            f"backend {self.name!r} has no tokenizer here (capabilities().tokenize is false)"
        )

    async def tokenize(
        self,
        content: str | list[str | int],
        *,
        add_special: bool = False,
        parse_special: bool = True,
    ) -> list[int]:
        """Token ids of ``content`` (llama-server's ``/tokenize``: a list mixes text and
        ids); backends without a local tokenizer raise ``InvalidRequest``."""
        raise self._no_tokenizer()

    async def token_pieces(self, tokens: list[int]) -> list[bytes]:
        """The bytes each token renders to (control tokens as their text)."""
        raise self._no_tokenizer()

    async def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (llama-server's ``/detokenize``)."""
        raise self._no_tokenizer()

    async def apply_template(self, request: Request) -> str:
        """The prompt the chat template renders for ``request`` (``/apply-template``)."""
        raise self._no_tokenizer()

    async def aclose(self) -> None:  # noqa: B027 - optional hook, not abstract on purpose
        """Release connections, contexts and models. Safe to call twice."""

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} ready={self.ready()}>"
