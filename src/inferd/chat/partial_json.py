"""Tool-call arguments streamed while the model is still writing them.

A local model writes a call's arguments as JSON text, a few characters per token. To
stream them (``ToolUseDelta``, docs/adr/0023-tool-call-streaming-and-stop-reasons.md)
every fragment must be final: the fragments of a call, joined, must equal the
arguments string of the complete ``ToolUse`` that follows. The model's raw text cannot
serve (whitespace and escapes vary, and the parsers re-serialise the arguments), so
:func:`stable_prefix` reads a *partial* JSON value and writes the part that can no
longer change in the canonical form, ``json.dumps(value, ensure_ascii=False)``:
structure and string characters as soon as they are read, a number or a literal only
once something follows it. The output for a longer input always extends the output
for a shorter one (the property the streaming relies on), and for a complete value it
equals ``json.dumps(json.loads(text), ensure_ascii=False)`` except for duplicate keys,
which the canonical text keeps (it still decodes to the same object).

:func:`call_arguments` finds the arguments value inside the common call shape
``{"name": ..., "arguments": {...}}`` (``parameters`` too, optionally inside a
``[...]`` list), the shape of the Hermes, Llama 3 and Mistral v1 families; other
families stream their arguments in one piece when the call is complete.
"""

from __future__ import annotations

import json
import re

#: A call body longer than this is not re-read on every token; its arguments arrive in
#: one piece when the call completes (bounds the per-token work on a runaway call).
MAX_STREAMED_CALL_CHARS = 16 * 1024

_WS = " \t\r\n"
#: What ends a run of plain string characters: a quote, an escape or a control character.
_STRING_STOP = re.compile(r'["\\\x00-\x1f]')
_NUMBER = frozenset("+-0123456789.eE")
_LITERALS = ("true", "false", "null")
#: Keys whose value is a call's arguments, in the families' common call shape.
ARGUMENT_KEYS = ("arguments", "parameters")


class _End(Exception):
    """The input ended inside a value: what was written so far is final."""


class _Bad(Exception):
    """Not JSON: stop streaming here (the parser decides what the call was)."""


