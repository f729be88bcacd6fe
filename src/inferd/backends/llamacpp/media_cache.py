"""The media cache: a projector's encoded images and audio, kept for the next prompt.

(docs/adr/0032-media-embedding-cache.md) Prefix reuse (ADR 0028) serves an image's cells
only when everything before it matches too. The same image behind different text (a new
question first, another system prompt, cells evicted by other requests) used to be
encoded again, as llama-server does; encoding is most of an image's prefill on a CPU.
This cache keeps the encoder's output, keyed by what determines it:

* the media's SHA-256 (mtmd's bitmap id, over the file's bytes);
* which of that file's chunks it is (a tiled image or a long audio file gives several
  chunks with one id, always in the same order);
* the chunk's kind, cells and positions (a guard: the same file always gives the same).

Each :class:`MediaCache` belongs to one projector, so the encoder and its threads are
fixed. Entries are shared read-only floats (``Embeddings.detached``); the budget is a
byte count, least recently used first out, and a chunk larger than the budget is not
kept. Only the scheduler thread touches it.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Mapping
from typing import Any

from inferd.limits import MAX_BUDGET_MIB, check_mib

#: Default host memory for encoded media, MiB: 64 LLaVA-1.5 images (576 cells of a
#: 4,096-wide model, 9 MiB each) or some 500 of a small model's.
DEFAULT_MEDIA_CACHE_MIB = 512
#: Largest budget accepted, MiB (the shared cache-budget rule, inferd.limits).
MAX_MEDIA_CACHE_MIB = MAX_BUDGET_MIB
_MIB = 1 << 20


def check_media_cache_mib(value: Any) -> int:
    """The one rule for ``media_cache_mib``: an integer in ``[0, MAX_MEDIA_CACHE_MIB]``."""
    return check_mib("media_cache_mib", value, "the media cache")


def chunk_keys(chunks: Any, copies: Mapping[str, int]) -> dict[int, Hashable]:
    """The cache key of every media chunk of ``chunks`` that has an id, by chunk index;
    ``copies``: how many of the prompt's files have each id (the same bytes sent twice).

    A file's chunks share its id and come in the same order wherever it appears, so the
    k-th chunk of a copy is keyed by k. A chunk whose copy cannot be told (its id's
    chunks do not split evenly into its copies) gets no key: it is encoded every time."""
    by_id: dict[str, list[int]] = collections.defaultdict(list)
    for k in range(len(chunks)):
        if chunks.kind(k) != "text" and chunks.id(k):
            by_id[chunks.id(k)].append(k)
    keys: dict[int, Hashable] = {}
    for media_id, ks in by_id.items():
        n_copies = copies.get(media_id, 0)
        if n_copies < 1 or len(ks) % n_copies:
            continue
        per_copy = len(ks) // n_copies
        for ordinal, k in enumerate(ks):
            shape = (chunks.kind(k), chunks.n_tokens(k), chunks.n_pos(k))
            keys[k] = (media_id, ordinal % per_copy, *shape)
    return keys


def make(mib: int) -> MediaCache | None:
    """The cache of a ``media_cache_mib`` budget; None when it is 0 (off)."""
    return MediaCache(check_media_cache_mib(mib) * _MIB) if mib else None


class MediaCache:
    """Encoded media chunks within ``budget_bytes`` (ADR 0032)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self.stats = {"media_cache_hits": 0, "media_cache_misses": 0, "media_cache_evicted": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, mtmd: Any, chunks: Any, idx: int, key: Hashable | None) -> Any:
        """Chunk ``idx`` of ``chunks`` encoded: the cached floats when ``key`` is held,
        else ``mtmd.encode`` (GIL released), kept for later when it fits."""
        if key is not None:
            held = self._entries.get(key)
            if held is not None:
                self._entries.move_to_end(key)
                self.stats["media_cache_hits"] += 1
                return held.bound(chunks, idx)
        emb = mtmd.encode(chunks, idx)
        if key is not None:
            self.stats["media_cache_misses"] += 1
            self._put(key, emb)
        return emb

    def _put(self, key: Hashable, emb: Any) -> None:
        if emb.nbytes > self.budget_bytes:
            return
        self._entries[key] = emb.detached()
        self.used_bytes += emb.nbytes
        while self.used_bytes > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            self.used_bytes -= old.nbytes
            self.stats["media_cache_evicted"] += 1

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0
