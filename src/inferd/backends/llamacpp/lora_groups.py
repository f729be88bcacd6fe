"""Per-request LoRA scales under continuous batching
(docs/adr/0026-grammar-fast-path-and-context-knobs.md).

libllama applies one adapter list, at one scale each, to every token of a decode, so
sequences asking for different scales cannot share a step. Each sequence carries its
*scale set*: a tuple with one scale per adapter loaded at start, in load order (0.0:
that adapter is off). The scheduler asks :meth:`LoraGroups.select` at the start of
every step which of its streams may be fed: those of one set, applied to the context
first. As llama-server does with slots whose adapters differ, sets never share a decode.

* **One set** (the common case, every request without ``lora``): every stream may run,
  and nothing is called on the context while the set stays what it already applies.
* **Several sets with work**: the step goes to the set that ran least recently (ties:
  the set of the oldest admitted stream), a round robin that lets no set starve: with
  ``k`` sets waiting, each runs at least once every ``k`` steps. Each change of set is
  one ``llama_set_adapters_lora`` call, after which libllama re-reserves its compute
  graph on the next decode (the switch cost; ``lora_switches`` in the stats counts them).
* **Cached cells**: a sequence's K/V depend on the adapters it ran with, so prefix reuse
  only takes cells computed under the same set; :attr:`LoraGroups.owner` records the set
  of every sequence id's cells (slots at admission, cache ids when copied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: A scale set: one scale per loaded adapter, in load order (0.0: off).
ScaleSet = tuple[float, ...]


class LoraGroups:
    """Which scale set each step runs, applied to ``ctx`` through ``set_lora`` (the
    binding's ``set_lora(ctx, adapters, scales)``). ``start``: the set the context applies
    now (the model's own scales, which requests without ``lora`` use)."""

    def __init__(
        self, set_lora: Callable[..., Any], ctx: Any, adapters: Sequence[Any], start: ScaleSet
    ) -> None:
        if len(adapters) != len(start):
            raise ValueError(f"{len(adapters)} LoRA adapters but {len(start)} scales")
        self._set_lora = set_lora
        self._ctx = ctx
        self._adapters = list(adapters)
        self.start: ScaleSet = tuple(float(x) for x in start)
        self.applied: ScaleSet = self.start
        #: sequence id -> the scale set its KV cells were computed with
        self.owner: dict[int, ScaleSet] = {}
        self._ran: dict[ScaleSet, int] = {}  # set -> step number it last ran (several sets)
        self._steps = 0

    def select(self, sched: Any) -> list[Any]:
        """(scheduler thread, context lock held) The streams this step may feed: all of
        ``sched._active`` when they share one set, else those of the set whose turn it is;
        that set is applied to the context before the step's first decode."""
        active = sched._active
        if not active:
            return active
        first = active[0].lora
        if all(s.lora == first for s in active):  # one set: nothing to choose
            self._apply(sched, first)
            return active
        ready = [s for s in active if not s.cancelled and sched._runnable(s)]
        sets = list(dict.fromkeys(s.lora for s in ready))  # oldest admitted stream first
        if not sets:
            return []
        if len(sets) > 1:
            sched.stats["lora_mixed_steps"] += 1  # another set's streams wait this step
        self._steps += 1
        want = min(sets, key=lambda k: self._ran.get(k, -1))  # least recently run
        self._ran = {k: v for k, v in self._ran.items() if k in sets}
        self._ran[want] = self._steps
        self._apply(sched, want)
        return [s for s in active if s.lora == want]

    def _apply(self, sched: Any, scales: ScaleSet) -> None:
        if scales == self.applied:
            return
        self._set_lora(self._ctx, self._adapters, list(scales))
        self.applied = scales
        sched.stats["lora_switches"] += 1

    def admitted(self, s: Any) -> None:
        """``s`` (and its choices) took their sequence ids: their cells are of its set."""
        for x in (s, *s.followers):
            self.owner[x.seq] = x.lora

    def copied(self, src: int, dst: int) -> None:
        """``src``'s cells were copied to ``dst`` (a prefix cache id)."""
        self.owner[dst] = self.owner.get(src, self.start)

    def media_ok(self, sched: Any, active: list[Any]) -> bool:
        """Whether the media hook may run this step: the stream it would advance (the
        first admitted that has reached a media chunk, as ``media.step`` picks it)
        belongs to this step's set. Otherwise that stream's set gets its own turn."""
        if active is sched._active:
            return True
        for s in sched._active:
            m = s.media
            if m is None or s.cancelled or s.lead is not None or s.n_past >= len(s.prompt):
                continue
            if m.span_at(s.n_past) is None:
                continue
            return any(x is s for x in active)
        return True


def make(
    set_lora: Callable[..., Any], ctx: Any, adapters: Sequence[Any], loaded: Sequence[Any]
) -> LoraGroups | None:
    """The scheduler's groups for a model's adapters (``loaded``: the options' ``(path,
    scale)`` pairs, already applied to ``ctx``); None without adapters, so a model
    without LoRA pays nothing per step."""
    if not adapters:
        return None
    return LoraGroups(set_lora, ctx, adapters, tuple(scale for _p, scale in loaded))
