"""The host-RAM prompt cache (docs/adr/0030-host-ram-prompt-cache.md).

The cache's own rules (dedupe, supersede, LRU within a byte budget, LoRA sets apart) run
against a recording stand-in for the two binding calls; the rest runs on the real
SmolLM2-135M-Instruct with one split slot, where every new prompt overwrites the slot.
"""

from __future__ import annotations

import pytest

from inferd.backends.llamacpp.options import LlamaCppOptions
from inferd.backends.llamacpp.prompt_ram import (
    DEFAULT_CACHE_RAM_MIB,
    MAX_CACHE_RAM_MIB,
    PromptRam,
    check_cache_ram_mib,
)
from inferd.errors import InvalidRequest
from inferd.types import Done, Message, Request, Text

from .conftest import require_llama_core

# ---------------------------------------------------------------- the cache's rules


class _Ctx:
    """Sequence states by id: ``get`` reads one, ``set`` writes one (or refuses)."""

    def __init__(self) -> None:
        self.seqs: dict[int, bytes] = {}
        self.refuse = False
        self.gets = 0

    def get(self, ctx: _Ctx, seq: int) -> bytes:
        self.gets += 1
        return self.seqs.get(seq, b"")

    def set(self, ctx: _Ctx, data: bytes, seq: int) -> bool:
        if self.refuse:
            return False
        self.seqs[seq] = data
        return True


def _ram(budget: int) -> tuple[PromptRam, _Ctx]:
    c = _Ctx()
    return PromptRam(budget, c.get, c.set), c


def test_save_then_best_restore_round_trip():
    ram, c = _ram(100)
    c.seqs[0] = b"x" * 10
    assert ram.save(c, 0, [1, 2, 3, 4, 5], None)
    entry, n = ram.best([1, 2, 3, 9], None, cap=10)
    assert entry is not None and n == 3
    assert ram.best([1, 2, 3, 4, 5, 6], None, cap=4)[1] == 4  # capped
    assert ram.best([7, 8], None, cap=10) == (None, 0)
    assert ram.restore(c, 1, entry) and c.seqs[1] == b"x" * 10
    assert ram.counters() == {"ram_saved": 1, "ram_restored": 1, "ram_entries": 1, "ram_bytes": 10}


def test_held_tokens_are_not_saved_twice_and_a_longer_entry_supersedes():
    ram, c = _ram(100)
    c.seqs[0] = b"a" * 10
    assert ram.save(c, 0, [1, 2, 3, 4], None)
    assert not ram.save(c, 0, [1, 2, 3], None)  # held by the longer entry: not even read
    assert c.gets == 1
    c.seqs[0] = b"b" * 20
    assert ram.save(c, 0, [1, 2, 3, 4, 5, 6], None)  # extends it: the old one goes
    assert len(ram) == 1 and ram.bytes_used == 20
    assert ram.best([1, 2, 3, 4, 5, 6, 7], None, cap=99)[1] == 6


def test_budget_evicts_least_recently_used_and_refuses_what_never_fits():
    ram, c = _ram(25)
    for seq, toks in enumerate(([1, 1], [2, 2], [3, 3])):
        c.seqs[seq] = bytes(10)
        ram.save(c, seq, toks, None)
        if seq == 1:  # touch the first entry: the second is now least recent
            first, _ = ram.best([1, 1], None, cap=9)
            assert first is not None and ram.restore(c, 5, first)
    assert ram.bytes_used == 20 and len(ram) == 2
    assert ram.best([2, 2], None, cap=9) == (None, 0)  # evicted
    assert ram.best([1, 1], None, cap=9)[1] == 2 and ram.best([3, 3], None, cap=9)[1] == 2
    c.seqs[4] = bytes(26)
    assert not ram.save(c, 4, [4, 4], None)  # larger than the whole budget
    assert len(ram) == 2 and ram.counters()["ram_too_big"] == 1


def test_lora_sets_never_share_entries():
    ram, c = _ram(100)
    c.seqs[0] = bytes(5)
    assert ram.save(c, 0, [1, 2, 3], (1.0,))
    assert ram.best([1, 2, 3], (0.5,), cap=9) == (None, 0)
    assert ram.save(c, 0, [1, 2, 3], (0.5,))  # same tokens, other adapters' cells
    assert len(ram) == 2
    assert ram.best([1, 2, 3], (0.5,), cap=9)[0].lora == (0.5,)


def test_saving_never_evicts_the_entry_being_restored():
    ram, c = _ram(25)
    c.seqs[0] = bytes(15)
    ram.save(c, 0, [1, 2], None)
    entry, _ = ram.best([1, 2], None, cap=9)
    c.seqs[0] = bytes(15)
    assert not ram.save(c, 0, [3, 4], None, spare=entry)  # it would push entry out
    c.seqs[0] = bytes(10)
    assert ram.save(c, 0, [5, 6], None, spare=entry)  # both fit
    assert ram.restore(c, 0, entry)


def test_a_refused_restore_drops_the_entry():
    ram, c = _ram(100)
    c.seqs[0] = bytes(5)
    ram.save(c, 0, [1, 2, 3], None)
    entry, _ = ram.best([1, 2, 3], None, cap=9)
    c.refuse = True
    assert not ram.restore(c, 1, entry)
    assert len(ram) == 0 and ram.bytes_used == 0
    assert not ram.restore(c, 1, entry)  # gone: refused without asking libllama
    assert ram.counters()["ram_restore_failed"] == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64", MAX_CACHE_RAM_MIB + 1])
