"""Embeddings and reranking on a ``LlamaCpp`` model: one context, inputs batched per decode.

Why a module of its own (docs/adr/0018-embeddings-rerank-tokens.md): generation runs on
the scheduler's context; embeddings and rerank scores need a context created with
``embeddings=True`` and a pooling type, which libllama fixes at creation. This module
owns that second context, created on first use in the backend's worker thread.

* Pooling: every type libllama has (``none``, ``mean``, ``cls``, ``last``, ``rank``),
  from the GGUF's ``<arch>.pooling_type`` or the ``pooling=`` option. ``rank`` is a
  reranker's (a classifier head gives one score per sequence); ``none`` gives one
  vector per token (:meth:`Embedder.embed_tokens`).
* Batching: many inputs share one ``llama_decode``, one sequence id each, packed until
  the batch holds :data:`DEFAULT_EMBED_SEQS` sequences or its token capacity. Attention
  never crosses sequences, so each vector equals the one-by-one result up to float
  summation order.
* ``dimensions`` (Matryoshka): truncate then L2-normalise, only for a model opened with
  ``matryoshka_dims=`` (GGUF metadata has no standard key saying a model was trained
  for it); refused otherwise, since truncating any other model's vector silently gives
  a worse one.
* Rerank input: the pair is built as ``llama-server`` builds it (the GGUF's
  ``tokenizer.chat_template.rerank`` with ``{query}``/``{document}``, else
  BOS query EOS SEP document EOS as the tokenizer's flags say), and the score is the
  classifier's first output, raw, as ``llama-server``'s ``/v1/rerank`` returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from inferd.errors import EmbedUnsupported, InvalidRequest
from inferd.limits import echo

#: libllama's pooling types, by the name ``LlamaCpp(pooling=...)`` takes.
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")
#: ``<arch>.pooling_type`` values in a GGUF (llama.h's ``enum llama_pooling_type``).
GGUF_POOLING = {"0": "none", "1": "mean", "2": "cls", "3": "last", "4": "rank"}
#: Pooling types that give one sentence vector per input.
SENTENCE_POOLING = frozenset({"mean", "cls", "last"})
#: Sequences packed into one decode (libllama allows at most 256 per context).
DEFAULT_EMBED_SEQS = 64
#: Largest embeddings context when neither the model nor ``embed_n_ctx`` says less.
DEFAULT_EMBED_N_CTX = 2048
#: The GGUF key of a reranker's own prompt template (``llama-server`` reads the same).
RERANK_TEMPLATE_KEY = "tokenizer.chat_template.rerank"


def check_options(pooling: Any, matryoshka_dims: Any) -> None:
    """Validate the ``pooling`` and ``matryoshka_dims`` settings (InvalidRequest names
    the setting); called by :class:`.options.LlamaCppOptions` before any load."""
    if pooling is not None and pooling not in POOLING_TYPES:
        raise InvalidRequest(
            f"pooling={echo(pooling)} must be one of {', '.join(POOLING_TYPES)} or None "
            "(the model's own)"
        )
    if matryoshka_dims is None or matryoshka_dims is True:
        return
    ok = isinstance(matryoshka_dims, (tuple, list)) and matryoshka_dims
    if not ok or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in matryoshka_dims
    ):
        raise InvalidRequest(
            f"matryoshka_dims={echo(matryoshka_dims)} must be True (any size) or a "
            "non-empty list of positive integers (the sizes the model was trained for)"
        )


def model_pooling(model: Any) -> str | None:
    """The pooling the GGUF declares (``<arch>.pooling_type``), or None."""
    return GGUF_POOLING.get(model.meta(f"{model.architecture}.pooling_type") or "")


def resolve_pooling(model: Any, option: str | None, embed: bool | None) -> str | None:
    """The pooling the embeddings context uses: the option, else the model's, else
    ``mean`` when ``embed=True`` asks to pool a model that declares none; None when
    this model serves neither embeddings nor rerank."""
    if option is not None:
        return option
    declared = model_pooling(model)
    if declared is not None and declared != "none":
        return declared
    return "mean" if embed else declared


class Embedder:
    """The embeddings context of one model; every method runs in the backend's one
    worker thread (the context serves one decode at a time)."""

    def __init__(
        self,
        L: Any,
        model: Any,
        *,
        pooling: str,
        n_ctx: int | None,
        n_threads: int | None,
        n_seqs: int = DEFAULT_EMBED_SEQS,
        matryoshka_dims: Sequence[int] | bool | None = None,
    ) -> None:
        n = n_ctx or min(int(model.n_ctx_train) or DEFAULT_EMBED_N_CTX, DEFAULT_EMBED_N_CTX)
        self.model = model
        self.pooling = pooling
        self.matryoshka_dims = matryoshka_dims
        self.n_seqs = n_seqs
        # A non-causal model needs each input whole in one micro-batch; one unified KV
        # buffer lets a decoder model hold every packed sequence at once.
        self.ctx = L.Context(
            model,
            n_ctx=n,
            n_batch=n,
            n_ubatch=n,
            n_seq_max=n_seqs,
            n_threads=n_threads,
            embeddings=True,
            pooling=pooling,
            kv_unified=True,
        )
        self.batch = L.Batch(n, 1)

    def close(self) -> None:
        self.ctx.close()

    # ------------------------------------------------------------------ inputs

    def _tokens(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for i, text in enumerate(texts):
            toks = self.model.tokenize(text, add_special=True, parse_special=False)
            out.append(self._fits(toks, f"input[{i}]"))
        return out

    def _fits(self, toks: list[int], where: str) -> list[int]:
        if not toks:
            raise InvalidRequest(f"{where} is empty after tokenization")
        if len(toks) > self.batch.capacity:
            raise InvalidRequest(
                f"{where} is {len(toks)} tokens; embeddings take at most "
                f"{self.batch.capacity} (pass embed_n_ctx= to LlamaCpp for more)"
            )
        return toks

    def _groups(self, seqs: list[list[int]]) -> list[list[int]]:
        """Indices of ``seqs`` packed into decodes (order kept)."""
        groups: list[list[int]] = [[]]
        used = 0
        for i, toks in enumerate(seqs):
            if groups[-1] and (
                used + len(toks) > self.batch.capacity or len(groups[-1]) >= self.n_seqs
            ):
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += len(toks)
        return groups

    def _run(self, seqs: list[list[int]], read: Any) -> list[Any]:
        """Decode ``seqs`` in packed batches; ``read(seq_id)`` collects each result."""
        ctx, batch = self.ctx, self.batch
        out: list[Any] = [None] * len(seqs)
        try:
            for group in self._groups(seqs):
                ctx.clear()
                batch.clear()
                for sid, i in enumerate(group):
                    batch.add_sequence(seqs[i], 0, sid, True)
                ctx.decode(batch)
                for sid, i in enumerate(group):
                    out[i] = read(sid)
        finally:
            ctx.clear()
        return out

    # ------------------------------------------------------------------ work

    def check_dimensions(self, dimensions: int | None) -> None:
        """``dimensions`` honoured only for a Matryoshka model (module docstring)."""
        if dimensions is None:
            return
        n = int(self.model.n_embd)
        dims = self.matryoshka_dims
        if not dims:
            raise InvalidRequest(
                f"dimensions={echo(dimensions)}: this model is not declared Matryoshka-"
                "trained, so a truncated vector would be a worse one; omit dimensions, or "
                "open the model with LlamaCpp(..., matryoshka_dims=...)"
            )
        if dimensions > n or (dims is not True and dimensions not in dims):
            allowed = f"at most {n}" if dims is True else f"one of {sorted(dims)}"
            raise InvalidRequest(f"dimensions={echo(dimensions)} must be {allowed}")

    def embed(self, texts: Sequence[str], dimensions: int | None) -> tuple[list[list[float]], int]:
        """One L2-normalised vector per text (truncated first when ``dimensions``), and
        the tokens read."""
        if self.pooling not in SENTENCE_POOLING:
            raise EmbedUnsupported(
                f"pooling={self.pooling!r} gives "
                + ("rerank scores" if self.pooling == "rank" else "one vector per token")
                + ", not one per input; use "
                + ("rerank()" if self.pooling == "rank" else "embed_tokens()")
                + " or open the model with pooling='mean', 'cls' or 'last'"
            )
        self.check_dimensions(dimensions)
        seqs = self._tokens(texts)
        ctx = self.ctx
        vecs = self._run(seqs, lambda sid: ctx.embedding(sid, dimensions=dimensions))
        return vecs, sum(map(len, seqs))

    def embed_tokens(self, text: str) -> list[list[float]]:
        """``pooling='none'``: one L2-normalised vector per token of ``text``."""
        if self.pooling != "none":
            raise EmbedUnsupported(
                f"per-token embeddings need pooling='none'; this model pools {self.pooling!r}"
            )
        (toks,) = self._tokens([text])
        ctx = self.ctx
        return self._run([toks], lambda _sid: [ctx.token_embedding(i) for i in range(len(toks))])[0]

    def pair_tokens(self, query: str, document: str) -> list[int]:
        """A rerank input, built as ``llama-server``'s ``format_prompt_rerank`` does."""
        m = self.model
        template = m.meta(RERANK_TEMPLATE_KEY)
        if template:
            text = template.replace("{query}", query).replace("{document}", document)
            return m.tokenize(text, add_special=False, parse_special=True)
        q = m.tokenize(query, add_special=False, parse_special=False)
        d = m.tokenize(document, add_special=False, parse_special=False)
        eos = m.eos if m.eos >= 0 else m.sep
        out = [m.bos] if m.add_bos else []
        out += q
        if m.add_eos:
            out.append(eos)
        if m.add_sep:
            out.append(m.sep)
        out += d
        if m.add_eos:
            out.append(eos)
        return out

    def rerank(self, query: str, documents: Sequence[str]) -> tuple[list[float], int]:
        """One relevance score per document (the classifier's first output), in input
        order, and the tokens read."""
        if self.pooling != "rank":
            raise EmbedUnsupported(
                f"rerank needs a reranker (rank pooling); this model pools {self.pooling!r}"
            )
        seqs = [
            self._fits(self.pair_tokens(query, d), f"documents[{i}] with the query")
            for i, d in enumerate(documents)
        ]
        ctx = self.ctx
        scores = self._run(seqs, lambda sid: ctx.scores(sid)[0])
        return scores, sum(map(len, seqs))
