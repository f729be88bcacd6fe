"""The stream contract, tested once for every backend.

Subclass :class:`BackendContract` in ``tests/contract/test_<backend>_contract.py``
(the class name must start with ``Test``) and provide these fixtures:

``backend``
    a ready backend (async fixture; close it in teardown).
``contract_request``
    a request that completes normally with at least two events before ``Done``
    (the base class gives a one-turn chat; override for backends that need more).
``pre_stream_failure``
    ``(backend, request, exception_type)``: a request that fails before the first event.
``mid_stream_failure``
    ``(backend, request)``: a request whose stream fails after at least one event.
``long_stream``
    ``(backend, request)``: a request yielding at least 200 events, for backpressure.
``call_reply``
    ``(backend, {tool_choice kind: request})``: requests whose replies end in a tool
    call (kinds ``auto``, ``required``, ``tool``; at least ``required`` and ``tool``).

and override :meth:`released` to say whether a backend has let go of everything it
held for a stream (no running stream, connection closed, KV sequence freed).
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from dataclasses import replace

import pytest

from inferd.backend import Backend
from inferd.errors import BackendUnavailable, InferdError
from inferd.types import (
    Capabilities,
    Done,
    Event,
    Request,
    Response,
    StopReason,
    Text,
    Thinking,
    Tool,
    ToolChoice,
    ToolUse,
    ToolUseDelta,
)

#: The tool of the ``call_reply`` requests.
WEATHER = Tool(
    "get_weather",
    "Current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def call_requests(*kinds: str, **kw) -> dict[str, Request]:
    """One request per ``tool_choice`` kind (auto, required, tool) for ``call_reply``."""
    choices = {"auto": "auto", "required": "required", "tool": ToolChoice("tool", WEATHER.name)}
    ask = "What is the weather in Paris right now? Use the tool."
    return {
        k: Request.chat(ask, tools=(WEATHER,), tool_choice=choices[k], **kw)
        for k in kinds or tuple(choices)
    }


#: How much more memory a slow consumer may see in use, mid-stream, than early on.
SLOW_CONSUMER_GROWTH_LIMIT = 4 * 1024 * 1024


async def _first_event_then_stop(backend: Backend, request: Request) -> Event:
    gen = backend.generate(request)
    try:
        return await gen.__anext__()
    finally:
        await gen.aclose()  # type: ignore[attr-defined]


class BackendContract:
    """Every backend passes these; see the module docstring for the fixtures."""

    @pytest.fixture
    def contract_request(self) -> Request:
        return Request.chat("Say hello in five words.", max_tokens=8, temperature=0.0)

    async def released(self, backend: Backend) -> bool:
        """True when nothing of a finished or abandoned stream is still held."""
        return True

    async def _wait_released(self, backend: Backend, timeout: float = 5.0) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if await self.released(backend):
                return True
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)

    # ---------------------------------------------------------------- completion

    async def test_ready_and_capabilities(self, backend: Backend) -> None:
        assert backend.ready() is True
        caps = backend.capabilities()
        assert isinstance(caps, Capabilities)
        assert caps.v2 is True

    async def test_completed_stream_ends_with_exactly_one_done(
        self, backend: Backend, contract_request: Request
    ) -> None:
        events = [ev async for ev in backend.generate(contract_request)]
        assert events, "a completed stream yields at least a Done"
        assert isinstance(events[-1], Done), f"last event is {events[-1]!r}"
        assert sum(isinstance(e, Done) for e in events) == 1
        assert all(isinstance(e, (Text, Thinking, ToolUse)) for e in events[:-1])
        done = events[-1]
        assert done.usage.output_tokens >= 0
        assert done.timings.total_s > 0
        assert done.backend, "Done names the backend that served"
        assert await self._wait_released(backend)

    async def test_a_reply_ending_in_a_call_says_so(self, call_reply) -> None:
        """``TOOL_USE`` ("tool_calls") when the last act is a call; a call forced by name
        ``END_TURN`` ("stop"), as OpenAI answers; argument deltas, when asked for, join
        into each call's arguments, and a caller ignoring them sees the same reply
        (docs/adr/0023-tool-call-streaming-and-stop-reasons.md)."""
        backend, requests = call_reply
        assert {"required", "tool"} <= set(requests)
        for kind, request in requests.items():
            plain = [ev async for ev in backend.generate(request)]
            streamed = [
                ev async for ev in backend.generate(replace(request, stream_tool_arguments=True))
            ]
            assert not any(isinstance(e, ToolUseDelta) for e in plain), kind
            for events in (plain, streamed):
                calls = [e for e in events if isinstance(e, ToolUse)]
                assert calls, (kind, events)
                want = StopReason.END_TURN if kind == "tool" else StopReason.TOOL_USE
                assert events[-1].stop_reason is want, (kind, events[-1])
            for call in (e for e in streamed if isinstance(e, ToolUse)):
                deltas = [e for e in streamed if isinstance(e, ToolUseDelta) and e.id == call.id]
                assert deltas and {d.name for d in deltas} == {call.name}, (kind, call)
                assert "".join(d.arguments_fragment for d in deltas) == call.raw_arguments
            collected = Response.collect(streamed).tool_calls
            assert [(c.name, c.input) for c in collected] == [
                (c.name, c.input) for c in streamed if isinstance(c, ToolUse)
            ]

    async def test_nothing_after_done(self, backend: Backend, contract_request: Request) -> None:
        gen = backend.generate(contract_request)
        async for ev in gen:
            if isinstance(ev, Done):
                break
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()

    async def test_concurrent_streams_each_complete(
        self, backend: Backend, contract_request: Request
    ) -> None:
        async def run() -> list[Event]:
            return [ev async for ev in backend.generate(contract_request)]

        results = await asyncio.gather(run(), run(), run())
        for events in results:
            assert isinstance(events[-1], Done)
            assert sum(isinstance(e, Done) for e in events) == 1
        assert await self._wait_released(backend)

    # ---------------------------------------------------------------- failures

    async def test_pre_stream_error_raises_before_any_event(self, pre_stream_failure) -> None:
        backend, request, exc_type = pre_stream_failure
        gen = backend.generate(request)
        with pytest.raises(exc_type):
            await gen.__anext__()
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()

    async def test_mid_stream_failure_raises_backend_unavailable(self, mid_stream_failure) -> None:
        backend, request = mid_stream_failure
        seen: list[Event] = []
        with pytest.raises(BackendUnavailable):
            async for ev in backend.generate(request):
                seen.append(ev)
        assert seen, "the failure must come after at least one event"
        assert not any(isinstance(e, Done) for e in seen), "no Done after a failure"
        assert await self._wait_released(backend)

    # ---------------------------------------------------------------- leaving early

    async def test_break_releases_everything(
        self, backend: Backend, contract_request: Request
    ) -> None:
        tasks_before = asyncio.all_tasks()
        first = await _first_event_then_stop(backend, contract_request)
        assert isinstance(first, (Text, Thinking, ToolUse, Done))
        assert await self._wait_released(backend)
        await asyncio.sleep(0.05)
        leftover = {t for t in asyncio.all_tasks() - tasks_before if not t.done()}
        assert not leftover, f"tasks outlived their stream: {leftover}"

    async def test_cancellation_releases_everything(self, long_stream) -> None:
        backend, request = long_stream
        got_one = asyncio.Event()

        async def consume() -> None:
            async for _ in backend.generate(request):
                got_one.set()
                await asyncio.sleep(0.01)

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await self._wait_released(backend)
        # the backend still serves after a cancelled stream
        events = [ev async for ev in backend.generate(request)]
        assert isinstance(events[-1], Done)

    async def test_slow_consumer_does_not_grow_memory(self, long_stream) -> None:
        backend, request = long_stream
        gc.collect()
        tracemalloc.start()
        try:
            baseline = None
            peak_in_use = 0
            n = 0
            async for ev in backend.generate(request):
                n += 1
                if n == 10:
                    baseline = tracemalloc.get_traced_memory()[0]
                elif n > 10:
                    peak_in_use = max(peak_in_use, tracemalloc.get_traced_memory()[0])
                if n % 20 == 0:
                    await asyncio.sleep(0.02)  # a slow consumer
                if isinstance(ev, Done):
                    break
        finally:
            tracemalloc.stop()
        assert n >= 200, f"long_stream gave only {n} events"
        assert baseline is not None
        growth = peak_in_use - baseline
        assert growth < SLOW_CONSUMER_GROWTH_LIMIT, f"memory grew by {growth} bytes"

    # ---------------------------------------------------------------- closing

    async def test_use_after_close_is_a_clear_pre_stream_error(
        self, backend: Backend, contract_request: Request
    ) -> None:
        await backend.aclose()
        await backend.aclose()  # idempotent
        assert backend.ready() is False
        gen = backend.generate(contract_request)
        with pytest.raises(InferdError) as info:
            await gen.__anext__()
        assert "close" in str(info.value).lower()
