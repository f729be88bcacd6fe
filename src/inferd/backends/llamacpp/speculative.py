"""Speculative decoding under continuous batching (docs/adr/0027-speculative-decoding-batched.md).

A *drafter* proposes up to ``n_draft`` tokens that may follow a stream; the scheduler
puts ``[last, d1, ..., dk]`` in the same target decode as every other stream's tokens
(logits at every position), then :meth:`Speculator.verify` samples the stream's own chain
at each position in turn and keeps a draft token only when the chain picks that very
token (llama.cpp's rule in ``common/speculative.*`` and ``server``: the target samples
every position itself, so the output has the target's distribution, and greedy output is
the non-speculative output where one and several rows round alike: one thread, flash
attention on; ADR 0027, "Exactness"). The first mismatch ends the run: the chain's pick
there is the bonus token, and the cells of the rejected drafts are removed (``seq_rm``).

Two drafters:

* :class:`NgramDraft` (``draft="ngram"``): prompt lookup over the stream's own prompt
  and output, no second model: the latest earlier occurrence of the last ``n`` tokens
  proposes what followed it (llama.cpp's ``ngram-simple``), and a run whose drafts are
  being taken goes on copying from where it was. A per-stream index keeps the
  lookup O(new tokens) per step, and the draft width follows what drafts earn (doubled
  on full acceptance, cut to the accepted run plus one, halved on a first-token miss,
  and a rest of up to :data:`MAX_NGRAM_REST` steps without drafts after width-1
  misses), so text that does not repeat costs little.
* :class:`DraftModel`: a smaller GGUF with the target's vocabulary in its own context,
  one sequence per slot, *batched across streams*: one draft decode per drafted
  position for all speculating streams together (llama-server runs one draft context
  per slot). Greedy drafting; a token whose draft probability is below ``p_min`` ends
  that stream's draft.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from inferd.errors import InvalidRequest, ModelLoadError
from inferd.limits import echo

#: Most tokens drafted per stream and step (llama-server's ``--spec-draft-n-max`` caps it
#: the same way); larger drafts mostly widen the verifying batch for nothing.
MAX_N_DRAFT = 64
#: Defaults of the n-gram drafter: lookup n-gram length and tokens drafted.
DEFAULT_NGRAM_N = 3
DEFAULT_NGRAM_DRAFT = 16
#: Defaults of the draft model: tokens drafted and the least draft probability kept.
DEFAULT_MODEL_DRAFT = 8
DEFAULT_P_MIN = 0.5
#: Longest lookup n-gram.
MAX_NGRAM_N = 16
#: Most steps an n-gram stream rests from drafting after width-1 drafts keep missing.
MAX_NGRAM_REST = 16


def _int_in(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"draft {name}={echo(value)} must be an integer in {lo}..{hi}")
    return value


@dataclass(frozen=True)
class NgramDraft:
    """Prompt-lookup drafting: ``n`` tokens of lookup, up to ``n_draft`` drafted."""

    n: int = DEFAULT_NGRAM_N
    n_draft: int = DEFAULT_NGRAM_DRAFT

    def __post_init__(self) -> None:
        _int_in("n", self.n, 1, MAX_NGRAM_N)
        _int_in("n_draft", self.n_draft, 1, MAX_N_DRAFT)


@dataclass(frozen=True)
class DraftModel:
    """A draft GGUF (same vocabulary as the target), up to ``n_draft`` tokens per step,
    a drafted token kept while its draft probability is at least ``p_min``."""

    path: str | os.PathLike[str]
    n_draft: int = DEFAULT_MODEL_DRAFT
    p_min: float = DEFAULT_P_MIN
    n_gpu_layers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise InvalidRequest(f"draft model path {echo(self.path)} must be a path")
        _int_in("n_draft", self.n_draft, 1, MAX_N_DRAFT)
        p = self.p_min
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise InvalidRequest(f"draft p_min={echo(p)} must be a number in 0..1")
        _int_in("n_gpu_layers", self.n_gpu_layers, -1, 1 << 16)


def parse_draft(value: Any) -> NgramDraft | DraftModel | None:
    """The typed ``draft`` setting: None, ``"ngram"``, an :class:`NgramDraft`, a
    :class:`DraftModel`, or a mapping (TOML) with ``type = "ngram"`` or ``path``."""
    if value is None or isinstance(value, (NgramDraft, DraftModel)):
        return value
    if value == "ngram":
        return NgramDraft()
    if isinstance(value, dict):
        d = dict(value)
        kind = d.pop("type", "model" if "path" in d else None)
        try:
            if kind == "ngram":
                return NgramDraft(**d)
            if kind == "model":
                return DraftModel(**d)
        except TypeError as e:
            raise InvalidRequest(f"draft: {e}") from None
    raise InvalidRequest(
        f"draft={echo(value)} is not a drafter; use 'ngram', NgramDraft(...), "
        "DraftModel(path, n_draft=..., p_min=...) or a table with type='ngram' or a path"
    )


# --------------------------------------------------------------------------- n-gram


class _NgramState:
    """One stream's n-gram index (key n-gram -> position after its latest occurrence),
    the copy run its last draft came from, and its drafting policy: the draft width, and
    how many steps to rest after drafts that keep missing (:meth:`NgramDrafter.feedback`)."""

    __slots__ = ("at", "backoff", "done", "index", "rest", "src", "width")

    def __init__(self, width: int) -> None:
        self.index: dict[tuple[int, ...], int] = {}
        self.done = 0
        self.width = width
        self.rest = 0  # steps left without drafting
        self.backoff = 0  # the next rest after another first-token miss at width 1
        self.src = -1  # where the last draft was copied from (-1: none)
        self.at = 0  # the history's length when it was

    def draft(self, hist: list[int], n: int, limit: int) -> list[int]:
        index = self.index
        if self.done > len(hist):  # the slot was reused for another history
            index.clear()
            self.done = 0
            self.src = -1
        for end in range(max(self.done, n), len(hist)):
            index[tuple(hist[end - n : end])] = end
        self.done = max(self.done, len(hist))
        if self.rest > 0:
            self.rest -= 1
            return []
        pos = self._follow(hist)
        if pos is None and len(hist) >= n:
            pos = index.get(tuple(hist[-n:]))
        if pos is None:
            self.src = -1
            return []
        self.src, self.at = pos, len(hist)
        return hist[pos : pos + min(limit, self.width)]

    def _follow(self, hist: list[int]) -> int | None:
        """Where the copy run goes on, when every token since the last draft is what its
        source holds (ADR 0027). Code repeats short n-grams (indentation and a keyword)
        line after line, and the latest occurrence of one is then often a line already
        rewritten, not the one being copied; the run's own source is the better guess."""
        src, at = self.src, self.at
        new = len(hist) - at
        if src < 0 or new <= 0 or src + new >= len(hist):
            return None
        if hist[src : src + new] != hist[at:]:
            return None
        return src + new


