"""Images and audio in a llama.cpp prompt: libmtmd's chunks inside the scheduler's token lists.

(docs/adr/0028-media-through-libmtmd.md) A request's media blocks become libmtmd's
media marker in the rendered chat prompt; ``Mtmd.tokenize`` splits the prompt there into
text runs and media chunks. The scheduler keeps one flat token list per sequence, so a
media chunk of ``n`` KV cells stands in it as ``n`` copies of a *placeholder*: a
negative id derived from the media's SHA-256 (mtmd's bitmap id). That gives media
everything token lists already have, unchanged:

* usage and the KV reservation count the media's cells (``len(prompt)``);
* prefix reuse compares lists, so the same image after the same text matches the cached
  cells and a different image (another hash) stops the match where it starts, as
  llama-server keys its cache by the image hash;
* choices copy the leader's cells, media included.

Placeholders never reach a ``Batch``: :meth:`MediaPrompt.text_run` cuts each prompt
chunk before the next media span, and :func:`step` (the scheduler's hook, once per step
in its thread) encodes a media chunk once and decodes its embeddings a piece of
``step_tokens`` per step, GIL released, so a stream that is decoding waits for one
encode or one piece per step, as for a text prompt chunk.

M-RoPE models (the Qwen2-VL family): an image of ``n`` cells advances the position by
``n_pos`` (the larger side of its token grid), fewer than ``n``, and its cells share one
temporal position with 2-D offsets. So a sequence's next position is
``len(kv) + shift``, where ``shift`` (``SeqStream.shift``, 0 without M-RoPE) sums
``n_pos - n`` over the media spans already decoded. The positions of a prompt's prefix
depend only on that prefix (the same media hash is the same image, so the same grid),
so a reused prefix gets its shift from the new request's own :class:`MediaPrompt`
(:meth:`MediaPrompt.prefix_cut`), never from the cache.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inferd.backends.llamacpp.media_cache import MediaCache, chunk_keys
from inferd.errors import InvalidRequest, ModelLoadError
from inferd.media_limits import (
    MediaLimits,
    check_audio,
    check_audio_seconds,
    check_image,
)
from inferd.types import AudioBlock, ImageBlock, Message, Request, TextBlock

log = logging.getLogger("inferd.llamacpp.media")

#: Placeholder ids are below this (never a vocabulary id): ``-(1 + 60 bits of the hash)``.
_PLACEHOLDER_BITS = 60


def placeholder(media_id: str | None, k: int) -> int:
    """The negative id standing for every cell of one media chunk (``k``: its index,
    used only when mtmd gave no hash)."""
    if media_id:
        try:
            return -1 - int(media_id[: _PLACEHOLDER_BITS // 4], 16)
        except ValueError:
            pass
    return -(1 << _PLACEHOLDER_BITS) - 1 - k


class MediaTokens(list):  # type: ignore[type-arg]
    """Prompt tokens (placeholders for media cells) that carry their :class:`MediaPrompt`
    to the scheduler through code that only passes token lists along."""

    def __init__(self, tokens: list[int], media: MediaPrompt) -> None:
        super().__init__(tokens)
        self.media = media


def resolve_mmproj(value: str) -> Path:
    """A projector file: a path as it is, or the projector a store entry keeps beside its
    model (``inferd pull`` of a Hugging Face repo with an mmproj)."""
    p = Path(value).expanduser()
    if p.exists():
        return p
    from inferd import models
    from inferd.catalog import Entry

    record = models._read_index(models.store_dir()).get(value)
    if record is not None:
        found = Entry(value, record, models.store_dir()).mmproj_path
        if found is not None and found.exists():
            return found
        raise ModelLoadError(f"model {value!r} in the store has no projector (mmproj)")
    raise ModelLoadError(f"projector {value!r} is neither a file nor a model in the store")


def open_projector(L: Any, model: Any, opts: Any) -> Any:
    """The projector of ``opts.mmproj`` over ``model``: on the GPU when the model's layers
    are, with the model's threads (``LlamaCppOptions``)."""
    use_gpu = opts.n_gpu_layers != 0 and bool(L.supports_gpu_offload())
    threads = opts.n_threads or max(1, len(os.sched_getaffinity(0)))
    return load_projector(
        L, model, str(resolve_mmproj(opts.mmproj)), use_gpu=use_gpu, n_threads=threads
    )


def load_projector(L: Any, model: Any, path: str, *, use_gpu: bool, n_threads: int) -> Any:
    """The :class:`Mtmd` over ``model``; ``ModelLoadError`` when libmtmd refuses the file
    (not a projector, or one whose width does not match the model). M-RoPE projectors
    (Qwen2-VL family) are scheduled with position shifts (ADR 0028)."""
    from inferd.backends.llamacpp.loader import prepare

    mf = prepare(path)
    return L.Mtmd(model, str(mf.path), use_gpu=use_gpu, n_threads=n_threads)


