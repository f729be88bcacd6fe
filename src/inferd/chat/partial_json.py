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

#: A call body longer than this stops streaming; the rest of its arguments arrive in one
#: piece when the call completes (the parser still re-reads the call's opening fields
#: per token, so this bounds the per-token work on a runaway call).
MAX_STREAMED_CALL_CHARS = 256 * 1024

_WS = " \t\r\n"
#: What ends a run of plain string characters: a quote, an escape or a control character.
_STRING_STOP = re.compile(r'["\\\x00-\x1f]')
_NUMBER = frozenset("+-0123456789.eE")
_LITERALS = ("true", "false", "null")
_DECODER = json.JSONDecoder()
#: Keys whose value is a call's arguments, in the families' common call shape.
ARGUMENT_KEYS = ("arguments", "parameters")


# What the reader expects next.
_VALUE, _FIRST_KEY, _KEY, _COLON, _NEXT, _FIRST_ITEM, _STRING, _DONE, _BAD = range(9)


class ArgumentStream:
    """A resumable reader of one growing JSON value at ``start``: :meth:`advance` takes
    the text so far (each call's text extends the last's) and returns the canonical
    text that just became final (all of it: :attr:`text`). Work per call is proportional
    to the new text, not to all of it (a number or literal cut by the end is re-read;
    they are short)."""

    __slots__ = ("_closers", "_key", "_safe", "i", "out", "state")

    def __init__(self, start: int = 0) -> None:
        self.i = start  # next unread character (the value starts here)
        self.state = _VALUE
        self.out: list[str] = []
        self._closers: list[str] = []  # "}" / "]" of the open containers
        self._key = False  # the string being read is an object key
        self._safe = 0  # in a string: where its not-yet-written characters start

    @property
    def done(self) -> bool:
        return self.state == _DONE

    @property
    def text(self) -> str:
        """Everything written so far."""
        return "".join(self.out)

    def advance(self, text: str) -> str:
        """The canonical text made final by what ``text`` adds (``""`` for nothing)."""
        start = len(self.out)
        while self.state < _DONE and self._step(text):
            pass
        return "".join(self.out[start:])

    def _after_value(self) -> None:
        self.state = _NEXT if self._closers else _DONE

    def _step(self, t: str) -> bool:
        """One token (or the rest of a string); False when more text is needed."""
        if self.state == _STRING:
            return self._string(t)
        i = self.i
        while i < len(t) and t[i] in _WS:
            i += 1
        self.i = i
        if i >= len(t):
            return False
        c, state = t[i], self.state
        if state == _COLON:
            return self._punct(c == ":", ": ", _VALUE)
        if state == _NEXT:
            if c == ",":
                return self._punct(True, ", ", _KEY if self._closers[-1] == "}" else _VALUE)
            if c == self._closers[-1]:
                self._closers.pop()
                self.i += 1
                self.out.append(c)
                self._after_value()
                return True
            return self._punct(False, "", _BAD)
        if state in (_FIRST_KEY, _FIRST_ITEM) and c == ("}" if state == _FIRST_KEY else "]"):
            self._closers.pop()
            self.i += 1
            self.out.append(c)
            self._after_value()
            return True
        if state in (_FIRST_KEY, _KEY):
            return self._open_string(key=True) if c == '"' else self._punct(False, "", _BAD)
        return self._value(t, c)

    def _punct(self, ok: bool, text: str, then: int) -> bool:
        if not ok:
            self.state = _BAD
            return False
        self.i += 1
        self.out.append(text)
        self.state = then
        return True

    def _value(self, t: str, c: str) -> bool:
        if c in "{[":
            self._closers.append("}" if c == "{" else "]")
            return self._punct(True, c, _FIRST_KEY if c == "{" else _FIRST_ITEM)
        if c == '"':
            return self._open_string(key=False)
        i = self.i
        for lit in _LITERALS:
            if t.startswith(lit, i):
                self.i = i + len(lit)
                self.out.append(lit)
                self._after_value()
                return True
            if lit.startswith(t[i : i + len(lit)]):
                return False  # "tr": wait for the rest
        j = i
        while j < len(t) and t[j] in _NUMBER:
            j += 1
        if j == i:
            self.state = _BAD
            return False
        if j >= len(t):
            return False  # the number may still grow
        try:
            value = json.loads(t[i:j])
        except ValueError:
            self.state = _BAD
            return False
        self.i = j
        self.out.append(json.dumps(value))
        self._after_value()
        return True

    def _open_string(self, *, key: bool) -> bool:
        self.i += 1
        self._safe = self.i
        self._key = key
        self.out.append('"')
        self.state = _STRING
        return True

    def _string(self, t: str) -> bool:
        j = self.i
        while True:
            m = _STRING_STOP.search(t, j)
            if m is None:
                return self._write(t, len(t), closed=False)
            j = m.start()
            c = t[j]
            if c == '"':
                return self._write(t, j, closed=True)
            if c < " ":
                self._write(t, j, closed=False)
                self.state = _BAD
                return False
            n = _escape_len(t, j)
            if n == 0:  # an escape not complete yet (or half a surrogate pair)
                return self._write(t, j, closed=False)
            j += n

    def _write(self, t: str, end: int, *, closed: bool) -> bool:
        """Write the string's characters up to ``end`` (and its quote when ``closed``)."""
        raw = t[self._safe : end]
        if raw:
            try:
                text = json.dumps(json.loads('"' + raw + '"'), ensure_ascii=False)[1:-1]
            except ValueError:
                self.state = _BAD
                return False
            self.out.append(text)
        self._safe = self.i = end
        if not closed:
            return False
        self.out.append('"')
        self.i = end + 1
        if self._key:
            self.state = _COLON
        else:
            self._after_value()
        return True


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
    r = ArgumentStream()
    return r.advance(text), r.done


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
            r = ArgumentStream()
            r.advance(t[start:])
            if not r.done:
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
        value, end = _DECODER.raw_decode(t, i)
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
