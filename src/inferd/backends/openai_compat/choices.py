"""Reading ``n`` choices and ``logprobs`` back from an OpenAI-compatible stream.

A request with ``n > 1`` or ``logprobs`` is decoded by :class:`ChoicesStreamDecoder`
instead of the compiled fast path (which reads choice 0 only and drops logprobs): the
same SSE scanner and the same per-choice rules (one pure-Python
:class:`~inferd._fast._chunks_py.ChunkAccumulator` per choice index), plus each
choice's ``logprobs.content`` as :class:`~inferd.types.TokenLogprob` on its events.
Requests that ask for neither keep the fast path and pay nothing
(docs/adr/0022-n-choices-and-logprobs.md).

Usage: the upstream reports one total for the reply. Choice 0's ``Done`` carries it;
every other choice's ``Done`` carries the prompt and zero completion tokens, so
:func:`inferd.types.choices_usage` over the ``Done`` events gives the upstream's total.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from inferd._fast._chunks_py import ChatStreamDecoder, ChunkAccumulator
from inferd.errors import BackendUnavailable
from inferd.types import MAX_CHOICES, Done, Event, TokenLogprob, Usage

#: Most ``logprobs.content`` entries one chunk of one choice may carry.
MAX_CHUNK_LOGPROBS = 4096


class _Choices:
    """Per-choice accumulators behind the decoder's ``_acc`` (the attributes it reads)."""

    def __init__(self, n: int, max_call_args: int, max_stream_args: int) -> None:
        self.n = n
        self._limits = (max_call_args, max_stream_args)
        self._accs: dict[int, ChunkAccumulator] = {}
        self._pending: dict[int, list[TokenLogprob]] = {}
        self._finished: set[int] = set()
        self._usage: Usage | None = None

    @property
    def _finish_reason(self) -> str | None:
        """Set once every choice has its finish reason (the grace timer starts then)."""
        if len(self._finished) < self.n:
            return None
        return self._acc(0).finish_reason

    def _acc(self, index: int) -> ChunkAccumulator:
        acc = self._accs.get(index)
        if acc is None:
            if len(self._accs) >= max(self.n, 1) or not 0 <= index < MAX_CHOICES:
                raise BackendUnavailable(
                    f"the upstream sent choice index {index!r}; {self.n} choice(s) were asked"
                )
            acc = self._accs[index] = ChunkAccumulator(*self._limits, stream_args=True)
        return acc

    def _ingest(self, chunk: object, out: list[Event]) -> None:
        if type(chunk) is not dict:
            return
        head = {k: v for k, v in chunk.items() if k != "choices"}
        head["choices"] = []
        self._acc(0)._ingest(head, out)  # errors and usage, as the fast path reads them
        self._usage = self._acc(0).usage
        choices = chunk.get("choices")
        if type(choices) is not list:
            return
        for choice in choices:
            if type(choice) is not dict:
                continue
            index = choice.get("index", 0)
            if type(index) is not int:
                index = 0
            events: list[Event] = []
            self._acc(index)._ingest({"choices": [{**choice, "index": 0}]}, events)
            self._logprobs(index, choice.get("logprobs"))
            if choice.get("finish_reason"):
                self._finished.add(index)
            out.extend(self._tag(index, events))

    def _logprobs(self, index: int, lps: object) -> None:
        content = lps.get("content") if type(lps) is dict else None
        if type(content) is not list or not content:
            return
        if len(content) > MAX_CHUNK_LOGPROBS:
            raise BackendUnavailable(
                f"the upstream sent {len(content)} logprobs in one chunk "
                f"(at most {MAX_CHUNK_LOGPROBS}, MAX_CHUNK_LOGPROBS)"
            )
        try:
            got = [TokenLogprob.from_dict(x, "logprobs.content") for x in content]
        except Exception as e:  # InvalidRequest: the upstream's fault here
            raise BackendUnavailable(f"the upstream sent malformed logprobs: {e}") from None
        self._pending.setdefault(index, []).extend(got)

    def _tag(self, index: int, events: list[Event]) -> list[Event]:
        """The choice index on every event; pending logprobs on the next text event."""
        pending = self._pending.get(index)
        out: list[Event] = []
        for ev in events:
            changes: dict[str, Any] = {"index": index} if index else {}
            if pending and not isinstance(ev, Done) and hasattr(ev, "logprobs"):
                changes["logprobs"] = tuple(pending)
                pending.clear()
            out.append(dataclasses.replace(ev, **changes) if changes else ev)  # type: ignore[type-var]
        return out

    def _finalize(self, out: list[Event]) -> None:
        total = self._acc(0).usage or Usage()
        for index in range(max(self.n, 1)):
            events: list[Event] = []
            self._acc(index)._finalize(events)
            pending = self._pending.get(index)
            if pending and events and not any(hasattr(e, "logprobs") for e in events[:-1]):
                # logprobs with no text event left to carry them: an empty Text does
                events.insert(0, _empty_text())
            tagged = self._tag(index, events)
            done = tagged[-1]
            assert isinstance(done, Done)
            usage = total if index == 0 else Usage(total.input_tokens, 0, total.cached_tokens)
            tagged[-1] = done.replace(usage=usage)
            out.extend(tagged)


def _empty_text() -> Event:
    from inferd.types import Text

    return Text("")


class ChoicesStreamDecoder(ChatStreamDecoder):
    """:class:`ChatStreamDecoder` for ``n`` choices and logprobs (see the module doc)."""

    def __init__(
        self, n: int, max_event_bytes: int, max_call_args: int, max_stream_args: int
    ) -> None:
        super().__init__(max_event_bytes, max_call_args, max_stream_args, stream_args=True)
        self._acc = _Choices(n, max_call_args, max_stream_args)  # type: ignore[assignment]