class _Reader:
    """One pass over ``text``, appending canonical output to ``out``."""

    __slots__ = ("i", "out", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.out: list[str] = []

    def ws(self) -> None:
        t, i = self.text, self.i
        while i < len(t) and t[i] in _WS:
            i += 1
        self.i = i
        if i >= len(t):
            raise _End

    def value(self) -> None:
        self.ws()
        c = self.text[self.i]
        if c == "{":
            self.container("}", member=True)
        elif c == "[":
            self.container("]", member=False)
        elif c == '"':
            self.string()
        else:
            self.scalar()

    def container(self, close: str, *, member: bool) -> None:
        self.i += 1
        self.out.append(self.text[self.i - 1])
        self.ws()
        if self.text[self.i] == close:
            self.i += 1
            self.out.append(close)
            return
        while True:
            if member:
                self.ws()
                if self.text[self.i] != '"':
                    raise _Bad
                self.string()
                self.ws()
                if self.text[self.i] != ":":
                    raise _Bad
                self.i += 1
                self.out.append(": ")
            self.value()
            self.ws()
            c = self.text[self.i]
            self.i += 1
            if c == close:
                self.out.append(close)
                return
            if c != ",":
                raise _Bad
            self.out.append(", ")

    def string(self) -> None:
        t = self.text
        start = self.i + 1
        j = start
        while True:
            m = _STRING_STOP.search(t, j)
            if m is None:
                self._string_part(t[start:], closed=False)
                raise _End
            j = m.start()
            c = t[j]
            if c == '"':
                self._string_part(t[start:j], closed=True)
                self.i = j + 1
                return
            if c < " ":
                self._string_part(t[start:j], closed=False)
                raise _Bad
            n = _escape_len(t, j)
            if n == 0:  # an escape not complete yet (or a half surrogate pair)
                self._string_part(t[start:j], closed=False)
                raise _End
            j += n

    def _string_part(self, raw: str, *, closed: bool) -> None:
        try:
            decoded = json.loads('"' + raw + '"')
        except ValueError:
            raise _Bad from None
        text = json.dumps(decoded, ensure_ascii=False)
        self.out.append(text if closed else text[:-1])

    def scalar(self) -> None:
        t, i = self.text, self.i
        for lit in _LITERALS:
            if t.startswith(lit, i):
                self.i = i + len(lit)
                if self.i >= len(t):
                    raise _End  # "true" could still be "truex" (then not JSON)
                self.out.append(lit)
                return
            if lit.startswith(t[i:]):
                raise _End
        j = i
        while j < len(t) and t[j] in _NUMBER:
            j += 1
        if j == i:
            raise _Bad
        if j >= len(t):
            raise _End  # the number may still grow
        try:
            value = json.loads(t[i:j])
        except ValueError:
            raise _Bad from None
        self.i = j
        self.out.append(json.dumps(value))


def _escape_len(t: str, j: int) -> int:
    """Length of the escape at ``t[j]`` (a backslash); 0 when it is not complete yet.

    A high surrogate (``\\ud83d``) waits for what follows: decoded alone it is a
    different character than decoded with its low half.
    """
    if j + 1 >= len(t):
        return 0
    if t[j + 1] != "u":
        return 2
    if j + 6 > len(t):
        return 0
    if t[j + 2 : j + 4].lower() not in ("d8", "d9", "da", "db"):
        return 6
    rest = t[j + 6 : j + 12]
    if not rest:
        return 0
    if rest[0] != "\\":
        return 6
    if len(rest) < 2:
        return 0
    if rest[1] != "u":
        return 6
    return 12 if len(rest) == 6 else 0


def stable_prefix(text: str) -> tuple[str, bool]:
    """``(canonical text that can no longer change, whether the value is complete)``
    for the JSON value at the start of ``text`` (leading whitespace skipped)."""
    r = _Reader(text)
    try:
        r.value()
    except (_End, _Bad, IndexError):
        return "".join(r.out), False
    return "".join(r.out), True


def canonical(text: str) -> str | None:
    """The canonical text of the complete JSON value at the start of ``text``, or None."""
    out, done = stable_prefix(text)
    return out if done else None


def call_arguments(body: str) -> tuple[str | None, str | None]:
    """``(name, arguments text so far)`` of the first call in a call body of the shape
    ``{"name": "f", "arguments": {...}}`` (``parameters`` too; a leading ``[`` is
    skipped); ``None`` for what is not known yet or not in that shape.

    The arguments text starts at the value's ``{`` and runs to the end of ``body``;
    :func:`stable_prefix` decides how much of it is final. Arguments given as a JSON
    *string* are not streamed (their text is re-encoded when the call completes).
    """
    t = body.lstrip(_WS)
    if t.startswith("["):
        t = t[1:].lstrip(_WS)
    if not t.startswith("{"):
        return None, None
    name: str | None = None
    i = 1
    while True:
        key, i = _read_key(t, i)
        if key is None:
            return name, None
        start = _skip_ws(t, i)
        if key == "name":
            value, i = _read_string(t, start)
            if value is None:
                return name, None
            name = value
        elif key in ARGUMENT_KEYS and t.startswith("{", start):
            return name, t[start:]
        else:
            r = _Reader(t[start:])
            try:
                r.value()
            except (_End, _Bad, IndexError):
                return name, None
            i = start + r.i
        i = _skip_ws(t, i)
        if not t.startswith(",", i):
            return name, None
        i += 1


def _skip_ws(t: str, i: int) -> int:
    while i < len(t) and t[i] in _WS:
        i += 1
    return i


def _read_string(t: str, i: int) -> tuple[str | None, int]:
    """A complete JSON string at ``t[i]``: (value, index after it) or (None, i)."""
    if not t.startswith('"', i):
        return None, i
    try:
        value, end = json.JSONDecoder().raw_decode(t, i)
    except ValueError:
        return None, i
    return (value, end) if isinstance(value, str) else (None, i)


def _read_key(t: str, i: int) -> tuple[str | None, int]:
    """``"key" :`` at ``t[i]`` (after whitespace): (key, index after the colon)."""
    key, j = _read_string(t, _skip_ws(t, i))
    if key is None:
        return None, i
    j = _skip_ws(t, j)
    if not t.startswith(":", j):
        return None, i
    return key, j + 1
