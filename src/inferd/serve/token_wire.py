"""Tokenizer and rerank requests on the daemon's wire (issue 19).

Why: a bridge in front of a daemon (``inferd.Client``) must serve ``/tokenize``,
``/detokenize``, ``/apply-template`` and ``/v1/rerank`` as one over an in-process
model does; the daemon's backend holds the tokenizer, so each ``Backend`` method
becomes one request frame and one answer frame
(docs/adr/0018-embeddings-rerank-tokens.md). Every request runs through the daemon's
admission like an embed (a rerank is a decode).

Client frames (``id`` and ``type`` are framing, :mod:`inferd.serve.wire`):

* ``tokenize``: ``{"content": str | [str | int, ...], "add_special": bool,
  "parse_special": bool}`` -> ``{"type": "tokens", "tokens": [int, ...]}``;
* ``token_pieces``: ``{"tokens": [int, ...]}`` -> ``{"type": "pieces", "pieces":
  [str, ...]}``, each piece's bytes as a Latin-1 string (one character per byte, so any
  bytes survive JSON and the size stays at most twice the bytes);
* ``detokenize``: ``{"tokens": [int, ...]}`` -> ``{"type": "detokenized", "content"}``;
* ``apply_template``: ``{<Request.to_dict()>}`` -> ``{"type": "prompt", "prompt"}``;
* ``rerank``: ``{"query", "documents", "top_n"}`` -> ``{"type": "reranked", "scores",
  "model", "usage"}``.

Hostile input (docs/adr/0010-hostile-input-limits.md): token lists and mixed content
lists hold at most :data:`MAX_WIRE_TOKENS` items, text to tokenize at most
:data:`MAX_TOKENIZE_BYTES`, token ids are integers in
``[0, MAX_TOKEN_ID]`` (the backend then checks its vocabulary), flags are booleans,
documents are bounded by ``MAX_RERANK_DOCUMENTS``, unknown keys are refused by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from inferd.backend import Backend
from inferd.errors import InternalError, InvalidRequest
from inferd.limits import echo
from inferd.types import Request, RerankRequest, RerankResult, Usage

#: Most items in one frame's token list or mixed content list (the bridge's bound too).
MAX_WIRE_TOKENS = 1_000_000
#: Largest token id a frame may carry (int32, what libllama's ``llama_token`` holds).
MAX_TOKEN_ID = 2**31 - 1
#: Most UTF-8 bytes of text one ``tokenize`` request may carry. A token is at least one
#: byte, so this bounds the reply (~4M ids, ~30 MB) and its list, which a 64 MiB frame
#: of text would otherwise turn into a list of tens of millions of ints.
MAX_TOKENIZE_BYTES = 4 * 1024 * 1024

#: The answer frame type of each request frame type.
REPLY_TYPES: dict[str, str] = {
    "tokenize": "tokens",
    "token_pieces": "pieces",
    "detokenize": "detokenized",
    "apply_template": "prompt",
    "rerank": "reranked",
}
#: The request frame types of this module.
CALL_TYPES = tuple(REPLY_TYPES)
#: Keys each request frame type accepts beside framing (``apply_template``: the
#: ``Request`` reader checks its own keys).
CALL_KEYS: dict[str, frozenset[str]] = {
    "tokenize": frozenset({"content", "add_special", "parse_special"}),
    "token_pieces": frozenset({"tokens"}),
    "detokenize": frozenset({"tokens"}),
    "rerank": frozenset({"query", "documents", "top_n"}),
}


@dataclass(frozen=True, slots=True)
class TokenCall:
    """One tokenizer request read from a frame: its ``kind`` and checked arguments."""

    kind: str
    content: str | tuple[str | int, ...] = ""
    tokens: tuple[int, ...] = ()
    add_special: bool = False
    parse_special: bool = True
    request: Request | None = None


#: What a frame of this module parses to.
Call = TokenCall | RerankRequest


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false, got {echo(value)}")
    return value


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_TOKEN_ID


def token_ids(value: Any, name: str = "tokens") -> tuple[int, ...]:
    """A bounded list of token ids (InvalidRequest names ``name`` and the limit)."""
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"{name} must be a list of token ids, got {type(value).__name__}")
    if len(value) > MAX_WIRE_TOKENS:
        raise InvalidRequest(
            f"{name} has {len(value)} items; at most {MAX_WIRE_TOKENS} (MAX_WIRE_TOKENS)"
        )
    if not all(_is_id(t) for t in value):
        raise InvalidRequest(f"{name} must hold only integer token ids from 0 to {MAX_TOKEN_ID}")
    return tuple(value)


def content_of(value: Any) -> str | tuple[str | int, ...]:
    """``tokenize``'s content: a string, or a bounded list of strings and token ids."""
    if isinstance(value, str):
        _check_text_bytes((value,))
        return value
    if not isinstance(value, list | tuple) or len(value) > MAX_WIRE_TOKENS:
        raise InvalidRequest(
            "content must be a string or a list of strings and token ids "
            f"(at most {MAX_WIRE_TOKENS} items, MAX_WIRE_TOKENS)"
        )
    if not all(isinstance(x, str) or _is_id(x) for x in value):
        raise InvalidRequest(
            f"content must hold only strings and integer token ids from 0 to {MAX_TOKEN_ID}"
        )
    _check_text_bytes(x for x in value if isinstance(x, str))
    return tuple(value)


