"""The bridge's OpenAI Responses endpoint, ``POST /v1/responses``, stateless.

Mapping is :mod:`inferd.responses_wire`'s; this module moves bytes with the bridge's
body reader, auth, OpenAI error objects and cancellation on disconnect
(docs/adr/0014-anthropic-messages-both-ways.md). A pre-stream failure of a streamed
request is a proper HTTP error (the first event is awaited before the 200); a failure
after it is an ``error`` stream event.
"""

from __future__ import annotations

from aiohttp import web

from inferd import openai_wire
from inferd import responses_wire as wire
from inferd.errors import InferdError
from inferd.serve.bridge import (
    _error,
    _model,
    complete_reply,
    log_unexpected,
    read_api_request,
    stream_reply,
)


async def responses(request: web.Request) -> web.StreamResponse:
    try:
        body, req, stream = await read_api_request(request, wire.request_from_responses)
    except InferdError as e:
        return _error(e)
    model = _model(request, body)
    if not stream:
        return await complete_reply(
            request, req, lambda r: wire.response_to_responses(r, body, model=model)
        )
    writer = wire.ResponsesStreamWriter(body, model)

    def error_event(exc: Exception) -> bytes:
        log_unexpected(exc)
        err = openai_wire.error_object(exc)["error"]
        return writer.error(err["code"], err["message"])

    return await stream_reply(request, req, writer, error_event)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)


__all__ = ["add_routes"]
