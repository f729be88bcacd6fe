"""The streaming engine every family parser is built on.

A model's reply is plain text with *sentinels* in it: ``<think>`` opens reasoning,
``<tool_call>`` opens a call, and so on. Tokens arrive in arbitrary pieces, and a
sentinel may be split across any number of them, so the engine keeps a small buffer
and a mode (text, thinking, call, ended) and only ever emits what can no longer turn
out to be the start of a sentinel: the longest suffix of the buffer that is a proper
prefix of a sentinel is held back until the next piece (or :meth:`finish`) decides.

Because every decision depends only on the text seen so far plus that bounded
look-ahead, the events are the same however the reply is split (the property the
hypothesis tests check). A family subclass only declares its sentinels and says how
to turn a call body into :class:`~inferd.types.ToolUse` events
(:meth:`SentinelParser.parse_call`); a body it cannot read raises
:class:`MalformedCall`, and the engine then emits the call's raw text (opener, body
and closer, exactly as generated) as :class:`~inferd.types.Text`: nothing is
dropped, nothing crashes, and ``parser.malformed`` records why.

With ``stream_arguments=True`` the engine also streams each call's arguments as they
are written (:class:`~inferd.types.ToolUseDelta`, docs/adr/0023-tool-call-streaming-
and-stop-reasons.md): while a call body grows, :meth:`SentinelParser.partial_call`
(by default the common ``{"name": ..., "arguments": {...}}`` shape) says what is known,
and :func:`inferd.chat.partial_json.stable_prefix` decides which part of the
arguments can no longer change. When the call completes, the rest follows, then the
complete ``ToolUse`` whose ``raw_arguments`` equals the fragments joined. A family
whose calls have another shape still gets one delta per call, at its end.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from inferd.chat.partial_json import (
    MAX_STREAMED_CALL_CHARS,
    ArgumentStream,
    call_arguments,
    stable_prefix,
)
from inferd.errors import InternalError, InvalidRequest
from inferd.types import Event, Text, Thinking, ToolUse, ToolUseDelta

IdFactory = Callable[[], str]

_TEXT, _THINK, _CALL, _END = "text", "think", "call", "end"


@runtime_checkable
class OutputParser(Protocol):
    """What a backend feeds generated text through: one instance per generation.

    The one parser protocol (``inferd.backends.llamacpp.output`` re-exports it).
    """

    def feed(self, text: str) -> list[Event]:
        """Consume one piece of generated text; return the events it completes."""
        ...

    def finish(self) -> list[Event]:
        """The generation ended: flush what was held back."""
        ...


class MalformedCall(ValueError):
    """A tool-call body that cannot be read; the engine falls back to Text."""


def default_call_id() -> str:
    """``call_`` + 24 random hex digits: unique without any shared counter."""
    return "call_" + secrets.token_hex(12)


def find_first(buf: str, sentinels: Iterable[str], start: int = 0) -> tuple[int, str]:
    """Earliest occurrence of any sentinel in ``buf`` (longest wins a tie); ``(-1, "")``."""
    best, best_s = -1, ""
    for s in sentinels:
        i = buf.find(s, start)
        if i >= 0 and (best < 0 or i < best or (i == best and len(s) > len(best_s))):
            best, best_s = i, s
    return best, best_s


def holdback(buf: str, sentinels: Iterable[str]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of a sentinel."""
    keep = 0
    last = buf[-1:]
    for s in sentinels:
        if not last or last not in s:
            continue  # the common case: the buffer cannot end inside this sentinel
        for n in range(min(len(s) - 1, len(buf)), keep, -1):
            if buf.endswith(s[:n]):
                keep = n
                break
    return keep


def merge_events(events: Iterable[Event]) -> list[Event]:
    """Join adjacent Text (and adjacent Thinking) events; drop empty ones.

    A signed ``Thinking`` (Anthropic's signature, ADR 0014) closes its block: it is
    kept even when empty and never merged into, so the signature survives.
    """
    out: list[Event] = []
    for ev in events:
        signed = isinstance(ev, Thinking) and ev.signature is not None
        if isinstance(ev, (Text, Thinking)) and not signed:
            if not ev.text:
                continue
            prev = out[-1] if out else None
            if type(prev) is type(ev) and getattr(prev, "signature", None) is None:
                out[-1] = type(ev)(prev.text + ev.text)  # type: ignore[union-attr]
                continue
        out.append(ev)
    return out


