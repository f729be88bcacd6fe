"""Which request fields change a reply, and the one rule for a backend that cannot
honour one: refuse it with :class:`InvalidRequest` naming the field, never drop it.

Every backend declares the optional fields it honours (a frozenset of
:class:`~inferd.types.Request` field names) and calls :func:`refuse_unhonoured` before
it starts a stream, so a client learns at once that, say, ``logit_bias`` cannot reach
the Anthropic API, instead of getting a reply that quietly ignored it
(docs/adr/0021-per-request-sampling-chain.md).

Fields that do not change the reply (``model``, ``keep_alive``, ``affinity_key``,
``stream_tool_arguments``) are never refused here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from inferd.errors import InvalidRequest
from inferd.limits import echo
from inferd.types import Request

#: Optional fields that change a reply, with the value that means "not set".
REPLY_FIELDS: dict[str, Any] = {
    # a raw completion (no chat template): only backends that can feed text as it is
    # honour it (docs/adr/0025-raw-completions-and-reasoning.md)
    "prompt": None,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "min_p": None,
    "seed": None,
    "response_format": None,
    "ignore_eos": False,
    "typical_p": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "repeat_penalty": None,
    "repeat_last_n": None,
    "dry_multiplier": None,
    "dry_base": None,
    "dry_allowed_length": None,
    "dry_penalty_last_n": None,
    "dry_sequence_breakers": None,
    "xtc_probability": None,
    "xtc_threshold": None,
    "logit_bias": None,
    "n": 1,
    "logprobs": False,
    "top_logprobs": None,
    "parallel_tool_calls": True,
    "reasoning_effort": None,
    # LoRA scales per request: llamacpp (docs/adr/0026-grammar-fast-path-and-context-knobs.md)
    "lora": None,
}

#: Every reply-changing field: for backends that honour all of them (Mock, relays).
ALL_REPLY_FIELDS: frozenset[str] = frozenset(REPLY_FIELDS)


def set_fields(request: Request) -> list[str]:
    """The reply-changing fields this request sets (differs from "not set"), in order."""
    return [name for name, unset in REPLY_FIELDS.items() if getattr(request, name) != unset]


def refuse_unhonoured(request: Request, backend: str, honoured: Iterable[str]) -> None:
    """Raise :class:`InvalidRequest` naming the first field ``request`` sets that the
    backend called ``backend`` does not honour."""
    ok = honoured if isinstance(honoured, (set, frozenset)) else frozenset(honoured)
    for name in set_fields(request):
        if name not in ok:
            value = getattr(request, name)
            raise InvalidRequest(
                f"{name}={echo(value)} cannot be honoured by backend {backend!r}; "
                f"leave {name} unset for this backend"
            )
