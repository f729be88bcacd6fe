"""One choice's tokens turned into events, and ``n`` choices merged into one stream.

``LlamaCpp.generate`` reads each choice of a request (``Request.n``; one for most
requests) through a :class:`ChoiceReader`: the token bytes go through the text tail
(held-back stop sequences and split characters) and the output parser (tool calls,
reasoning), and the events come out tagged with the choice's ``index`` and, when the
request asked, the logprobs of the tokens they came from. :func:`merged` reads the
choices round-robin, one item each, as the scheduler delivers one token per choice and
step; a choice that ends leaves the rotation after its own ``Done``
(docs/adr/0022-n-choices-and-logprobs.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from inferd.backends.llamacpp.scheduler import SeqStream
from inferd.backends.llamacpp.text_tail import TextTail
from inferd.chat._stream import OutputParser
from inferd.types import Done, Event, StopReason, Timings, TokenLogprob, Usage

#: ``Request.seed`` wraps past this when ``seed + i`` of a later choice overflows it.
SEED_SPAN = 2**64


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index``: ``seed + index`` (wrapped into the valid range);
    ``None`` stays ``None`` (each choice's sampler then draws its own random seed)."""
    if seed is None:
        return None
    s = seed + index
    return s - SEED_SPAN if s >= SEED_SPAN else s


class ChoiceReader:
    """Turns one choice's scheduler items into events (text, tool calls, one ``Done``)."""

    __slots__ = (
        "first",
        "index",
        "parser",
        "pending",
        "produced",
        "stop_reason",
        "stream",
        "tail",
        "want_lps",
    )

    def __init__(
        self, index: int, stream: SeqStream, parser: OutputParser, stops: tuple[str, ...]
    ) -> None:
        self.index = index
        self.stream = stream
        self.parser = parser
        self.tail = TextTail(stops)
        self.produced = 0
        self.first = 0.0
        self.stop_reason: StopReason | None = None
        self.pending: list[TokenLogprob] = []  # logprobs of tokens no event carries yet
        self.want_lps = stream.top_logprobs >= 0

    def take(
        self, item: tuple[Any, ...], ignore_eos: bool, end_item: Callable[..., StopReason]
    ) -> list[Event]:
        """Events for one scheduler item; sets :attr:`stop_reason` when the choice ends."""
        if item[0] != "tok":
            self.stop_reason = end_item(item)
            return []
        if item[2] and not ignore_eos:
            self.stop_reason = StopReason.END_TURN
            return []
        self.produced += 1
        if self.want_lps and item[4] is not None:
            self.pending.append(item[4])
        text = self.tail.feed(item[3])  # the token's bytes, from the scheduler thread
        if self.tail.stopped:
            self.stop_reason = StopReason.STOP_SEQUENCE
        elif self.produced >= self.stream.max_tokens:
            self.stop_reason = StopReason.MAX_TOKENS
        return self._tag(self.parser.feed(text)) if text else []

    def finish(self) -> list[Event]:
        """The text still held back and the parser's last events (before ``Done``)."""
        rest = self.tail.finish()
        return self._tag([*(self.parser.feed(rest) if rest else ()), *self.parser.finish()])

    def done(self, n_prompt: int, start: float, backend: str) -> Done:
        assert self.stop_reason is not None
        usage = Usage(n_prompt, self.produced, self.stream.cached_tokens)
        timings = Timings.measure(start, self.first or None, time.perf_counter(), self.produced)
        if self.stream.spec_drafted:  # speculative decoding drafted for this reply
            timings = dataclasses.replace(
                timings,
                draft_tokens=self.stream.spec_drafted,
                draft_accepted=self.stream.spec_accepted,
            )
        return Done(self.stop_reason, usage, timings, backend, self.index)

    def _tag(self, events: list[Event]) -> list[Event]:
        """Set the choice index, and hand the pending logprobs to the first event:
        each event carries the tokens fed since the previous one."""
        if events and not self.first:
            self.first = time.perf_counter()
        if not (self.index or self.pending):
            return events
        out: list[Event] = []
        for ev in events:
            changes: dict[str, Any] = {"index": self.index} if self.index else {}
            if self.pending and not isinstance(ev, Done):
                changes["logprobs"] = tuple(self.pending)
                self.pending.clear()
            out.append(dataclasses.replace(ev, **changes) if changes else ev)  # type: ignore[type-var]
        return out


async def merged(
    readers: list[ChoiceReader],
    *,
    ignore_eos: bool,
    end_item: Callable[[tuple[Any, ...], bool], StopReason],
    check_open: Callable[[], None],
    n_prompt: int,
    start: float,
    backend: str,
) -> AsyncIterator[Event]:
    """Every choice's events in one stream, each choice ending with its own ``Done``.

    Round-robin, one item per choice: the scheduler decodes all choices in the same
    steps, so nobody waits long, and a choice whose consumer lags only pauses itself.
    A choice that ended early (a stop sequence) is cancelled at once, keeping its
    cells for prefix reuse, so it stops costing decode time.
    """
    live = list(readers)
    started = False

    def ended(item: tuple[Any, ...]) -> StopReason:
        return end_item(item, started)

    while live:
        for r in list(live):
            item = await r.stream.get()
            check_open()
            events = r.take(item, ignore_eos, ended)
            if r.stop_reason is not None:
                events += r.finish()
            for ev in events:
                started = True
                yield ev
            if r.stop_reason is not None:
                live.remove(r)
                if not r.stream.done:
                    r.stream.cancel(keep=True)
                started = True
                yield r.done(n_prompt, start, backend)
