"""Anthropic Messages API <-> inferd types: pure mappers, no I/O.

Used both ways (docs/adr/0014-anthropic-messages-both-ways.md):

* out: :func:`request_to_anthropic` builds the ``/v1/messages`` body that
  :class:`inferd.backends.anthropic_compat.AnthropicCompat` sends;
* in: :func:`request_from_anthropic` reads a client's body for the bridge's
  ``/v1/messages``, and :class:`MessageStreamWriter` / :func:`response_to_message` write
  our events back as Anthropic SSE events or one message object.

What the Messages API cannot carry is refused with :class:`InvalidRequest` naming the
field (``min_p``, ``seed``, ``ignore_eos``, audio, JSON ``response_format``), never
dropped. Stop reasons are mapped by :data:`STOP_FROM_ANTHROPIC` (documented there).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from inferd.errors import InferdError, InvalidRequest
from inferd.limits import check_depth, echo
from inferd.request_fields import refuse_unhonoured
from inferd.types import (
    MAX_MESSAGES,
    MAX_TOOLS,
    AudioBlock,
    Block,
    Done,
    Event,
    ImageBlock,
    Message,
    Request,
    Response,
    StopReason,
    Text,
    TextBlock,
    Thinking,
    ThinkingBlock,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUse,
    ToolUseBlock,
    ToolUseDelta,
    Usage,
)

#: The ``anthropic-version`` header sent upstream (the stable Messages API version).
ANTHROPIC_VERSION = "2023-06-01"
#: ``max_tokens`` sent when the request sets none: the Messages API requires the field.
DEFAULT_MAX_TOKENS = 4096
#: ``thinking.budget_tokens`` sent for ``Request(thinking=True)`` (our Request carries
#: no budget); the API's minimum is :data:`MIN_THINKING_BUDGET`.
DEFAULT_THINKING_BUDGET = 2048
MIN_THINKING_BUDGET = 1024

#: Anthropic stop reason -> ours. ``pause_turn`` (a server tool paused a long turn;
#: the caller sends the reply back to continue) and ``model_context_window_exceeded``
#: both mean "incomplete, continue", which is what MAX_TOKENS tells a caller.
#: ``refusal`` ends the turn (the text says why); unknown or missing -> END_TURN.
STOP_FROM_ANTHROPIC: dict[str, StopReason] = {
    "end_turn": StopReason.END_TURN,
    "max_tokens": StopReason.MAX_TOKENS,
    "stop_sequence": StopReason.STOP_SEQUENCE,
    "tool_use": StopReason.TOOL_USE,
    "pause_turn": StopReason.MAX_TOKENS,
    "refusal": StopReason.END_TURN,
    "model_context_window_exceeded": StopReason.MAX_TOKENS,
}
#: Ours -> Anthropic (CANCELLED and ERROR never reach a finished reply).
STOP_TO_ANTHROPIC: dict[StopReason, str] = {
    StopReason.END_TURN: "end_turn",
    StopReason.MAX_TOKENS: "max_tokens",
    StopReason.STOP_SEQUENCE: "stop_sequence",
    StopReason.TOOL_USE: "tool_use",
    StopReason.CANCELLED: "end_turn",
    StopReason.ERROR: "end_turn",
}


def stop_reason_to_anthropic(stop: StopReason, *, called_tools: bool) -> str:
    """Ours -> Anthropic's. A reply that called tools and ended on its own is
    ``tool_use`` even if the backend said END_TURN (some local backends do, after a
    grammar-forced call): Anthropic clients run their tool loop on that value."""
    if called_tools and stop is StopReason.END_TURN:
        return "tool_use"
    return STOP_TO_ANTHROPIC[stop]


def stop_reason_from_anthropic(reason: Any) -> StopReason:
    return STOP_FROM_ANTHROPIC.get(reason, StopReason.END_TURN) if reason else StopReason.END_TURN


def usage_from_anthropic(u: Mapping[str, Any] | None, base: Usage | None = None) -> Usage:
    """Anthropic usage -> ours. Anthropic's ``input_tokens`` excludes cached tokens, so
    our ``input_tokens`` (the whole prompt, as OpenAI counts it) adds cache reads and
    cache writes; ``cached_tokens`` is the cache reads. Usage has no field for cache
    writes on their own (they are in ``input_tokens``). Fields absent from ``u`` keep
    ``base``'s values (``message_delta`` repeats only some of them)."""
    base = base or Usage()
    if not isinstance(u, Mapping):
        return base

    def n(key: str) -> int | None:
        v = u.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    inp, read, write, out = (
        n("input_tokens"),
        n("cache_read_input_tokens"),
        n("cache_creation_input_tokens"),
        n("output_tokens"),
    )
    if inp is None and read is None and write is None:
        total_in, cached = base.input_tokens, base.cached_tokens
    else:
        prev_plain = base.input_tokens - base.cached_tokens
        total_in = (inp if inp is not None else prev_plain) + (read or 0) + (write or 0)
        cached = read if read is not None else base.cached_tokens
    return Usage(total_in, out if out is not None else base.output_tokens, cached)


