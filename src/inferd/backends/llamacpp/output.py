"""The seam between generated text and events: a per-model output parser.

The backend streams decoded text (UTF-8 complete, stop sequences already cut) into a
parser and yields whatever events it returns. The default passes text through as
``Text``. Tool-call and thinking parsers for local models (``inferd.chat``) implement
the same two methods and are passed to ``LlamaCpp(output_parser=...)`` as a
:data:`ParserFactory`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from inferd.types import Event, Request, Text


@runtime_checkable
class OutputParser(Protocol):
    """Turns a stream of text pieces into events. One instance per generation."""

    def feed(self, text: str) -> list[Event]:
        """Events made complete by ``text`` (may be empty while a construct is open)."""

    def finish(self) -> list[Event]:
        """Events still held when generation ends (a parser flushes what it buffered)."""


class PlainText:
    """Every piece of text is a ``Text`` event, unchanged."""

    __slots__ = ()

    def feed(self, text: str) -> list[Event]:
        return [Text(text)] if text else []

    def finish(self) -> list[Event]:
        return []


#: ``factory(chat_template, prompt, request) -> OutputParser``: the model's Jinja template
#: source (or ``None``), the rendered prompt (a parser may need to know whether it ends
#: inside an open reasoning block) and the request (tools, thinking). This matches
#: ``inferd.chat.parser_for(chat_template, prompt, ...)`` so it plugs in directly.
ParserFactory = Callable[[str | None, str, Request], OutputParser]


def plain_text(chat_template: str | None, prompt: str, request: Request) -> OutputParser:
    """The default factory: plain text, whatever the model."""
    return PlainText()
