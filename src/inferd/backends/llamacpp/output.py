"""The seam between generated text and events: a per-model output parser.

The backend streams decoded text (UTF-8 complete, stop sequences already cut) into a
parser and yields whatever events it returns. By default the backend builds the parser
from its chat plan (:meth:`inferd.chat.plan.ChatPlan.parser`); ``LlamaCpp(output_parser=
...)`` takes a :data:`ParserFactory` instead. The parser protocol is
:class:`inferd.chat.OutputParser` (one definition, re-exported here for the backend).

The model itself only ends its turn; whether that end is a tool call's is read from
the events the parser produced (:class:`CallStops`, the one rule of
:mod:`inferd.call_stop`; docs/adr/0023-tool-call-streaming-and-stop-reasons.md).
"""

from __future__ import annotations

from collections.abc import Callable

from inferd.call_stop import CallTracker
from inferd.chat._stream import OutputParser
from inferd.types import Done, Event, Request, Text

__all__ = ["CallStops", "OutputParser", "ParserFactory", "PlainText"]


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


class CallStops:
    """Per choice, what its reply did last; ``Done`` gets the stop reason that says so
    (``TOOL_USE`` after a call, OpenAI's ``END_TURN`` for a call forced by name)."""

    __slots__ = ("_calls", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self._calls: dict[int, CallTracker] = {}

    def see(self, event: Event) -> Event:
        """``event``, or for a ``Done`` the same with its true stop reason."""
        tracker = self._calls.get(event.index)
        if tracker is None:
            tracker = self._calls[event.index] = CallTracker()
        if not isinstance(event, Done):
            tracker.see(event)
            return event
        reason = tracker.stop_reason(self.request, event.stop_reason)
        return event if reason is event.stop_reason else event.replace(stop_reason=reason)