# =========================================================================== out


def _image_out(block: ImageBlock, request: Request) -> dict[str, Any]:
    if block.url is not None:
        return {"type": "image", "source": {"type": "url", "url": block.url}}
    data, media = block.data, block.media_type
    if block.attachment is not None:
        att = request.attachment(block.attachment)
        data, media = att.data, att.media_type
    assert data is not None
    b64 = base64.b64encode(data).decode("ascii")
    return {"type": "image", "source": {"type": "base64", "media_type": media, "data": b64}}


def _block_out(b: Block, request: Request, where: str) -> dict[str, Any] | None:
    if isinstance(b, TextBlock):
        return {"type": "text", "text": b.text} if b.text else None
    if isinstance(b, ImageBlock):
        return _image_out(b, request)
    if isinstance(b, ToolUseBlock):
        return {"type": "tool_use", "id": b.id, "name": b.name, "input": dict(b.input)}
    if isinstance(b, ThinkingBlock):
        # Only a signed block can go back (the API refuses an unsigned one); earlier
        # turns' reasoning from other backends is dropped, as the API drops it anyway.
        if b.signature is None:
            return None
        return {"type": "thinking", "thinking": b.text, "signature": b.signature}
    if isinstance(b, ToolResultBlock):
        out: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": b.tool_use_id,
            "content": b.content,
        }
        if b.is_error:
            out["is_error"] = True
        return out
    assert isinstance(b, AudioBlock)
    raise InvalidRequest(f"{where} has audio, which the Anthropic Messages API cannot carry")


