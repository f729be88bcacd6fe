"""CORS for the bridge: browser apps on other origins may call it, when allowed.

Why off by default: the bridge binds 127.0.0.1, and a web page from any site the
user visits could otherwise drive the local model (and read its replies). An operator
allows origins one by one with ``--cors-origin`` (repeatable; ``*`` allows any origin
and is for keyless local setups only). docs/adr/0016-metrics-traces-cors.md.

How: a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
is answered here, before the API-key check, since browsers never send credentials on
a preflight. The headers of actual responses are added in ``on_response_prepare``,
which also runs for streamed (SSE) replies and for error responses, so every reply an
allowed page reads carries them. A disallowed origin gets no CORS header: the browser
blocks the page from reading the reply.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable

import orjson
from aiohttp import web

#: Seconds a browser may cache a preflight answer.
CORS_MAX_AGE_S = 600
#: Methods the bridge's routes use.
ALLOWED_METHODS = "GET, POST, OPTIONS"
#: Longest ``Access-Control-Request-Headers`` value answered (header names, commas).
MAX_REQUEST_HEADERS_CHARS = 1024
#: Response headers a page may read besides the CORS-safelisted ones.
EXPOSED_HEADERS = "Content-Type, Retry-After"
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Cors:
    """The allowed origins and the two hooks that apply them to an app."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(o.rstrip("/") for o in origins)
        if not self.origins:
            raise ValueError("Cors needs at least one origin (CORS is off without --cors-origin)")

    def allowed(self, origin: str | None) -> bool:
        """True when a page from ``origin`` may read the bridge's replies."""
        return origin is not None and ("*" in self.origins or origin in self.origins)

    def install(self, app: web.Application) -> None:
        """Answer preflights first (outermost middleware); tag every response."""
        app.middlewares.insert(0, self.preflight)
        app.on_response_prepare.append(self.on_prepare)

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        origin = request.headers.get("Origin")
        if not self.allowed(origin):
            body = {
                "error": {
                    "message": "origin not allowed: start the bridge with --cors-origin",
                    "type": "invalid_request_error",
                    "code": "cors_origin_not_allowed",
                    "param": None,
                }
            }
            body_bytes = orjson.dumps(body)
            return web.Response(status=403, body=body_bytes, content_type="application/json")
        headers = {
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
        }
        asked = request.headers.get("Access-Control-Request-Headers", "").strip()
        if asked and len(asked) <= MAX_REQUEST_HEADERS_CHARS and _HEADER_LIST.match(asked):
            headers["Access-Control-Allow-Headers"] = asked
        return web.Response(status=204, headers=headers)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if not self.allowed(origin):
            return
        assert origin is not None
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in self.origins else origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if "*" not in self.origins:
            response.headers.add("Vary", "Origin")