def arguments_to_tool_use(
    call_id: str, name: Any, args: Any, *, what: str = "arguments"
) -> ToolUse:
    """Build a ToolUse from a decoded name and arguments (object or JSON string).

    Arguments given as a string are decoded; a string that is not JSON keeps
    ``input=None`` and the raw text (ToolUse's documented shape for that case).
    """
    if not isinstance(name, str) or not name:
        raise MalformedCall(f"tool call has no string 'name' (got {name!r})")
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            decoded = json.loads(args) if args.strip() else {}
        except ValueError:
            return ToolUse(call_id, name, None, args)
        if not isinstance(decoded, dict):
            return ToolUse(call_id, name, None, args)
        return ToolUse(call_id, name, decoded, args)
    if not isinstance(args, Mapping):
        raise MalformedCall(f"tool call {name!r}: {what} must be an object, got {args!r}")
    return ToolUse(call_id, name, dict(args), json.dumps(args, ensure_ascii=False))


def arguments_text(call: ToolUse) -> str:
    """The arguments string of a complete call, as every wire sends it."""
    return call.raw_arguments or json.dumps(dict(call.input or {}), ensure_ascii=False)


def finish_streamed(call: ToolUse, sent: ToolUseDelta | None) -> tuple[ToolUse, str]:
    """``(call, the rest of its arguments)`` after ``sent`` (the fragments so far,
    joined) so that the fragments joined equal the call's ``raw_arguments``.

    The parsers write ``json.dumps`` of the arguments, which the streamed canonical
    text matches; where it does not (duplicate keys), the call keeps the canonical
    text, which decodes to the same object.
    """
    full = arguments_text(call)
    done = "" if sent is None else sent.arguments_fragment
    if full.startswith(done):
        if full != call.raw_arguments:
            call = ToolUse(call.id, call.name, call.input, full)
        return call, full[len(done) :]
    whole, complete = stable_prefix(call.raw_arguments) if call.raw_arguments else ("", False)
    if complete and whole.startswith(done) and _same_json(whole, call.input):
        return ToolUse(call.id, call.name, call.input, whole), whole[len(done) :]
    return call, ""  # not reconcilable (never seen): the deltas end, the ToolUse is the truth


def _same_json(text: str, value: Any) -> bool:
    try:
        return bool(json.loads(text) == value)
    except ValueError:
        return False


def decode_json_objects(body: str, separators: str = " \t\r\n;,") -> list[Any]:
    """Decode one or more JSON values written one after another (``{..}; {..}``)."""
    dec = json.JSONDecoder()
    out: list[Any] = []
    i, n = 0, len(body)
    while True:
        while i < n and body[i] in separators:
            i += 1
        if i >= n:
            return out
        try:
            value, i = dec.raw_decode(body, i)
        except ValueError as e:
            raise MalformedCall(f"not JSON at offset {i}: {e}") from None
        out.append(value)


