"""The bridge's tokenizer and rerank endpoints, in llama-server's shapes (issue 19).

``POST /tokenize`` ``{"content", "add_special"=false, "parse_special"=true,
"with_pieces"=false}`` -> ``{"tokens": [id, ...]}`` (with pieces: ``[{"id", "piece"}]``,
a piece that is not valid UTF-8 given as its byte values); ``POST /detokenize``
``{"tokens"}`` -> ``{"content"}``; ``POST /apply-template`` (a chat completions body)
-> ``{"prompt"}``; ``POST /v1/rerank`` (and ``/rerank``) ``{"query", "documents",
"top_n", "return_documents"}`` -> ``{"results": [{"index", "relevance_score"}], ...}``
best first, the Jina/Cohere shape llama-server answers. A backend without a tokenizer
or reranker answers 400 (its ``capabilities()`` says so up front).
docs/adr/0018-embeddings-rerank-tokens.md says why these shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from inferd import openai_wire
from inferd.backend import Backend
from inferd.errors import InvalidRequest
from inferd.limits import echo
from inferd.serve.bridge import BACKEND_KEY, _body, _error, _json, _model
from inferd.types import RerankRequest

#: Most token ids one ``/detokenize`` or mixed ``/tokenize`` body may carry.
MAX_TOKENS_PER_REQUEST = 1_000_000
#: Fields a ``/v1/rerank`` body may have; any other is refused, not ignored.
RERANK_FIELDS = frozenset({"model", "query", "documents", "top_n", "return_documents"})


def _backend(request: web.Request) -> Backend:
    """The backend that does token and rerank work. A wrapper that observes only
    generation and embeddings (the bridge's metrics layer keeps what it wraps in
    ``inner``) would answer with ``Backend``'s refusals, so the work goes to ``inner``."""
    b = request.app[BACKEND_KEY]
    inner = getattr(b, "inner", None)
    return inner if isinstance(inner, Backend) else b


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {echo(value)}")
    return value


def _id_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{name} must be a list of token ids")
    if len(value) > MAX_TOKENS_PER_REQUEST:
        raise InvalidRequest(
            f"{name} has {len(value)} items; at most {MAX_TOKENS_PER_REQUEST} "
            "(MAX_TOKENS_PER_REQUEST)"
        )
    if any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise InvalidRequest(f"{name} must hold only integer token ids")
    return value


def _content(body: Mapping[str, Any]) -> str | list[str | int]:
    content = body.get("content", "")
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or len(content) > MAX_TOKENS_PER_REQUEST:
        raise InvalidRequest(
            "content must be a string or a list of strings and token ids "
            f"(at most {MAX_TOKENS_PER_REQUEST} items, MAX_TOKENS_PER_REQUEST)"
        )
    if any(not isinstance(x, (str, int)) or isinstance(x, bool) for x in content):
        raise InvalidRequest("content must hold only strings and integer token ids")
    return content


def _piece(data: bytes) -> str | list[int]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


async def tokenize(request: web.Request) -> web.Response:
    backend = _backend(request)
    try:
        body = await _body(request)
        with_pieces = _flag(body, "with_pieces", False)
        tokens = await backend.tokenize(
            _content(body),
            add_special=_flag(body, "add_special", False),
            parse_special=_flag(body, "parse_special", True),
        )
        out: list[Any] = list(tokens)
        if with_pieces:
            pieces = await backend.token_pieces(tokens)
            out = [{"id": t, "piece": _piece(p)} for t, p in zip(tokens, pieces, strict=True)]
    except Exception as e:
        return _error(e)
    return _json({"tokens": out})


async def detokenize(request: web.Request) -> web.Response:
    backend = _backend(request)
    try:
        body = await _body(request)
        content = await backend.detokenize(_id_list(body.get("tokens", []), "tokens"))
    except Exception as e:
        return _error(e)
    return _json({"content": content})


async def apply_template(request: web.Request) -> web.Response:
    backend = _backend(request)
    try:
        body = await _body(request)
        prompt = await backend.apply_template(openai_wire.request_from_openai(body))
    except Exception as e:
        return _error(e)
    return _json({"prompt": prompt})


def rerank_request(body: Mapping[str, Any]) -> tuple[RerankRequest, bool]:
    """The request a ``/v1/rerank`` body asks for, and whether to return documents."""
    unknown = set(body) - RERANK_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown rerank field(s): {echo(sorted(unknown))}")
    if "query" not in body:
        raise InvalidRequest("rerank request needs 'query'")
    docs = body.get("documents")
    if not isinstance(docs, list):
        raise InvalidRequest("documents must be a non-empty list of strings")
    req = RerankRequest(body["query"], tuple(docs), body.get("top_n"))
    return req, _flag(body, "return_documents", False)


async def rerank(request: web.Request) -> web.Response:
    backend = _backend(request)
    try:
        body = await _body(request)
        req, with_docs = rerank_request(body)
        result = await backend.rerank(req)
    except Exception as e:
        return _error(e)
    results = []
    for i, score in result.ranked(req.top_n):
        item: dict[str, Any] = {"index": i, "relevance_score": score}
        if with_docs:
            item["document"] = {"text": req.documents[i]}
        results.append(item)
    n = result.usage.input_tokens
    return _json(
        {
            "model": _model(request, body),
            "object": "list",
            "usage": {"prompt_tokens": n, "total_tokens": n},
            "results": results,
        }
    )


def add_routes(app: web.Application) -> None:
    """Register the tokenizer and rerank endpoints on the bridge ``app``."""
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/apply-template", apply_template)
    app.router.add_post("/v1/rerank", rerank)
    app.router.add_post("/rerank", rerank)
