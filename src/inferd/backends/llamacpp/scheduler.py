"""Continuous batching: many ``generate()`` streams on one llama.cpp context.

One scheduler thread owns the context (ADR 0008). Every *step* it builds one batch
holding the next token of every decoding sequence plus prompt chunks of newly admitted
ones, calls ``llama_decode`` once with the GIL released, samples every sequence that
asked for logits with that sequence's own sampler chain (same C call, no GIL), and
hands the tokens to the streams' event loops in one callback per loop.

Why these choices:

* **Unified KV cache** (``kv_unified=True``): all sequences share ``n_ctx`` cells, so a
  shared prefix is the *same* cells (``seq_cp`` only tags them, no copy) and one mixed
  batch decodes as one micro-batch. A split cache copies whole buffers on ``seq_cp`` and
  splits a batch whose sequence ids are not consecutive.
* **Chunked prefill** under a per-step budget (:data:`DEFAULT_STEP_TOKENS`): a long
  prompt is fed a chunk per step next to everyone else's next token, so it delays the
  other streams by one chunk at most, never by its whole length.
* **Backpressure by pausing**: each stream may hold :data:`PIPELINE_DEPTH` undelivered
  tokens; a stream whose consumer is slower is left out of the next batches (its KV
  stays) until it catches up. Memory is bounded and the others keep their pace.
* **Lock-step pacing** when compute threads take every CPU: before the next decode the
  scheduler waits (at most :data:`LOCKSTEP_GRACE_S`) for consumers to take the tokens
  of the previous step, so the event loop does not preempt a ggml thread mid-graph.
* **Admission** is first come, first served: a bounded queue (``max_queued``; beyond it
  ``QueueFull`` at once) and a head that waits until a sequence slot is free and the
  KV cache can hold its worst case (prompt + ``max_tokens``). Nobody overtakes the
  head, so nobody starves.
* **Prefix reuse**: a finished sequence's tokens stay in the cache under a spare
  sequence id (an LRU of ``prefix_cache`` entries, evicted first under pressure). A new
  sequence copies the longest common prefix from any cached or running sequence and
  decodes only the rest; ``Usage.cached_tokens`` reports it.

Cancellation: the stream's flag is seen at the next step, its cells are removed, and
the consumer's ``freed()`` resolves only after that, so nothing outlives its stream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from inferd.errors import InvalidRequest, NotReady, QueueFull

log = logging.getLogger("inferd.llamacpp.scheduler")

#: Undelivered tokens a stream may hold before its sequence is paused (backpressure).
PIPELINE_DEPTH = 8
#: Tokens per decode step (next tokens of running sequences + prompt chunks): bounds how
#: long a newly admitted long prompt can delay the others.
DEFAULT_STEP_TOKENS = 256
#: Requests that may wait for a sequence slot before ``generate()`` raises ``QueueFull``.
DEFAULT_MAX_QUEUED = 64
#: Finished sequences kept in the KV cache for prefix reuse (LRU).
DEFAULT_PREFIX_CACHE = 8
#: Shortest token list worth keeping for prefix reuse.
MIN_CACHED_PREFIX = 4
#: Lock-step pacing: longest wait for consumers to take the previous step's tokens.
LOCKSTEP_GRACE_S = 0.005
#: Idle wake-up period of the scheduler thread (a safety net; work is signalled).
_IDLE_POLL_S = 0.5


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

    The consumer awaits :meth:`get` for items ``("tok", token, is_eog)``, ``("full",)``
    (the sequence reached its context), ``("error", exc)`` or ``("end",)`` (the
    scheduler closed). It calls :meth:`cancel` when it leaves early and then awaits
    :meth:`freed`.
    """

    __slots__ = (
        "_freed",
        "cache_on_cancel",
        "cached_tokens",
        "cancelled",
        "done",
        "ignore_eos",
        "kv",
        "last",
        "loop",
        "max_tokens",
        "n_past",
        "need",
        "produced",
        "prompt",
        "queue",
        "sampler",
        "sched",
        "sent",
        "seq",
        "taken",
    )

    def __init__(self, sched: Scheduler, loop: asyncio.AbstractEventLoop, prompt: list[int],
                 sampler: Any, max_tokens: int, ignore_eos: bool) -> None:
        self.sched = sched
        self.loop = loop
        self.prompt = prompt
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.need = len(prompt) + max_tokens  # worst-case KV cells
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._freed: asyncio.Future[None] = loop.create_future()
        # scheduler-thread state
        self.seq = -1  # sequence id while admitted
        self.n_past = 0  # prompt tokens already in the KV cache
        self.kv: list[int] = []  # tokens whose cells this sequence holds, by position
        self.last = -1  # sampled token not yet decoded
        self.produced = 0
        self.sent = 0  # tokens handed to the loop (written by the scheduler only)
        self.taken = 0  # tokens taken by the consumer (written by the consumer only)
        self.done = False  # no more tokens will come
        self.cancelled = False
        self.cache_on_cancel = False
        self.cached_tokens = 0

    async def get(self) -> tuple[Any, ...]:
        """The next item from the scheduler (waits; a slow caller pauses the sequence)."""
        item = await self.queue.get()
        if item[0] == "tok":
            self.taken += 1
            inflight = self.sent - self.taken
            if inflight == PIPELINE_DEPTH - 1 or (inflight == 0 and self.sched.lockstep):
                self.sched._wake()
        return item

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


