"""The bridge's OpenAI Responses endpoint, ``POST /v1/responses``, stateless.

Mapping is :mod:`inferd.responses_wire`'s; this module moves bytes with the bridge's
body reader, auth, OpenAI error objects and cancellation on disconnect
(docs/adr/0014-anthropic-messages-both-ways.md). A pre-stream failure of a streamed
request is a proper HTTP error (the first event is awaited before the 200); a failure
after it is an ``error`` stream event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from aiohttp import web

from inferd import openai_wire
from inferd import responses_wire as wire
from inferd.backend import ended_without_done
from inferd.errors import InferdError, InvalidRequest
from inferd.serve.bridge import BACKEND_KEY, _aclose, _body, _client_left, _error, _model
from inferd.types import Event, Request, Response

log = logging.getLogger("inferd.bridge")


async def responses(request: web.Request) -> web.StreamResponse:
    try:
        body = await _body(request)
        req = wire.request_from_responses(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("stream must be true or false")
    except InferdError as e:
        return _error(e)
    model = _model(request, body)
    if not stream:
        return await _complete(request, req, body, model)
    return await _stream(request, req, wire.ResponsesStreamWriter(body, model))


async def _complete(
    request: web.Request, req: Request, body: Mapping[str, Any], model: str
) -> web.Response:
    stream = request.app[BACKEND_KEY].generate(req)
    try:
        events = [ev async for ev in stream]
        out = wire.response_to_responses(Response.collect(events), body, model=model)
    except asyncio.CancelledError as e:
        _client_left(request, e)
        raise
    except Exception as e:
        return _error(e)
    finally:
        await _aclose(stream)
    return web.Response(body=orjson.dumps(out), content_type="application/json")


async def _stream(
    request: web.Request, req: Request, writer: wire.ResponsesStreamWriter
) -> web.StreamResponse:
    stream = request.app[BACKEND_KEY].generate(req)
    resp: web.StreamResponse | None = None
    try:
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return _error(ended_without_done())
        except Exception as e:
            return _error(e)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        await resp.write(writer.start())
        await _pump(resp, writer, stream, first)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp
    except (ConnectionError, asyncio.CancelledError) as e:
        _client_left(request, e)
        if isinstance(e, asyncio.CancelledError):
            raise
        assert resp is not None
        return resp
    finally:
        await _aclose(stream)


async def _pump(
    resp: web.StreamResponse,
    writer: wire.ResponsesStreamWriter,
    stream: AsyncIterator[Event],
    event: Event,
) -> None:
    try:
        while True:
            await resp.write(writer.write(event))
            if writer.finished:
                return
            try:
                event = await stream.__anext__()
            except StopAsyncIteration:
                raise ended_without_done() from None
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as e:
        if not isinstance(e, InferdError):
            log.error("stream failed with %s", type(e).__name__, exc_info=e)
        err = openai_wire.error_object(e)["error"]
        await resp.write(writer.error(err["code"], err["message"]))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", responses)


__all__ = ["add_routes"]
