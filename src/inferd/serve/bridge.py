"""``inferd bridge``: an OpenAI-compatible HTTP front for the daemon (or in-process backends).

Why a separate process: the daemon speaks a small NDJSON protocol on a private Unix
socket; tools that only speak OpenAI's HTTP API (SDKs, editors, agents) get this
bridge instead, and a bug or a flood on the HTTP side cannot take the model down.

Routes: ``POST /v1/chat/completions`` (streaming SSE and not, tool calls, usage),
``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``. Every mapping between
OpenAI JSON and inferd types comes from :mod:`inferd.openai_wire`; this module only
moves bytes. Errors are OpenAI error objects with the status of
:func:`inferd.openai_wire.http_status`, aiohttp's own (malformed request line, huge
headers) included; a non-inferd exception reaches the client as its type and a log
reference only. A pre-stream failure of a streaming request is still a proper HTTP
error (the first event is awaited before the 200 is sent); a failure after that is an
SSE ``data: {"error": ...}`` event, which openai-python raises as an ``APIError``.

Hostile clients (issue 13): in front of a daemon each HTTP request gets a daemon
connection of its own (``--daemon-connections``, ADR 0011), so a client that stops
reading stalls only its own stream; a client that disconnects cancels its request,
streaming or not (the handler is cancelled), and is logged at INFO; bodies are
depth-checked (:func:`inferd.limits.check_depth`) before they are mapped.

Binds 127.0.0.1 by default. An optional bearer key (read from the environment
variable named by ``--api-key-env``, never from the command line, where ``ps`` shows
it) is compared in constant time on the header's raw bytes and never logged.
``/health`` stays open for probes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from inferd import openai_wire
from inferd.backend import Backend, ended_without_done
from inferd.errors import InferdError, InvalidRequest
from inferd.limits import check_depth, echo
from inferd.types import Event, Request, Response, Text, Thinking

log = logging.getLogger("inferd.bridge")

#: Loopback only unless told otherwise: the bridge has no TLS.
DEFAULT_HOST = "127.0.0.1"
#: The bridge's TCP port when ``--port`` is not given.
DEFAULT_PORT = 8800
#: Largest request body accepted (images ride inline as data URLs).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: The model id reported by ``/v1/models`` and in responses when the client sends none.
DEFAULT_MODEL_NAME = "inferd"
#: Connections (hence streams in flight) the bridge opens to the daemon: one per
#: request, so one client that stops reading pauses only its own stream.
DEFAULT_DAEMON_CONNECTIONS = 64
#: Seconds open requests get to finish on SIGTERM before they are cancelled.
SHUTDOWN_TIMEOUT_S = 10.0
BACKEND_KEY = web.AppKey("backend", Backend)
#: The backend as given to make_app: its model pool, or the daemon it reaches (ADR 0015).
MODELS_BACKEND_KEY = web.AppKey("models_backend", Backend)
#: Seconds the bridge keeps the list of served model names (for 404 model_not_found).
MODEL_NAMES_TTL_S = 10.0
SETTINGS_KEY = web.AppKey("settings", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class BridgeStats:
    """Counters a test (or an operator with a debugger) reads to see nothing leaks."""

    in_flight: int = 0
    clients_left: int = 0


STATS_KEY = web.AppKey("stats", BridgeStats)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error_body(exc: BaseException) -> dict[str, Any]:
    """An OpenAI error object; a non-inferd exception's text stays in the server log."""
    obj = openai_wire.error_object(exc)
    if not isinstance(exc, InferdError):
        ref = uuid.uuid4().hex[:12]
        log.error("unexpected %s (ref %s)", type(exc).__name__, ref, exc_info=exc)
        obj["error"]["message"] = f"{obj['error']['message']} (ref {ref})"
    return obj


def _error(exc: BaseException) -> web.Response:
    return _json(_error_body(exc), openai_wire.http_status(exc))


def _http_error(status: int, message: str, code: str, etype: str) -> web.Response:
    return _json(
        {"error": {"message": message, "type": etype, "code": code, "param": None}}, status
    )


