"""``llama3``: Llama 3.1 / 3.2 / 3.3 JSON tool calls.

Meta's templates ask for a reply that *is* the call: ``{"name": ..., "parameters":
{...}}`` (3.2 and 3.3 without a marker; 3.1 may prefix ``<|python_tag|>``).
Several calls may follow one another, separated by ``;`` or new lines.

So the parser watches the start of the reply: if it begins like ``{"name":`` the
whole reply is read as calls when generation ends; any other start is plain text
and streams at once (only the first few characters wait, never the whole reply).
After ``<|python_tag|>`` everything up to the end is calls. A body that is not JSON
calls (including 3.1's built-in Python-style ``brave_search.call(...)``) falls
back to Text, marker included, so nothing is lost.
"""

from __future__ import annotations

from inferd.chat._stream import MalformedCall, SentinelParser, decode_json_objects
from inferd.chat.hermes import calls_from_objects
from inferd.types import ToolUse

#: How a call starts: ``{"name":`` or ``{"type": "function", "name":`` (3.2 writes both).
_STARTS = (
    ("{", '"name"', ":"),
    ("{", '"type"', ":", '"function"', ",", '"name"', ":"),
)


def _match_tokens(s: str, tokens: tuple[str, ...]) -> bool | None:
    i = 0
    for tok in tokens:
        while i < len(s) and s[i] in " \t\r\n":
            i += 1
        part = s[i : i + len(tok)]
        if part != tok:
            return None if tok.startswith(part) and i + len(part) == len(s) else False
        i += len(tok)
    return True


def looks_like_call(buf: str, final: bool) -> bool | None:
    """True when ``buf`` starts like ``{"name":``, False when it cannot, None: undecided."""
    results = [_match_tokens(buf, start) for start in _STARTS]
    if True in results:
        return True
    if None in results and not final:
        return None
    return False


class Llama3Parser(SentinelParser):
    """JSON calls at the start of the reply or after ``<|python_tag|>``."""

    name = "llama3"
    call_open = "<|python_tag|>"
    call_close = None
    end_sentinels = ("<|eom_id|>", "<|eot_id|>")

    def bare_call_start(self, buf: str, final: bool) -> bool | None:
        return looks_like_call(buf, final)

    def parse_call(self, opener: str, body: str, closed: bool) -> list[ToolUse]:
        objs = decode_json_objects(body)
        if not objs:
            raise MalformedCall("empty tool call after <|python_tag|>")
        if not opener and not all(
            isinstance(o, dict) and ("parameters" in o or "arguments" in o) for o in objs
        ):
            # A bare reply like {"name": "Bob", "age": 3} is an answer, not a call.
            raise MalformedCall("JSON reply without 'parameters': read as text")
        return calls_from_objects(self, objs, "parameters")
