"""The host-RAM prompt cache: slot states kept in host memory after their cells are gone.

(docs/adr/0030-host-ram-prompt-cache.md) Under the split layout a slot keeps its last
stream's cells for the next request that shares a prefix, but only until another request
takes the slot. When one does, the cells it would overwrite are first copied to host
memory (libllama's sequence state: positions and K/V rows in the cache's own types) if
no entry already holds them. When a request arrives whose prompt shares a longer prefix
with an entry than with any free slot's cells, the entry is copied back into a slot and
only the rest of the prompt is decoded, as llama-server's ``--cache-ram`` does.

Entries are keyed by their tokens and by the LoRA scale set their cells were computed
with (ADR 0026); media placeholders are tokens like any other, and the saved state keeps
each cell's position (M-RoPE's 2-D offsets included), so a restored image prefix needs
no encode. The budget is a byte count: entries go least recently used first, and one
larger than the whole budget is not kept.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from inferd.backends.llamacpp.scheduler import common_prefix
from inferd.limits import MAX_BUDGET_MIB, check_mib

#: Default host memory for saved slot states, MiB (llama-server's ``--cache-ram`` is
#: 8 GiB; a server holding several models has one cache per model, so ours is smaller).
DEFAULT_CACHE_RAM_MIB = 2048
#: Largest budget accepted, MiB (the shared cache-budget rule, inferd.limits).
MAX_CACHE_RAM_MIB = MAX_BUDGET_MIB
_MIB = 1 << 20


def check_cache_ram_mib(value: Any) -> int:
    """The one rule for ``cache_ram_mib``: an integer in ``[0, MAX_CACHE_RAM_MIB]``."""
    return check_mib("cache_ram_mib", value, "the host-RAM prompt cache")


@dataclass(eq=False)
class Entry:
    """One saved slot state: its tokens, the LoRA scale set of its cells, its bytes."""

    tokens: list[int]
    lora: Any
    data: bytes


class PromptRam:
    """Saved slot states within ``budget_bytes`` (least recently used go first).

    ``get_state(ctx, seq) -> bytes`` and ``set_state(ctx, data, seq) -> bool`` are the
    binding's ``seq_state_get`` / ``seq_state_set``; the scheduler calls :meth:`save`
    and :meth:`restore` from its thread with the context lock held. :meth:`counters`
    joins the scheduler's stats.
    """

    def __init__(
        self,
        budget_bytes: int,
        get_state: Callable[[Any, int], bytes],
        set_state: Callable[[Any, bytes, int], bool],
    ) -> None:
        self.budget_bytes = budget_bytes
        self._get = get_state
        self._set = set_state
        self._stats: collections.Counter[str] = collections.Counter()
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._next_id = 0
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, prompt: Sequence[int], lora: Any, cap: int) -> tuple[Entry | None, int]:
        """The entry of set ``lora`` sharing the longest prefix with ``prompt`` (at most
        ``cap`` tokens), and that length; ``(None, 0)`` when none shares any."""
        best, found = 0, None
        for e in self._entries.values():
            if e.lora == lora:
                n = common_prefix(prompt, e.tokens)
                if n > best:
                    best, found = n, e
        return found, min(best, cap)

    def save(
        self, ctx: Any, seq: int, tokens: Sequence[int], lora: Any, spare: Entry | None = None
    ) -> bool:
        """Copy ``seq``'s cells (holding ``tokens``) to host memory unless an entry
        already holds them; entries they extend are dropped, and the least recently
        used go until it fits, never ``spare`` (the entry about to be restored into
        ``seq``: it outranks what it replaces). False: not kept."""
        key = list(tokens)
        same = [(eid, e) for eid, e in self._entries.items() if e.lora == lora]
        for eid, e in same:
            if len(e.tokens) >= len(key) and e.tokens[: len(key)] == key:
                self._entries.move_to_end(eid)  # already held (by a longer entry)
                return False
        room = self.budget_bytes - (len(spare.data) if spare is not None else 0)
        data = self._get(ctx, seq)
        if not data or len(data) > room:
            self._stats["ram_too_big"] += bool(data)
            return False
        for eid, e in same:
            if e is not spare and key[: len(e.tokens)] == e.tokens:
                self._drop(eid)  # the new one holds all of it and more
        while self.bytes_used + len(data) > self.budget_bytes:
            self._drop(next(k for k, e in self._entries.items() if e is not spare))
        self._entries[self._next_id] = Entry(key, lora, data)
        self._next_id += 1
        self.bytes_used += len(data)
        self._stats["ram_saved"] += 1
        return True

    def restore(self, ctx: Any, seq: int, entry: Entry) -> bool:
        """Copy ``entry`` into ``seq`` (whose cells it replaces); False when libllama
        refuses it, and the entry is dropped."""
        eid = next((k for k, e in self._entries.items() if e is entry), None)
        if eid is None:
            return False
        if not self._set(ctx, entry.data, seq):
            self._drop(eid)
            self._stats["ram_restore_failed"] += 1
            return False
        self._entries.move_to_end(eid)
        self._stats["ram_restored"] += 1
        return True

    def counters(self) -> dict[str, int]:
        """Saves, restores and evictions so far, and the entries and bytes held now."""
        return {**self._stats, "ram_entries": len(self._entries), "ram_bytes": self.bytes_used}

    def clear(self) -> None:
        for eid in list(self._entries):
            self._drop(eid)

    def _drop(self, eid: int) -> None:
        e = self._entries.pop(eid)
        self.bytes_used -= len(e.data)
        self._stats["ram_evicted"] += 1


def make(cache_ram_mib: int) -> PromptRam | None:
    """The scheduler's cache for ``cache_ram_mib`` (None when 0: nothing is saved)."""
    if check_cache_ram_mib(cache_ram_mib) == 0:
        return None
    from inferd._fast import _llama

    return PromptRam(cache_ram_mib * _MIB, _llama.seq_state_get, _llama.seq_state_set)