def _authorized(request: web.Request, key: bytes) -> bool:
    """Bearer check on the raw header bytes (any bytes a client sends), in constant time."""
    given = next((v for k, v in request.raw_headers if k.lower() == b"authorization"), b"")
    token = given[7:] if given[:7].lower() == b"bearer " else b""
    # Anthropic clients send the key as x-api-key (docs/adr/0014-anthropic-messages-both-ways.md)
    alt = next((v for k, v in request.raw_headers if k.lower() == b"x-api-key"), b"")
    return hmac.compare_digest(token, key) | hmac.compare_digest(alt, key)


@web.middleware
async def _errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    stats = request.app[STATS_KEY]
    key: bytes | None = request.app[SETTINGS_KEY]["api_key"]
    if key is not None and request.path != "/health" and not _authorized(request, key):
        return _http_error(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "invalid_api_key",
            "invalid_request_error",
        )
    stats.in_flight += 1
    try:
        return await handler(request)
    except web.HTTPException as e:  # 404, 405, 413 ... as OpenAI error objects too
        if e.status < 400:
            raise
        what = (
            e.text
            if e.status == 413
            else f"{e.reason}: {echo(request.method)} {echo(request.path)}"
        )
        return _http_error(e.status, what, str(e.status), "invalid_request_error")
    finally:
        stats.in_flight -= 1


class _JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as OpenAI error objects.

    aiohttp rejects some requests before any middleware runs (a malformed request
    line, an unknown method token, an 8 KiB header, too many headers) with text/plain;
    clients of an OpenAI API parse JSON, so these get the same shape as every other
    bridge error. A client's bad request is INFO, not an ERROR traceback.
    """

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response started already; cannot send an error")
        if status >= 500:
            ref = uuid.uuid4().hex[:12]
            log.error("unexpected %s (ref %s)", type(exc).__name__, ref, exc_info=exc)
            text = f"internal error ({type(exc).__name__}); see the server log (ref {ref})"
            etype = "server_error"
        else:
            log.info("rejected a malformed HTTP request (%d): %s", status, echo(message))
            text = f"malformed HTTP request: {echo(message or type(exc).__name__, 200)}"
            etype = "invalid_request_error"
        resp = _http_error(status, text, str(status), etype)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class BridgeRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer aiohttp's own errors as JSON and whose
    handlers are cancelled when their client disconnects (so the generation stops)."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log", None)
        kwargs.setdefault("handler_cancellation", True)
        kwargs.setdefault("shutdown_timeout", SHUTDOWN_TIMEOUT_S)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # over client_max_size: 413, as an error object (middleware)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    check_depth(body, what="request body")
    return body


def _model(request: web.Request, body: dict[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else request.app[SETTINGS_KEY]["model_name"]


async def _aclose(stream: AsyncIterator[Event]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _client_left(request: web.Request, exc: BaseException) -> None:
    """A client hanging up is routine: one INFO line, no traceback."""
    request.app[STATS_KEY].clients_left += 1
    log.info("client left %s mid-reply (%s)", request.path, type(exc).__name__)


# --------------------------------------------------------------------------- routes


async def health(request: web.Request) -> web.Response:
    ready = request.app[BACKEND_KEY].ready()
    return _json({"status": "ok" if ready else "not_ready", "ready": ready}, 200 if ready else 503)


async def _pool(request: web.Request) -> dict[str, Any] | None:
    """The daemon's (or in-process) model pool status; None without a pool (ADR 0015)."""
    from inferd.serve.models_pool import pool_view

    view = await pool_view(request.app[MODELS_BACKEND_KEY])
    return None if view is None else view.get("pool")


async def _model_refusal(
    request: web.Request, name: str | None, *, embed: bool = False
) -> web.Response | None:
    """404 ``model_not_found`` (OpenAI's answer) for a model no pool serves; None to go on.

    Without a model pool the bridge takes any model name, as before.
    """
    from inferd.serve.models_pool import served_names

    settings = request.app[SETTINGS_KEY]
    cached = settings.get("model_names")
    if cached is None or time.monotonic() - cached[0] > MODEL_NAMES_TTL_S:
        pool = await _pool(request)
        names = None if pool is None else (served_names(pool), pool.get("default"))
        cached = settings["model_names"] = (time.monotonic(), names)
    if name is None or cached[1] is None:
        return None
    names, default = cached[1]
    if name not in names:
        return _http_error(
            404,
            f"The model {echo(name)} does not exist; served models: {', '.join(names)}",
            "model_not_found",
            "invalid_request_error",
        )
    if embed and name != default:
        return _error(InvalidRequest(f"embeddings come from the default model {default!r} only"))
    return None


async def models(request: web.Request) -> web.Response:
    name = request.app[SETTINGS_KEY]["model_name"]
    pool = await _pool(request)
    if pool is not None:  # every servable model with its state (ADR 0015)
        from inferd.serve.models_pool import openai_model_list

        created = request.app[SETTINGS_KEY]["created"]
        return _json({"object": "list", "data": openai_model_list(pool, created)})
    return _json(
        {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": request.app[SETTINGS_KEY]["created"],
                    "owned_by": "inferd",
                },
            ],
        }
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        body = await _body(request)
        req = openai_wire.request_from_openai(body)
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise InvalidRequest("'stream_options' must be an object")
        if "keep_alive" in body:  # Ollama's field: how long the model stays loaded
            req = replace(req, keep_alive=body["keep_alive"])
    except InferdError as e:
        return _error(e)
    refused = await _model_refusal(request, req.model)
    if refused is not None:
        return refused
    model = _model(request, body)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    if not body.get("stream"):
        return await complete_reply(
            request,
            req,
            lambda r: openai_wire.response_to_completion(r, model=model, id=cid),
        )
    include_usage = bool(opts.get("include_usage"))
    writer = openai_wire.ChunkWriter(model, cid, include_usage=include_usage, n=req.n)
    req = replace(req, stream_tool_arguments=True)  # calls stream as written (ADR 0023)
    return await stream_reply(request, req, _FastChunks(writer), _chat_error_event)


