"""The bridge's legacy OpenAI Completions endpoint, ``POST /v1/completions``.

Mapping is :mod:`inferd.completions_wire`'s; this module moves bytes with the bridge's
body reader, auth, model check, OpenAI error objects and cancellation on disconnect,
through the same instrumented backend as chat (metrics, traces, the daemon's admission
when the bridge fronts one), so a raw completion is limited and counted like a chat
request (docs/adr/0025-raw-completions-and-reasoning.md). A pre-stream failure of a
streamed request is a proper HTTP error; a failure after it is an SSE error chunk.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from inferd import completions_wire as wire
from inferd.errors import InferdError, InvalidRequest
from inferd.serve.bridge import (
    _chat_error_event,
    _error,
    _model,
    _model_refusal,
    complete_reply,
    read_api_request,
    stream_reply,
)


async def completions(request: web.Request) -> web.StreamResponse:
    try:
        body, req, stream = await read_api_request(request, wire.request_from_completions)
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise InvalidRequest("'stream_options' must be an object")
    except InferdError as e:
        return _error(e)
    refused = await _model_refusal(request, req.model)
    if refused is not None:
        return refused
    model = _model(request, body)
    cid = f"cmpl-{uuid.uuid4().hex}"
    if not stream:
        return await complete_reply(
            request, req, lambda r: wire.response_to_completions(r, model=model, id=cid)
        )
    include_usage = bool(opts.get("include_usage"))
    writer = wire.CompletionStreamWriter(model, cid, include_usage=include_usage, n=req.n)
    return await stream_reply(request, req, writer, _chat_error_event)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)


__all__ = ["add_routes"]