def _messages_out(request: Request) -> tuple[str, list[dict[str, Any]]]:
    """(system text, turns): system messages hoisted; tool results in user turns;
    consecutive turns of one role merged (tool results stay first, in order)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(request.messages):
        if m.role == "system":
            system.append(m.text)
            continue
        role = "assistant" if m.role == "assistant" else "user"
        blocks = [x for b in m.content if (x := _block_out(b, request, f"messages[{i}]"))]
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(s for s in system if s), turns


def _tool_choice_out(tc: ToolChoice) -> dict[str, Any]:
    if tc.kind == "tool":
        return {"type": "tool", "name": tc.name}
    return {"type": {"auto": "auto", "required": "any", "none": "none"}[tc.kind]}


#: Reply-changing Request fields the Messages API can carry; any other set field is
#: refused by the one rule in inferd.request_fields (docs/adr/0021-*.md).
ANTHROPIC_HONOURED: frozenset[str] = frozenset({"temperature", "top_p", "top_k", "response_format"})
#: ``parallel_tool_calls: false`` is ``tool_choice.disable_parallel_tool_use`` (ADR 0023).
ANTHROPIC_HONOURED |= {"parallel_tool_calls"}


def _refuse_unmappable(request: Request) -> None:
    refuse_unhonoured(request, "the Anthropic Messages API", ANTHROPIC_HONOURED)
    rf = request.response_format
    if rf is not None and rf.get("type") != "text":
        raise InvalidRequest(
            f"response_format {echo(rf.get('type'))} is not supported by the Anthropic "
            "Messages API (use a forced tool instead)"
        )


def _thinking_out(request: Request, max_tokens: int, budget: int) -> tuple[dict[str, Any], int]:
    """The ``thinking`` object and the (possibly raised) ``max_tokens``: the API needs
    ``budget_tokens`` >= 1024 and < ``max_tokens``."""
    if max_tokens > budget:
        return {"type": "enabled", "budget_tokens": budget}, max_tokens
    if request.max_tokens is None:
        return {"type": "enabled", "budget_tokens": budget}, budget + DEFAULT_MAX_TOKENS
    if max_tokens - 1 < MIN_THINKING_BUDGET:
        raise InvalidRequest(
            f"thinking needs max_tokens > {MIN_THINKING_BUDGET} on the Anthropic Messages "
            f"API (the smallest thinking budget); got max_tokens={max_tokens}"
        )
    return {"type": "enabled", "budget_tokens": max_tokens - 1}, max_tokens


def request_to_anthropic(
    request: Request,
    *,
    model: str,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    thinking_budget: int = DEFAULT_THINKING_BUDGET,
) -> dict[str, Any]:
    """A ``/v1/messages`` body for ``request`` (without ``stream``).

    ``max_tokens`` is the default when the request sets none (the API requires one).
    """
    _refuse_unmappable(request)
    system, turns = _messages_out(request)
    if not turns:
        raise InvalidRequest("the Anthropic Messages API needs at least one user message")
    body: dict[str, Any] = {"model": model, "messages": turns}
    limit = request.max_tokens or max_tokens
    if system:
        body["system"] = system
    if request.tools:
        body["tools"] = [
            {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}
            for t in request.tools
        ]
    if request.tool_choice is not None:
        body["tool_choice"] = _tool_choice_out(request.tool_choice)
    if request.tools and not request.parallel_tool_calls:
        choice = body.setdefault("tool_choice", {"type": "auto"})
        if choice["type"] != "none":  # Anthropic refuses the flag on "none"
            choice["disable_parallel_tool_use"] = True
    for name in ("temperature", "top_p", "top_k"):
        v = getattr(request, name)
        if v is not None:
            body[name] = v
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.thinking:
        body["thinking"], limit = _thinking_out(request, limit, thinking_budget)
    body["max_tokens"] = limit
    return body


# =========================================================================== in

#: Top-level fields a ``/v1/messages`` body may have; any other is refused, as
#: Anthropic itself refuses them. ``metadata`` and ``service_tier`` never change a reply.
KNOWN_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "metadata",
        "service_tier",
    }
)


def _text_of(content: Any, where: str) -> str:
    """A string, or a list of text blocks (system prompts, tool results), as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of text blocks")
    out = []
    for j, b in enumerate(content):
        if not isinstance(b, Mapping) or b.get("type") != "text":
            kind = b.get("type") if isinstance(b, Mapping) else type(b).__name__
            raise InvalidRequest(f"{where}[{j}] is {echo(kind)}; only text blocks are supported")
        t = b.get("text")
        if not isinstance(t, str):
            raise InvalidRequest(f"{where}[{j}].text must be a string")
        out.append(t)
    return "".join(out)