class SentinelParser:
    """Base of the family parsers: a text / thinking / call state machine.

    Class attributes a family sets:

    * ``think_open`` / ``think_close``: the reasoning pair (used when thinking is on);
    * ``think_strip``: a label the model writes right after ``think_open``
      (Gemma 4's ``thought``), dropped;
    * ``call_open`` / ``call_close``: a call's sentinels; ``call_close = None``
      means a call runs until the next ``call_open`` or the end of generation;
    * ``end_sentinels``: end-of-turn markers; text after one is discarded (they
      normally stop generation before they are ever rendered);
    * ``thinking_default``: whether ``think_open`` is recognised unless told.

    ``in_thinking=True`` starts inside the reasoning block (the prompt already
    opened it, as DeepSeek R1 and Qwen 3 templates can do). ``stream_arguments=True``
    adds :class:`~inferd.types.ToolUseDelta` events (module docstring).
    """

    name: ClassVar[str] = "base"
    think_open: ClassVar[str] = "<think>"
    think_close: ClassVar[str] = "</think>"
    think_strip: ClassVar[str] = ""
    call_open: ClassVar[str | None] = None
    call_close: ClassVar[str | None] = None
    end_sentinels: ClassVar[tuple[str, ...]] = ()
    thinking_default: ClassVar[bool] = False

    def __init__(
        self,
        *,
        thinking: bool | None = None,
        in_thinking: bool = False,
        id_factory: IdFactory | None = None,
        stream_arguments: bool = False,
    ) -> None:
        self.thinking = self.thinking_default if thinking is None else thinking
        self._id_factory: IdFactory = id_factory or type(self).default_id
        #: The id of the next call (families call it from ``parse_call``); a call whose
        #: arguments are being streamed already has one, handed out first.
        self.new_id: IdFactory = self._take_id
        self.stream_arguments = stream_arguments
        #: Whether the last thing the reply did so far was a complete tool call.
        self.ended_in_call = False
        self._calls = 0  # complete calls so far: the call_index of the next one
        self._reserved_id: str | None = None
        self._streamed: ToolUseDelta | None = None  # the call streaming now (no text)
        self._reader: ArgumentStream | None = None  # its arguments, read so far
        #: Why each malformed call fell back to Text (for logs and tests).
        self.malformed: list[str] = []
        self._buf = ""
        self._mode = _TEXT
        self._at_start = True  # nothing but whitespace seen in text mode yet
        self._lstrip_text = False
        self._lstrip_think = False
        self._think_ws = ""
        self._think_label_pending = False
        self._call_opener = ""
        self._finished = False
        openers = [s for s in (self.call_open,) if s]
        if self.thinking:
            openers.append(self.think_open)
        openers.extend(self.end_sentinels)
        self._text_sentinels = tuple(openers)
        if in_thinking and self.thinking:
            self._enter_think()
        elif in_thinking:
            raise InvalidRequest(f"{self.name}: in_thinking=True needs thinking enabled")

    # -- hooks a family overrides ------------------------------------------

    @staticmethod
    def default_id() -> str:
        return default_call_id()

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        """Turn one call body into ToolUse events; raise MalformedCall if unreadable."""
        raise MalformedCall(f"{self.name} has no tool calls")

    def bare_call_start(self, buf: str, final: bool) -> bool | None:
        """At the start of the reply: True to read it all as a call, None to wait."""
        return False

    def partial_call(self, opener: str, body: str) -> tuple[str | None, str | None]:
        """``(name, arguments text so far)`` of the call being written, for streaming;
        ``None`` for what is not known yet. The arguments text runs to the end of
        ``body`` (the engine then reads only what each token adds). The default reads
        the common ``{"name": ..., "arguments": {...}}`` shape; other families may
        override it (or keep the default: their arguments then stream in one piece at
        the end)."""
        return call_arguments(body)

    # -- the engine -------------------------------------------------------------

    def feed(self, text: str) -> list[Event]:
        if self._finished:
            raise InternalError(f"{self.name} parser: feed() after finish()")
        if not text:
            return []
        self._buf += text
        out: list[Event] = []
        self._run(out, final=False)
        if self.stream_arguments and self._mode == _CALL:
            self._stream_partial(out)
        return self._settle(out)

    def finish(self) -> list[Event]:
        if self._finished:
            return []
        out: list[Event] = []
        self._run(out, final=True)
        if self._mode == _THINK:
            self._think_ws = ""
        elif self._mode == _CALL:
            self._close_call(out, self._buf, closed=False, closer="")
            self._buf = ""
        self._finished = True
        return self._settle(out)

    def _settle(self, out: list[Event]) -> list[Event]:
        events = merge_events(out)
        for ev in events:
            if isinstance(ev, ToolUse):
                self.ended_in_call = True
            elif isinstance(ev, (Text, Thinking)) and ev.text.strip():
                self.ended_in_call = False
        return events

    def _enter_think(self) -> None:
        self._mode = _THINK
        self._lstrip_think = True
        self._think_ws = ""
        self._think_label_pending = bool(self.think_strip)

    def _emit_text(self, out: list[Event], s: str) -> None:
        if self._lstrip_text:
            s = s.lstrip()
            if s:
                self._lstrip_text = False
        if s:
            out.append(Text(s))

    def _emit_think(self, out: list[Event], s: str, closing: bool) -> None:
        # Leading and trailing whitespace inside a reasoning block is layout, not
        # content; trailing whitespace is held until something follows it.
        if self._lstrip_think:
            s = s.lstrip()
            if s:
                self._lstrip_think = False
        s = self._think_ws + s
        if closing:
            s, self._think_ws = s.rstrip(), ""
        else:
            body = s.rstrip()
            s, self._think_ws = body, s[len(body) :]
        if s:
            out.append(Thinking(s))

    def _run(self, out: list[Event], final: bool) -> None:
        while self._buf:
            if self._mode == _TEXT:
                if not self._step_text(out, final):
                    return
            elif self._mode == _THINK:
                if not self._step_think(out, final):
                    return
            elif self._mode == _CALL:
                if not self._step_call(out, final):
                    return
            else:  # _END: everything after an end-of-turn marker is discarded
                self._buf = ""
                return

    def _step_text(self, out: list[Event], final: bool) -> bool:
        buf = self._buf
        if self._at_start:
            if buf.strip() == "" and not final:
                return False
            decided = self.bare_call_start(buf, final)
            if decided is None and not final:
                return False
            if decided:
                self._at_start = False
                self._mode, self._call_opener = _CALL, ""
                self._buf = buf.lstrip()
                return True
            self._at_start = False
        i, s = find_first(buf, self._text_sentinels)
        if i < 0:
            keep = 0 if final else holdback(buf, self._text_sentinels)
            self._emit_text(out, buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep :]
            return False
        self._emit_text(out, buf[:i])
        self._buf = buf[i + len(s) :]
        if s == self.call_open:
            self._mode, self._call_opener = _CALL, s
        elif self.thinking and s == self.think_open:
            self._enter_think()
        else:
            self._mode = _END
        return True

    def _step_think(self, out: list[Event], final: bool) -> bool:
        if self._think_label_pending:
            label, buf = self.think_strip, self._buf
            if not final and len(buf) < len(label) and label.startswith(buf):
                return False
            if buf.startswith(label):
                self._buf = buf[len(label) :]
            self._think_label_pending = False
        buf = self._buf
        i = buf.find(self.think_close)
        if i < 0:
            keep = 0 if final else holdback(buf, (self.think_close,))
            self._emit_think(out, buf[: len(buf) - keep], closing=False)
            self._buf = buf[len(buf) - keep :]
            return False
        self._emit_think(out, buf[:i], closing=True)
        self._buf = buf[i + len(self.think_close) :]
        self._mode = _TEXT
        self._lstrip_text = True
        self._at_start = False
        return True

    def _step_call(self, out: list[Event], final: bool) -> bool:
        # A call ends at its closer; one without a closer runs to the next opener.
        # An end-of-turn marker ends it either way (as an unterminated call).
        buf = self._buf
        ends = [self.call_close] if self.call_close is not None else [self.call_open or ""]
        ends = [e for e in ends if e]
        i, s = find_first(buf, (*ends, *self.end_sentinels))
        if i < 0:
            return False  # finish() handles an unterminated call
        if s in self.end_sentinels:
            self._close_call(out, buf[:i], closed=False, closer="")
            self._buf, self._mode = "", _END
            return False
        ok = self._close_call(out, buf[:i], closed=True, closer=s if s == self.call_close else "")
        self._buf = buf[i + len(s) :]
        if s == self.call_close:
            self._mode = _TEXT
            self._lstrip_text = ok
        else:
            self._call_opener = s
        return True

    # -- streaming the arguments (ADR 0023) ------------------------------------------

    def _take_id(self) -> str:
        if self._reserved_id is not None:
            call_id, self._reserved_id = self._reserved_id, None
            return call_id
        return self._id_factory()

    def _stream_partial(self, out: list[Event]) -> None:
        """The call being written has grown: send what of its arguments is final.

        The arguments are read incrementally (:class:`ArgumentStream`): each token costs
        what it adds, whatever the call's length so far."""
        body = self._buf
        if len(body) > MAX_STREAMED_CALL_CHARS:
            return
        if type(self).partial_call is not SentinelParser.partial_call:
            self._stream_rebuilt(out, body)
            return
        sent, reader = self._streamed, self._reader
        if sent is None or reader is None:
            name, args = self.partial_call(self._call_opener, body)
            if name is None or args is None:
                return
            self._reserved_id = self._id_factory()
            reader = self._reader = ArgumentStream(len(body) - len(args))
            sent = self._streamed = ToolUseDelta(self._calls, self._reserved_id, name)
            new = reader.advance(body)
            out.append(ToolUseDelta(sent.call_index, sent.id, sent.name, new))  # announces it
        elif new := reader.advance(body):
            out.append(ToolUseDelta(sent.call_index, sent.id, sent.name, new))

    def _stream_rebuilt(self, out: list[Event], body: str) -> None:
        """A family whose :meth:`partial_call` builds the arguments (XML parameters typed
        by the schema, not JSON in the body) cannot be read incrementally: rebuild them
        on each token and send what is final beyond what was sent. ``_streamed`` then
        holds all that was sent."""
        name, args = self.partial_call(self._call_opener, body)
        if name is None or args is None:
            return
        prefix, _ = stable_prefix(args)
        sent = self._streamed
        if sent is None:
            self._reserved_id = self._id_factory()
            self._streamed = ToolUseDelta(self._calls, self._reserved_id, name, prefix)
            out.append(self._streamed)  # announces it
        elif sent.name == name and prefix.startswith(sent.arguments_fragment):
            # (otherwise not the call the deltas began, a parser's re-read: the end decides)
            new = prefix[len(sent.arguments_fragment) :]
            if new:
                out.append(ToolUseDelta(self._calls, sent.id, name, new))
                self._streamed = ToolUseDelta(self._calls, sent.id, name, prefix)

    def _close_call(self, out: list[Event], body: str, *, closed: bool, closer: str) -> bool:
        """End a call through the family's :meth:`_end_call`; when streaming, put the
        rest of each call's arguments (or all of them, for a call not streamed yet)
        before its ``ToolUse``."""
        start = len(out)
        ok = self._end_call(out, body, closed=closed, closer=closer)
        streamed, self._streamed, self._reserved_id = self._streamed, None, None
        if streamed is not None and self._reader is not None:  # with all it sent
            sent_text = self._reader.text
            streamed = ToolUseDelta(streamed.call_index, streamed.id, streamed.name, sent_text)
        self._reader = None
        if not self.stream_arguments:
            self._calls += sum(isinstance(ev, ToolUse) for ev in out[start:])
            return ok
        tail: list[Event] = []
        for ev in out[start:]:
            if isinstance(ev, ToolUse):
                sent = streamed if streamed is not None and streamed.id == ev.id else None
                call, rest = finish_streamed(ev, sent)
                if rest or sent is None:
                    tail.append(ToolUseDelta(self._calls, call.id, call.name, rest))
                tail.append(call)
                self._calls += 1
            else:
                tail.append(ev)
        if streamed is not None and not any(isinstance(ev, ToolUse) for ev in tail):
            self._calls += 1  # a streamed call that failed keeps its index; none reuses it
        out[start:] = tail
        return ok

    def _end_call(self, out: list[Event], body: str, *, closed: bool, closer: str) -> bool:
        """Emit the call's events (True) or its raw text as the fallback (False)."""
        try:
            calls = self.parse_call(self._call_opener, body, closed)
            if not calls:
                raise MalformedCall("empty tool call")
        except MalformedCall as e:
            self.malformed.append(str(e))
            raw = self._call_opener + body + closer
            if raw:
                out.append(Text(raw))
            self._lstrip_text = False
            return False
        out.extend(calls)
        return True
