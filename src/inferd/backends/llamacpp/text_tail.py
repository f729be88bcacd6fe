"""Token bytes to the text a caller may see: UTF-8 completion and stop sequences.

A token's piece may end inside a multi-byte character (the rest comes with the next
token), and a stop sequence may be spread over several tokens. :class:`TextTail` holds
back exactly what could still change: the bytes of an unfinished character and the
longest tail that could still grow into a stop sequence (the same holdback rule the
chat parsers use for their sentinels, :func:`inferd.chat._stream.holdback`). Work per
token is bounded by the longest stop sequence, not by the reply's length.
"""

from __future__ import annotations

import codecs

from inferd.chat._stream import find_first, holdback


class TextTail:
    """One generation's decoder. ``feed`` each token's bytes; after ``stopped`` turns
    true nothing more may be fed; ``finish`` returns what is still held."""

    __slots__ = ("_decoder", "_pending", "stopped", "stops")

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""

    def feed(self, piece: bytes) -> str:
        """Text that can no longer change; on a stop sequence, the text before it (and
        ``stopped`` is set; the stop sequence itself is never returned)."""
        text = self._decoder.decode(piece)
        if not self.stops:
            return text
        buf = self._pending + text
        at, _ = find_first(buf, self.stops)
        if at >= 0:
            self.stopped = True
            self._pending = ""
            return buf[:at]
        cut = len(buf) - holdback(buf, self.stops)
        self._pending = buf[cut:]
        return buf[:cut]

    def finish(self) -> str:
        """What is held at the end (a partial stop sequence is text after all; a broken
        trailing character becomes U+FFFD); empty after a stop sequence."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
