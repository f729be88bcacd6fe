"""Shared bounds on untrusted JSON: nesting depth and echoed text (ADR 0010).

Every edge that turns bytes from a client or an upstream into Python objects (the
daemon's NDJSON frames, the bridge's HTTP bodies, request ``from_dict`` mappers) calls
:func:`check_depth` before walking the object, so a 1,000-deep ``[[[...]]]`` becomes an
``InvalidRequest`` naming the limit instead of a ``RecursionError`` that takes down
the connection. Error messages that repeat a client's value use :func:`echo`, so a
50 MiB string never comes back in a 50 MiB error. Host-memory budgets given in MiB
(the llamacpp caches) share one rule, :func:`check_mib`.
"""

from __future__ import annotations

import reprlib
from typing import Any

from inferd.errors import InvalidRequest

#: Deepest nesting of lists and objects accepted in a request (OpenAI requests with
#: JSON-schema tools rarely pass 20; llama-server's parser allows far more, but no
#: request that means something needs it).
MAX_JSON_DEPTH = 64
#: Most characters of a client's value repeated in an error message.
MAX_ECHO_CHARS = 80
#: Most characters of one error message sent to a client: a last cut for messages built
#: from text nobody bounded (an exception's ``str``), so no error frame is ever large.
MAX_ERROR_MESSAGE_CHARS = 1000
#: Largest host-memory budget accepted for a cache, MiB (1 TiB: past it the number is a
#: typo).
MAX_BUDGET_MIB = 1 << 20
#: Levels of a container :func:`echo` shows before writing ``...`` (a 1,000-deep list
#: is echoed as ``[[[...]]]`` instead of raising ``RecursionError``).
ECHO_MAX_LEVEL = 3


class _EchoRepr(reprlib.Repr):
    """A few levels and elements of a container, strings and other values cut at ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel = ECHO_MAX_LEVEL
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 6
        self.maxstring = self.maxother = limit

    def repr_int(self, x: int, level: int) -> str:
        bits = x.bit_length()
        return super().repr_int(x, level) if bits <= 128 else f"<int of {bits} bits>"


def check_depth(obj: Any, max_depth: int = MAX_JSON_DEPTH, *, what: str = "request") -> None:
    """``InvalidRequest`` when ``obj`` nests lists/dicts deeper than ``max_depth``.

    Iterative (an explicit stack), so it cannot itself hit the recursion limit; it
    visits every container once, so its cost is linear in the object's size.
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > max_depth:
            raise InvalidRequest(
                f"the {what} nests lists and objects more than {max_depth} levels deep "
                f"(limit MAX_JSON_DEPTH={max_depth})"
            )
        for child in children:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))


def echo(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr`` of a client's value cut to ``limit`` characters, saying how much was cut.

    Never walks more than a few elements or levels of a container, so a deep or huge
    value is echoed in constant time and cannot raise ``RecursionError``.
    """
    if isinstance(value, str | bytes):
        text = repr(value[: limit + 1])
    else:
        text = _EchoRepr(limit).repr(value)  # one per call: echo runs in worker threads too
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes | list | dict | tuple) else len(text)
    return f"{text[:limit]}... ({size} long, cut)"


def cut_message(text: str, limit: int = MAX_ERROR_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters (saying so): the last guard on an error message."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... (message cut from {len(text)} characters)"


def check_mib(key: str, value: Any, off: str) -> int:
    """The one rule for a cache's budget ``key``: an integer of MiB in
    ``[0, MAX_BUDGET_MIB]``; ``off`` names what 0 turns off, for the error."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BUDGET_MIB:
        raise InvalidRequest(
            f"{key}={echo(value)} must be an integer of MiB in [0, {MAX_BUDGET_MIB}]"
            f" (0 turns {off} off)"
        )
    return value
