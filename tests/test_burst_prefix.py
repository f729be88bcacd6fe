"""Burst prefix sharing (docs/adr/0031-burst-prefix-sharing.md).

Requests arriving together with one long system prompt: the first prefills it, the
others copy its cells and prefill only their own rest. The release and copy rules run
against a recording stand-in for the context; the rest runs on the real
SmolLM2-135M-Instruct in both KV layouts.

What is compared: the tokens each request reused (exact, from the tokenizer), the
tokens every step decoded (exact bookkeeping), and the probabilities of the tokens
picked against the same request reusing the same prefix in its own slot, within a
tolerance. Greedy texts against a request that prefilled everything itself are not
compared: a prefix computed in other chunks differs in the last float bits (its first
token's log-probability moved by 0.07 here), and on this small model a near-tie can
then pick another token, as with any prefix reuse.
"""

from __future__ import annotations

import asyncio
import collections
import math

import pytest

from inferd.backends.llamacpp import burst_prefix
from inferd.backends.llamacpp.scheduler import MIN_COPIED_PREFIX, Scheduler, common_prefix
from inferd.types import Done, Message, Request, Text

from .conftest import require_llama_core

SYSTEM = "You are a support agent for a hardware shop. " + " ".join(
    f"Rule {i}: answer politely and cite the order number when asked about order {i}."
    for i in range(20)
)
QUESTIONS = ("Where is my order?", "Can I return a drill?", "Do you sell nails?")


def _request(question: str, system: str = SYSTEM, n: int = 8) -> Request:
    return Request(
        (Message.system(system), Message.user(question)),
        temperature=0,
        max_tokens=n,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=5,
    )


async def _run(b, request: Request) -> tuple[list[Text], Done]:
    events = [ev async for ev in b.generate(request)]
    assert isinstance(events[-1], Done)
    return [e for e in events if isinstance(e, Text)], events[-1]


def _backend(path, **kw):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    return LlamaCpp(path, **{"n_threads": 1, "parallel": 4, "n_ctx": 2048, **kw})


def _tokens(b, request: Request) -> list[int]:
    return b.tokenize_prompt(b.render(request))


def _first_logprob(texts: list[Text], token: str) -> float:
    """The first token's log-probability of ``token`` (among the top alternatives)."""
    top = {t: lp for t, _, lp in texts[0].logprobs[0].top}
    return top.get(token, -math.inf)


# ---------------------------------------------------------------- the real model


@pytest.mark.llama
@pytest.mark.parametrize("layout", ["split", "unified"])
async def test_a_burst_prefills_the_shared_prompt_once(smollm2_path, layout):
    b = _backend(smollm2_path, kv_layout=layout)
    try:
        prompts = [_tokens(b, _request(q)) for q in QUESTIONS]
        shared = [min(common_prefix(prompts[0], p), len(p) - 1) for p in prompts[1:]]
        assert min(shared) >= MIN_COPIED_PREFIX  # the case under test
        alone = [await _run(b, _request(q)) for q in QUESTIONS[:1]]
        b.clear_prefix_cache()
        before = collections.Counter(b.batching_stats())
        got = await asyncio.gather(*(_run(b, _request(q)) for q in QUESTIONS))
        stats = collections.Counter(b.batching_stats())
        stats.subtract(before)
        assert [d.usage.cached_tokens for _, d in got] == [0, *shared]
        assert stats["burst_waits"] == stats["burst_copies"] == len(QUESTIONS) - 1
        # every prompt token not copied is decoded once, then each reply token but the last
        prefilled = sum(len(p) for p in prompts) - sum(shared)
        assert stats["batch_tokens"] == prefilled + sum(d.usage.output_tokens - 1 for _, d in got)
        assert all(d.usage.output_tokens == 8 for _, d in got)
        # the source's cells are the request's own: its first token is as likely as alone
        lone_texts, _ = alone[0]
        first = lone_texts[0].logprobs[0]
        assert abs(_first_logprob(got[0][0], first.token) - first.logprob) < 0.05
    finally:
        b.close()


@pytest.mark.llama
async def test_copied_cells_are_the_ones_reuse_in_place_gives(smollm2_path):
    """A waiter's first token is as likely as when the same prefix is reused in its
    own slot (the source's prompt ran there just before): the copied cells are the right
    ones, cut at the right place. (llama_decode itself refuses a cut at the wrong
    position: the next position must follow the sequence's last cell.)"""
    b = _backend(smollm2_path)
    try:
        in_place = []
        for q in QUESTIONS[1:]:
            b.clear_prefix_cache()
            await _run(b, _request(QUESTIONS[0], n=1))
            in_place.append(await _run(b, _request(q)))
        b.clear_prefix_cache()
        got = await asyncio.gather(*(_run(b, _request(q)) for q in QUESTIONS))
        for (ref, ref_done), (texts, done) in zip(in_place, got[1:], strict=True):
            assert done.usage.cached_tokens == ref_done.usage.cached_tokens > 0
            want = ref[0].logprobs[0]
            assert abs(_first_logprob(texts, want.token) - want.logprob) < 0.02
    finally:
        b.close()