def _check_text_bytes(texts: Iterable[str]) -> None:
    n = sum(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if n > MAX_TOKENIZE_BYTES:
        raise InvalidRequest(
            f"content has {n} bytes of text; at most {MAX_TOKENIZE_BYTES} "
            "(MAX_TOKENIZE_BYTES) per tokenize request"
        )


def call_from_body(kind: str, body: Mapping[str, Any]) -> Call:
    """The checked request of a ``kind`` frame whose framing keys are removed."""
    if kind == "apply_template":
        return TokenCall(kind, request=Request.from_dict(body))
    unknown = set(body) - CALL_KEYS[kind]
    if unknown:
        names = ", ".join(echo(k, 40) for k in sorted(unknown)[:8])
        raise InvalidRequest(f"unknown {kind} frame field(s): {names}")
    if kind == "tokenize":
        return TokenCall(
            kind,
            content=content_of(body.get("content", "")),
            add_special=_flag(body, "add_special", False),
            parse_special=_flag(body, "parse_special", True),
        )
    if kind == "rerank":
        docs = body.get("documents")
        if not isinstance(docs, list):
            raise InvalidRequest("documents must be a non-empty list of strings")
        return RerankRequest(body.get("query"), tuple(docs), body.get("top_n"))  # type: ignore[arg-type]
    return TokenCall(kind, tokens=token_ids(body.get("tokens")))


def call_frame(kind: str, **args: Any) -> dict[str, Any]:
    """A request frame (without ``id``) for the client side; tuples become lists."""
    if kind == "apply_template":
        return {"type": kind, **args["request"].to_dict()}
    return {"type": kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}}


def rerank_frame(request: RerankRequest) -> dict[str, Any]:
    return call_frame(
        "rerank", query=request.query, documents=request.documents, top_n=request.top_n
    )


async def serve(backend: Backend, call: Call) -> dict[str, Any]:
    """Run ``call`` on the daemon's backend; the answer frame without its ``id``."""
    if isinstance(call, RerankRequest):
        r = await backend.rerank(call)
        return {
            "type": "reranked",
            "scores": list(r.scores),
            "model": r.model,
            "usage": r.usage.to_dict(),
        }
    if call.kind == "tokenize":
        content = call.content if isinstance(call.content, str) else list(call.content)
        toks = await backend.tokenize(
            content, add_special=call.add_special, parse_special=call.parse_special
        )
        return {"type": "tokens", "tokens": list(toks)}
    if call.kind == "token_pieces":
        pieces = await backend.token_pieces(list(call.tokens))
        return {"type": "pieces", "pieces": [bytes(p).decode("latin-1") for p in pieces]}
    if call.kind == "detokenize":
        return {"type": "detokenized", "content": await backend.detokenize(list(call.tokens))}
    assert call.request is not None  # apply_template
    return {"type": "prompt", "prompt": await backend.apply_template(call.request)}


# --------------------------------------------------------------------------- client side


def _bad(what: str) -> InternalError:
    return InternalError(f"daemon sent a malformed answer: {what}")


def tokens_of(frame: Mapping[str, Any]) -> list[int]:
    toks = frame.get("tokens")
    if not isinstance(toks, list) or not all(_is_id(t) for t in toks):
        raise _bad("'tokens' is not a list of token ids")
    return toks


def pieces_of(frame: Mapping[str, Any], n: int) -> list[bytes]:
    pieces = frame.get("pieces")
    if not isinstance(pieces, list) or len(pieces) != n:
        raise _bad(f"'pieces' is not a list of {n} pieces")
    try:
        return [p.encode("latin-1") for p in pieces]
    except (AttributeError, UnicodeEncodeError):
        raise _bad("a piece is not a Latin-1 string") from None


def text_of(frame: Mapping[str, Any], key: str) -> str:
    value = frame.get(key)
    if not isinstance(value, str):
        raise _bad(f"{key!r} is not a string")
    return value


def rerank_result_of(frame: Mapping[str, Any], n: int) -> RerankResult:
    scores = frame.get("scores")
    if (
        not isinstance(scores, list)
        or len(scores) != n
        or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
    ):
        raise _bad(f"'scores' is not a list of {n} numbers")
    usage = frame.get("usage")
    try:
        u = Usage.from_dict(usage if isinstance(usage, Mapping) else None)
    except InvalidRequest as e:
        raise _bad(e.message) from None
    model = frame.get("model")
    return RerankResult(tuple(float(s) for s in scores), model if isinstance(model, str) else "", u)
