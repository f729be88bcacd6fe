"""A scriptable OpenAI-compatible upstream on 127.0.0.1, for real-HTTP tests.

Each *scenario* is a URL prefix: a backend built with ``base_url=up.url("name")``
talks to ``/s/name/v1/...``. ``up.script("name", reply, reply, ...)`` queues what the
next requests get (the last reply repeats), so a test can say "503, then 429 with
Retry-After, then a stream". Replies:

* :class:`Stream` - raw SSE bytes, written piece by piece (optionally slowly),
  optionally stalling (read timeouts), dropping the connection mid-way, or closing
  it silently after a complete response;
* :class:`Status` - an error status with a body and headers;
* :class:`Json` - a JSON body (embeddings).

Everything received is recorded (method, path, headers, parsed body) in
``up.received``, and every client disconnect seen while streaming in
``up.disconnects``, so tests can assert on both sides of the wire.

``QUIRKS`` holds recorded streams in the styles real upstreams use (llama-server,
vLLM, Ollama, Gemini's OpenAI endpoint, DeepSeek-style reasoning), each with the
events it must decode to.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from inferd.types import Done, Event, StopReason, Text, Thinking, ToolUse, Usage


@dataclass
class Stream:
    """Write ``pieces`` (raw bytes) as a 200 ``text/event-stream`` response.

    ``stall_after``: after that many pieces, stop writing (but keep the connection)
    for ``stall_s`` seconds. ``drop_after``: after that many pieces, kill the TCP
    connection. ``delay``: seconds between pieces.
    """

    pieces: Sequence[bytes]
    delay: float = 0.0
    stall_after: int | None = None
    stall_s: float = 30.0
    drop_after: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Close the connection right after a complete response, without a
    #: ``Connection: close`` header (llama-server does this after streams).
    close_after: bool = False


@dataclass
class Status:
    """An HTTP error answer."""

    status: int
    body: str | bytes = '{"error": {"message": "scripted failure", "type": "server_error"}}'
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Json:
    """A JSON answer."""

    body: Any
    status: int = 200


Reply = Stream | Status | Json


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    peer: Any = None


# --------------------------------------------------------------------------- stream builders


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    *,
    usage: dict[str, Any] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "test-model",
    }
    c["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage is not None:
        c["usage"] = usage
    return c


def usage_obj(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def text_stream(
    parts: Iterable[str],
    *,
    usage: tuple[int, int] | None = (5, 3),
    finish: str = "stop",
    done: bool = True,
) -> list[bytes]:
    """The plain OpenAI shape: role chunk, content chunks, finish, usage chunk, [DONE]."""
    out = [sse(chunk({"role": "assistant", "content": ""}))]
    out += [sse(chunk({"content": p})) for p in parts]
    out.append(sse(chunk({}, finish)))
    if usage is not None:
        out.append(sse(chunk(usage=usage_obj(*usage), choices=False)))
    if done:
        out.append(DONE)
    return out


def completion_stream(
    parts: Iterable[str], *, usage: tuple[int, int] | None = (5, 3), finish: str = "stop"
) -> list[bytes]:
    """A legacy ``/v1/completions`` stream: ``text_completion`` chunks with ``choices[0].text``,
    the finish chunk, a usage chunk and ``[DONE]`` (docs/adr/0025-*)."""
    base = {"id": "cmpl-test", "object": "text_completion", "created": 1, "model": "test-model"}

    def one(text: str, fin: str | None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "text": text, "finish_reason": fin}]})

    out = [one(p, None) for p in parts] + [one("", finish)]
    if usage is not None:
        out.append(sse({**base, "choices": [], "usage": usage_obj(*usage)}))
    return [*out, DONE]


def _tool_delta(
    index: int | None, id: str | None = None, name: str | None = None, args: str = ""
) -> dict[str, Any]:
    call: dict[str, Any] = {"function": {"arguments": args}}
    if index is not None:
        call["index"] = index
    if id is not None:
        call["id"] = id
        call["type"] = "function"
        call["function"]["name"] = name
    return {"tool_calls": [call]}


@dataclass
class Quirk:
    """A recorded stream and the events it must decode to."""

    pieces: list[bytes]
    events: list[Event]


def _text_quirks() -> dict[str, Quirk]:
    """Framing, encoding and text quirks of real OpenAI-compatible servers."""
    q: dict[str, Quirk] = {}
    plain = text_stream(["Hel", "lo"])
    q["plain"] = Quirk(plain, [Text("Hel"), Text("lo"), Done(StopReason.END_TURN, Usage(5, 3))])
    # A UTF-8 BOM before the first event (some proxies add one).
    bom = list(plain)
    bom[0] = b"\xef\xbb\xbf" + bom[0]
    q["bom"] = Quirk(bom, q["plain"].events)
    # CRLF line endings throughout, and one event split inside a multi-byte character.
    crlf = b"".join(plain).replace(b"\n", b"\r\n")
    q["crlf"] = Quirk([crlf[:7], crlf[7:50], crlf[50:]], q["plain"].events)
    snow = b"".join(text_stream(["sn\u2603w"], usage=(1, 1)))
    cut = snow.index("\u2603".encode()) + 1
    q["split_utf8"] = Quirk(
        [snow[:cut], snow[cut:]], [Text("sn\u2603w"), Done(StopReason.END_TURN, Usage(1, 1))]
    )
    # Comments and keep-alives between events (OpenRouter sends ": OPENROUTER PROCESSING").
    q["comments"] = Quirk(
        [
            b": keep-alive\n\n",
            plain[0],
            b": OPENROUTER PROCESSING\n\n",
            *plain[1:3],
            b":\n\n",
            *plain[3:],
        ],
        q["plain"].events,
    )
    # No [DONE] at all: a clean EOF ends the stream.
    q["no_done"] = Quirk(text_stream(["Hel", "lo"], done=False), q["plain"].events)
    # Usage carried by a `choices: []` chunk after the finish chunk, no usage elsewhere.
    q["usage_chunk"] = Quirk(
        [
            sse(chunk({"content": "hi"})),
            sse(chunk({}, "length")),
            sse(
                chunk(
                    usage={**usage_obj(9, 4), "prompt_tokens_details": {"cached_tokens": 2}},
                    choices=False,
                )
            ),
            DONE,
        ],
        [Text("hi"), Done(StopReason.MAX_TOKENS, Usage(9, 4, 2))],
    )
    # DeepSeek / llama-server / vLLM reasoning deltas.
    q["reasoning"] = Quirk(
        [
            sse(chunk({"role": "assistant", "reasoning_content": "think"})),
            sse(chunk({"reasoning_content": "ing"})),
            sse(chunk({"content": "answer"})),
            sse(chunk({}, "stop", usage=usage_obj(3, 3))),
            DONE,
        ],
        [
            Thinking("think"),
            Thinking("ing"),
            Text("answer"),
            Done(StopReason.END_TURN, Usage(3, 3)),
        ],
    )
    return q


def _tool_quirks() -> dict[str, Quirk]:
    """How real servers split and number tool-call deltas."""
    q: dict[str, Quirk] = {}
    # OpenAI-style tool call: arguments in fragments, index on every delta.
    q["tool_openai"] = Quirk(
        [
            sse(chunk({"role": "assistant", "content": None})),
            sse(chunk(_tool_delta(0, "call_1", "get_weather"))),
            sse(chunk(_tool_delta(0, args='{"city":'))),
            sse(chunk(_tool_delta(0, args=' "Paris"}'))),
            sse(chunk({}, "tool_calls")),
            sse(chunk(usage=usage_obj(20, 7), choices=False)),
            DONE,
        ],
        [
            ToolUse("call_1", "get_weather", {"city": "Paris"}, '{"city": "Paris"}'),
            Done(StopReason.TOOL_USE, Usage(20, 7)),
        ],
    )
    # Gemini's OpenAI endpoint: no `index` on tool-call deltas, whole calls at once.
    q["tool_gemini"] = Quirk(
        [
            sse(chunk(_tool_delta(None, "g1", "a", '{"x":1}'))),
            sse(chunk(_tool_delta(None, "g2", "b", '{"y":2}'))),
            sse(chunk({}, "tool_calls", usage=usage_obj(4, 2))),
            DONE,
        ],
        [
            ToolUse("g1", "a", {"x": 1}, '{"x":1}'),
            ToolUse("g2", "b", {"y": 2}, '{"y":2}'),
            Done(StopReason.TOOL_USE, Usage(4, 2)),
        ],
    )
    # Ollama: every call reuses index 0; a new id starts a new call.
    q["tool_ollama"] = Quirk(
        [
            sse(chunk(_tool_delta(0, "o1", "a", '{"x":1}'))),
            sse(chunk(_tool_delta(0, "o2", "b", '{"y":2}'))),
            sse(chunk({}, "tool_calls", usage=usage_obj(4, 2))),
            DONE,
        ],
        [
            ToolUse("o1", "a", {"x": 1}, '{"x":1}'),
            ToolUse("o2", "b", {"y": 2}, '{"y":2}'),
            Done(StopReason.TOOL_USE, Usage(4, 2)),
        ],
    )
    return q


def _quirks() -> dict[str, Quirk]:
    return {**_text_quirks(), **_tool_quirks()}


QUIRKS: dict[str, Quirk] = _quirks()

#: A stream that reports an upstream error object after some text.
ERROR_MIDSTREAM = [
    sse(chunk({"content": "partial"})),
    sse({"error": {"message": "upstream overloaded", "type": "server_error"}}),
]


# --------------------------------------------------------------------------- server


class Upstream:
    """The test upstream; see the module docstring."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.disconnects: list[str] = []
        self.completed: list[str] = []
        self._scripts: dict[str, list[Reply]] = defaultdict(list)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- control ------------------------------------------------------------

    def url(self, scenario: str = "default") -> str:
        return f"http://127.0.0.1:{self.port}/s/{scenario}"

    def script(self, scenario: str, *replies: Reply) -> str:
        """Queue ``replies`` for ``scenario``; returns its base URL."""
        self._scripts[scenario] = list(replies)
        return self.url(scenario)

    def requests(self, scenario: str) -> list[Received]:
        return [r for r in self.received if r.path.startswith(f"/s/{scenario}/")]

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/s/{scenario}/{rest:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_disconnect(self, scenario: str, timeout: float = 5.0) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while scenario not in self.disconnects:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    # -- serving ------------------------------------------------------------

    def _next(self, scenario: str) -> Reply:
        queue = self._scripts.get(scenario)
        if not queue:
            return Stream(QUIRKS["plain"].pieces)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw
        scenario = request.match_info["scenario"]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.received.append(
            Received(request.method, request.path, dict(request.headers), body, peer)
        )
        reply = self._next(scenario)
        if isinstance(reply, Status):
            data = reply.body.encode() if isinstance(reply.body, str) else reply.body
            return web.Response(
                status=reply.status,
                body=data,
                headers=reply.headers,
                content_type="application/json",
            )
        if isinstance(reply, Json):
            return web.Response(
                status=reply.status, body=orjson.dumps(reply.body), content_type="application/json"
            )
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **reply.headers,
            },
        )
        await resp.prepare(request)
        try:
            for i, piece in enumerate(reply.pieces):
                if reply.drop_after is not None and i == reply.drop_after:
                    assert request.transport is not None
                    request.transport.abort()  # a hard drop: no chunked terminator
                    return resp
                if reply.stall_after is not None and i == reply.stall_after:
                    await asyncio.sleep(reply.stall_s)
                await resp.write(piece)
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                elif i % 64 == 63:
                    await asyncio.sleep(0)
            await resp.write_eof()
            self.completed.append(scenario)
            if reply.close_after and request.transport is not None:
                request.transport.close()
        except asyncio.CancelledError:
            self.disconnects.append(scenario)
            raise
        except (ConnectionError, RuntimeError):
            self.disconnects.append(scenario)
        return resp