def _image_in(b: Mapping[str, Any], where: str) -> ImageBlock:
    src = b.get("source")
    if not isinstance(src, Mapping):
        raise InvalidRequest(f"{where}.source must be an object")
    if src.get("type") == "base64":
        try:
            data = base64.b64decode(str(src.get("data", "")), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{where}.source.data is not valid base64") from None
        media = src.get("media_type")
        return ImageBlock(data=data, media_type=media if isinstance(media, str) else "image/png")
    if src.get("type") == "url" and isinstance(src.get("url"), str):
        return ImageBlock(url=src["url"])
    raise InvalidRequest(f"{where}.source.type {echo(src.get('type'))} is not base64 or url")


def _blocks_in(content: Any, role: str, where: str) -> tuple[list[Block], list[Message]]:
    """(ordinary blocks, tool-result messages) of one turn's content."""
    if isinstance(content, str):
        return [TextBlock(content)], []
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of blocks")
    blocks: list[Block] = []
    results: list[Message] = []
    for j, b in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(b, Mapping):
            raise InvalidRequest(f"{at} must be an object")
        kind = b.get("type")
        if kind == "text" and isinstance(b.get("text"), str):
            blocks.append(TextBlock(b["text"]))
        elif kind == "image":
            blocks.append(_image_in(b, at))
        elif kind == "tool_use" and role == "assistant":
            inp = b.get("input", {})
            if not isinstance(inp, Mapping) or not isinstance(b.get("id"), str):
                raise InvalidRequest(f"{at} needs a string id and an object input")
            blocks.append(ToolUseBlock(b["id"], str(b.get("name", "")), inp))
        elif kind == "tool_result" and role == "user":
            if not isinstance(b.get("tool_use_id"), str):
                raise InvalidRequest(f"{at}.tool_use_id must be a string")
            text = _text_of(b.get("content", ""), f"{at}.content")
            results.append(Message.tool(b["tool_use_id"], text, bool(b.get("is_error", False))))
        elif kind == "thinking" and role == "assistant":
            blocks.append(_thinking_block_in(b, at))
        elif kind == "redacted_thinking" and role == "assistant":
            continue  # encrypted reasoning: no backend of ours can read or carry it
        else:
            raise InvalidRequest(f"{at} has unsupported block type {echo(kind)} for {role}")
    return blocks, results


def _thinking_block_in(b: Mapping[str, Any], where: str) -> ThinkingBlock:
    """An earlier turn's reasoning, kept with its signature: an Anthropic backend sends
    it back unchanged; local templates see it as ``reasoning_content``."""
    text, sig = b.get("thinking", ""), b.get("signature")
    if not isinstance(text, str) or not (sig is None or isinstance(sig, str)):
        raise InvalidRequest(f"{where} needs string thinking and signature")
    return ThinkingBlock(text, sig or None)


def _messages_in(body: Mapping[str, Any]) -> list[Message]:
    msgs: list[Message] = []
    if body.get("system") is not None:
        msgs.append(Message.system(_text_of(body["system"], "system")))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages must be a non-empty list")
    if len(raw) > MAX_MESSAGES:
        raise InvalidRequest(f"{len(raw)} messages given; at most {MAX_MESSAGES} (MAX_MESSAGES)")
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping) or m.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role must be 'user' or 'assistant'")
        blocks, results = _blocks_in(m.get("content"), m["role"], f"messages[{i}]")
        msgs.extend(results)
        if blocks:
            msgs.append(Message(m["role"], blocks))
    return msgs


def _tools_in(body: Mapping[str, Any]) -> tuple[Tool, ...]:
    raw = body.get("tools") or []
    if not isinstance(raw, list):
        raise InvalidRequest("tools must be a list")
    if len(raw) > MAX_TOOLS:
        raise InvalidRequest(f"{len(raw)} tools given; at most {MAX_TOOLS} (MAX_TOOLS)")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, Mapping):
            raise InvalidRequest(f"tools[{i}] must be an object")
        if t.get("type") not in (None, "custom"):
            raise InvalidRequest(
                f"tools[{i}] is a server tool ({echo(t.get('type'))}); only custom tools "
                "(name, description, input_schema) are supported"
            )
        schema = t.get("input_schema")
        if not isinstance(schema, Mapping):
            raise InvalidRequest(f"tools[{i}].input_schema must be a JSON-schema object")
        tools.append(Tool(t.get("name", ""), t.get("description") or "", schema))
    return tuple(tools)


def _tool_choice_in(tc: Any) -> ToolChoice | None:
    if tc is None:
        return None
    if not isinstance(tc, Mapping):
        raise InvalidRequest("tool_choice must be an object like {'type': 'auto'}")
    kind = tc.get("type")
    if kind == "tool":
        return ToolChoice("tool", tc.get("name"))
    mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)  # type: ignore[arg-type]
    if mapped is None:
        raise InvalidRequest(f"tool_choice.type {echo(kind)} is not auto, any, tool or none")
    return ToolChoice(mapped)  # type: ignore[arg-type]


def _parallel_off(tc: Any) -> bool:
    """``tool_choice.disable_parallel_tool_use``: at most one call (ADR 0023)."""
    flag = tc.get("disable_parallel_tool_use", False) if isinstance(tc, Mapping) else False
    if not isinstance(flag, bool):
        raise InvalidRequest("tool_choice.disable_parallel_tool_use must be true or false")
    return flag


