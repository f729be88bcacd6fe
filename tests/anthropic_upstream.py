"""Anthropic Messages SSE streams for the scriptable upstream in :mod:`tests.upstream`.

:class:`tests.upstream.Upstream` serves any path, so the same fault injection (drops,
stalls, error statuses, slow pieces) works for ``/v1/messages``; this module builds
the bodies in the real protocol's shape: ``event:`` + ``data:`` pairs, ``ping``
between blocks, ``message_delta`` with usage, and the quirks an adapter must survive
(an ``error`` event mid-stream, 1-byte tool-input fragments, unknown event types, a
delta for an index never started).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from .upstream import Json, Status, Stream, Upstream

__all__ = [
    "SIG",
    "Json",
    "Status",
    "Stream",
    "Upstream",
    "anthropic_error",
    "ev",
    "message_json",
    "signed_reply",
    "stream",
    "text_block",
    "thinking_block",
    "tool_block",
]


def ev(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event as Anthropic frames it (the ``type`` repeated inside ``data``)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **data}) + b"\n\n"


def message_start(input_tokens: int = 7, cache_read: int = 0, cache_write: int = 0) -> bytes:
    return ev(
        "message_start",
        {
            "message": {
                "id": "msg_test",
                "type": "message",
                "role": "assistant",
                "model": "claude-test",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": input_tokens,
                    "output_tokens": 1,
                    "cache_read_input_tokens": cache_read,
                    "cache_creation_input_tokens": cache_write,
                },
            }
        },
    )


def text_block(index: int, parts: Iterable[str]) -> list[bytes]:
    out = [
        ev("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
    ]
    out += [
        ev("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": p}})
        for p in parts
    ]
    out.append(ev("content_block_stop", {"index": index}))
    return out


def thinking_block(index: int, parts: Iterable[str], signature: str = "sig-abc") -> list[bytes]:
    start = {"type": "thinking", "thinking": "", "signature": ""}
    out = [ev("content_block_start", {"index": index, "content_block": start})]
    out += [
        ev(
            "content_block_delta",
            {"index": index, "delta": {"type": "thinking_delta", "thinking": p}},
        )
        for p in parts
    ]
    sig = {"type": "signature_delta", "signature": signature}
    out.append(ev("content_block_delta", {"index": index, "delta": sig}))
    out.append(ev("content_block_stop", {"index": index}))
    return out


#: A thinking signature as the API sends them: opaque base64, with + / = in it.
SIG = "EqQBCkgIARABGAIiQL+dq/3Wx9kq+" + "Zm9v" * 100 + "Yg=="


def signed_reply() -> list[bytes]:
    """Signed thinking ("Let me check.", :data:`SIG` in two ``signature_delta`` parts),
    then a ``weather`` call for Paris: a reply a follow-up turn must send back."""
    sig_parts = [
        ev(
            "content_block_delta",
            {"index": 0, "delta": {"type": "signature_delta", "signature": p}},
        )
        for p in (SIG[:50], SIG[50:])
    ]
    thinking = thinking_block(0, ["Let me ", "check."])
    return stream(
        [*thinking[:-2], *sig_parts, thinking[-1]],
        tool_block(1, "toolu_1", "weather", ['{"city": ', '"Paris"}']),
        stop_reason="tool_use",
    )


def tool_block(index: int, id: str, name: str, fragments: Iterable[str]) -> list[bytes]:
    start = {"type": "tool_use", "id": id, "name": name, "input": {}}
    out = [ev("content_block_start", {"index": index, "content_block": start})]
    out += [
        ev(
            "content_block_delta",
            {"index": index, "delta": {"type": "input_json_delta", "partial_json": f}},
        )
        for f in fragments
    ]
    out.append(ev("content_block_stop", {"index": index}))
    return out


def message_end(stop_reason: str = "end_turn", output_tokens: int = 5) -> list[bytes]:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return [
        ev("message_delta", {"delta": delta, "usage": {"output_tokens": output_tokens}}),
        ev("message_stop", {}),
    ]


def stream(
    *blocks: list[bytes],
    stop_reason: str = "end_turn",
    input_tokens: int = 7,
    output_tokens: int = 5,
    cache_read: int = 0,
    cache_write: int = 0,
    ping: bool = True,
) -> list[bytes]:
    """A whole reply: ``message_start``, a ``ping``, the blocks (pings between), the end."""
    out = [message_start(input_tokens, cache_read, cache_write)]
    for b in blocks:
        if ping:
            out.append(ev("ping", {}))
        out += b
    return out + message_end(stop_reason, output_tokens)


def anthropic_error(status: int, etype: str, message: str = "scripted") -> Status:
    """An HTTP error in Anthropic's error shape."""
    body = orjson.dumps({"type": "error", "error": {"type": etype, "message": message}})
    return Status(status, body)


def message_json(text: str = "ok", stop_reason: str = "end_turn") -> dict[str, Any]:
    return {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": text}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }
