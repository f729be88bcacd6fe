"""``inferd bridge``: an OpenAI-compatible HTTP front for the daemon (or in-process backends).

Why a separate process: the daemon speaks a small NDJSON protocol on a private Unix
socket; tools that only speak OpenAI's HTTP API (SDKs, editors, agents) get this
bridge instead, and a bug or a flood on the HTTP side cannot take the model down.

Routes: ``POST /v1/chat/completions`` (streaming SSE and not, tool calls, usage),
``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``. Every mapping between
OpenAI JSON and inferd types comes from :mod:`inferd.openai_wire`; this module only
moves bytes. Errors are OpenAI error objects with the status of
:func:`inferd.openai_wire.http_status`. A pre-stream failure of a streaming request is
still a proper HTTP error (the first event is awaited before the 200 is sent); a
failure after that is an SSE ``data: {"error": ...}`` event, which openai-python
raises as an ``APIError``.

Binds 127.0.0.1 by default. An optional bearer key (read from the environment
variable named by ``--api-key-env``, never from the command line, where ``ps`` shows
it) is compared in constant time and never logged. ``/health`` stays open for probes.
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
from typing import Any

import orjson
from aiohttp import web

from inferd import openai_wire
from inferd.backend import Backend
from inferd.errors import BackendUnavailable, InferdError, InvalidRequest
from inferd.types import Event, Response

log = logging.getLogger("inferd.bridge")

#: Loopback only unless told otherwise: the bridge has no TLS.
DEFAULT_HOST = "127.0.0.1"
#: The bridge's TCP port when ``--port`` is not given.
DEFAULT_PORT = 8800
#: Largest request body accepted (images ride inline as data URLs).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: The model id reported by ``/v1/models`` and in responses when the client sends none.
DEFAULT_MODEL_NAME = "inferd"
BACKEND_KEY = web.AppKey("backend", Backend)
SETTINGS_KEY = web.AppKey("settings", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(exc: BaseException) -> web.Response:
    if not isinstance(exc, InferdError):
        log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)
    return _json(openai_wire.error_object(exc), openai_wire.http_status(exc))


def _http_error(status: int, message: str, code: str, etype: str) -> web.Response:
    return _json(
        {"error": {"message": message, "type": etype, "code": code, "param": None}}, status
    )


@web.middleware
async def _errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    key: bytes | None = request.app[SETTINGS_KEY]["api_key"]
    if key is not None and request.path != "/health":
        given = request.headers.get("Authorization", "")
        token = given[7:].encode() if given[:7].lower() == "bearer " else b""
        if not hmac.compare_digest(token, key):
            return _http_error(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "invalid_api_key",
                "invalid_request_error",
            )
    try:
        return await handler(request)
    except web.HTTPException as e:  # 404, 405, 413 ... as OpenAI error objects too
        if e.status < 400:
            raise
        what = e.text if e.status == 413 else f"{e.reason}: {request.method} {request.path}"
        return _http_error(e.status, what, str(e.status), "invalid_request_error")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()  # over client_max_size: 413, as an error object (middleware)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


# --------------------------------------------------------------------------- routes


async def health(request: web.Request) -> web.Response:
    ready = request.app[BACKEND_KEY].ready()
    return _json({"status": "ok" if ready else "not_ready", "ready": ready}, 200 if ready else 503)


async def models(request: web.Request) -> web.Response:
    name = request.app[SETTINGS_KEY]["model_name"]
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
    backend = request.app[BACKEND_KEY]
    try:
        body = await _body(request)
        req = openai_wire.request_from_openai(body)
    except InferdError as e:
        return _error(e)
    model = body.get("model") or request.app[SETTINGS_KEY]["model_name"]
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    stream: AsyncIterator[Event] = backend.generate(req)
    try:
        if not body.get("stream"):
            try:
                events = [ev async for ev in stream]
                completion = openai_wire.response_to_completion(
                    Response.collect(events), model=model, id=cid
                )
            except Exception as e:
                return _error(e)
            return _json(completion)
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
        writer = openai_wire.ChunkWriter(model, cid, include_usage=include_usage)
        try:
            first = await stream.__anext__()  # pre-stream errors keep their HTTP status
        except Exception as e:
            return _error(e)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        try:
            event: Event | None = first
            while event is not None:
                for chunk in writer.write(event):
                    await resp.write(openai_wire.sse_encode(chunk))
                event = None if writer.finished else await stream.__anext__()
            await resp.write(openai_wire.SSE_DONE)
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client left: the finally below cancels the generation
        except StopAsyncIteration:
            await resp.write(
                openai_wire.sse_encode(
                    openai_wire.error_object(
                        BackendUnavailable("the backend ended the stream without a Done event")
                    )
                )
            )
        except Exception as e:
            if not isinstance(e, InferdError):
                log.error("stream failed: %s", type(e).__name__, exc_info=e)
            await resp.write(openai_wire.sse_encode(openai_wire.error_object(e)))
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def embeddings(request: web.Request) -> web.Response:
    backend = request.app[BACKEND_KEY]
    try:
        body = await _body(request)
        fmt = openai_wire.embed_encoding_format(body)
        body.pop("encoding_format", None)
        ereq = openai_wire.embed_request_from_openai(body)
        result = await backend.embed(ereq)
    except Exception as e:
        return _error(e)
    model = body.get("model") or request.app[SETTINGS_KEY]["model_name"]
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
) -> web.Application:
    """The bridge as an aiohttp application over ``backend`` (a ``Client`` or any Backend)."""
    app = web.Application(middlewares=[_errors_and_auth], client_max_size=max_body_bytes)
    app[BACKEND_KEY] = backend
    app[SETTINGS_KEY] = {
        "api_key": api_key.encode() if api_key else None,
        "model_name": model_name,
        "created": int(time.time()),
    }
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
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
        "--model-name",
        default=DEFAULT_MODEL_NAME,
        help="model id reported by /v1/models (default %(default)s)",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def _backend_from_args(args: argparse.Namespace) -> Backend:
    if args.config:
        from inferd.router import Router
        from inferd.serve.config import build_backends, load_config

        cfg = load_config(args.config)
        return Router(build_backends(cfg), **cfg.router)
    from inferd.serve.client import Client

    return Client(args.socket)


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
    app = make_app(backend, api_key=api_key, model_name=args.model_name)
    runner = web.AppRunner(app, access_log=None)
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
    sys.exit(main())