def _thinking_in(th: Any) -> bool:
    """``{"type": "enabled", "budget_tokens": n}`` turns thinking on; the budget is not
    enforced on its own (the whole reply is bounded by ``max_tokens``; ADR 0014)."""
    if th is None:
        return False
    if not isinstance(th, Mapping) or th.get("type") not in ("enabled", "disabled"):
        raise InvalidRequest("thinking must be {'type': 'enabled', ...} or {'type': 'disabled'}")
    return bool(th["type"] == "enabled")


def request_from_anthropic(body: Mapping[str, Any]) -> Request:
    """A :class:`Request` from an untrusted ``/v1/messages`` body."""
    check_depth(body, what="request body")
    unknown = set(body) - KNOWN_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown field(s): {echo(sorted(unknown))}")
    mt = body.get("max_tokens")
    if mt is None:
        raise InvalidRequest("max_tokens is required")
    stop = body.get("stop_sequences") or ()
    if not isinstance(stop, list | tuple):
        raise InvalidRequest("stop_sequences must be a list of strings")
    model = body.get("model")
    try:
        return Request(
            messages=tuple(_messages_in(body)),
            tools=_tools_in(body),
            tool_choice=_tool_choice_in(body.get("tool_choice")),
            parallel_tool_calls=not _parallel_off(body.get("tool_choice")),
            temperature=body.get("temperature"),
            top_p=body.get("top_p"),
            top_k=body.get("top_k"),
            max_tokens=mt,
            stop=tuple(stop),
            thinking=_thinking_in(body.get("thinking")),
            model=model if isinstance(model, str) else None,
        )
    except (KeyError, TypeError, AttributeError) as e:  # a reader missed a check
        raise InvalidRequest(f"malformed request ({type(e).__name__})") from None


# =========================================================================== replies


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def usage_to_anthropic(u: Usage) -> dict[str, Any]:
    """Ours -> Anthropic: ``input_tokens`` excludes the cached part, as Anthropic counts."""
    return {
        "input_tokens": max(0, u.input_tokens - u.cached_tokens),
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def response_to_message(response: Response, *, model: str, id: str) -> dict[str, Any]:
    """A whole reply as one non-streamed Messages API ``message`` object."""
    content: list[dict[str, Any]] = [
        {"type": "thinking", "thinking": b.text, "signature": b.signature or ""}
        for b in response.thinking_blocks
        if b.text or b.signature
    ]
    if response.thinking and not content:  # a Response built by hand, without blocks
        content.append({"type": "thinking", "thinking": response.thinking, "signature": ""})
    if response.text:
        content.append({"type": "text", "text": response.text})
    for c in response.tool_calls:
        content.append(_tool_use_block(c))
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason_to_anthropic(
            response.stop_reason, called_tools=bool(response.tool_calls)
        ),
        "stop_sequence": None,
        "usage": usage_to_anthropic(response.done.usage),
    }


def _tool_use_block(c: ToolUse) -> dict[str, Any]:
    return {"type": "tool_use", "id": c.id, "name": c.name, "input": dict(c.input or {})}


def sse_event(name: str, data: Mapping[str, Any]) -> bytes:
    """One named SSE event, as Anthropic frames them."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessageStreamWriter:
    """Our events -> the Messages API's SSE events, in its order: ``message_start``,
    per block ``content_block_start`` / ``_delta``... / ``_stop``, ``message_delta``
    (stop reason, usage), ``message_stop``. A change of kind (text, thinking, a tool
    call) closes the open block and starts the next one. A call's ``ToolUseDelta``
    events stream as ``input_json_delta`` pieces of its block as they come, and its
    complete ``ToolUse`` adds only what they lacked (ADR 0023)."""

    __slots__ = ("_called", "_index", "_open", "_sent", "finished", "id", "model")

    def __init__(self, model: str, id: str | None = None) -> None:
        self.model = model
        self.id = id or new_message_id()
        self._index = -1
        self._open: str | None = None
        self._called = False
        self._sent = ""  # the open streamed call's arguments so far
        self.finished = False

    def start(self) -> bytes:
        msg: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse_event("message_start", {"type": "message_start", "message": msg})

    def _switch(self, kind: str | None, block: dict[str, Any] | None) -> list[bytes]:
        out = []
        if self._open is not None:
            out.append(
                sse_event(
                    "content_block_stop", {"type": "content_block_stop", "index": self._index}
                )
            )
        self._open = kind
        if block is not None:
            self._index += 1
            out.append(
                sse_event(
                    "content_block_start",
                    {"type": "content_block_start", "index": self._index, "content_block": block},
                )
            )
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self._index, "delta": delta},
        )

    def write(self, event: Event) -> bytes:
        """The SSE bytes for one event."""
        if isinstance(event, Text):
            out = [] if self._open == "text" else self._switch("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": event.text}))
        elif isinstance(event, Thinking):
            out = self._thinking(event)
        elif isinstance(event, ToolUseDelta):
            out = self._call_delta(event)
        elif isinstance(event, ToolUse):
            self._called = True
            if self._open == f"tool_use {event.id}":  # streamed: send what is left
                raw = event.raw_arguments
                rest = raw[len(self._sent) :] if raw.startswith(self._sent) else ""
                delta = {"type": "input_json_delta", "partial_json": rest}
                out = [self._delta(delta)] if rest else []
                self._open = "tool_use"  # the next call opens its own block
            else:
                out = self._switch("tool_use", {**_tool_use_block(event), "input": {}})
                raw = orjson.dumps(dict(event.input or {})).decode()
                out.append(self._delta({"type": "input_json_delta", "partial_json": raw}))
        else:
            assert isinstance(event, Done)
            out = self._switch(None, None)
            out.append(self._end(event))
        return b"".join(out)

    def _call_delta(self, event: ToolUseDelta) -> list[bytes]:
        """A piece of a call's arguments: opens the call's block on its first piece."""
        out: list[bytes] = []
        if self._open != f"tool_use {event.id}":
            block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
            out = self._switch(f"tool_use {event.id}", block)
            self._sent = ""
        if event.arguments_fragment:
            self._sent += event.arguments_fragment
            out.append(
                self._delta({"type": "input_json_delta", "partial_json": event.arguments_fragment})
            )
        return out

    def _thinking(self, event: Thinking) -> list[bytes]:
        """A thinking delta; a signature ends the block (the next reasoning opens one)."""
        out = (
            []
            if self._open == "thinking"
            else self._switch("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        )
        if event.text:
            out.append(self._delta({"type": "thinking_delta", "thinking": event.text}))
        if event.signature is not None:
            out.append(self._delta({"type": "signature_delta", "signature": event.signature}))
            self._open = "thinking (signed)"
        return out

    def _end(self, done: Done) -> bytes:
        self.finished = True
        u = usage_to_anthropic(done.usage)
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": stop_reason_to_anthropic(
                    done.stop_reason, called_tools=self._called
                ),
                "stop_sequence": None,
            },
            "usage": u,
        }
        return sse_event("message_delta", delta) + sse_event(
            "message_stop", {"type": "message_stop"}
        )


# =========================================================================== errors

#: inferd error code -> (Anthropic error type, HTTP status).
ERROR_TYPES: dict[str, tuple[str, int]] = {
    "invalid_request": ("invalid_request_error", 400),
    "embed_unsupported": ("invalid_request_error", 400),
    "not_ready": ("overloaded_error", 503),
    "queue_full": ("rate_limit_error", 429),
    "backend_unavailable": ("api_error", 502),
    "model_load_error": ("api_error", 500),
    "internal": ("api_error", 500),
}
#: HTTP status -> Anthropic error type, for errors that are not inferd exceptions.
STATUS_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(etype: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": etype, "message": message}}


def error_for(exc: BaseException) -> tuple[dict[str, Any], int]:
    """(Anthropic error body, HTTP status) for ``exc``; a non-inferd exception is named
    by type only (its text may hold anything)."""
    if isinstance(exc, InferdError):
        etype, status = ERROR_TYPES.get(exc.code, ("api_error", 500))
        return error_body(etype, exc.message), status
    return error_body("api_error", f"internal error ({type(exc).__name__})"), 500
