"""The bridge's Anthropic Messages endpoints: ``POST /v1/messages`` and
``POST /v1/messages/count_tokens``, in front of any backend.

A client written for Claude (the ``anthropic`` SDK, agents, editors) runs on a local
model through these; every mapping is :mod:`inferd.anthropic_wire`'s and this module
only moves bytes, with the bridge's own body reader, auth (``x-api-key`` or bearer)
and cancellation on disconnect (docs/adr/0014-anthropic-messages-both-ways.md).

Errors are Anthropic error objects (``{"type": "error", "error": {...}}``): the
handlers' own, and the bridge middleware's (401, 404, 405, 413) rewritten by
:func:`anthropic_errors` for these paths. A pre-stream failure of a streamed request
is a proper HTTP error (the first event is awaited before the 200); a failure after
it is an SSE ``error`` event, which the SDK raises.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import orjson
from aiohttp import web

from inferd import anthropic_wire as wire
from inferd.backend import Backend
from inferd.errors import InferdError, InvalidRequest
from inferd.serve.bridge import (
    BACKEND_KEY,
    Handler,
    _body,
    _model,
    complete_reply,
    log_unexpected,
    read_api_request,
    stream_reply,
)
from inferd.types import Request

log = logging.getLogger("inferd.bridge")

#: Paths whose errors are written in Anthropic's shape.
PATH_PREFIX = "/v1/messages"
#: ``max_tokens`` assumed for a count_tokens body (which need not carry one).
COUNT_TOKENS_MAX_TOKENS = 1


def _error(exc: BaseException) -> web.Response:
    body, status = wire.error_for(exc)
    if not isinstance(exc, InferdError):
        ref = uuid.uuid4().hex[:12]
        log.error("unexpected %s (ref %s)", type(exc).__name__, ref, exc_info=exc)
        body["error"]["message"] += f"; see the server log (ref {ref})"
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@web.middleware
async def anthropic_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: an OpenAI-shaped error from the bridge middleware (401, 404, 405,
    413) on an Anthropic path is rewritten in Anthropic's shape, status kept."""
    resp = await handler(request)
    if not request.path.startswith(PATH_PREFIX) or resp.status < 400:
        return resp
    if not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
        return resp
    try:
        obj = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return resp
    err = obj.get("error") if isinstance(obj, dict) else None
    if obj.get("type") == "error" or not isinstance(err, dict):  # type: ignore[union-attr]
        return resp
    etype = wire.STATUS_TYPES.get(resp.status, "api_error")
    body = wire.error_body(etype, str(err.get("message", "")))
    out = web.Response(body=orjson.dumps(body), status=resp.status, content_type="application/json")
    for name in ("WWW-Authenticate", "Retry-After"):
        if name in resp.headers:
            out.headers[name] = resp.headers[name]
    return out


async def messages(request: web.Request) -> web.StreamResponse:
    try:
        body, req, stream = await read_api_request(request, wire.request_from_anthropic)
    except InferdError as e:
        return _error(e)
    model = _model(request, body)
    if not stream:
        return await complete_reply(
            request,
            req,
            lambda r: wire.response_to_message(r, model=model, id=wire.new_message_id()),
            _error,
        )
    req = replace(req, stream_tool_arguments=True)  # input_json_delta as written (ADR 0023)
    return await stream_reply(request, req, wire.MessageStreamWriter(model), _error_event, _error)


def _error_event(exc: Exception) -> bytes:
    """A failure after the 200: an SSE ``error`` event, which the SDK raises."""
    log_unexpected(exc)
    return wire.sse_event("error", wire.error_for(exc)[0])


def count_prompt_tokens(backend: Backend, req: Request) -> int:
    """Tokens of ``req``'s prompt as the backend's model sees it (its chat template and
    tokenizer); backends without a local tokenizer are refused with a clear 400."""
    render = getattr(backend, "render", None)
    tokenize = getattr(backend, "tokenize_prompt", None)
    if not callable(render) or not callable(tokenize):
        raise InvalidRequest(
            f"count_tokens needs a backend with a local tokenizer (a llama.cpp model); "
            f"backend {backend.name!r} ({type(backend).__name__}) has none"
        )
    return len(tokenize(render(req)))


async def count_tokens(request: web.Request) -> web.Response:
    try:
        body = await _body(request)
        body.setdefault("max_tokens", COUNT_TOKENS_MAX_TOKENS)
        req = wire.request_from_anthropic(body)
        n = count_prompt_tokens(request.app[BACKEND_KEY], req)
    except Exception as e:
        return _error(e)
    return web.Response(body=orjson.dumps({"input_tokens": n}), content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register the endpoints and the error-shape middleware (outermost) on ``app``."""
    app.middlewares.insert(0, anthropic_errors)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)


__all__ = ["add_routes", "anthropic_errors", "count_prompt_tokens"]