async def read_api_request(
    request: web.Request, to_request: Callable[[dict[str, Any]], Request]
) -> tuple[dict[str, Any], Request, bool]:
    """The body, its mapped request and its ``stream`` flag (a bool, else refused): the
    prelude of the Messages and Responses endpoints
    (docs/adr/0014-anthropic-messages-both-ways.md)."""
    body = await _body(request)
    req = to_request(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false")
    return body, req, stream


class StreamWriter(Protocol):
    """One API's SSE mapping: bytes after the 200, bytes per event, and when it is done."""

    @property
    def finished(self) -> bool: ...

    def start(self) -> bytes: ...

    def write(self, event: Event) -> bytes: ...


#: An API's error reply for a failure before any byte of the reply was sent.
ErrorReply = Callable[[BaseException], web.Response]


def log_unexpected(exc: BaseException) -> None:
    """A mid-stream failure that is not an inferd error keeps its traceback in the log."""
    if not isinstance(exc, InferdError):
        log.error("stream failed with %s", type(exc).__name__, exc_info=exc)


async def _fetch_images(request: web.Request, req: Request) -> Request:
    """Remote image URLs fetched when the bridge allows their hosts (ADR 0028)."""
    from inferd.serve import image_urls

    return await image_urls.resolve(req, request.app[SETTINGS_KEY].get("image_urls"))


async def complete_reply(
    request: web.Request,
    req: Request,
    render: Callable[[Response], Any],
    error: ErrorReply = _error,
) -> web.Response:
    """A non-streaming reply for any API (chat completions, Messages, Responses; ADR
    0014): ``render`` maps the collected response to the API's JSON, ``error`` maps a
    failure. A client that leaves cancels the generation (the handler is cancelled)."""
    try:
        req = await _fetch_images(request, req)
    except InferdError as e:
        return error(e)
    stream = request.app[BACKEND_KEY].generate(req)
    try:
        out = render(Response.collect([ev async for ev in stream]))
    except asyncio.CancelledError as e:
        _client_left(request, e)
        raise
    except Exception as e:
        return error(e)
    finally:
        await _aclose(stream)
    return _json(out)


async def stream_reply(
    request: web.Request,
    req: Request,
    writer: StreamWriter,
    error_event: Callable[[Exception], bytes],
    error: ErrorReply = _error,
) -> web.StreamResponse:
    """A streamed reply for any API (ADR 0014). Errors before the first event keep their
    HTTP status (``error``); after it they are ``error_event``'s SSE bytes. A client
    leaving stops the generation."""
    try:
        req = await _fetch_images(request, req)
    except InferdError as e:
        return error(e)
    stream = request.app[BACKEND_KEY].generate(req)
    resp: web.StreamResponse | None = None
    try:
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return error(ended_without_done())
        except Exception as e:
            return error(e)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        if head := writer.start():
            await resp.write(head)
        await _pump(resp, writer, stream, first, error_event)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp
    except (ConnectionError, asyncio.CancelledError) as e:
        _client_left(request, e)
        if isinstance(e, asyncio.CancelledError):
            raise
        assert resp is not None
        return resp  # aiohttp finishes quietly on a closed connection
    finally:
        await _aclose(stream)


async def _pump(
    resp: web.StreamResponse,
    writer: StreamWriter,
    stream: AsyncIterator[Event],
    event: Event,
    error_event: Callable[[Exception], bytes],
) -> None:
    """Events -> SSE, one write per event; a backend failure becomes an SSE error event."""
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
        await resp.write(error_event(e))


def _chat_error_event(exc: Exception) -> bytes:
    return openai_wire.sse_encode(_error_body(exc))


class _FastChunks:
    """SSE bytes for a stream's events; text deltas skip the intermediate dicts.

    The hot path of a streamed reply is one ``Text`` per token. Its chunk differs from
    the last only in the text, so the bytes around it are built once and the text is
    the only thing serialised per token. Every other event (role, tool calls, Done,
    usage) goes through :class:`inferd.openai_wire.ChunkWriter`, which owns the
    mapping; ``tests/test_hostile_bridge.py`` checks both give identical bytes.
    """

    __slots__ = ("_content", "_reasoning", "_started", "_suffix", "_writer")

    def __init__(self, writer: openai_wire.ChunkWriter) -> None:
        self._writer = writer
        self._started = False
        head = orjson.dumps(
            {
                "id": writer.id,
                "object": "chat.completion.chunk",
                "created": writer.created,
                "model": writer.model,
            }
        )
        base = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":{'
        self._content = base + b'"content":'
        self._reasoning = base + b'"reasoning_content":'
        self._suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def encode(self, event: Event) -> bytes:
        """The SSE bytes for one event (the first event also carries the role chunk)."""
        if (
            self._started
            and isinstance(event, Text | Thinking)
            and event.text
            and not (event.index or event.logprobs)  # choices, logprobs: ChunkWriter
        ):
            prefix = self._content if type(event) is Text else self._reasoning
            return prefix + orjson.dumps(event.text) + self._suffix
        self._started = True
        return b"".join(openai_wire.sse_encode(c) for c in self._writer.write(event))

    @property
    def finished(self) -> bool:
        return self._writer.finished

    def start(self) -> bytes:
        """Nothing before the first event: the role rides on the first chunk."""
        return b""

    def write(self, event: Event) -> bytes:
        """:meth:`encode`, with ``[DONE]`` in the same write once the reply is finished."""
        data = self.encode(event)
        return data + openai_wire.SSE_DONE if self._writer.finished else data


async def embeddings(request: web.Request) -> web.Response:
    backend = request.app[BACKEND_KEY]
    try:
        body = await _body(request)
        fmt = openai_wire.embed_encoding_format(body)
        body.pop("encoding_format", None)
        ereq = openai_wire.embed_request_from_openai(body)
        refused = await _model_refusal(request, body.get("model"), embed=True)
        if refused is not None:
            return refused
        result = await backend.embed(ereq)
    except Exception as e:
        return _error(e)
    model = _model(request, body)
    to_openai = (
        openai_wire.embed_result_to_openai_base64
        if fmt == "base64"
        else openai_wire.embed_result_to_openai
    )
    return _json(to_openai(result, model=model))


def make_app(
    backend: Backend,
    *,
    api_key: str | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    max_body_bytes: int = MAX_BODY_BYTES,
    cors_origins: Sequence[str] = (),
    image_urls: Any = None,
) -> web.Application:
    """The bridge as an aiohttp application over ``backend`` (a ``Client`` or any Backend).

    ``/metrics``, ``traceparent`` and ``cors_origins`` (CORS, off when empty):
    docs/adr/0016-metrics-traces-cors.md. ``image_urls``: an
    :class:`inferd.serve.image_urls.ImageUrlPolicy` naming the hosts whose image URLs the
    bridge fetches (None: none; docs/adr/0028-media-through-libmtmd.md).
    """
    from inferd.serve import cors, observed

    app = web.Application(middlewares=[_errors_and_auth], client_max_size=max_body_bytes)
    app[BACKEND_KEY] = observed.instrument(app, backend)
    app[STATS_KEY] = BridgeStats()
    app[MODELS_BACKEND_KEY] = backend
    app[SETTINGS_KEY] = {
        "api_key": api_key.encode() if api_key else None,
        "model_name": model_name,
        "created": int(time.time()),
        "image_urls": image_urls,
    }
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    # Anthropic Messages and OpenAI Responses endpoints (ADR 0014); imported here
    # because those modules import this one.
    from inferd.serve import anthropic_routes, completions_routes, responses_routes, token_routes

    anthropic_routes.add_routes(app)
    responses_routes.add_routes(app)
    completions_routes.add_routes(app)  # legacy /v1/completions (ADR 0025)
    token_routes.add_routes(app)  # /tokenize, /detokenize, /apply-template, /v1/rerank
    if cors_origins:  # outermost: preflights are answered before the key check
        cors.Cors(cors_origins).install(app)
    return app


# --------------------------------------------------------------------------- CLI


class BridgeError(Exception):
    """The bridge cannot start (bad options, missing key variable, port taken)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``inferd bridge`` options."""
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="TCP port, 0 for any free one (default %(default)s)",
    )
    parser.add_argument(
        "--socket", default=None, help="daemon socket to forward to (default: the daemon's default)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="serve the backends of this TOML config in-process instead of forwarding to a daemon",
    )
    parser.add_argument(
        "--api-key-env",
        default=None,
        metavar="VAR",
        help="require 'Authorization: Bearer <key>' with the key read from "
        "environment variable VAR",
    )
    parser.add_argument(
        "--daemon-connections",
        type=int,
        default=DEFAULT_DAEMON_CONNECTIONS,
        help="most connections (streams in flight) to the daemon (default %(default)s)",
    )
    parser.add_argument(
        "--model-name",
        default=DEFAULT_MODEL_NAME,
        help="model id reported by /v1/models (default %(default)s)",
    )
    _add_web_arguments(parser)
    from inferd.serve.config import add_router_arguments

    add_router_arguments(parser)  # with --config (ADR 0020)
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def _add_web_arguments(parser: argparse.ArgumentParser) -> None:
    """What pages and remote images may reach: CORS origins (ADR 0016), image URL hosts
    and their limits (ADR 0028); all off by default."""
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let pages from ORIGIN (e.g. http://localhost:3000) call the bridge; "
        "repeatable; off by default (ADR 0016)",
    )
    parser.add_argument(
        "--allow-image-url",
        action="append",
        default=[],
        metavar="HOST",
        help="fetch image_url http(s) URLs whose host is HOST (repeatable); off by default: "
        "local models then take data: URIs only (ADR 0028)",
    )
    parser.add_argument(
        "--image-url-max-bytes",
        type=int,
        default=None,
        help="largest image fetched from an allowed host (default 20 MiB)",
    )
    parser.add_argument(
        "--image-url-timeout",
        type=float,
        default=None,
        help="seconds one image fetch may take (default 10)",
    )