class NgramDrafter:
    """Prompt lookup for every speculating stream (state per stream)."""

    def __init__(self, cfg: NgramDraft) -> None:
        self.cfg = cfg
        self.n_draft = cfg.n_draft

    def propose(self, items: list[tuple[Any, list[int], int]]) -> list[list[int]]:
        out = []
        for s, hist, limit in items:
            st = s.spec_state
            if st is None:
                st = s.spec_state = _NgramState(self.cfg.n_draft)
            out.append(st.draft(hist, self.cfg.n, limit))
        return out

    def feedback(self, s: Any, drafted: int, accepted: int) -> None:
        """Adapt the stream's drafting to what its drafts earn (ADR 0027). On a CPU every
        verified row costs about a third of a decode, so a draft longer than what gets
        taken is paid for nothing: double the width when every token was taken, cut it
        to the accepted run plus one when part was, halve it on a first-token miss, and
        once a width-1 draft misses, rest (no drafts) for 1, 2, 4, ... up to
        :data:`MAX_NGRAM_REST` steps; any accepted token ends the resting."""
        st = s.spec_state
        if st is None or drafted == 0:
            return
        if accepted == drafted:
            st.width = min(self.cfg.n_draft, st.width * 2)
        elif accepted > 0:
            st.width = max(1, min(st.width, accepted + 1))
        elif st.width > 1:
            st.width = max(1, st.width // 2)
        else:
            st.backoff = min(MAX_NGRAM_REST, max(1, st.backoff * 2))
            st.rest = st.backoff
            return
        st.backoff = 0

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- draft model


def check_vocab(target: Any, draft: Any, target_name: str, draft_name: str) -> None:
    """ModelLoadError naming both models when their vocabularies differ (size, BOS/EOS,
    or any token's text: a draft token id must mean the same token to the target)."""
    why = None
    if int(target.n_vocab) != int(draft.n_vocab):
        why = f"{target.n_vocab} vs {draft.n_vocab} tokens"
    elif (target.bos, target.eos) != (draft.bos, draft.eos):
        why = "different BOS/EOS tokens"
    else:
        for t in range(int(target.n_vocab)):
            if target.token_text(t) != draft.token_text(t):
                why = f"token {t} differs"
                break
    if why is not None:
        raise ModelLoadError(
            f"draft model {draft_name!r} does not share the vocabulary of target model "
            f"{target_name!r} ({why}); a draft must use the target's tokenizer"
        )


class ModelDrafter:
    """A draft model's context, one sequence per slot, drafting for all streams in one
    decode per drafted position (greedy, stops below ``p_min``)."""

    def __init__(
        self, L: Any, cfg: DraftModel, target: Any, n_ctx: int, parallel: int, n_threads: int | None
    ) -> None:
        self.L = L
        self.cfg = cfg
        self.n_draft = cfg.n_draft
        self.model = L.Model(str(cfg.path), n_gpu_layers=cfg.n_gpu_layers)
        self.ctx: Any = None
        try:
            check_vocab(target, self.model, target.name, str(cfg.path))
            extra = parallel * (cfg.n_draft + 1)
            kw = {"n_threads": n_threads} if n_threads else {}
            self.ctx = L.Context(
                self.model,
                n_ctx=n_ctx + extra,
                n_batch=512,
                n_seq_max=parallel,
                kv_unified=True,
                **kw,
            )
        except BaseException:
            self.close()
            raise
        self.batch = L.Batch(max(512, parallel * 2), 1)
        self.cap = max(512, parallel * 2)
        self.kv: dict[int, list[int]] = {}  # seq -> tokens whose draft cells it holds
        from inferd._fast._llama import token_logprobs

        self._top = token_logprobs

    def propose(self, items: list[tuple[Any, list[int], int]]) -> list[list[int]]:
        try:
            return self._propose(items)
        except Exception:  # a failed draft costs speculation, never the stream
            self.ctx.seq_rm(-1, -1, -1)
            self.kv.clear()
            return [[] for _ in items]

    def _propose(self, items: list[tuple[Any, list[int], int]]) -> list[list[int]]:
        from inferd.backends.llamacpp.scheduler import common_prefix

        feeds = []
        for s, hist, _ in items:
            have = self.kv.get(s.seq, [])
            lcp = min(common_prefix(have, hist), len(hist) - 1)
            if lcp < len(have):
                self.ctx.seq_rm(s.seq, lcp, -1)
            self.kv[s.seq] = list(hist[:lcp])
            feeds.append(hist[lcp:])
        self._prefill(items, feeds)
        drafts: list[list[int]] = [[] for _ in items]
        live = list(range(len(items)))
        batch = self.batch
        batch.clear()
        idx = [
            batch.add(f[-1], len(self.kv[items[k][0].seq]), items[k][0].seq, True)
            for k, f in enumerate(feeds)
        ]
        for k, f in enumerate(feeds):
            self.kv[items[k][0].seq].append(f[-1])
        while live:
            self.ctx.decode(batch)
            tops = self._top(self.ctx, idx, [0] * len(idx), 1)
            batch.clear()
            nxt, idx = [], []
            for k, (_, top) in zip(live, tops, strict=True):
                tok, lp = top[0]
                if math.exp(lp) < self.cfg.p_min:
                    continue
                drafts[k].append(tok)
                if len(drafts[k]) >= items[k][2]:
                    continue
                seq = items[k][0].seq
                idx.append(batch.add(tok, len(self.kv[seq]), seq, True))
                self.kv[seq].append(tok)
                nxt.append(k)
            live = nxt
        return drafts

    def _prefill(self, items: list[tuple[Any, list[int], int]], feeds: list[list[int]]) -> None:
        """Decode every feed but its last token (no logits), in batches of ``cap``."""
        batch = self.batch
        batch.clear()
        for (s, _, _), f in zip(items, feeds, strict=True):
            kv = self.kv[s.seq]
            for t in f[:-1]:
                if len(batch) >= self.cap:
                    self.ctx.decode(batch)
                    batch.clear()
                batch.add(t, len(kv), s.seq, False)
                kv.append(t)
        if len(batch):
            self.ctx.decode(batch)

    def feedback(self, s: Any, drafted: int, accepted: int) -> None:
        pass

    def close(self) -> None:
        for obj in (self.ctx, self.model):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self.ctx = self.model = None


# --------------------------------------------------------------------------- scheduler side


class Speculator:
    """The scheduler's hooks: :meth:`propose` extends this step's feeds with drafts,
    :meth:`verify` samples them after the decode and trims rejected cells."""

    def __init__(self, drafter: NgramDrafter | ModelDrafter) -> None:
        self.drafter = drafter

    def propose(self, sched: Any, fed: list[tuple[Any, list[int]]], budget: int) -> int:
        """Append drafts to the one-token feeds of speculating streams, within the
        ``budget`` prompt chunks left in this step (a prompt is never cut shorter for a
        draft, so chunking stays what it is without speculation); returns the draft
        tokens added."""
        items, feeds = [], []
        for s, toks in fed:
            if not s.speculative or len(toks) != 1 or s.n_past < len(s.prompt):
                continue
            limit = min(
                self.drafter.n_draft,
                s.max_tokens - s.produced - 1,  # the bonus token needs no cell
                sched.n_ctx_seq - len(s.kv) - 2,
            )
            if limit > 0:
                items.append((s, s.kv + toks, limit))
                feeds.append(toks)
        if not items or budget <= 0:
            return 0
        used = 0
        for (s, _, _), toks, d in zip(items, feeds, self.drafter.propose(items), strict=True):
            d = d[: max(0, budget - used)]
            s.drafted = len(d)
            toks.extend(d)
            used += len(d)
        return used

    def verify(self, sched: Any, s: Any, toks: list[int], idxs: list[int]) -> list[int]:
        """(after the decode and ``s.kv.extend(toks)``) the tokens ``s`` produced this
        step: its chain's pick at each position while it equals the draft, then the
        pick at the first mismatch (or after the last draft). Rejected cells go."""
        k = len(toks) - 1
        out = []
        for j, i in enumerate(idxs):
            tok = s.sampler.sample(sched.ctx, i)
            out.append(tok)
            if j >= k or tok != toks[j + 1]:
                break
        accepted = len(out) - 1
        if accepted < k:
            del s.kv[len(s.kv) - (k - accepted) :]
            sched.ctx.seq_rm(s.seq, len(s.kv) + s.shift, -1)
        s.drafted = 0
        s.spec_drafted += k
        s.spec_accepted += accepted
        st = sched.stats
        st["spec_steps"] += 1
        st["spec_drafted"] += k
        st["spec_accepted"] += accepted
        self.drafter.feedback(s, k, accepted)
        return out

    def close(self) -> None:
        self.drafter.close()


def make_speculator(
    L: Any, draft: Any, target: Any, *, n_ctx: int, parallel: int, n_threads: int | None
) -> Speculator | None:
    """The backend's :class:`Speculator` for its ``draft`` setting (None: none)."""
    cfg = parse_draft(draft)
    if cfg is None:
        return None
    if isinstance(cfg, NgramDraft):
        return Speculator(NgramDrafter(cfg))
    return Speculator(ModelDrafter(L, cfg, target, n_ctx, parallel, n_threads))


def speculative_stats(stats: Any) -> dict[str, float]:
    """Acceptance rate and tokens per target decode from a scheduler's counters."""
    drafted, accepted = stats.get("spec_drafted", 0), stats.get("spec_accepted", 0)
    steps, tokens = stats.get("steps", 0), stats.get("tokens", 0)
    return {
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tokens_per_decode": tokens / steps if steps else 0.0,
    }
