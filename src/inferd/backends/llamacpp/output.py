"""The seam between generated text and events: a per-model output parser.

The backend streams decoded text (UTF-8 complete, stop sequences already cut) into a
parser and yields whatever events it returns. By default the backend builds the parser
from its chat plan (:meth:`inferd.chat.plan.ChatPlan.parser`); ``LlamaCpp(output_parser=
...)`` takes a :data:`ParserFactory` instead. The parser protocol is
:class:`inferd.chat.OutputParser` (one definition, re-exported here for the backend).
"""

from __future__ import annotations

from collections.abc import Callable

from inferd.chat._stream import OutputParser
from inferd.types import Event, Request, Text

__all__ = ["OutputParser", "ParserFactory", "PlainText"]


class PlainText:
    """Every piece of text is a ``Text`` event, unchanged (for ``output_parser=``)."""

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