@pytest.mark.llama
async def test_nothing_waits_without_prefix_reuse_or_a_long_shared_prefix(smollm2_path):
    b = _backend(smollm2_path, prefix_cache=0)
    try:
        got = await asyncio.gather(*(_run(b, _request(q)) for q in QUESTIONS))
        assert all(d.usage.cached_tokens == 0 for _, d in got)
        assert "burst_waits" not in b.batching_stats()
    finally:
        b.close()
    b = _backend(smollm2_path)
    try:  # different short system prompts: under MIN_COPIED_PREFIX tokens in common
        got = await asyncio.gather(
            *(_run(b, _request(q, system=f"Be brief, {i}.")) for i, q in enumerate(QUESTIONS))
        )
        assert all(d.usage.cached_tokens == 0 for _, d in got)
        assert "burst_waits" not in b.batching_stats()
    finally:
        b.close()


@pytest.mark.llama
async def test_cancelling_the_source_leaves_the_waiters_whole(smollm2_path):
    """The source goes while the others wait for its prefill: they still reply in full
    (copied if its cells got there first, else prefilled on their own) and no cell
    leaks. A long prompt keeps the source prefilling for several steps."""
    b = _backend(smollm2_path, n_ctx=8192)
    try:
        system = SYSTEM + " " + SYSTEM
        source = asyncio.create_task(_run(b, _request(QUESTIONS[0], system=system)))
        others = [asyncio.create_task(_run(b, _request(q, system=system))) for q in QUESTIONS[1:]]
        for _ in range(6000):  # until both wait (a bound, not a timing assumption)
            if b.batching_stats().get("burst_waits", 0) == len(others) or source.done():
                break
            await asyncio.sleep(0.01)
        source.cancel()
        got = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError):
            await source
        stats = b.batching_stats()
        assert stats["burst_waits"] == len(others)
        assert stats.get("burst_released", 0) + stats.get("burst_copies", 0) == len(others)
        assert all(d.usage.output_tokens == 8 for _, d in got)
        assert b.kv_used() == 0
    finally:
        b.close()


# ---------------------------------------------------------------- the rules


class _Ctx:
    """Records the KV calls ``settle`` makes; ``cut_ok`` False: libllama refuses a cut."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.cut_ok = True

    def seq_cp(self, *a: int) -> None:
        self.calls.append(("cp", *a))

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        self.calls.append(("rm", seq, p0, p1))
        return self.cut_ok or p0 == -1


class _Stream:
    def __init__(self, seq: int, prompt: list[int]) -> None:
        self.seq, self.prompt = seq, prompt
        self.kv: list[int] = []
        self.n_past = self.cached_tokens = self.shift = 0
        self.done = self.cancelled = False
        self.wait = None


class _Sched:
    """The scheduler's state ``settle`` touches, with its real prefix-copy methods."""

    _reuse_in_slot = Scheduler._reuse_in_slot
    _copy_prefix = Scheduler._copy_prefix

    def __init__(self, split: bool = True) -> None:
        self.ctx, self.split = _Ctx(), split
        self.waiting: list[_Stream] = []
        self.stats: collections.Counter[str] = collections.Counter()
        self.prompt_ram = None
        self._slot_kv: dict[int, list[int]] = {}
        self._cache: dict[int, list[int]] = {}


def _waiting_pair(sched: _Sched, n: int = 100) -> tuple[_Stream, _Stream]:
    source, waiter = _Stream(0, list(range(200))), _Stream(1, list(range(150)))
    waiter.wait = (source, n)
    sched.waiting.append(waiter)
    return source, waiter


def test_a_waiter_waits_until_the_source_covers_the_shared_prefix():
    sched = _Sched()
    source, waiter = _waiting_pair(sched)
    source.kv = list(range(99))
    burst_prefix.settle(sched)
    assert waiter.wait is not None and sched.ctx.calls == []
    source.kv = list(range(128))
    burst_prefix.settle(sched)
    assert sched.ctx.calls == [("cp", 0, 1, -1, -1), ("rm", 1, 100, -1)]
    assert (waiter.n_past, waiter.cached_tokens, waiter.kv) == (100, 100, list(range(100)))
    assert sched.waiting == [] and sched.stats["burst_copies"] == 1


def test_unified_tags_only_the_shared_cells():
    sched = _Sched(split=False)
    source, waiter = _waiting_pair(sched)
    source.kv = list(range(100))
    burst_prefix.settle(sched)
    assert sched.ctx.calls == [("rm", 1, -1, -1), ("cp", 0, 1, 0, 100)]
    assert waiter.n_past == 100


@pytest.mark.parametrize("how", ["cancelled", "done"])
def test_a_waiter_whose_source_ends_prefills_on_its_own(how):
    sched = _Sched()
    source, waiter = _waiting_pair(sched)
    setattr(source, how, True)
    burst_prefix.settle(sched)
    assert waiter.wait is None and waiter.n_past == 0 and sched.ctx.calls == []
    assert sched.waiting == [] and sched.stats["burst_released"] == 1


def test_a_cut_libllama_refuses_leaves_the_waiter_to_prefill_everything():
    sched = _Sched()
    source, waiter = _waiting_pair(sched)
    waiter.cached_tokens = waiter.n_past = 10  # it had reused ten tokens in place
    sched.stats["cached_tokens"] = 10
    sched.ctx.cut_ok = False
    source.kv = list(range(100))
    burst_prefix.settle(sched)
    assert sched.ctx.calls[-1] == ("rm", 1, -1, -1)
    assert (waiter.n_past, waiter.cached_tokens, waiter.kv) == (0, 0, [])
    assert sched.stats["cached_tokens"] == 0


def test_a_cancelled_waiter_leaves_the_list():
    sched = _Sched()
    _, waiter = _waiting_pair(sched)
    waiter.cancelled = True
    burst_prefix.settle(sched)
    assert sched.waiting == [] and waiter.wait is None and sched.ctx.calls == []
