"""Burst prefix sharing: requests that arrive together and share a long prompt prefix
prefill it once (docs/adr/0031-burst-prefix-sharing.md).

Agent frameworks and RAG services send the same long system prompt (tools, a
document) in every request. When several such requests arrive while none of them has
been prefilled yet, each slot would compute the same cells. Here the first one to be
admitted prefills them (the *source*); a later one sharing at least
:data:`~.scheduler.MIN_COPIED_PREFIX` more tokens with the source's prompt than it could reuse
already *waits*: it is left out of the steps until the source's cells cover the shared
prefix, then takes a copy of them (``seq_cp``: a tag in the unified layout, a
whole-stream copy cut back at the prefix in the split one) and prefills only its own
rest. If the source ends first (cancelled, failed), the waiter prefills on its own.

Prompts with images or audio never wait or serve as a source: their cut points follow
media spans (media.py), and the saving there is a whole encode, handled by prefix
reuse once the cells exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferd.backends.llamacpp.scheduler import Scheduler, SeqStream


def join(sched: Scheduler, s: SeqStream, have: int) -> bool:
    """(scheduler thread, at admission) make ``s`` wait for a running stream still
    prefilling a prompt that shares at least ``have + MIN_COPIED_PREFIX`` tokens with
    its own (the least gain worth a whole-stream copy and a wait); True when it waits."""
    if not sched.prefix_cache or s.media is not None:
        return False
    from inferd.backends.llamacpp.scheduler import MIN_COPIED_PREFIX, common_prefix

    cap = len(s.prompt) - 1  # the last prompt token is decoded to get logits
    best, source = 0, None
    for a in sched._active:
        if not _can_serve(a, s):
            continue
        n = min(common_prefix(s.prompt, a.prompt), cap)
        if n > best:
            best, source = n, a
    if source is None or best - have < MIN_COPIED_PREFIX:
        return False
    s.wait = (source, best)
    sched.waiting.append(s)
    sched.stats["burst_waits"] += 1
    return True


def _can_serve(a: SeqStream, s: SeqStream) -> bool:
    """A source must be prefilling (a prefilled one's cells were weighed already by
    prefix reuse), plain text, under the same LoRA scale set, and not waiting itself."""
    return (
        a is not s
        and not a.cancelled
        and not a.done
        and a.n_past < len(a.prompt)
        and a.media is None
        and a.wait is None
        and a.lead is None
        and a.lora == s.lora
    )


def settle(sched: Scheduler) -> None:
    """(scheduler thread, between decodes) copy the source's cells to every waiter they
    now cover; release waiters whose source ended (they prefill on their own)."""
    still: list[SeqStream] = []
    for s in sched.waiting:
        if s.done or s.cancelled or s.wait is None:
            s.wait = None
            continue
        source, n = s.wait
        if source.done or source.cancelled:
            s.wait = None
            sched.stats["burst_released"] += 1
        elif len(source.kv) >= n:
            s.wait = None
            _copy(sched, source, s, n)
        else:
            still.append(s)
    sched.waiting = still


def _copy(sched: Scheduler, source: SeqStream, s: SeqStream, n: int) -> None:
    """Give ``s`` the source's first ``n`` cells through the layout's own prefix copy
    (split: the whole stream, cut back at ``n``, also counted in ``slot_copies``;
    unified: a tag); if libllama cannot cut the copy there, ``s`` starts from nothing."""
    if sched.split:
        n = sched._reuse_in_slot(s.seq, n, n, source.seq)
    else:
        n = sched._copy_prefix(s.seq, source.seq, n, n)
    sched.stats["cached_tokens"] += n - s.cached_tokens
    s.kv = s.prompt[:n]
    s.n_past = n
    s.shift = 0
    s.cached_tokens = n
    sched.stats["burst_copies"] += 1
