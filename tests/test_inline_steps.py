"""Inline decode steps (docs/adr/0034-inline-decode-steps.md) on the real SmolLM2.

Under lock-step pacing the scheduler thread lends the steps to the event loop that
reads every sequence, which runs them itself. These tests pin what the lend must never
change (the tokens; an arrival; a second loop; a close on the borrowing loop; a loop
that stops; a bug in a round) and that it engages at all, by the scheduler's counters.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from inferd.errors import BackendUnavailable
from inferd.types import Done, Request, Text

from .conftest import require_llama_core

pytestmark = pytest.mark.llama

PROMPT = "Write a short story about a lighthouse keeper."


def _backend(path, *, overlap: bool, parallel: int = 2, **kw):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    return LlamaCpp(path, n_ctx=1024, n_threads=1, parallel=parallel, overlap=overlap, **kw)


def _req(prompt: str = PROMPT, n: int = 24) -> Request:
    return Request.chat(prompt, temperature=0, max_tokens=n, ignore_eos=True)


async def _reply(b, request: Request) -> tuple[str, Done]:
    events = [ev async for ev in b.generate(request)]
    assert isinstance(events[-1], Done)
    return "".join(e.text for e in events if isinstance(e, Text)), events[-1]


async def test_inline_steps_decode_the_same_tokens_as_the_thread(smollm2_path):
    """Lock-step (inline) and overlapped (thread only) give the same greedy reply, and
    only the lock-step backend runs steps on the event loop."""
    inline, thread = _backend(smollm2_path, overlap=False), _backend(smollm2_path, overlap=True)
    try:
        got_inline, done = await _reply(inline, _req())
        got_thread, _ = await _reply(thread, _req())
        assert got_inline == got_thread
        assert done.usage.output_tokens == 24
        stats = inline.batching_stats()
        # the loop ran every step, the prompt's included
        assert stats["inline_steps"] == stats["steps"] == 24, stats
        assert thread.batching_stats().get("inline_steps", 0) == 0
    finally:
        inline.close()
        thread.close()


async def test_inline_steps_off_keeps_every_step_on_the_thread(smollm2_path):
    """``inline_steps=False`` under lock-step: the thread runs every step (paced by the
    consumers, ADR 0008), and the reply is the same."""
    on = _backend(smollm2_path, overlap=False)
    off = _backend(smollm2_path, overlap=False, inline_steps=False)
    try:
        got_on, _ = await _reply(on, _req())
        got_off, done = await _reply(off, _req())
        assert got_on == got_off and done.usage.output_tokens == 24
        stats = off.batching_stats()
        assert stats.get("inline_steps", 0) == 0 and stats["steps"] == 24, stats
        assert off._sched.lockstep and not off._sched.inline
    finally:
        on.close()
        off.close()


async def test_an_arrival_takes_the_context_back_and_both_replies_are_whole(smollm2_path):
    """A request sent while another decodes inline is admitted by the thread (its
    prompt never prefills on the loop) and both replies match their single runs."""
    b = _backend(smollm2_path, overlap=False)
    try:
        alone_a, _ = await _reply(b, _req(n=32))
        alone_b, _ = await _reply(b, _req("Name three colours.", n=12))
        b.clear_prefix_cache()
        first = b.generate(_req(n=32))
        parts = []
        async for ev in first:  # a few tokens inline, then a second request arrives
            if isinstance(ev, Text):
                parts.append(ev.text)
            if len(parts) == 4:
                break
        second = asyncio.ensure_future(_reply(b, _req("Name three colours.", n=12)))
        async for ev in first:
            if isinstance(ev, Text):
                parts.append(ev.text)
        got_b, _ = await second
        assert "".join(parts) == alone_a
        assert got_b == alone_b
        stats = b.batching_stats()
        assert stats["steps"] == stats["inline_steps"] > 0, stats
    finally:
        b.close()


def test_sequences_of_two_loops_step_on_the_thread_and_stay_whole(smollm2_path):
    """A second loop's request while the first loop runs the steps: the steps go back
    to the thread while both run, and each reply matches its single run."""
    b = _backend(smollm2_path, overlap=False)
    try:
        long_alone = asyncio.run(_reply(b, _req(n=96)))[0]
        short_alone = asyncio.run(_reply(b, _req("Name three colours.", n=8)))[0]
        b.clear_prefix_cache()
        started, result = threading.Event(), {}

        async def long_reader() -> None:
            parts = []
            async for ev in b.generate(_req(n=96)):
                if isinstance(ev, Text):
                    parts.append(ev.text)
                    if len(parts) == 3:
                        started.set()
            result["long"] = "".join(parts)

        other = threading.Thread(target=lambda: asyncio.run(long_reader()))
        other.start()
        assert started.wait(120)
        before = b.batching_stats()
        short = asyncio.run(_reply(b, _req("Name three colours.", n=8)))[0]
        during = b.batching_stats()
        other.join(120)
        assert short == short_alone
        assert result["long"] == long_alone
        # the short reply's steps ran on the thread: both loops' sequences were in them
        thread_steps = (during["steps"] - before["steps"]) - (
            during["inline_steps"] - before["inline_steps"]
        )
        assert thread_steps >= 8, (before, during)
    finally:
        b.close()


async def test_close_on_the_borrowing_loop_takes_the_context_back(smollm2_path):
    """``close()`` called on the very loop the context is lent to (so that loop cannot
    give it back) ends the thread at once and the stream with ``BackendUnavailable``."""
    b = _backend(smollm2_path, overlap=False)
    stream = b.generate(_req(n=200))
    seen = 0
    with pytest.raises(BackendUnavailable, match="closed"):
        async for ev in stream:
            seen += isinstance(ev, Text)
            if seen == 3:
                sched = b._sched
                assert sched._lent is asyncio.get_running_loop()
                b.close()  # blocks this loop: the thread must not wait for it
                assert not sched._thread.is_alive()


def test_a_stopped_loop_never_holds_the_context(smollm2_path):
    """A loop that stops while the context is lent to it (its consumer left without
    closing its stream) cannot give it back; the thread takes it back and serves a
    request from another loop."""
    b = _backend(smollm2_path, overlap=False)
    first = asyncio.new_event_loop()
    try:

        async def read_three():
            agen = b.generate(_req(n=200))
            n = 0
            async for ev in agen:
                n += isinstance(ev, Text)
                if n == 3:
                    assert b._sched._lent is asyncio.get_running_loop()
                    return agen  # left open: its sequence keeps its slot

        agen = first.run_until_complete(read_three())  # the borrowing loop stops

        async def other() -> str:
            text, done = await asyncio.wait_for(_reply(b, _req(n=8)), 120)
            assert done.usage.output_tokens == 8
            return text

        assert asyncio.run(other())
        assert b._sched._lent is None
        first.run_until_complete(agen.aclose())
    finally:
        first.close()
        b.close()


async def test_a_bug_in_an_inline_step_fails_the_streams_not_the_loop(smollm2_path):
    """An unexpected error inside an inline step ends every stream with
    ``BackendUnavailable`` (as a scheduler-thread bug does) and the loop runs on."""
    b = _backend(smollm2_path, overlap=False)
    try:
        text, _ = await _reply(b, _req(n=4))  # the backend works, and has started
        assert text
        sched = b._sched
        real = sched._take_tokens
        calls = {"inline": 0}

        def broken(*args):
            if sched._stepping is not None:
                calls["inline"] += 1
                if calls["inline"] == 3:
                    raise RuntimeError("boom in an inline step")
            return real(*args)

        sched._take_tokens = broken
        with pytest.raises(BackendUnavailable, match="boom in an inline step"):
            await _reply(b, _req(n=50))
        assert calls["inline"] == 3
        await asyncio.sleep(0)  # the loop still runs callbacks
    finally:
        b.close()