def _backend_from_args(args: argparse.Namespace) -> Backend:
    if args.config:
        from inferd.router import Router
        from inferd.serve.config import (
            build_backends,
            load_config,
            override_router,
            router_overrides,
        )

        cfg = override_router(load_config(args.config), **router_overrides(args))
        if cfg.models:  # [[model]] tables: loaded on demand (ADR 0015)
            from inferd.serve.models_pool import ModelPool

            return ModelPool.from_config(cfg)
        return Router(build_backends(cfg), **cfg.router)
    from inferd.serve.client import Client

    return Client(args.socket, max_connections=args.daemon_connections)


#: ``[bridge]`` keys of a ``--config`` TOML file and the flags they stand for.
_BRIDGE_TOML = {
    "allow_image_urls": "--allow-image-url",
    "image_url_max_bytes": "--image-url-max-bytes",
    "image_url_timeout_s": "--image-url-timeout",
}


def _bridge_table(path: str | None) -> dict[str, Any]:
    """The ``[bridge]`` table of the ``--config`` file (empty without one)."""
    if not path:
        return {}
    import tomllib

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("bridge", {})
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BridgeError(f"{path}: {e}") from None
    if not isinstance(table, dict) or set(table) - set(_BRIDGE_TOML):
        raise BridgeError(f"{path}: [bridge] takes only {', '.join(sorted(_BRIDGE_TOML))}")
    hosts = table.get("allow_image_urls", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise BridgeError(f"{path}: [bridge] allow_image_urls must be a list of host names")
    return table


def _image_url_policy(args: argparse.Namespace) -> Any:
    """The image URL policy of the flags and the config's ``[bridge]`` table (flags win),
    or None when no host is listed (ADR 0028)."""
    table = _bridge_table(getattr(args, "config", None))
    hosts = [*table.get("allow_image_urls", []), *(getattr(args, "allow_image_url", None) or ())]
    if not hosts:
        return None
    from inferd.serve.image_urls import ImageUrlPolicy

    bounds = {
        k: v
        for k, v in (
            ("max_bytes", _flag(args, "image_url_max_bytes", table, "image_url_max_bytes")),
            ("timeout_s", _flag(args, "image_url_timeout", table, "image_url_timeout_s")),
        )
        if v is not None
    }
    try:
        return ImageUrlPolicy(tuple(hosts), **bounds)
    except (TypeError, ValueError) as e:
        raise BridgeError(f"image URL settings: {e}") from None


def _flag(args: argparse.Namespace, name: str, table: dict[str, Any], key: str) -> Any:
    value = getattr(args, name, None)
    return table.get(key) if value is None else value


async def bridge_main(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT. Prints the URL (one line, stdout) once listening."""
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise BridgeError(
                f"environment variable {args.api_key_env} (--api-key-env) is not set or empty"
            )
    backend = _backend_from_args(args)
    connect = getattr(backend, "connect", None)
    if connect is not None:
        with contextlib.suppress(InferdError):  # the daemon may come up later
            await connect()
    app = make_app(
        backend,
        api_key=api_key,
        model_name=args.model_name,
        cors_origins=getattr(args, "cors_origin", None) or (),
        image_urls=_image_url_policy(args),
    )
    runner = BridgeRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        try:
            await site.start()
        except OSError as e:
            raise BridgeError(f"cannot listen on {args.host}:{args.port}: {e}") from None
        server = site._server
        port = server.sockets[0].getsockname()[1] if server and server.sockets else args.port
        print(f"inferd bridge: listening on http://{args.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        await backend.aclose()
    return 0


def run_args(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=str(args.log_level).upper(), format="inferd bridge: %(levelname)s %(message)s"
    )
    from inferd.serve.config import ConfigError

    try:
        return asyncio.run(bridge_main(args))
    except (BridgeError, ConfigError, ValueError) as e:
        print(f"inferd bridge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m inferd.serve.bridge`` / ``inferd bridge``."""
    parser = argparse.ArgumentParser(prog="inferd bridge", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: the route modules (Messages,
    # Responses, Completions) import ``inferd.serve.bridge``, and an app built here would
    # hold this copy's AppKeys, which theirs do not find (a KeyError, a 500).
    from inferd.serve import bridge as _bridge

    sys.exit(_bridge.main())
