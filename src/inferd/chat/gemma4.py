"""``gemma4``: Gemma 4 tool calls and thinking channel.

A call is ``<|tool_call>call:NAME{ARGS}<tool_call|>`` where ARGS is Gemma's own
notation, not JSON: bare keys (``location:``), strings between ``<|"|>``
delimiters (no escapes inside, so quotes and non-ASCII text pass untouched),
numbers, ``true``/``false``/``null``, nested ``{...}`` and ``[...]``. Reasoning is
``<|channel>thought\\n...<channel|>`` (the ``thought`` label is dropped). After its
calls the model writes ``<|tool_response>`` to hand over to the tool; that and
``<turn|>`` end the reply.

A value the notation does not cover (an unquoted word) is read as a string, the
lenient choice; a body that does not parse at all falls back to Text.

Two slips of the model are absorbed, as llama.cpp does (ADR 0024): a stray
``<channel|>`` outside a reasoning block (often after the answer) is dropped instead
of reaching the user's text, and a doubled opener ``<|channel><|channel>thought``
opens one block instead of putting ``<|channel>thought`` into the reasoning.
"""

from __future__ import annotations

import json
import re
from typing import Any

from inferd.chat._stream import MalformedCall, SentinelParser, arguments_to_tool_use, find_first
from inferd.types import Event, ToolUse

QUOTE = '<|"|>'
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None}


class _Reader:
    """Recursive-descent reader for the argument notation."""

    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def fail(self, what: str) -> MalformedCall:
        return MalformedCall(f"gemma4 call: {what} at offset {self.i} of {self.s!r}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def peek(self, token: str) -> bool:
        return self.s.startswith(token, self.i)

    def expect(self, token: str) -> None:
        self.ws()
        if not self.peek(token):
            raise self.fail(f"expected {token!r}")
        self.i += len(token)

    def string(self) -> str:
        self.i += len(QUOTE)
        end = self.s.find(QUOTE, self.i)
        if end < 0:
            raise self.fail('unterminated <|"|> string')
        value, self.i = self.s[self.i : end], end + len(QUOTE)
        return value

    def key(self) -> str:
        self.ws()
        if self.peek(QUOTE):
            return self.string()
        end = self.s.find(":", self.i)
        if end < 0:
            raise self.fail("expected 'key:'")
        key, self.i = self.s[self.i : end].strip(), end
        if not key or any(c in key for c in "{}[],"):
            raise self.fail(f"bad key {key!r}")
        return key

    def obj(self) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        self.ws()
        if self.peek("}"):
            self.i += 1
            return out
        while True:
            k = self.key()
            self.expect(":")
            out[k] = self.value()
            self.ws()
            if self.peek(","):
                self.i += 1
                continue
            self.expect("}")
            return out

    def array(self) -> list[Any]:
        self.expect("[")
        out: list[Any] = []
        self.ws()
        if self.peek("]"):
            self.i += 1
            return out
        while True:
            out.append(self.value())
            self.ws()
            if self.peek(","):
                self.i += 1
                continue
            self.expect("]")
            return out

    def value(self) -> Any:
        self.ws()
        if self.peek(QUOTE):
            return self.string()
        if self.peek("{"):
            return self.obj()
        if self.peek("["):
            return self.array()
        m = _NUMBER.match(self.s, self.i)
        end = self.i
        while end < len(self.s) and self.s[end] not in ",}]":
            end += 1
        word = self.s[self.i : end].strip()
        if not word:
            raise self.fail("expected a value")
        self.i = end
        if m and m.group() == word:
            return json.loads(word)
        if word in _WORDS:
            return _WORDS[word]
        return word  # an unquoted word: lenient, read as a string


def parse_arguments(text: str) -> dict[str, Any]:
    """Read a ``{key:value,...}`` argument block in Gemma 4 notation."""
    r = _Reader(text)
    value = r.obj()
    r.ws()
    if r.i != len(r.s):
        raise r.fail("trailing characters")
    return value


class Gemma4Parser(SentinelParser):
    """``<|tool_call>call:name{...}<tool_call|>`` calls, ``<|channel>`` thinking."""

    name = "gemma4"
    think_open = "<|channel>"
    think_close = "<channel|>"
    think_strip = "thought"
    call_open = "<|tool_call>"
    call_close = "<tool_call|>"
    end_sentinels = ("<|tool_response>", "<turn|>")
    thinking_default = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # The closer is watched for in text too (held back when split), to drop it.
        self._text_sentinels = (*self._text_sentinels, self.think_close)

    def _step_text(self, out: list[Event], final: bool) -> bool:
        i, s = find_first(self._buf, self._text_sentinels)
        if s == self.think_close:  # a stray closer outside reasoning: layout, not text
            self._buf = self._buf[:i] + self._buf[i + len(s) :]
            return True
        return super()._step_text(out, final)

    def _step_think(self, out: list[Event], final: bool) -> bool:
        if self._think_label_pending:  # a doubled opener: one block, not content
            buf, opener = self._buf.lstrip(), self.think_open
            if buf.startswith(opener):
                self._buf = buf[len(opener) :]
                return True
            if not final and opener.startswith(buf):
                return False
        return super()._step_think(out, final)

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        text = body.strip()
        if not text.startswith("call:"):
            raise MalformedCall(f"gemma4 call must start with 'call:', got {text[:40]!r}")
        brace = text.find("{")
        if brace < 0:
            raise MalformedCall("gemma4 call has no {arguments}")
        name = text[len("call:") : brace].strip()
        return [arguments_to_tool_use(self.new_id(), name, parse_arguments(text[brace:]))]