def _deliver(items: list[tuple[SeqStream, tuple[Any, ...]]]) -> None:
    """(event loop) hand a step's items to their streams."""
    for stream, item in items:
        if item[0] == "freed":
            stream._set_freed()
        else:
            stream.queue.put_nowait(item)


class Scheduler:
    """Owns one llama.cpp context and batches every admitted sequence into one decode.

    :param ctx: a ``Context`` created with ``n_seq_max >= parallel + prefix_cache`` and
        ``kv_unified=True``; nobody else may use it while the scheduler runs.
    :param parallel: sequences decoded together (slots ``0..parallel-1``).
    :param n_ctx_seq: most tokens (prompt + reply) one sequence may hold.
    :param step_tokens: tokens per decode step (see :data:`DEFAULT_STEP_TOKENS`).
    :param max_queued: requests that may wait for a slot before ``QueueFull``.
    :param prefix_cache: finished sequences kept for prefix reuse (0 disables).
    :param lockstep: pace decoding by the consumers (see the module docstring).
    """

    def __init__(self, ctx: Any, model: Any, batch_factory: Any, *, parallel: int,
                 n_ctx_seq: int, step_tokens: int = DEFAULT_STEP_TOKENS,
                 max_queued: int = DEFAULT_MAX_QUEUED,
                 prefix_cache: int = DEFAULT_PREFIX_CACHE, lockstep: bool = False,
                 decode_sample: Any = None, name: str = "llamacpp") -> None:
        if parallel < 1:
            raise InvalidRequest(f"parallel={parallel} must be >= 1")
        if max_queued < 0:
            raise InvalidRequest(f"max_queued={max_queued} must be >= 0")
        if prefix_cache < 0:
            raise InvalidRequest(f"prefix_cache={prefix_cache} must be >= 0")
        n_batch = int(ctx.n_batch)
        if step_tokens < 1:
            raise InvalidRequest(f"step_tokens={step_tokens} must be >= 1")
        self.ctx = ctx
        self.model = model
        self.name = name
        self.parallel = parallel
        self.n_ctx = int(ctx.n_ctx)
        self.n_ctx_seq = min(n_ctx_seq, self.n_ctx)
        # every running sequence's next token always fits next to a prompt chunk
        self.step_tokens = max(1, min(step_tokens, n_batch - parallel)) if (
            n_batch > parallel) else 1
        self.batch_capacity = max(n_batch, parallel + 1)
        self._batch = batch_factory(self.batch_capacity, 1)
        if decode_sample is None:
            from inferd._fast._llama import decode_sample
        self._decode_sample = decode_sample
        self.max_queued = max_queued
        self.prefix_cache = prefix_cache
        self.lockstep = lockstep
        self._cond = threading.Condition()
        self._pending: collections.deque[SeqStream] = collections.deque()
        self._active: list[SeqStream] = []  # admission order
        self._free_slots = list(range(parallel - 1, -1, -1))
        self._cancels: list[SeqStream] = []
        # prefix cache: seq id -> token list, least recently used first
        self._cache: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._free_cache_ids = list(range(parallel + prefix_cache - 1, parallel - 1, -1))
        self._reserved = 0  # worst-case cells of admitted sequences
        self._head_fits = True  # False while the queue head waits for KV room
        self._ctx_lock = threading.Lock()  # held during a step; kv queries take it
        self._closing = False
        self.idle = threading.Event()
        self.idle.set()
        self.stats: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="inferd-llama-sched",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event loop side

    def submit(self, prompt: list[int], sampler: Any, *, max_tokens: int,
               ignore_eos: bool = False) -> SeqStream:
        """Queue a sequence (call from the consumer's event loop).

        Raises ``InvalidRequest`` when it can never fit, ``QueueFull`` when the
        admission queue is at ``max_queued``, ``NotReady`` after :meth:`close`.
        """
        n = len(prompt)
        self.check_prompt(n)
        max_tokens = max(1, min(max_tokens, self.n_ctx_seq - n))
        loop = asyncio.get_running_loop()
        stream = SeqStream(self, loop, list(prompt), sampler, max_tokens, ignore_eos)
        with self._cond:
            if self._closing:
                raise NotReady(f"backend {self.name!r} is closed")
            if len(self._pending) >= self.max_queued and (
                    not self._free_slots or self._pending):
                self.stats["queue_full"] += 1
                raise QueueFull(
                    f"backend {self.name!r}: {len(self._pending)} requests already wait "
                    f"for one of {self.parallel} sequence slots (max_queued="
                    f"{self.max_queued}); retry later")
            self._pending.append(stream)
            self.idle.clear()
            self._cond.notify()
        return stream

    def check_prompt(self, n: int) -> None:
        """``InvalidRequest`` naming the limits when ``n`` prompt tokens never fit."""
        if n == 0:
            raise InvalidRequest("the prompt is empty after tokenization")
        if n >= self.n_ctx_seq:
            raise InvalidRequest(
                f"the prompt is {n} tokens, but one sequence holds at most "
                f"{self.n_ctx_seq} tokens of prompt and reply (n_ctx={self.n_ctx} shared "
                f"by parallel={self.parallel}); shorten the conversation or create "
                "LlamaCpp with a larger n_ctx (or n_ctx_seq)")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _cancel(self, stream: SeqStream) -> None:
        with self._cond:
            if stream.seq < 0:
                try:
                    self._pending.remove(stream)
                except ValueError:
                    pass
                else:  # never admitted: nothing to free in the context
                    stream.done = True
                    stream._set_freed()
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
        """``(pos_min, pos_max)`` of every sequence id (slots, then cache ids)."""
        from inferd._fast import _llama

        with self._ctx_lock:
            if self.ctx.closed:
                return []
            return _llama.seq_cells(self.ctx, self.parallel + self.prefix_cache)

    def kv_used(self) -> int:
        """KV cells held by running sequences (0 when every stream has ended)."""
        cells = self.kv_cells()[: self.parallel]
        return sum(hi - lo + 1 for lo, hi in cells if hi >= 0)

    def kv_cached(self) -> int:
        """Tokens kept for prefix reuse (their cells may be shared with running ones)."""
        with self._ctx_lock:
            return sum(len(t) for t in self._cache.values())

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (their KV cells are freed now)."""
        with self._ctx_lock:
            for cid in list(self._cache):
                self._evict(cid)

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
        if s.n_past < len(s.prompt):
            return True
        return s.sent - s.taken < PIPELINE_DEPTH

    def _has_work(self) -> bool:  # with self._cond held
        if self._cancels:
            return True
        if self._pending and self._free_slots and self._head_fits:
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
                    if self.lockstep and self._active:
                        self._await_consumers()
                    cancels, self._cancels = self._cancels, []
                with self._ctx_lock:
                    for s in cancels:
                        if s in self._active:
                            self._finish(s, cache=s.cache_on_cancel)
                    self._admit()
                    self._step()
                with self._cond:
                    self._update_idle()
        except BaseException as e:  # a bug: fail every stream rather than hang them
            log.exception("llama scheduler failed")
            self._fail_all(e)
        finally:
            self._shutdown()

    def _await_consumers(self) -> None:  # with self._cond held
        deadline = time.monotonic() + LOCKSTEP_GRACE_S
        while not self._closing and not self._cancels:
            if all(s.sent == s.taken or s.cancelled for s in self._active):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self.stats["lockstep_timeouts"] += 1
                return
            self._cond.wait(left)

    def _admit(self) -> None:
        """Move queue heads into free slots while the KV cache can hold them (FCFS)."""
        while True:
            with self._cond:
                if not self._pending or not self._free_slots:
                    return
                s = self._pending[0]
                src, lcp = self._best_prefix(s.prompt)
                if not self._make_room(s.need, keep=src):
                    if lcp and src in self._cache:  # the kept source must go too
                        src, lcp = -1, 0
                        fits = self._make_room(s.need, keep=-1)
                    else:
                        fits = False
                    if not fits:  # context pressure: wait for a sequence to end
                        self._head_fits = False
                        self.stats["waited_for_kv"] += 1
                        return
                self._pending.popleft()
                seq = self._free_slots.pop()
                s.seq = seq
                self._active.append(s)
                self._reserved += s.need
            if lcp > 0:
                self.ctx.seq_rm(seq, -1, -1)
                self.ctx.seq_cp(src, seq, 0, lcp)
                s.n_past = lcp
                s.kv = s.prompt[:lcp]
                s.cached_tokens = lcp
                self.stats["cached_tokens"] += lcp
                if src in self._cache:
                    self._cache.move_to_end(src)
            self.stats["admitted"] += 1

    def _best_prefix(self, prompt: list[int]) -> tuple[int, int]:
        """(sequence id, length) of the longest reusable prefix of ``prompt``."""
        best, src = 0, -1
        cap = len(prompt) - 1  # the last prompt token is decoded to get logits
        for cid, toks in self._cache.items():
            n = common_prefix(prompt, toks)
            if n > best:
                best, src = n, cid
        for a in self._active:
            if a.kv and not a.cancelled:
                n = common_prefix(prompt, a.kv)
                if n > best:
                    best, src = n, a.seq
        best = min(best, cap)
        return (src, best) if best >= MIN_CACHED_PREFIX else (-1, 0)

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

    def _step(self) -> None:
        """Build one batch, decode it, sample, deliver."""
        batch = self._batch
        batch.clear()
        samplers: list[Any] = []
        idxs: list[int] = []
        owners: list[SeqStream] = []
        fed: list[tuple[SeqStream, list[int]]] = []
        # 1. the next token of every decoding sequence whose consumer keeps up
        for s in self._active:
            if s.cancelled or s.n_past < len(s.prompt):
                continue
            if s.sent - s.taken >= PIPELINE_DEPTH:
                self.stats["paused"] += 1
                continue
            pos = len(s.kv)
            idxs.append(batch.add(s.last, pos, s.seq, True))
            samplers.append(s.sampler)
            owners.append(s)
            fed.append((s, [s.last]))
        # 2. prompt chunks, oldest admission first, within the step budget
        room = max(self.step_tokens - len(owners), 1)
        room = min(room, self.batch_capacity - len(owners))
        for s in self._active:
            if room <= 0:
                break
            if s.cancelled or s.n_past >= len(s.prompt):
                continue
            chunk = s.prompt[s.n_past:s.n_past + room]
            last_chunk = s.n_past + len(chunk) >= len(s.prompt)
            i = batch.add_sequence(chunk, s.n_past, s.seq, last_chunk)
            room -= len(chunk)
            fed.append((s, chunk))
            if last_chunk:
                idxs.append(i)
                samplers.append(s.sampler)
                owners.append(s)
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
        for s, chunk in fed:
            s.kv.extend(chunk)
            if s.n_past < len(s.prompt):
                s.n_past += len(chunk)
        out: dict[asyncio.AbstractEventLoop, list[tuple[SeqStream, tuple[Any, ...]]]] = {}
        finished: list[SeqStream] = []
        is_eog = self.model.is_eog
        for s, tok in zip(owners, toks, strict=True):
            eog = bool(is_eog(tok))
            s.last = tok
            s.produced += 1
            s.sent += 1
            out.setdefault(s.loop, []).append((s, ("tok", tok, eog)))
            if (eog and not s.ignore_eos) or s.produced >= s.max_tokens:
                finished.append(s)
            elif len(s.kv) >= self.n_ctx_seq:
                out[s.loop].append((s, ("full",)))
                finished.append(s)
        self.stats["tokens"] += len(owners)
        for s in finished:
            self._finish(s, cache=True, out=out)
        self._send(out)

    def _decode_failed(self, err: Exception, streams: list[SeqStream]) -> None:
        """A failed decode leaves the cache as libllama says; fail that batch's streams."""
        log.warning("llama_decode failed for %d sequences: %s", len(streams), err)
        out: dict[asyncio.AbstractEventLoop, list[tuple[SeqStream, tuple[Any, ...]]]] = {}
        for s in dict.fromkeys(streams):
            out.setdefault(s.loop, []).append((s, ("error", err)))
            self._finish(s, cache=False, out=out)
        for cid in list(self._cache):
            self._evict(cid)
        self._send(out)

    def _finish(self, s: SeqStream, *, cache: bool,
                out: dict[asyncio.AbstractEventLoop, list[tuple[SeqStream, tuple[Any, ...]]]]
                | None = None) -> None:
        """Free ``s``'s slot (keeping its tokens as a cached prefix when asked)."""
        if s.done:
            return
        s.done = True
        seq = s.seq
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

    def _remember(self, seq: int, kv: list[int]) -> None:
        """Keep ``kv`` (the cells of ``seq``) under a cache id, deduplicating prefixes."""
        for cid, toks in list(self._cache.items()):
            if len(toks) >= len(kv) and toks[:len(kv)] == kv:
                self._cache.move_to_end(cid)  # already covered by a longer entry
                return
            if len(toks) < len(kv) and kv[:len(toks)] == toks:
                self._evict(cid)  # superseded by the longer one
        if not self._free_cache_ids:
            self._evict(next(iter(self._cache)))
        cid = self._free_cache_ids.pop()
        self.ctx.seq_rm(cid, -1, -1)
        self.ctx.seq_cp(seq, cid, 0, len(kv))
        self._cache[cid] = list(kv)
        self.stats["remembered"] += 1

    def _send(self, out: dict[asyncio.AbstractEventLoop,
                              list[tuple[SeqStream, tuple[Any, ...]]]]) -> None:
        for loop, items in out.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its consumers are gone
                with self._cond:
                    for s, _ in items:
                        if not s.done and not s.cancelled:
                            s.cancelled = True
                            self._cancels.append(s)

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            self._closing = True
            streams = list(self._active) + list(self._pending)
        out: dict[asyncio.AbstractEventLoop, list[tuple[SeqStream, tuple[Any, ...]]]] = {}
        for s in streams:
            out.setdefault(s.loop, []).append((s, ("error", err)))
        self._send(out)

    def _shutdown(self) -> None:
        """(thread exit) end every open stream and free what they held."""
        with self._cond:
            self._closing = True
            streams = list(self._active) + list(self._pending)
            self._pending.clear()
        out: dict[asyncio.AbstractEventLoop, list[tuple[SeqStream, tuple[Any, ...]]]] = {}
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
                for cid in list(self._cache):
                    self._evict(cid)
            except Exception:
                pass
        with self._cond:
            self._active.clear()
            self.idle.set()
        self._send(out)
