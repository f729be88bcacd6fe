"""Continuous batching: many ``generate()`` streams on one llama.cpp context.

One scheduler thread owns the context (ADR 0008). Every *step* it builds one batch
holding the next token of every decoding sequence plus prompt chunks of newly admitted
ones, calls ``llama_decode`` once with the GIL released, samples every sequence that
asked for logits with that sequence's own sampler chain (same C call, no GIL), and
hands the tokens to the streams' event loops in one callback per loop.

Why these choices:

* **Split KV cache** (``kv_layout="split"``, the default, ``kv_unified=False``, what
  llama-server's ``-np`` slots use): each of the ``parallel`` slots owns
  ``n_ctx // parallel`` cells of its own, so a sequence's attention never spans another's
  cells and its greedy output is bit-for-bit the single-stream output. A request must
  fit one slot (no oversubscription), prefix reuse stays inside a slot (a finished slot
  keeps its tokens; a new request takes the free slot sharing the longest prefix with its
  prompt), and the batch is ordered by sequence id because libllama splits it into one
  micro-batch per run of consecutive ids.
* **Unified KV cache** (``kv_layout="unified"``, ``kv_unified=True``): all sequences
  share ``n_ctx`` cells, so a shared prefix is the *same* cells (``seq_cp`` only tags
  them, no copy) and one mixed batch decodes as one micro-batch. A sequence's attention
  then runs over cells interleaved with the others' (masked, never read: their content
  cannot reach it), so its float sums, and sometimes a greedy choice, depend on the
  layout, that is on what else runs (ADR 0008 has the measurements).
* **Chunked prefill** under a per-step budget (:data:`DEFAULT_STEP_TOKENS`): a long
  prompt is fed a chunk per step next to everyone else's next token, so it delays the
  other streams by one chunk at most, never by its whole length.
* **Backpressure by pausing**: each stream may hold :data:`PIPELINE_DEPTH` undelivered
  tokens; a stream whose consumer is slower is left out of the next batches (its KV
  stays) until it catches up. Memory is bounded and the others keep their pace.
* **Lock-step pacing** when compute threads take every CPU: before the next decode the
  scheduler waits (at most :data:`LOCKSTEP_GRACE_S`) until each event loop has run the
  consumers of the previous step (one wake-up per loop and step), so the event loop
  does not preempt a ggml thread mid-graph.
* **Inline decode steps** (lock-step only, docs/adr/0034-inline-decode-steps.md): while
  every running and waiting sequence is read on one event loop, the scheduler thread
  lends the steps to that loop, which runs each round (cancels, admission, one step)
  right after the consumers of the last one. The two thread hand-offs per token (a
  wake-up of the loop, a wake-up of this thread) are gone, and one thread opens every
  OpenMP region (libgomp throttles its workers once two threads have). The loop gives
  the steps back when there is no work or another loop's sequence arrives.
* **Admission** is first come, first served: a bounded queue (``max_queued``; beyond it
  ``QueueFull`` at once) and a head that waits until a sequence slot is free and the
  KV cache can hold its worst case (prompt + ``max_tokens``). Nobody overtakes the
  head, so nobody starves.
* **Prefix reuse** (unified): a finished sequence's tokens stay in the cache under a
  spare sequence id (an LRU of ``prefix_cache`` entries, evicted first under pressure).
  A new sequence copies the longest common prefix from any cached or running sequence
  and decodes only the rest; ``Usage.cached_tokens`` reports it. (Split: see above;
  ``prefix_cache=0`` turns reuse off in both layouts.)

LoRA scale sets (docs/adr/0026-grammar-fast-path-and-context-knobs.md): libllama applies
one adapter list per decode, so sequences asking for different scales never share a step;
:mod:`.lora_groups` picks each step's set (all streams when they share one) and records
the set of every sequence id's cells, which prefix reuse checks.

Cancellation: the stream's flag is seen at the next step, its cells are removed, and
the consumer's ``freed()`` resolves only after that, so nothing outlives its stream.

Choices (``n > 1``, docs/adr/0022-n-choices-and-logprobs.md): :meth:`Scheduler.submit_choices`
queues one *leader* and ``n - 1`` *followers*, admitted together (``n`` slots, the KV
worst case of all ``n``). Only the leader prefills the prompt; the step that decodes its
last prompt token samples every choice from those same logits (each with its own chain
and seed), then copies the leader's cells to the followers (``seq_cp``: a tag in the
unified layout, a whole-stream copy in the split one), and from then on they are
ordinary sequences. Logprobs (``top_logprobs``): for the sequences that asked, one
GIL-free call per step (``_logprobs.pxi``) reads the same logits after the decode.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from inferd.backends.llamacpp import burst_prefix
from inferd.errors import BackendUnavailable, InvalidRequest, NotReady, QueueFull
from inferd.limits import echo
from inferd.types import TokenLogprob

log = logging.getLogger("inferd.llamacpp.scheduler")

#: Undelivered tokens a stream may hold before its sequence is paused (backpressure).
PIPELINE_DEPTH = 8
#: Tokens per decode step (next tokens of running sequences + prompt chunks): bounds how
#: long a newly admitted long prompt can delay the others.
DEFAULT_STEP_TOKENS = 256
#: Requests that may wait for a sequence slot before ``generate()`` raises ``QueueFull``.
DEFAULT_MAX_QUEUED = 64
#: Split layout: least shared prefix worth copying another slot's whole stream of cells
#: for (the copy costs the slot's whole buffer, a prefill costs per token).
MIN_COPIED_PREFIX = 64
#: Finished sequences kept in the KV cache for prefix reuse (LRU).
DEFAULT_PREFIX_CACHE = 8
#: Shortest token list worth keeping for prefix reuse.
MIN_CACHED_PREFIX = 4
#: Lock-step pacing: longest wait for consumers to take the previous step's tokens.
LOCKSTEP_GRACE_S = 0.005
#: Arrival gathering (ADR 0029): an idle scheduler that gets a request while slots stay
#: free waits until no other request has arrived for this long, so requests sent
#: together prefill in one batch instead of the first alone (0 turns it off).
DEFAULT_ADMIT_GATHER_S = 0.003
#: Longest any gathering may last, however requests keep arriving; also the largest
#: ``admit_gather_s`` accepted.
ADMIT_GATHER_MAX_S = 0.025
#: Idle wake-up period of the scheduler thread (a safety net; work is signalled).
_IDLE_POLL_S = 0.5
#: While the context is lent to an event loop (inline steps), how often the scheduler
#: thread checks that the loop still runs (a stopped loop never gives it back).
_LENT_POLL_S = 0.05
#: KV cache layouts (ADR 0008): one stream of cells per slot, or one shared buffer.
KV_LAYOUTS = ("split", "unified")
#: The default layout (ADR 0008): under "split" a stream's greedy output does not depend
#: on what else runs; under "unified" it does (float sums over a shared cache).
DEFAULT_KV_LAYOUT = "split"


def check_kv_layout(kv_layout: str) -> bool:
    """True for ``"split"``; ``InvalidRequest`` naming the value when it is unknown."""
    if kv_layout not in KV_LAYOUTS:
        raise InvalidRequest(
            f"kv_layout={echo(kv_layout)} is not a KV cache layout; choose one of "
            f"{', '.join(repr(k) for k in KV_LAYOUTS)} (default {DEFAULT_KV_LAYOUT!r})"
        )
    return kv_layout == "split"


def check_settings(
    *,
    parallel: int,
    max_queued: int,
    step_tokens: int,
    prefix_cache: int,
    kv_layout: str,
    admit_gather_s: float = DEFAULT_ADMIT_GATHER_S,
) -> bool:
    """The scheduler's one rule for its settings: ``InvalidRequest`` naming the first bad
    value (the backend's options call it before loading a model, the scheduler again
    when built on its own). Returns :func:`check_kv_layout`'s answer."""
    g = admit_gather_s
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= ADMIT_GATHER_MAX_S:
        raise InvalidRequest(
            f"admit_gather_s={echo(g)} must be a number of seconds in [0, {ADMIT_GATHER_MAX_S}]"
        )
    least = {"parallel": 1, "max_queued": 0, "step_tokens": 1, "prefix_cache": 0}
    values = {
        "parallel": parallel,
        "max_queued": max_queued,
        "step_tokens": step_tokens,
        "prefix_cache": prefix_cache,
    }
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least[key]:
            raise InvalidRequest(f"{key}={echo(value)} must be an integer >= {least[key]}")
    return check_kv_layout(kv_layout)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo] holds, a[:hi] == b[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class SeqStream:
    """One generation's hand-off between the scheduler thread and its event loop.

    The consumer awaits :meth:`get` for items ``("tok", token, is_eog, piece, logprob)``
    (``piece``: the token's bytes, detokenized in the scheduler thread; ``logprob``: a
    :class:`~inferd.types.TokenLogprob` when ``top_logprobs >= 0``, else None),
    ``("full",)`` (the sequence
    reached its context), ``("error", exc)`` or ``("end",)`` (the scheduler closed). It
    calls :meth:`cancel` when it leaves early and then awaits :meth:`freed`.

    The hand-off is a deque and at most one waiting future (not an ``asyncio.Queue``):
    a token costs an append and, when the consumer waits, one ``set_result``.
    """

    __slots__ = (
        "_freed",
        "_items",
        "_waiter",
        "cache_on_cancel",
        "cached_tokens",
        "cancelled",
        "done",
        "drafted",
        "followers",
        "ignore_eos",
        "kv",
        "last",
        "lead",
        "loop",
        "lora",
        "max_tokens",
        "media",
        "n_past",
        "need",
        "produced",
        "prompt",
        "sampler",
        "sched",
        "sent",
        "seq",
        "shift",
        "spec_accepted",
        "spec_drafted",
        "spec_state",
        "special",
        "speculative",
        "taken",
        "top_logprobs",
        "wait",
    )

    def __init__(
        self,
        sched: Scheduler,
        loop: asyncio.AbstractEventLoop,
        prompt: list[int],
        sampler: Any,
        max_tokens: int,
        ignore_eos: bool,
        special: bool = False,
    ) -> None:
        self.sched = sched
        self.loop = loop
        self.prompt = prompt
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.special = special  # render control tokens as text (tool/thinking sentinels)
        self.need = len(prompt) + max_tokens  # worst-case KV cells
        self._items: collections.deque[tuple[Any, ...]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._freed: asyncio.Future[None] = loop.create_future()
        # scheduler-thread state
        self.seq = -1  # sequence id while admitted
        self.n_past = 0  # prompt tokens already in the KV cache
        self.kv: list[int] = []  # tokens whose cells this sequence holds, in order
        # next position = len(kv) + shift: M-RoPE media take fewer positions than cells
        # (media.py, ADR 0028); 0 for every other sequence
        self.shift = 0
        self.last = -1  # sampled token not yet decoded
        self.produced = 0
        self.sent = 0  # tokens handed to the loop (written by the scheduler only)
        self.taken = 0  # tokens taken by the consumer (written by the consumer only)
        self.done = False  # no more tokens will come
        self.cancelled = False
        self.cache_on_cancel = False
        self.cached_tokens = 0
        # choices (ADR 0022): a leader lists its followers; a follower names its leader
        # until its first token (sampled from the leader's logits) and cells are copied
        self.followers: list[SeqStream] = []
        self.lead: SeqStream | None = None
        self.top_logprobs = -1  # -1: no logprobs; 0..20 alternatives per token
        self.media: Any = None  # media.MediaPrompt: images/audio in the prompt (ADR 0028)
        # speculative decoding (ADR 0027): may draft, draft tokens fed this step, drafter state
        self.speculative = False
        self.drafted = 0
        self.spec_state: Any = None
        # this stream's drafted and accepted tokens so far (its Done's Timings)
        self.spec_drafted = 0
        self.spec_accepted = 0
        self.lora: Any = None  # LoRA scale set (lora_groups; ADR 0026); None: no adapters
        # burst prefix sharing (ADR 0031): (source stream, shared tokens) while waiting
        self.wait: tuple[SeqStream, int] | None = None

    async def get(self) -> tuple[Any, ...]:
        """The next item from the scheduler (waits; a slow caller pauses the sequence)."""
        items = self._items
        while not items:
            self._waiter = waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if item[0] == "tok":
            self.taken += 1
            if self.sent - self.taken == PIPELINE_DEPTH - 1:
                self.sched._wake()  # a paused sequence may run again
        return item

    def _put(self, item: tuple[Any, ...]) -> None:  # event loop
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self, *, keep: bool = False) -> None:
        """Stop this sequence at the next step. ``keep`` (the consumer finished on its
        own, e.g. a stop sequence) keeps its tokens for prefix reuse."""
        if self.cancelled or self.done:
            return
        self.cache_on_cancel = keep
        self.cancelled = True
        self.sched._cancel(self)

    async def freed(self) -> None:
        """Resolves once the scheduler has let go of this sequence and its KV cells."""
        await asyncio.shield(self._freed)

    def _set_freed(self) -> None:
        if not self._freed.done():
            self._freed.set_result(None)


#: One step's items per event loop: ``(stream, item)`` in the order they happened.
Deliveries = dict[asyncio.AbstractEventLoop, list[tuple[SeqStream, tuple[Any, ...]]]]


def _deliver(
    items: list[tuple[SeqStream, tuple[Any, ...]]], handled: Callable[[], None] | None
) -> None:
    """(event loop) hand a step's items to their streams: one callback per loop and step.

    ``handled`` (lock-step pacing) runs after the consumers this wakes have had their
    turn: their wake-ups were queued first, and asyncio runs callbacks in order.
    """
    for stream, item in items:
        if item[0] == "freed":
            stream._set_freed()
        else:
            stream._put(item)
    if handled is not None:
        asyncio.get_running_loop().call_soon(handled)


class Scheduler:
    """Owns one llama.cpp context and batches every admitted sequence into one decode.

    :param ctx: a ``Context`` created with ``n_seq_max >= parallel + prefix_cache`` and
        ``kv_unified=True`` (unified layout) or ``n_seq_max == parallel`` and
        ``kv_unified=False`` (split layout); nobody else may use it while the scheduler
        runs.
    :param parallel: sequences decoded together (slots ``0..parallel-1``).
    :param n_ctx_seq: most tokens (prompt + reply) one sequence may hold; with the split
        layout at most the ``n_ctx // parallel`` cells of one slot.
    :param step_tokens: tokens per decode step (see :data:`DEFAULT_STEP_TOKENS`).
    :param max_queued: requests that may wait for a slot before ``QueueFull``.
    :param prefix_cache: finished sequences kept for prefix reuse (0 disables).
    :param lockstep: pace decoding by the consumers (see the module docstring).
    :param inline: with ``lockstep``, lend the steps to the one event loop that reads
        every sequence (ADR 0034); ``None``: whenever ``lockstep`` is on.
    :param kv_layout: ``"unified"`` or ``"split"``, as the context was created.
    :param prompt_ram: a ``prompt_ram.PromptRam`` keeping split slots' states in host
        memory once another request takes the slot (ADR 0030); None: off.
    """

    def __init__(
        self,
        ctx: Any,
        model: Any,
        batch_factory: Any,
        *,
        parallel: int,
        n_ctx_seq: int,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        max_queued: int = DEFAULT_MAX_QUEUED,
        prefix_cache: int = DEFAULT_PREFIX_CACHE,
        lockstep: bool = False,
        inline: bool | None = None,
        decode_sample: Any = None,
        name: str = "llamacpp",
        kv_layout: str = DEFAULT_KV_LAYOUT,
        speculator: Any = None,
        admit_gather_s: float = DEFAULT_ADMIT_GATHER_S,
        lora_groups: Any = None,
        prompt_ram: Any = None,
    ) -> None:
        self.split = check_settings(
            parallel=parallel,
            max_queued=max_queued,
            step_tokens=step_tokens,
            prefix_cache=prefix_cache,
            kv_layout=kv_layout,
            admit_gather_s=admit_gather_s,
        )
        self.admit_gather_s = float(admit_gather_s)
        self._last_arrival = 0.0  # monotonic time of the latest submission
        self.ctx = ctx
        self.model = model
        self.name = name
        self.parallel = parallel
        self._init_sizes(n_ctx_seq, step_tokens)
        self._batch = batch_factory(self.batch_capacity, 1)
        if decode_sample is None:
            from inferd._fast._llama import decode_sample
        self._decode_sample = decode_sample
        self.max_queued = max_queued
        self.prefix_cache = prefix_cache
        self.lockstep = lockstep
        self._init_inline(lockstep and (inline is None or inline))
        self.speculator = speculator  # speculative.Speculator or None (ADR 0027)
        self.lora_groups = lora_groups  # lora_groups.LoraGroups or None (ADR 0026)
        # prompt_ram.PromptRam or None (ADR 0030): split slots' states in host memory
        self.prompt_ram = prompt_ram if self.split and prefix_cache > 0 else None
        self._cond = threading.Condition()
        self._pending: collections.deque[SeqStream] = collections.deque()
        self._active: list[SeqStream] = []  # admission order
        self._cancels: list[SeqStream] = []
        self.waiting: list[SeqStream] = []  # burst prefix sharing (ADR 0031)
        self._init_ids(parallel, prefix_cache)
        self._reserved = 0  # worst-case cells of admitted sequences
        self._head_fits = True  # False while the queue head waits for KV room
        self._ctx_lock = threading.Lock()  # held during a step; kv queries take it
        self._unhandled = 0  # lock-step: deliveries whose loop has not yet run them
        self._closing = False
        self.idle = threading.Event()
        self.idle.set()
        self.stats: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="inferd-llama-sched", daemon=True)
        self._thread.start()

    def _init_inline(self, inline: bool) -> None:
        """Inline steps (ADR 0034): whether they may run, the loop the steps are lent
        to, the loop whose round runs now, and the error a round ended with (this
        thread fails every stream with it)."""
        self.inline = inline
        self._lent: asyncio.AbstractEventLoop | None = None
        self._stepping: asyncio.AbstractEventLoop | None = None
        self._inline_error: BaseException | None = None

    def _init_sizes(self, n_ctx_seq: int, step_tokens: int) -> None:
        """Cells per sequence (a split slot's own stream size), prompt tokens per step and
        the batch's capacity, from the context and ``parallel``."""
        n_batch, parallel = int(self.ctx.n_batch), self.parallel
        self.n_ctx = int(self.ctx.n_ctx)
        self.n_ctx_seq = min(n_ctx_seq, self.n_ctx)
        if self.split:
            self.n_ctx_seq = self._slot_limit(n_ctx_seq)
        # every running sequence's next token always fits next to a prompt chunk
        self.step_tokens = (
            max(1, min(step_tokens, n_batch - parallel)) if (n_batch > parallel) else 1
        )
        self.batch_capacity = max(n_batch, parallel + 1)

    def _init_ids(self, parallel: int, prefix_cache: int) -> None:
        """Sequence ids: ``0..parallel-1`` are slots; unified adds ``prefix_cache`` spare
        ids that hold cached prefixes (split has none: each id is a whole stream)."""
        # unified: a stack (lowest id on top); split: least recently used first
        self._free_slots = (
            list(range(parallel)) if self.split else list(range(parallel - 1, -1, -1))
        )
        # unified prefix cache: seq id -> token list, least recently used first
        self._cache: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._free_cache_ids = (
            [] if self.split else list(range(parallel + prefix_cache - 1, parallel - 1, -1))
        )
        # split: tokens whose cells a free slot still holds (reused in place)
        self._slot_kv: dict[int, list[int]] = {}
        self._slot_lora: dict[int, Any] = {}  # split: the LoRA set of those cells
        self.n_seq = parallel if self.split else parallel + prefix_cache

    # ------------------------------------------------------------------ event loop side

    def submit(
        self,
        prompt: list[int],
        sampler: Any,
        *,
        max_tokens: int | None = None,
        ignore_eos: bool = False,
        special: bool = False,
    ) -> SeqStream:
        """Queue a sequence (call from the consumer's event loop).

        The one place that checks a prompt's length and fits ``max_tokens`` (``None``:
        all the sequence has left) to the sequence; ``stream.max_tokens`` is the result.
        Raises ``InvalidRequest`` when it can never fit, ``QueueFull`` when the
        admission queue is at ``max_queued``, ``NotReady`` after :meth:`close`.
        """
        return self.submit_choices(
            prompt, [sampler], max_tokens=max_tokens, ignore_eos=ignore_eos, special=special
        )[0]

    def submit_choices(
        self,
        prompt: list[int],
        samplers: Sequence[Any],
        *,
        max_tokens: int | None = None,
        ignore_eos: bool = False,
        special: bool = False,
        top_logprobs: int | None = None,
        media: Any = None,
        speculative: bool = True,
        lora: Any = None,
    ) -> list[SeqStream]:
        """Queue one sequence per sampler sharing one prefill (choices, ADR 0022).

        As :meth:`submit`, plus ``InvalidRequest`` naming ``n`` when the choices can
        never be admitted together (more than ``parallel`` slots, or more KV than the
        context holds). ``top_logprobs`` (0..20; None: off) adds a ``TokenLogprob`` to
        every token item. Returns the streams in choice order (the first is the leader).
        """
        n = len(prompt)
        self.check_prompt(n)
        room = self.n_ctx_seq - n
        max_tokens = room if max_tokens is None else max(1, min(max_tokens, room))
        self._check_choices(len(samplers), n + max_tokens)
        loop = asyncio.get_running_loop()
        streams = [
            SeqStream(self, loop, list(prompt), smp, max_tokens, ignore_eos, special)
            for smp in samplers
        ]
        stream = streams[0]
        stream.followers = streams[1:]
        for s in streams:
            s.lead = stream if s is not stream else None
            s.top_logprobs = -1 if top_logprobs is None else top_logprobs
            s.media = media
            s.speculative = speculative and self.speculator is not None
            s.lora = lora  # its LoRA scale set (lora_groups.py; ADR 0026)
        with self._cond:
            if self._closing:
                raise NotReady(f"backend {self.name!r} is closed")
            if len(self._pending) >= self.max_queued and (not self._free_slots or self._pending):
                self.stats["queue_full"] += 1
                raise QueueFull(
                    f"backend {self.name!r}: {len(self._pending)} requests already wait "
                    f"for one of {self.parallel} sequence slots (max_queued="
                    f"{self.max_queued}); retry later"
                )
            self._pending.append(stream)
            self._last_arrival = time.monotonic()
            self.idle.clear()
            self._cond.notify()
        return streams

    def _check_choices(self, width: int, need: int) -> None:
        """``InvalidRequest`` naming ``n`` when ``width`` choices can never run together."""
        if width < 1:
            raise InvalidRequest("n must be at least 1")
        if width > self.parallel:
            raise InvalidRequest(
                f"n={width} choices need {width} sequence slots decoded together, but "
                f"backend {self.name!r} has parallel={self.parallel}; ask for fewer choices "
                "or create LlamaCpp with a larger parallel"
            )
        if not self.split and width * need > self.n_ctx:
            raise InvalidRequest(
                f"n={width} choices of {need} tokens each (prompt + max_tokens) need "
                f"{width * need} KV cells, but the context holds n_ctx={self.n_ctx}; ask "
                "for fewer choices or a smaller max_tokens"
            )

    def check_prompt(self, n: int) -> None:
        """``InvalidRequest`` naming the limits when ``n`` prompt tokens never fit.

        A ``max_tokens`` beyond what is left is shortened to fit (``submit``) under both
        layouts, as llama-server and the OpenAI API end such a reply with ``length``:
        clients routinely send a generous ``max_tokens``, and refusing them would make
        the split layout unusable behind an OpenAI-compatible front.
        """
        if n == 0:
            raise InvalidRequest("the prompt is empty after tokenization")
        if n >= self.n_ctx_seq:
            where = (
                (
                    f"one slot holds at most {self.n_ctx_seq} tokens of prompt and reply "
                    f"(kv_layout='split': n_ctx={self.n_ctx} split into parallel="
                    f"{self.parallel} slots)"
                )
                if self.split
                else (
                    f"one sequence holds at most {self.n_ctx_seq} tokens of prompt and "
                    f"reply (n_ctx={self.n_ctx} shared by parallel={self.parallel})"
                )
            )
            raise InvalidRequest(
                f"the prompt is {n} tokens, but {where}; shorten the conversation or create "
                "LlamaCpp with a larger n_ctx (or n_ctx_seq, or a smaller parallel)"
            )

    def _slot_limit(self, n_ctx_seq: int) -> int:
        """Split layout: a sequence lives in its slot's ``n_ctx // parallel`` cells, so an
        ``n_ctx_seq`` beyond that (oversubscription) can never work; say so now."""
        slot = self.n_ctx // self.parallel
        if n_ctx_seq > slot:
            raise InvalidRequest(
                f"n_ctx_seq={n_ctx_seq} exceeds the {slot} cells of one slot "
                f"(kv_layout='split': n_ctx={self.n_ctx} split into parallel="
                f"{self.parallel} slots); use kv_layout='unified' to oversubscribe"
            )
        return n_ctx_seq

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _cancel(self, stream: SeqStream) -> None:
        with self._cond:
            if stream.seq < 0:
                lead = stream.lead
                if lead is not None and lead.seq < 0:  # a choice whose group still waits
                    lead.followers.remove(stream)
                    stream.done = True
                    stream._set_freed()
                    return
                try:
                    self._pending.remove(stream)
                except ValueError:
                    pass
                else:  # never admitted: nothing to free in the context
                    for s in (stream, *stream.followers):  # its choices end with it
                        s.done = True
                        if s is not stream:
                            s._put(("end",))
                        s._set_freed()
                    self._update_idle()
                    return
            self._cancels.append(stream)
            self._cond.notify()

    # ------------------------------------------------------------------ queries

    @property
    def n_active(self) -> int:
        return len(self._active)

    @property
    def n_queued(self) -> int:
        return len(self._pending)

    def kv_cells(self) -> list[tuple[int, int]]:
        """``(pos_min, pos_max)`` of every sequence id (slots, then unified cache ids)."""
        with self._ctx_lock:
            return self._cells()

    def _cells(self) -> list[tuple[int, int]]:  # with self._ctx_lock held
        from inferd._fast import _llama

        return [] if self.ctx.closed else _llama.seq_cells(self.ctx, self.n_seq)

    def kv_used(self) -> int:
        """KV cells held by slots, except those a free slot keeps for prefix reuse (0
        when every stream has ended: a leaked cell shows up here)."""
        with self._ctx_lock:
            kept = {seq for seq, toks in self._slot_kv.items() if toks}
            cells = self._cells()[: self.parallel]
        return sum(hi - lo + 1 for seq, (lo, hi) in enumerate(cells) if hi >= 0 and seq not in kept)

    def kv_cached(self) -> int:
        """Tokens kept for prefix reuse (their cells may be shared with running ones)."""
        with self._ctx_lock:
            return sum(len(t) for t in self._cache.values()) + sum(
                len(t) for t in self._slot_kv.values()
            )

    def clear_prefix_cache(self, *also: Any) -> None:
        """Drop every cached prefix (their KV cells are freed now), the host-RAM entries
        (ADR 0030) and ``also``'s (caches this thread uses under the context lock: the
        media cache, ADR 0032)."""
        with self._ctx_lock:
            self._drop_cached()
            for cache in (self.prompt_ram, *also):
                if cache is not None:
                    cache.clear()

    def _drop_cached(self) -> None:  # with self._ctx_lock held
        for cid in list(self._cache):
            self._evict(cid)
        for seq, toks in list(self._slot_kv.items()):
            if toks:
                self.ctx.seq_rm(seq, -1, -1)
                self._slot_kv[seq] = []
                self.stats["evicted"] += 1

    # ------------------------------------------------------------------ closing

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; open streams get ``("end",)``. Safe to call twice."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ scheduler thread

    def _update_idle(self) -> None:  # with self._cond held
        if not self._active and not self._pending:
            self.idle.set()

    def _runnable(self, s: SeqStream) -> bool:
        if s.lead is not None:  # a choice waiting for its leader's prefill
            return False
        if s.wait is not None:  # waits for a burst source (ADR 0031) unless it ended
            return s.wait[0].done or s.wait[0].cancelled
        if s.n_past < len(s.prompt):
            return True
        return s.sent - s.taken < PIPELINE_DEPTH

    def _has_work(self) -> bool:  # with self._cond held
        if self._cancels:
            return True
        if self._pending and self._head_fits and self._slots_for(self._pending[0]):
            return True
        return any(self._runnable(s) for s in self._active)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._has_work():
                        self._update_idle()
                        self._cond.wait(_IDLE_POLL_S)
                    if self._closing:
                        break
                    if not self._active and self.admit_gather_s > 0:
                        self._gather_arrivals()
                    if self.lockstep and self._active:
                        self._await_consumers()
                    lend = self._loop_to_lend()
                    cancels: list[SeqStream] = []
                    if lend is None:  # a lent round takes the cancels itself
                        cancels, self._cancels = self._cancels, []
                if lend is not None:
                    self._lend(lend)
                else:
                    with self._ctx_lock:
                        self._iteration(cancels)
                with self._cond:
                    self._update_idle()
        except BaseException as e:  # a bug: fail every stream rather than hang them
            log.exception("llama scheduler failed")
            self._fail_all(e)
        finally:
            self._shutdown()

    def _iteration(self, cancels: list[SeqStream]) -> None:  # with self._ctx_lock held
        """One round of the work: free the cancelled, admit what fits, one step."""
        for s in cancels:
            if s in self._active:
                self._finish(s, cache=s.cache_on_cancel)
        self._admit()
        self._step()

    def _gather_arrivals(self) -> None:  # with self._cond held
        """Arrival gathering (ADR 0029): nothing runs yet and a request has come; while
        slots would stay free, wait until ``admit_gather_s`` passes without a new
        arrival (at most :data:`ADMIT_GATHER_MAX_S` in all), so requests sent together
        share the first prefill. Without it the first one prefills alone while the
        event loop is still parsing the others, and they wait a whole prefill longer."""
        start = time.monotonic()
        while not self._closing and not self._cancels:
            waiting = sum(1 + len(p.followers) for p in self._pending)
            if waiting >= len(self._free_slots):
                return
            now = time.monotonic()
            left = min(self._last_arrival + self.admit_gather_s, start + ADMIT_GATHER_MAX_S) - now
            if left <= 0:
                return
            self.stats["gather_waits"] += 1
            self._cond.wait(left)

    def _await_consumers(self) -> None:  # with self._cond held
        """Lock-step: wait (at most ``LOCKSTEP_GRACE_S``) until every event loop has run
        the consumers of the last delivery; one wake-up per loop and step, not per
        token, so the wait costs O(loops), whatever the number of streams."""
        deadline = time.monotonic() + LOCKSTEP_GRACE_S
        while not self._closing and not self._cancels and self._unhandled > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stats["lockstep_timeouts"] += 1
                return
            self._cond.wait(left)

    def _handled(self) -> None:  # event loop: a delivery's consumers have run
        with self._cond:
            self._unhandled -= 1
            if self._unhandled <= 0:
                self._cond.notify()

    def _slots_for(self, s: SeqStream) -> bool:  # with self._cond held
        """True when the free slots can take ``s`` and its choices (ADR 0022)."""
        return len(self._free_slots) >= 1 + len(s.followers)

    def _admit(self) -> None:
        """Move queue heads into free slots while they fit (FCFS: nobody overtakes)."""
        while True:
            with self._cond:
                if not self._pending or not self._slots_for(self._pending[0]):
                    return
                s = self._pending[0]
                placed = self._place_split(s.prompt, s.lora) if self.split else self._place(s)
                if placed is None:  # context pressure: wait for a sequence to end
                    self._head_fits = False
                    self.stats["waited_for_kv"] += 1
                    return
                seq, src, lcp = placed
                self._pending.popleft()
                s.seq = seq
                self._active.append(s)
                self._reserved += s.need
                for f in s.followers:  # choices: a slot each, filled from the leader later
                    f.seq = self._free_slots.pop(0) if self.split else self._free_slots.pop()
                    self._active.append(f)
                    self._reserved += f.need
                if self.lora_groups is not None:  # the set their cells hold (ADR 0026)
                    self.lora_groups.admitted(s)
            for f in s.followers:
                self.ctx.seq_rm(f.seq, -1, -1)
                if self.split:
                    self._slot_kv[f.seq] = []
            # media: never cut inside a media span; cut = the position of prompt[lcp]
            lcp, cut = (lcp, lcp) if s.media is None else s.media.prefix_cut(lcp)
            lcp = (
                self._reuse_in_slot(seq, lcp, cut, src)
                if self.split
                else self._copy_prefix(seq, src, lcp, cut)
            )
            if lcp > 0:
                s.n_past = lcp
                s.kv = s.prompt[:lcp]
                s.shift = cut - lcp
                s.cached_tokens = lcp
                self.stats["cached_tokens"] += lcp
            burst_prefix.join(self, s, lcp)
            self.stats["admitted"] += 1 + len(s.followers)

    def _place(self, s: SeqStream) -> tuple[int, int, int] | None:
        """Unified: ``(slot, prefix source, prefix length)`` once the shared cache can
        hold ``s``'s worst case next to the other reservations; None: not yet."""
        src, lcp = self._best_prefix(s.prompt, s.lora)
        need = s.need * (1 + len(s.followers))  # choices reserve their worst case too
        if not self._make_room(need, keep=src):
            if not (lcp and src in self._cache):
                return None
            src, lcp = -1, 0  # the kept source must go too
            if not self._make_room(need, keep=-1):
                return None
        return self._free_slots.pop(), src, lcp

    def _copy_prefix(self, seq: int, src: int, lcp: int, cut: int) -> int:
        """Unified: tag ``src``'s first ``lcp`` cells (positions below ``cut``) for
        ``seq`` too (no copy)."""
        if lcp > 0:
            self.ctx.seq_rm(seq, -1, -1)
            self.ctx.seq_cp(src, seq, 0, cut)
            if src in self._cache:
                self._cache.move_to_end(src)
        return lcp

    def _place_split(self, prompt: list[int], lora: Any = None) -> tuple[int, Any, int]:
        """Split: ``(slot, source or None, prefix length)`` for the free slot whose kept
        tokens share the longest prefix with ``prompt`` (as llama-server picks a slot);
        ties and no match take the least recently used one. A longer prefix elsewhere
        goes into the least recently used slot instead (the source): a host-RAM entry
        (ADR 0030), or a running stream's slot, copied whole when it shares at least
        :data:`MIN_COPIED_PREFIX` tokens. With ``prefix_cache=0`` nothing is reused.
        The slot's cells past the prefix go later (:meth:`_reuse_in_slot`)."""
        best, slot = 0, self._free_slots[0]
        cap = len(prompt) - 1  # the last prompt token is decoded to get logits
        for seq in self._free_slots:  # least recently used first: a tie keeps the first
            if self._lora_of(seq) != lora:  # cells of another LoRA scale set (ADR 0026)
                continue
            n = min(common_prefix(prompt, self._slot_kv.get(seq, ())), cap)
            if n > best:
                best, slot = n, seq
        if best < MIN_CACHED_PREFIX:
            best, slot = 0, self._free_slots[0]
        source: Any = None
        if self.prompt_ram is not None:
            saved, n = self.prompt_ram.best(prompt, lora, cap)
            if n >= MIN_CACHED_PREFIX and n > best:
                source, best, slot = saved, n, self._free_slots[0]
        other, n = self._best_other_slot(prompt, lora, cap, slot) if self.prefix_cache else (-1, 0)
        if n >= MIN_COPIED_PREFIX and n > best:
            source, best, slot = other, n, self._free_slots[0]
        self._free_slots.remove(slot)
        return slot, source, best

    def _best_other_slot(
        self, prompt: list[int], lora: Any, cap: int, chosen: int
    ) -> tuple[int, int]:
        """Split: the running stream whose cells share the longest prefix with
        ``prompt``, and its length (at most ``cap``); free slots' kept cells were
        weighed already. One admitted just before counts with the prefix it kept, so
        when one slot holds a long prompt, a burst of requests sharing it copies its
        cells instead of prefilling them again."""
        best, src = 0, -1
        for a in self._active:
            if a.seq != chosen and not a.cancelled and a.lora == lora:
                n = common_prefix(prompt, a.kv)
                if n > best:
                    best, src = n, a.seq
        return src, min(best, cap)

    def _reuse_in_slot(self, seq: int, lcp: int, cut: int, source: Any = None) -> int:
        """Split: keep the slot's first ``lcp`` cells (positions below ``cut``) and drop
        the rest (all of them when ``lcp`` is 0 or libllama cannot cut there); returns
        the prefix kept. With the host-RAM cache (ADR 0030) the cells about to go are
        saved first. A ``source`` replaces the slot's cells before the cut: a saved
        entry, or another slot (an int) whose whole stream is copied (the copy lands
        before the next decode, as for choices)."""
        kept, self._slot_kv[seq] = self._slot_kv.get(seq) or [], []
        ram = self.prompt_ram
        entry = source if source is not None and not isinstance(source, int) else None
        if ram is not None and len(kept) - (0 if source is not None else lcp) >= MIN_CACHED_PREFIX:
            ram.save(self.ctx, seq, kept, self._slot_lora.get(seq), spare=entry)
        if isinstance(source, int):
            self.ctx.seq_cp(source, seq, -1, -1)
            self.stats["slot_copies"] += 1
        elif entry is not None and ram is not None and not ram.restore(self.ctx, seq, entry):
            lcp = 0
        if lcp > 0 and self.ctx.seq_rm(seq, cut, -1):
            return lcp
        self.ctx.seq_rm(seq, -1, -1)
        return 0

    def _best_prefix(self, prompt: list[int], lora: Any = None) -> tuple[int, int]:
        """(sequence id, length) of the longest reusable prefix of ``prompt`` among cells
        of the LoRA scale set ``lora`` (ADR 0026)."""
        best, src = 0, -1
        cap = len(prompt) - 1  # the last prompt token is decoded to get logits
        for cid, toks in self._cache.items():
            if self._lora_of(cid) != lora:
                continue
            n = common_prefix(prompt, toks)
            if n > best:
                best, src = n, cid
        for a in self._active:
            if a.kv and not a.cancelled and a.lora == lora:
                n = common_prefix(prompt, a.kv)
                if n > best:
                    best, src = n, a.seq
        best = min(best, cap)
        return (src, best) if best >= MIN_CACHED_PREFIX else (-1, 0)

    def _lora_of(self, seq: int) -> Any:
        """The LoRA scale set ``seq``'s cells were computed with (ADR 0026); None when
        the model has no adapters."""
        return None if self.lora_groups is None else self.lora_groups.owner.get(seq)

    def _make_room(self, need: int, keep: int) -> bool:
        """Evict cached prefixes (LRU, sparing ``keep``) until ``need`` cells fit."""

        def used() -> int:
            return self._reserved + sum(len(t) for t in self._cache.values())

        while used() + need > self.n_ctx:
            victim = next((c for c in self._cache if c != keep), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, cid: int) -> None:
        self._cache.pop(cid, None)
        self.ctx.seq_rm(cid, -1, -1)
        self._free_cache_ids.append(cid)
        self.stats["evicted"] += 1

    def _plan(self, active: list[SeqStream] | None = None) -> list[tuple[SeqStream, list[int]]]:
        """This step's tokens, per sequence of ``active`` (default: all): the next token of
        every decoding sequence whose consumer keeps up, then prompt chunks (oldest
        admission first) within the step budget, then drafts of speculating sequences in
        what is left (ADR 0027)."""
        active = self._active if active is None else active
        fed: list[tuple[SeqStream, list[int]]] = []
        for s in active:
            if s.cancelled or s.n_past < len(s.prompt):
                continue
            if s.sent - s.taken >= PIPELINE_DEPTH:
                self.stats["paused"] += 1
                continue
            fed.append((s, [s.last]))
        room = max(self.step_tokens - len(fed), 1)
        room = min(room, self.batch_capacity - len(fed))
        for s in active:
            if room <= 0:
                break
            if s.cancelled or s.n_past >= len(s.prompt) or s.lead is not None or s.wait:
                continue
            chunk = (
                s.prompt[s.n_past : s.n_past + room]
                if s.media is None
                else s.media.text_run(s.prompt, s.n_past, room)
            )
            if not chunk:  # a media chunk comes first: media.step evaluates it
                continue
            room -= len(chunk)
            fed.append((s, chunk))
        if self.speculator is not None:  # drafts take what prompts left (ADR 0027)
            self.speculator.propose(self, fed, room)
        if self.split:  # libllama splits a split-cache batch at every non-consecutive id
            fed.sort(key=lambda e: e[0].seq)
        return fed

    def _step(self) -> None:
        """Build one batch, decode it, sample, deliver."""
        batch = self._batch
        batch.clear()
        if self.waiting:  # burst waiters whose source ended prefill on their own
            burst_prefix.settle(self)
        groups = self.lora_groups  # one LoRA scale set per step (ADR 0026)
        active = self._active if groups is None else groups.select(self)
        if any(s.media is not None for s in active) and (  # images/audio (ADR 0028)
            groups is None or groups.media_ok(self, active)
        ):
            from inferd.backends.llamacpp.media import step as media_step

            media_step(self)
        fed = self._plan(active)
        samplers, idxs, owners, drafted = self._fill_batch(batch, fed)
        if len(batch) == 0:
            return
        t0 = time.perf_counter()
        try:
            toks = self._decode_sample(self.ctx, batch, samplers, idxs)
        except Exception as e:
            self._decode_failed(e, [s for s, _ in fed])
            return
        self.stats["steps"] += 1
        self.stats["batch_tokens"] += len(batch)
        self.stats["decode_us"] += int((time.perf_counter() - t0) * 1e6)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        if len(fed) > 1:  # more than one sequence shared this decode
            self.stats["batched_steps"] += 1
            self.stats["max_seqs"] = max(self.stats["max_seqs"], len(fed))
        for s, chunk in fed:
            s.kv.extend(chunk)
            if s.n_past < len(s.prompt):
                s.n_past += len(chunk)
                if s.n_past >= len(s.prompt) and s.followers:
                    self._fill_choices(s)
        if self.waiting:  # burst waiters now covered take their copies (ADR 0031)
            burst_prefix.settle(self)
        if drafted and len(fed) > 1:  # drafts verified in one decode with other sequences
            self.stats["spec_batched_steps"] += 1
        for s, chunk, ix in drafted:  # speculation: the stream's picks, rejected cells gone
            got = self.speculator.verify(self, s, chunk, ix)
            owners += [s] * len(got)
            idxs += ix[: len(got)]
            toks = [*toks, *got]
        out, finished = self._take_tokens(owners, idxs, toks)
        self.stats["tokens"] += len(owners)
        for s in finished:
            self._finish(s, cache=True, out=out)
        self._send(out)

    def _take_tokens(
        self, owners: list[SeqStream], idxs: list[int], toks: list[int]
    ) -> tuple[Deliveries, list[SeqStream]]:
        """Each drawn token to its stream: the deliveries per event loop (the token, its
        bytes, its logprobs) and the streams this step ended (end of generation,
        ``max_tokens`` or a full sequence)."""
        out: Deliveries = {}
        finished: list[SeqStream] = []
        is_eog, to_piece = self.model.is_eog, self.model.token_to_piece
        lps = self._logprobs(owners, idxs, toks)
        ended: set[SeqStream] = set()  # a speculating stream's tokens past its end are dropped
        for k, (s, tok) in enumerate(zip(owners, toks, strict=True)):
            if s in ended:
                continue
            eog = bool(is_eog(tok))
            s.last = tok
            s.produced += 1
            s.sent += 1
            shown = not eog or s.ignore_eos  # an end-of-generation token ends the text
            piece = to_piece(tok, s.special) if shown else b""
            item = ("tok", tok, eog, piece, lps[k] if lps is not None and shown else None)
            out.setdefault(s.loop, []).append((s, item))
            if (eog and not s.ignore_eos) or s.produced >= s.max_tokens:
                finished.append(s)
                ended.add(s)
            elif len(s.kv) >= self.n_ctx_seq:
                out[s.loop].append((s, ("full",)))
                finished.append(s)
                ended.add(s)
        return out, finished

    def _fill_batch(
        self, batch: Any, fed: list[tuple[SeqStream, list[int]]]
    ) -> tuple[list[Any], list[int], list[SeqStream], list[tuple[SeqStream, list[int], list[int]]]]:
        """Put this step's tokens in ``batch``: the samplers, logit rows and streams of
        the tokens to draw, and the speculating streams' drafts to verify (ADR 0027)."""
        samplers: list[Any] = []
        idxs: list[int] = []
        owners: list[SeqStream] = []
        drafted: list[tuple[SeqStream, list[int], list[int]]] = []
        for s, toks in fed:
            if s.drafted:  # logits at every position, verified after the decode (ADR 0027)
                pos = len(s.kv) + s.shift
                drafted.append(
                    (s, toks, [batch.add(t, pos + j, s.seq, True) for j, t in enumerate(toks)])
                )
                continue
            # a decoding sequence, or the last chunk of a prompt: sample its next token
            wants = s.n_past + len(toks) >= len(s.prompt)
            i = batch.add_sequence(toks, len(s.kv) + s.shift, s.seq, wants)
            if wants:
                for c in (s, *s.followers) if s.followers else (s,):
                    if c.lead is s and c.cancelled:
                        continue
                    if c is s or c.lead is s:  # choices draw from the leader's logits
                        idxs.append(i)
                        samplers.append(c.sampler)
                        owners.append(c)
        return samplers, idxs, owners, drafted

    def _fill_choices(self, lead: SeqStream) -> None:
        """The leader's prompt is in its cells: copy them to every waiting choice (the
        copy lands before the next decode), which then decodes on its own (ADR 0022)."""
        for f in lead.followers:
            if f.lead is not lead:
                continue
            f.lead = None
            if f.cancelled or f.done:
                continue
            self.ctx.seq_cp(lead.seq, f.seq, -1, -1)
            f.kv = list(lead.kv)
            f.shift = lead.shift
            f.n_past = len(f.prompt)
            f.cached_tokens = lead.cached_tokens
        self.stats["choice_copies"] += 1

    def _logprobs(
        self, owners: list[SeqStream], idxs: list[int], toks: list[int]
    ) -> list[TokenLogprob | None] | None:
        """``TokenLogprob`` per sampled token for the sequences that asked (None: none
        did, nothing is computed), from the logits of the decode just done."""
        want = [k for k, s in enumerate(owners) if s.top_logprobs >= 0]
        if not want:
            return None
        from inferd._fast._llama import token_logprobs

        top_n = max(owners[k].top_logprobs for k in want)
        got = token_logprobs(self.ctx, [idxs[k] for k in want], [toks[k] for k in want], top_n)
        to_piece = self.model.token_to_piece
        out: list[TokenLogprob | None] = [None] * len(owners)
        for k, (lp, top) in zip(want, got, strict=True):
            s = owners[k]
            alts = []
            for tid, alp in top[: s.top_logprobs]:
                b = to_piece(tid, s.special)
                alts.append((b.decode("utf-8", "replace"), tuple(b), alp))
            piece = to_piece(toks[k], s.special)
            out[k] = TokenLogprob(piece.decode("utf-8", "replace"), tuple(piece), lp, tuple(alts))
        return out

    def _decode_failed(self, err: Exception, streams: list[SeqStream]) -> None:
        """A failed decode leaves the cache as libllama says; fail that batch's streams."""
        log.warning("llama_decode failed for %d sequences: %s", len(streams), err)
        out: Deliveries = {}
        for s in dict.fromkeys(streams):
            out.setdefault(s.loop, []).append((s, ("error", err)))
            self._finish(s, cache=False, out=out)
        self._drop_cached()
        self._send(out)

    def _finish(
        self,
        s: SeqStream,
        *,
        cache: bool,
        out: Deliveries | None = None,
    ) -> None:
        """Free ``s``'s slot (keeping its tokens as a cached prefix when asked)."""
        if s.done:
            return
        s.done = True
        for f in s.followers:  # choices still waiting for this prefill end with it
            if f.lead is s:
                f.lead = None
                if not f.done:
                    f.cancelled = True
                    lost = BackendUnavailable("the prompt's prefill for this choice failed")
                    if out is not None:
                        out.setdefault(f.loop, []).append((f, ("error", lost)))
                    self._finish(f, cache=False, out=out)
        seq = s.seq
        if self.split:
            self._keep_in_slot(seq, s.kv if cache else None)
        else:
            if cache and self.prefix_cache and len(s.kv) >= MIN_CACHED_PREFIX:
                self._remember(seq, s.kv)
            self.ctx.seq_rm(seq, -1, -1)
        with self._cond:
            self._active.remove(s)
            self._free_slots.append(seq)
            self._reserved -= s.need
            self._head_fits = True
            self._update_idle()
        if out is None:
            out = {}
            out.setdefault(s.loop, []).append((s, ("freed",)))
            self._send(out)
        else:
            out.setdefault(s.loop, []).append((s, ("freed",)))

    def _keep_in_slot(self, seq: int, kv: list[int] | None) -> None:
        """Split: a slot whose stream ended normally keeps its cells for the next request
        sharing a prefix with ``kv``; ``None`` (cancelled, failed) clears the slot."""
        keep = kv is not None and self.prefix_cache > 0 and len(kv) >= MIN_CACHED_PREFIX
        if not keep:
            self.ctx.seq_rm(seq, -1, -1)
        self._slot_kv[seq] = list(kv) if keep and kv is not None else []
        self._slot_lora[seq] = self._lora_of(seq)
        if keep:
            self.stats["remembered"] += 1

    def _remember(self, seq: int, kv: list[int]) -> None:
        """Keep ``kv`` (the cells of ``seq``) under a cache id, deduplicating prefixes."""
        for cid, toks in list(self._cache.items()):
            if self._lora_of(cid) != self._lora_of(seq):  # other adapters' cells (ADR 0026)
                continue
            if len(toks) >= len(kv) and toks[: len(kv)] == kv:
                self._cache.move_to_end(cid)  # already covered by a longer entry
                return
            if len(toks) < len(kv) and kv[: len(toks)] == toks:
                self._evict(cid)  # superseded by the longer one
        if not self._free_cache_ids:
            self._evict(next(iter(self._cache)))
        cid = self._free_cache_ids.pop()
        self.ctx.seq_rm(cid, -1, -1)
        self.ctx.seq_cp(seq, cid, 0, len(kv))
        self._cache[cid] = list(kv)
        if self.lora_groups is not None:
            self.lora_groups.copied(seq, cid)
        self.stats["remembered"] += 1

    def _send(self, out: Deliveries) -> None:
        """Hand ``out`` to its event loops: at once to the loop an inline step runs on
        (ADR 0034), through ``call_soon_threadsafe`` to any other."""
        here = self._stepping
        handled = self._handled if self.lockstep and here is None else None
        for loop, items in out.items():
            if loop is here:
                _deliver(items, None)
                continue
            if handled is not None:
                with self._cond:
                    self._unhandled += 1
            if not self._post(loop, items, handled) and handled is not None:
                with self._cond:
                    self._unhandled -= 1

    def _post(
        self,
        loop: asyncio.AbstractEventLoop,
        items: list[tuple[SeqStream, tuple[Any, ...]]],
        then: Callable[[], None] | None,
    ) -> bool:
        """``_deliver`` on ``loop`` from another thread; False when that loop is closed
        (its consumers are gone: their streams are cancelled)."""
        try:
            loop.call_soon_threadsafe(_deliver, items, then)
            return True
        except RuntimeError:
            with self._cond:
                for s, _ in items:
                    if not s.done and not s.cancelled:
                        s.cancelled = True
                        self._cancels.append(s)
            return False

    # ------------------------------------------------------------------ inline steps

    def _loop_to_lend(self) -> asyncio.AbstractEventLoop | None:  # with self._cond held
        """The one event loop every running and waiting sequence is read on, when the
        steps may run on it (ADR 0034: lock-step with ``inline``), else None."""
        if not self.inline or self._closing:
            return None
        loop = None
        for s in itertools.chain(self._active, self._pending):
            if loop is None:
                loop = s.loop
            elif s.loop is not loop:
                return None
        # a stopped or closed loop would never run a step: the thread keeps them
        return loop if loop is not None and loop.is_running() else None

    def _lend(self, loop: asyncio.AbstractEventLoop) -> None:
        """(scheduler thread) let ``loop`` run the steps until it gives them back."""
        self._lent = loop
        try:
            loop.call_soon_threadsafe(self._inline_step)
        except RuntimeError:  # closed since: the next round runs on this thread
            self._lent = None
            return
        self._wait_lent()

    def _inline_step(self) -> None:
        """(event loop) one round of the work on this loop, then the next after the
        consumers it woke have had their turn; the steps go back to the scheduler
        thread when there is no work or another loop's sequence comes (ADR 0034)."""
        loop = asyncio.get_running_loop()
        if self._lent is not loop:
            return  # taken back (closing, or the loop had stopped)
        with self._ctx_lock:
            if self._lent is not loop:
                return
            try:
                stepped = self._inline_round(loop)
            except BaseException as e:  # a bug: the thread fails every stream with it
                log.exception("llama scheduler failed in an inline step")
                self._inline_error = e
                stepped = False
            if not stepped:
                self._lent = None
        if stepped:
            loop.call_soon(self._inline_step)
        else:
            self._wake()

    def _inline_round(self, loop: asyncio.AbstractEventLoop) -> bool:  # _ctx_lock held
        """:meth:`_iteration` on ``loop``; False when it is no longer this loop's turn
        or there was nothing to do (the thread then waits for work as usual)."""
        with self._cond:
            if self._loop_to_lend() is not loop or not self._has_work():
                return False
            cancels, self._cancels = self._cancels, []
        self._stepping = loop
        try:
            self._iteration(cancels)
        finally:
            self._stepping = None
        if len(self._batch) > 0:
            self.stats["inline_steps"] += 1
        return self._lent is loop and (len(self._batch) > 0 or bool(cancels))

    def _wait_lent(self) -> None:
        """(scheduler thread) wait while the steps are lent; take them back when closing,
        when the borrowing loop has stopped (it would never give them back) or when
        another loop's sequence arrives (it must not wait for that loop's next turn)."""
        with self._cond:
            while True:
                lent = self._lent
                if lent is None or self._loop_to_lend() is not lent:
                    break
                self._cond.wait(_LENT_POLL_S)
        if self._lent is not None:
            with self._ctx_lock:
                self._lent = None
        err, self._inline_error = self._inline_error, None
        if err is not None:
            raise err

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            self._closing = True
            streams = list(self._active) + [x for p in self._pending for x in (p, *p.followers)]
        out: Deliveries = {}
        for s in streams:
            out.setdefault(s.loop, []).append((s, ("error", err)))
        self._send(out)

    def _shutdown(self) -> None:
        """(thread exit) end every open stream and free what they held."""
        with self._cond:
            self._closing = True
            streams = list(self._active) + [x for p in self._pending for x in (p, *p.followers)]
            self._pending.clear()
        out: Deliveries = {}
        for s in streams:
            out.setdefault(s.loop, []).append((s, ("end",)))
        with self._ctx_lock:
            for s in streams:
                if s.seq >= 0 and not s.done:
                    try:
                        self._finish(s, cache=False, out=out)
                    except Exception:  # the context may be gone already
                        s.done = True
                else:
                    s.done = True
                    out.setdefault(s.loop, []).append((s, ("freed",)))
            try:
                self._drop_cached()
            except Exception:
                pass
        with self._cond:
            self._active.clear()
            self.idle.set()
        self._send(out)
