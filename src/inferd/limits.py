"""Shared bounds on untrusted JSON: nesting depth and echoed text (ADR 0010).

Every edge that turns bytes from a client or an upstream into Python objects (the
daemon's NDJSON frames, the bridge's HTTP bodies, request ``from_dict`` mappers) calls
:func:`check_depth` before walking the object, so a 1,000-deep ``[[[...]]]`` becomes an
``InvalidRequest`` naming the limit instead of a ``RecursionError`` that takes down
the connection. Error messages that repeat a client's value use :func:`echo`, so a
50 MiB string never comes back in a 50 MiB error.
"""

from __future__ import annotations

from typing import Any

from inferd.errors import InvalidRequest

#: Deepest nesting of lists and objects accepted in a request (OpenAI requests with
#: JSON-schema tools rarely pass 20; llama-server's parser allows far more, but no
#: request that means something needs it).
MAX_JSON_DEPTH = 64
#: Most characters of a client's value repeated in an error message.
MAX_ECHO_CHARS = 80


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
    """``repr`` of a client's value cut to ``limit`` characters, saying how much was cut."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes | list | dict | tuple) else len(text)
    return f"{text[:limit]}... ({size} long, cut)"