def test_cache_ram_mib_is_validated(bad):
    with pytest.raises(InvalidRequest, match="cache_ram_mib"):
        check_cache_ram_mib(bad)
    with pytest.raises(InvalidRequest, match="cache_ram_mib"):
        LlamaCppOptions(cache_ram_mib=bad)
    assert LlamaCppOptions().cache_ram_mib == DEFAULT_CACHE_RAM_MIB
    assert LlamaCppOptions(cache_ram_mib=0).cache_ram_mib == 0


# ---------------------------------------------------------------- the real model

#: SmolLM2-135M's state per token: 30 layers x (K + V) x 3 KV heads x 64 x 2 bytes (f16).
STATE_PER_TOKEN = 30 * 2 * 3 * 64 * 2


def _request(topic: str, n: int = 6) -> Request:
    """A prompt of about 150 tokens that differs from the others at its first word."""
    system = f"{topic.capitalize()} notes. " + "Answer in one short sentence. " * 20
    return Request(
        (Message.system(system), Message.user(f"Tell me about {topic}.")),
        temperature=0,
        max_tokens=n,
    )


async def _run(b, request: Request) -> tuple[str, Done]:
    events = [ev async for ev in b.generate(request)]
    assert isinstance(events[-1], Done)
    return "".join(e.text for e in events if isinstance(e, Text)), events[-1]


def _backend(path, **kw):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    kw = {"n_ctx": 512, "parallel": 1, **kw}
    return LlamaCpp(path, n_threads=1, kv_layout="split", **kw)


@pytest.mark.llama
async def test_a_returning_prompt_is_restored_from_host_memory(smollm2_path):
    b = _backend(smollm2_path)
    try:
        t1, d1 = await _run(b, _request("rivers"))
        _, d2 = await _run(b, _request("mountains"))  # takes the only slot
        assert d2.usage.cached_tokens == 0
        t3, d3 = await _run(b, _request("rivers"))
        stats = b.batching_stats()
        assert d3.usage.cached_tokens == d1.usage.input_tokens - 1
        assert t3 == t1  # the restored cells give the same greedy reply
        assert stats["ram_saved"] == 2 and stats["ram_restored"] == 1
        assert stats["ram_bytes"] >= STATE_PER_TOKEN * 2 * d1.usage.input_tokens
        b.clear_prefix_cache()
        assert b.batching_stats()["ram_entries"] == 0
        _, d4 = await _run(b, _request("mountains"))
        assert d4.usage.cached_tokens == 0
    finally:
        b.close()


@pytest.mark.llama
async def test_budget_keeps_only_what_fits(smollm2_path):
    # one entry of about 150 tokens fits 4 MiB, two do not
    b = _backend(smollm2_path, cache_ram_mib=4)
    try:
        _, d1 = await _run(b, _request("rivers"))
        assert 1 << 22 >= STATE_PER_TOKEN * (d1.usage.input_tokens + 6) > 1 << 21
        await _run(b, _request("mountains"))  # saves rivers
        await _run(b, _request("forests"))  # saves mountains; rivers goes (LRU)
        _, back = await _run(b, _request("mountains"))  # forests is not saved over it
        assert back.usage.cached_tokens == d1.usage.input_tokens - 1
        _, gone = await _run(b, _request("rivers"))
        assert gone.usage.cached_tokens == 0
        stats = b.batching_stats()
        assert stats["ram_restored"] == 1 and stats["ram_too_big"] == 1
        assert b.batching_stats()["ram_bytes"] <= 4 << 20
    finally:
        b.close()


@pytest.mark.llama
async def test_zero_turns_it_off(smollm2_path):
    b = _backend(smollm2_path, cache_ram_mib=0)
    try:
        await _run(b, _request("rivers"))
        await _run(b, _request("mountains"))
        _, d3 = await _run(b, _request("rivers"))
        assert d3.usage.cached_tokens == 0
        assert "ram_saved" not in b.batching_stats()
    finally:
        b.close()


@pytest.mark.llama
async def test_a_running_streams_prefix_is_copied_to_another_slot(smollm2_path):
    """Split slots: a request sharing a long prompt with a stream that is running gets
    that stream's cells copied into its own slot instead of prefilling them; its reply
    is the one the same cells give when reused in place."""
    b = _backend(smollm2_path, parallel=2, n_ctx=1024)
    try:
        _, first = await _run(b, _request("rivers"))  # slot A keeps the prompt
        b.clear_prefix_cache()
        talker = b.generate(_request("rivers", n=200))
        await talker.__anext__()  # running; unread, it pauses but keeps its slot
        copied_text, copied = await _run(b, _request("rivers"))
        await talker.aclose()
        stats = b.batching_stats()
        assert copied.usage.cached_tokens == first.usage.input_tokens - 1
        assert stats["slot_copies"] == 1
        b.clear_prefix_cache()
        await _run(b, _request("rivers", n=1))  # the prompt in a slot, then reused in place
        in_place_text, in_place = await _run(b, _request("rivers"))
        assert in_place.usage.cached_tokens == first.usage.input_tokens - 1
        assert copied_text == in_place_text
    finally:
        b.close()


@pytest.mark.llama
async def test_no_slot_copies_without_prefix_reuse(smollm2_path):
    b = _backend(smollm2_path, parallel=2, n_ctx=1024, prefix_cache=0)
    try:
        talker = b.generate(_request("rivers", n=200))
        await talker.__anext__()
        _, d = await _run(b, _request("rivers"))
        await talker.aclose()
        assert d.usage.cached_tokens == 0 and "slot_copies" not in b.batching_stats()
    finally:
        b.close()