@dataclasses.dataclass
class MediaPrompt:
    """One prompt's media: the chunks and where each sits in the flat token list."""

    mtmd: Any
    chunks: Any
    #: start index in the token list -> (chunk index, cells)
    spans: dict[int, tuple[int, int]]
    #: start index -> positions the span advances, where that is not its cells (M-RoPE)
    n_pos: dict[int, int] = dataclasses.field(default_factory=dict)
    #: the projector's encoded media kept across prompts (ADR 0032), or None
    cache: MediaCache | None = None
    #: chunk index -> its media cache key (media_cache.chunk_keys)
    keys: dict[int, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._starts = sorted(self.spans)
        # end index of each span, and the position shift once it is decoded (sorted)
        self._ends: list[int] = []
        self._shifts: list[int] = []
        shift = 0
        for start in self._starts:
            n = self.spans[start][1]
            shift += self.n_pos.get(start, n) - n
            self._ends.append(start + n)
            self._shifts.append(shift)
        #: the span being decoded a piece per step: (start, Embeddings), or None
        self.active: tuple[int, Any] | None = None

    def shift_at(self, i: int) -> int:
        """The position shift of a sequence holding ``prompt[:i]`` (``i`` not inside a
        span): the sum of ``n_pos - cells`` over the spans that end at or before ``i``."""
        k = bisect.bisect_right(self._ends, i)
        return self._shifts[k - 1] if k else 0

    def prefix_cut(self, lcp: int) -> tuple[int, int]:
        """A reusable prefix of ``lcp`` tokens, moved back to the start of the media span
        it would end inside (a span's cells are decoded whole: under M-RoPE they share a
        temporal position, so no position cuts one), and the position of its first
        token after it, where the cached cells are cut."""
        span = self.span_at(lcp)
        if span is not None and span[0] < lcp:
            lcp = span[0]
        return lcp, lcp + self.shift_at(lcp)

    def text_run(self, prompt: Sequence[int], n_past: int, room: int) -> list[int]:
        """The prompt's next text tokens from ``n_past`` (at most ``room``), stopping
        before the next media span; empty when ``n_past`` is at or inside a media span."""
        if self.span_at(n_past) is not None:
            return []
        end = min(n_past + room, len(prompt))
        k = bisect.bisect_right(self._starts, n_past - 1)
        if k < len(self._starts):
            end = min(end, self._starts[k])
        return list(prompt[n_past:end])

    def span_at(self, n_past: int) -> tuple[int, int, int] | None:
        """``(start, chunk index, cells)`` of the span holding position ``n_past``."""
        k = bisect.bisect_right(self._starts, n_past) - 1
        if k < 0:
            return None
        start = self._starts[k]
        idx, n = self.spans[start]
        return (start, idx, n) if n_past < start + n else None


def split_media(request: Request, marker: str) -> tuple[Request, list[tuple[str, bytes, str]]]:
    """``request`` with every media block replaced by ``marker`` text, and the media in
    prompt order as ``(kind, bytes, name)``. Media is allowed in user turns only; text
    that already holds the marker is refused (it would be taken for a media position)."""
    atts = {a.id: a for a in request.attachments}
    media: list[tuple[str, bytes, str]] = []
    messages: list[Message] = []
    for i, m in enumerate(request.messages):
        blocks: list[Any] = []
        for b in m.content:
            if isinstance(b, TextBlock) and marker in b.text:
                raise InvalidRequest(
                    f"messages[{i}] contains the text {marker!r}, libmtmd's media marker; "
                    "remove it from requests that carry images or audio"
                )
            if not isinstance(b, (ImageBlock, AudioBlock)):
                blocks.append(b)
                continue
            kind = "image" if isinstance(b, ImageBlock) else "audio"
            name = f"messages[{i}] {kind} {len(media) + 1}"
            if m.role != "user":
                raise InvalidRequest(f"{name}: images and audio go in user messages only")
            media.append((kind, _block_bytes(b, atts, name), name))
            blocks.append(TextBlock(marker))
        messages.append(dataclasses.replace(m, content=tuple(blocks)))
    return dataclasses.replace(request, messages=tuple(messages), attachments=()), media


def _block_bytes(b: ImageBlock | AudioBlock, atts: dict[str, Any], name: str) -> bytes:
    if isinstance(b, ImageBlock) and b.url is not None:
        raise InvalidRequest(
            f"{name} is a URL; this backend takes image bytes (data: URIs or attachments). "
            "The HTTP bridge can fetch URLs when started with allow_image_urls"
        )
    if b.data is not None:
        return b.data
    att = atts.get(b.attachment or "")
    if att is None:
        raise InvalidRequest(f"{name} names an attachment this request does not carry")
    return bytes(att.data)


def has_media(request: Request) -> bool:
    return any(isinstance(b, (ImageBlock, AudioBlock)) for m in request.messages for b in m.content)


def tokenize(
    mtmd: Any,
    model: Any,
    prompt: str,
    media: list[tuple[str, bytes, str]],
    limits: MediaLimits,
    cache: MediaCache | None = None,
) -> tuple[list[int], MediaPrompt]:
    """Decode the media (limits first), split ``prompt`` at its markers, and return the
    flat token list (placeholders for media cells) and the :class:`MediaPrompt`, whose
    encodes go through ``cache`` when one is given (ADR 0032)."""
    bitmaps = [_bitmap(mtmd, kind, data, name, limits) for kind, data, name in media]
    try:
        chunks = mtmd.tokenize(prompt, bitmaps, add_special=False, parse_special=True)
    except ValueError as e:
        raise InvalidRequest(f"the prompt's media could not be placed: {e}") from None
    tokens: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    n_pos: dict[int, int] = {}
    for k in range(len(chunks)):
        if chunks.kind(k) == "text":
            tokens.extend(chunks.tokens(k))
            continue
        n = chunks.n_tokens(k)
        spans[len(tokens)] = (k, n)
        if chunks.n_pos(k) != n:  # M-RoPE: fewer positions than cells
            n_pos[len(tokens)] = chunks.n_pos(k)
        tokens.extend([placeholder(chunks.id(k), k)] * n)
    if model.add_bos and model.bos >= 0 and (not tokens or tokens[0] != model.bos):
        tokens.insert(0, model.bos)
        spans = {p + 1: v for p, v in spans.items()}
        n_pos = {p + 1: v for p, v in n_pos.items()}
    if not tokens or tokens[-1] < 0:
        raise InvalidRequest("the prompt must end with text after its last image or audio")
    keys = chunk_keys(chunks, collections.Counter(bm.id for bm in bitmaps if bm.id))
    return tokens, MediaPrompt(mtmd, chunks, spans, n_pos, cache, keys)


def _bitmap(mtmd: Any, kind: str, data: bytes, name: str, limits: MediaLimits) -> Any:
    if kind == "image":
        if not mtmd.vision:
            raise InvalidRequest(f"{name}: this model's projector takes no images")
        check_image(data, name, limits)
    else:
        if not mtmd.audio:
            raise InvalidRequest(f"{name}: this model's projector takes no audio")
        check_audio(data, name, limits)
    try:
        bm = mtmd.bitmap(data)
    except ValueError as e:
        raise InvalidRequest(f"{name} could not be decoded: {e}") from None
    if bm.is_audio != (kind == "audio"):
        raise InvalidRequest(f"{name} was sent as {kind} but decodes as the other kind")
    if bm.is_audio:
        rate = mtmd.audio_sample_rate or 16000
        check_audio_seconds(bm.n_bytes / 4 / rate, name, limits)
    return bm


def step(sched: Any) -> None:
    """The scheduler's hook (its thread, context lock held): advance the media of one
    prefilling sequence (the oldest admitted that has reached media) by one piece.

    A media chunk is encoded once (GIL released) and its embeddings are decoded a piece
    of at most ``step_tokens`` per step, like a text prompt chunk, so a decoding stream
    waits one encode or one piece per step; a model that attends to media
    bidirectionally (mtmd's non-causal rule) gets its chunk decoded whole, in
    ``n_batch`` pieces, as mtmd's own helper does."""
    for s in sched._active:
        if s.media is not None and getattr(s, "speculative", False):
            # drafts are proposed from the token list, whose media cells are placeholders
            # (never tokens to feed): a media stream decodes without speculation
            s.speculative = False
    for s in sched._active:
        m: MediaPrompt | None = s.media
        if m is None or s.cancelled or s.lead is not None or s.n_past >= len(s.prompt):
            continue
        span = m.span_at(s.n_past)
        if span is None:
            continue
        try:
            _advance(sched, s, m, span)
        except Exception as e:  # the stream gets the error
            m.active = None
            sched._decode_failed(e, [s])
        return


def _advance(sched: Any, s: Any, m: MediaPrompt, span: tuple[int, int, int]) -> None:
    from inferd._fast._llama import decode_embeddings

    start, idx, n = span
    if m.active is None or m.active[0] != start:
        if start < s.n_past:  # the sequence holds part of this span: redo it whole
            s.shift = m.shift_at(start)
            sched.ctx.seq_rm(s.seq, start + s.shift, -1)
            del s.kv[start:]
            s.n_past = start
            s.cached_tokens = min(s.cached_tokens, start)
        m.active = (start, _encode(m, idx))
    emb = m.active[1]
    offset = s.n_past - start
    width = sched.batch_capacity if emb.non_causal else sched.step_tokens
    pieces = range(offset, n, width) if emb.non_causal else (offset,)
    for at in pieces:
        count = min(width, n - at)
        # the span's first position: s.shift moves on only once the span is whole
        decode_embeddings(sched.ctx, emb, at, count, start + s.shift, s.seq)
        s.kv.extend(s.prompt[s.n_past : s.n_past + count])
        s.n_past += count
        sched.stats["media_tokens"] += count
        sched.stats["media_pieces"] += 1
    if s.n_past >= start + n:
        m.active = None
        s.shift = m.shift_at(start + n)  # M-RoPE: the text after it follows its n_pos
        sched.stats["media_chunks"] += 1


def _encode(m: MediaPrompt, idx: int) -> Any:
    """Chunk ``idx`` encoded, through the projector's media cache when there is one."""
    if m.cache is None:
        return m.mtmd.encode(m.chunks, idx)
    return m.cache.encode(m.mtmd, m.chunks, idx, m.keys.get(idx))
