"""A deterministic test double with fault injection.

``Mock`` ignores what the request asks and streams scripted tokens, thinking and tool
calls, so tests of routers, daemons and clients can assert exact output. Faults are
injected the way real backends fail: before the first event (not ready, invalid
request, unavailable) or after N tokens (``BackendUnavailable`` mid-stream).

Scripted calls follow the request like a model's would (ADR 0023): ``parallel_tool_calls
=False`` keeps only the first, ``stream_tool_arguments`` streams each call's arguments in
:data:`MOCK_DELTA_CHARS` pieces before its ``ToolUse``, and the stop reason is the one
rule of :mod:`inferd.call_stop`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Literal

import orjson

from inferd.backend import Backend
from inferd.call_stop import stop_after_calls
from inferd.errors import BackendUnavailable, InvalidRequest, NotReady
from inferd.limits import echo
from inferd.request_fields import ALL_REPLY_FIELDS, refuse_unhonoured
from inferd.types import (
    AcceleratorInfo,
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    StopReason,
    Text,
    Thinking,
    Timings,
    ToolUse,
    ToolUseDelta,
    Usage,
)

PreStreamError = Literal["not_ready", "invalid_request", "unavailable"]

#: Embedding width when ``embed_dims`` is not given.
DEFAULT_EMBED_DIMS = 8
#: A scripted reply ignores sampling, so sampling fields are accepted; what would change
#: the shape of the reply (several choices, logprobs) is refused by the one rule
#: (inferd.request_fields) until the script can produce it.
MOCK_HONOURED: frozenset[str] = ALL_REPLY_FIELDS - {"n", "logprobs", "top_logprobs"}

#: Characters of a scripted call's arguments per ``ToolUseDelta``.
MOCK_DELTA_CHARS = 8

_ids = itertools.count(1)


class Mock(Backend):
    """Scripted backend: same output for every request, optional delays and faults.

    ``tool_calls`` items are ``ToolUse`` events or ``(name, input_dict)`` pairs.
    """

    def __init__(
        self,
        tokens: Sequence[str] = ("mock-response",),
        *,
        delay: float = 0.0,
        pre_stream_error: PreStreamError | None = None,
        drop_after: int | None = None,
        tool_calls: Iterable[ToolUse | tuple[str, Mapping[str, Any]]] = (),
        thinking: Sequence[str] = (),
        embed_dims: int = DEFAULT_EMBED_DIMS,
        name: str = "mock",
        ready: bool = True,
    ) -> None:
        # Configs build Mocks too, so bad arguments are InvalidRequest (a ValueError).
        if pre_stream_error not in (None, "not_ready", "invalid_request", "unavailable"):
            raise InvalidRequest(f"unknown pre_stream_error {echo(pre_stream_error)}")
        if delay < 0:
            raise InvalidRequest(f"delay={echo(delay)} must be >= 0")
        if drop_after is not None and drop_after < 0:
            raise InvalidRequest(f"drop_after={echo(drop_after)} must be >= 0")
        if embed_dims < 1:
            raise InvalidRequest(f"embed_dims={echo(embed_dims)} must be >= 1")
        self.tokens = tuple(tokens)
        self.delay = delay
        self.pre_stream_error: PreStreamError | None = pre_stream_error
        self.drop_after = drop_after
        self.thinking = tuple(thinking)
        self.embed_dims = embed_dims
        self.name = name
        self._ready = ready
        self._closed = False
        self.tool_calls = tuple(self._as_tool_use(c) for c in tool_calls)
        #: How many streams are running now (tests assert it returns to 0).
        self.active = 0
        #: Requests seen, in order (tests inspect what reached the backend).
        self.requests: list[Request] = []

    @staticmethod
    def _as_tool_use(call: ToolUse | tuple[str, Mapping[str, Any]]) -> ToolUse:
        if isinstance(call, ToolUse):
            return call
        name, args = call
        raw = orjson.dumps(dict(args)).decode()
        return ToolUse(f"call_mock_{next(_ids)}", name, dict(args), raw)

    def set_ready(self, ready: bool) -> None:
        """Mark the backend ready or not (``NotReady`` is raised pre-stream when not)."""
        self._ready = ready

    def ready(self) -> bool:
        return self._ready and not self._closed

    def capabilities(self) -> Capabilities:
        return Capabilities(
            tools=True,
            vision=True,
            audio=True,
            thinking=True,
            embed=True,
            accelerator=AcceleratorInfo(kind="cpu", device_name="mock"),
        )

    def _check_pre_stream(self) -> None:
        if self._closed:
            raise NotReady(f"backend {self.name!r} is closed; create a new one")
        if not self._ready:
            raise NotReady(f"backend {self.name!r} is not ready; try again later")
        if self.pre_stream_error == "not_ready":
            raise NotReady(f"backend {self.name!r} is not ready (injected)")
        if self.pre_stream_error == "invalid_request":
            raise InvalidRequest(f"backend {self.name!r} rejected the request (injected)")
        if self.pre_stream_error == "unavailable":
            raise BackendUnavailable(f"backend {self.name!r} is unavailable (injected)")

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        self._check_pre_stream()
        refuse_unhonoured(request, self.name, MOCK_HONOURED)
        self.requests.append(request)
        self.active += 1
        try:
            start = time.perf_counter()
            first: float | None = None
            produced = 0
            script: list[Event] = [Thinking(t) for t in self.thinking]
            script += [Text(t) for t in self.tokens]
            calls = self.tool_calls if request.parallel_tool_calls else self.tool_calls[:1]
            script += _call_events(calls, request.stream_tool_arguments)
            limit = request.max_tokens
            # Hitting max_tokens cuts the scripted calls off with the text, as a real
            # model's are; Done then says MAX_TOKENS.
            stop = stop_after_calls(
                request, StopReason.END_TURN, called=bool(calls), last=bool(calls)
            )
            for ev in script:
                if isinstance(ev, (Text, Thinking)) and limit is not None and produced >= limit:
                    stop = StopReason.MAX_TOKENS
                    break
                if self.drop_after is not None and produced >= self.drop_after:
                    raise BackendUnavailable(
                        f"backend {self.name!r} dropped the stream after {produced} tokens "
                        "(injected)"
                    )
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)  # stay cancellable and fair to other tasks
                if first is None:
                    first = time.perf_counter()
                if isinstance(ev, (Text, Thinking)):
                    produced += 1
                yield ev
            end = time.perf_counter()
            input_tokens = sum(len(m.text.split()) for m in request.messages)
            yield Done(
                stop,
                Usage(input_tokens=input_tokens, output_tokens=produced),
                Timings.measure(start, first, end, produced),
                self.name,
            )
        finally:
            self.active -= 1

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._check_pre_stream()
        dims = request.dimensions or self.embed_dims
        vectors = []
        for s in request.input:
            n = len(s.encode("utf-8"))
            vectors.append(tuple((i + 1) / (n + 1) for i in range(dims)))
        usage = Usage(input_tokens=sum(len(s.split()) for s in request.input))
        return EmbedResult(tuple(vectors), dims, self.name, usage)

    async def aclose(self) -> None:
        self._closed = True


def _call_events(calls: Sequence[ToolUse], stream: bool) -> list[Event]:
    """The scripted calls, each after its argument deltas when ``stream`` is set."""
    out: list[Event] = []
    for i, call in enumerate(calls):
        if stream:
            args = call.raw_arguments
            pieces = [args[j : j + MOCK_DELTA_CHARS] for j in range(0, len(args), MOCK_DELTA_CHARS)]
            for piece in pieces or [""]:
                out.append(ToolUseDelta(i, call.id, call.name, piece))
        out.append(call)
    return out
