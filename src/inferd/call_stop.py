"""The one rule for a reply's stop reason once tool calls are involved.

OpenAI clients and agent loops branch on ``finish_reason == "tool_calls"``, so a reply
whose last act is a tool call must end with :attr:`StopReason.TOOL_USE` on every
backend, whatever the model or upstream said (``LlamaCpp`` sees only an end-of-turn
token; some upstreams say ``"stop"``). The one exception copies OpenAI: a call forced
by *name* (``tool_choice={"type": "function", ...}``) ends with ``"stop"``
(``END_TURN``), while ``auto`` and ``required`` end with ``"tool_calls"``
(docs/adr/0023-tool-call-streaming-and-stop-reasons.md). A cut-off reply keeps
``MAX_TOKENS``, a matched stop string ``STOP_SEQUENCE``: those are not a call's end.
A reply whose last act is not a call keeps what the backend or upstream said.
"""

from __future__ import annotations

from inferd.types import Event, Request, StopReason, Text, Thinking, ToolUse

__all__ = ["CallTracker", "stop_after_calls"]


class CallTracker:
    """Watches one reply's events: did it call a tool, and was a call its last act?"""

    __slots__ = ("called", "last_was_call")

    def __init__(self) -> None:
        self.called = False
        self.last_was_call = False

    def see(self, event: Event) -> None:
        if isinstance(event, ToolUse):
            self.called = self.last_was_call = True
        elif isinstance(event, (Text, Thinking)) and event.text.strip():
            self.last_was_call = False

    def stop_reason(self, request: Request, reason: StopReason) -> StopReason:
        """:func:`stop_after_calls` for what this tracker saw."""
        return stop_after_calls(request, reason, called=self.called, last=self.last_was_call)


def stop_after_calls(
    request: Request, reason: StopReason, *, called: bool, last: bool
) -> StopReason:
    """The stop reason a reply reports: ``reason`` as the backend found it, ``called``
    whether it made a complete call, ``last`` whether a call was its last act."""
    if reason not in (StopReason.END_TURN, StopReason.TOOL_USE):
        return reason
    choice = request.tool_choice
    if called and choice is not None and choice.kind == "tool":
        return StopReason.END_TURN  # what OpenAI answers for a call forced by name
    if last:
        return StopReason.TOOL_USE
    return reason  # no call last: what the backend or upstream said
