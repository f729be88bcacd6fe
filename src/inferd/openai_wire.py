"""OpenAI Chat Completions <-> inferd types, both directions, in one place.

One mapping module used three ways (``docs/architecture.md``, "Layers"):

* the cloud adapter maps requests *out* (:func:`request_to_openai`), while the streaming
  decoder in :mod:`inferd.toolcalls` maps chunks *in*;
* :meth:`inferd.types.Request.from_openai` / ``to_openai`` delegate to
  :func:`request_from_openai` / :func:`request_to_openai`;
* the HTTP bridge maps the other way round: an incoming body becomes a
  :class:`~inferd.types.Request`, and events become ``chat.completion.chunk`` dicts
  (:class:`ChunkWriter`), a whole :class:`~inferd.types.Response` becomes a
  ``chat.completion`` (:func:`response_to_completion`), and errors become OpenAI error
  objects (:func:`error_object`, :func:`http_status`).

Keeping every direction here means a field added once is added everywhere, and the
round-trip tests (``to_openai(from_openai(x))``) catch a direction that drifts.
Everything is a pure function of its inputs; nothing here does I/O. Only
:mod:`inferd.types` and :mod:`inferd.errors` are imported (plus orjson).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from inferd.errors import (
    BackendUnavailable,
    EmbedUnsupported,
    InferdError,
    InvalidRequest,
    NotReady,
    QueueFull,
)
from inferd.limits import check_depth, echo
from inferd.request_fields import refuse_unhonoured
from inferd.types import (
    MAX_MESSAGES,
    MAX_TOOLS,
    AudioBlock,
    Block,
    Done,
    EmbedRequest,
    EmbedResult,
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
    TokenLogprob,
    Tool,
    ToolChoice,
    ToolResultBlock,
    ToolUse,
    ToolUseBlock,
    ToolUseDelta,
    Usage,
    choices_usage,
)

__all__ = [
    "FINISH_REASONS",
    "SSE_DONE",
    "STOP_REASONS",
    "ChunkWriter",
    "embed_request_from_openai",
    "embed_request_to_openai",
    "embed_result_from_openai",
    "embed_result_to_openai",
    "error_object",
    "finish_reason",
    "http_status",
    "request_from_openai",
    "request_to_openai",
    "response_to_completion",
    "sse_encode",
    "stop_reason_from_finish",
    "usage_from_openai",
    "usage_to_openai",
]

#: StopReason -> OpenAI ``finish_reason``. OpenAI has no "cancelled" or "error"
#: reason; a stream that reached ``Done`` ended normally from the client's view.
FINISH_REASONS: dict[StopReason, str] = {
    StopReason.END_TURN: "stop",
    StopReason.STOP_SEQUENCE: "stop",
    StopReason.MAX_TOKENS: "length",
    StopReason.TOOL_USE: "tool_calls",
    StopReason.CANCELLED: "stop",
    StopReason.ERROR: "stop",
}

#: OpenAI ``finish_reason`` -> :class:`StopReason`: the one table. The streaming cores
#: (``inferd._fast._chunks_py`` / ``_chunks_c``) read it too, so a reply read live and
#: one read whole can never disagree. ``content_filter`` is ``END_TURN``: the upstream
#: ended the reply on its own, and ``STOP_SEQUENCE`` would tell the caller that one of
#: *its* ``stop`` strings matched, which did not happen. Any other value ("eos",
#: "abort", ...) is also read as ``END_TURN`` by the readers below.
STOP_REASONS: dict[str, StopReason] = {
    "stop": StopReason.END_TURN,
    "length": StopReason.MAX_TOKENS,
    "tool_calls": StopReason.TOOL_USE,
    "function_call": StopReason.TOOL_USE,
    "content_filter": StopReason.END_TURN,
}

#: The SSE terminator OpenAI streams end with.
SSE_DONE = b"data: [DONE]\n\n"


def finish_reason(stop: StopReason) -> str:
    """The OpenAI ``finish_reason`` for ``stop``."""
    return FINISH_REASONS[StopReason(stop)]


def stop_reason_from_finish(reason: str | None) -> StopReason:
    """The :class:`StopReason` for an OpenAI ``finish_reason`` (unknown -> END_TURN).

    Upstreams invent reasons ("eos", "abort"); treating them as a normal end keeps a
    good reply from being thrown away over a label.
    """
    if reason is None:
        return StopReason.END_TURN
    return STOP_REASONS.get(reason, StopReason.END_TURN)


def sse_encode(chunk: Mapping[str, Any]) -> bytes:
    """One chunk as an SSE ``data:`` event (``\\n\\n`` terminated)."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


# =========================================================================== usage


def usage_to_openai(usage: Usage) -> dict[str, Any]:
    """An OpenAI ``usage`` object (``prompt_tokens_details.cached_tokens`` included)."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def timings_to_llama(dones: Sequence[Done]) -> dict[str, Any]:
    """A reply's ``timings`` object under llama-server's names: its OpenAI-compatible
    replies carry one (in a stream, on the last chunk), and its web UI and users' scripts
    read the generation rate there. Token counts come from the usage (``prompt_n``
    without the cached ones, ``cache_n`` those); the generation time is the longest
    choice's, first token to end, and the rate the choices' rates summed (they decode
    side by side). The draft counts appear only when something was drafted (ADR 0027).
    No ``prompt_ms``: our time to first token includes the queue, llama-server's prompt
    time does not."""
    usage = choices_usage(dones)
    decode_s = max((d.timings.total_s - (d.timings.ttft_s or 0.0) for d in dones), default=0.0)
    out: dict[str, Any] = {
        "cache_n": usage.cached_tokens,
        "prompt_n": usage.input_tokens - usage.cached_tokens,
        "predicted_n": usage.output_tokens,
        "predicted_ms": 1000 * decode_s,
    }
    rates = [d.timings.tokens_per_s for d in dones if d.timings.tokens_per_s is not None]
    if rates:
        out["predicted_per_second"] = sum(rates)
    drafted = [d.timings for d in dones if d.timings.draft_tokens is not None]
    if drafted:
        out["draft_n"] = sum(t.draft_tokens or 0 for t in drafted)
        out["draft_n_accepted"] = sum(t.draft_accepted or 0 for t in drafted)
    return out


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def usage_from_openai(d: Mapping[str, Any] | None) -> Usage:
    """A :class:`Usage` from an OpenAI ``usage`` object; missing counts are 0."""
    if not isinstance(d, Mapping):
        return Usage()
    details = d.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    return Usage(_int(d.get("prompt_tokens")), _int(d.get("completion_tokens")), cached)


# =========================================================================== request out


def _data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _image_part(block: ImageBlock, request: Request) -> dict[str, Any]:
    if block.url is not None:
        url = block.url
    elif block.data is not None:
        url = _data_url(block.data, block.media_type)
    else:
        att = request.attachment(block.attachment or "")
        url = _data_url(
            att.data, att.media_type if att.media_type.startswith("image/") else block.media_type
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _audio_part(block: AudioBlock, request: Request) -> dict[str, Any]:
    data = block.data if block.data is not None else request.attachment(block.attachment or "").data
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(data).decode("ascii"), "format": block.format},
    }


def _user_content(
    blocks: Sequence[Block], request: Request, vision: bool, where: str
) -> str | list[dict[str, Any]]:
    """Plain text stays a string (every upstream reads it); media needs parts."""
    if all(isinstance(b, TextBlock) for b in blocks):
        return "".join(b.text for b in blocks)  # type: ignore[union-attr]
    parts: list[dict[str, Any]] = []
    for b in blocks:
        if isinstance(b, TextBlock):
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += b.text
            else:
                parts.append({"type": "text", "text": b.text})
        elif isinstance(b, ImageBlock):
            if not vision:
                raise InvalidRequest(
                    f"{where} has an image, but this backend is not configured for vision; "
                    "use a vision model and set vision=True, or drop the image"
                )
            parts.append(_image_part(b, request))
        elif isinstance(b, AudioBlock):
            parts.append(_audio_part(b, request))
    return parts


def _tool_message(b: ToolResultBlock) -> dict[str, Any]:
    # OpenAI has no is_error flag; the content itself tells the model what went wrong.
    return {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.content}


def _messages_out(request: Request, vision: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(request.messages):
        where = f"messages[{i}] ({m.role})"
        results = [b for b in m.content if isinstance(b, ToolResultBlock)]
        others = [b for b in m.content if not isinstance(b, ToolResultBlock)]
        # Tool results must follow the assistant turn directly, so they go first.
        out.extend(_tool_message(b) for b in results)
        if m.role == "tool":
            if others:
                raise InvalidRequest(f"{where} may only hold tool results")
            continue
        if m.role == "assistant":
            text = "".join(b.text for b in others if isinstance(b, TextBlock))
            calls = [
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": _dumps(dict(b.input))},
                }
                for b in others
                if isinstance(b, ToolUseBlock)
            ]
            if any(isinstance(b, (ImageBlock, AudioBlock)) for b in others):
                raise InvalidRequest(f"{where}: assistant messages cannot carry media")
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            reasoning = "".join(b.text for b in others if isinstance(b, ThinkingBlock))
            if reasoning:  # llama-server / vLLM / DeepSeek name; signatures have no field
                msg["reasoning_content"] = reasoning
            if calls:
                msg["tool_calls"] = calls
            elif not text:
                msg["content"] = ""
            out.append(msg)
            continue
        if any(isinstance(b, ToolUseBlock) for b in others):
            raise InvalidRequest(f"{where}: only assistant messages may hold tool calls")
        if not others:
            continue
        if m.role == "system":
            if not all(isinstance(b, TextBlock) for b in others):
                raise InvalidRequest(f"{where}: system messages may only hold text")
            out.append({"role": "system", "content": "".join(b.text for b in others)})  # type: ignore[union-attr]
        else:
            out.append({"role": "user", "content": _user_content(others, request, vision, where)})
    return out


def _tool_choice_out(tc: ToolChoice) -> str | dict[str, Any]:
    if tc.kind == "tool":
        return {"type": "function", "function": {"name": tc.name}}
    return tc.kind


#: Sampling fields beyond temperature/top_p/top_k/min_p/seed, under the same name in a
#: Request, an OpenAI body and a llama-server body: OpenAI's own (``presence_penalty``,
#: ``frequency_penalty``, ``logit_bias``) and llama-server's extensions
#: (docs/adr/0021-per-request-sampling-chain.md).
SAMPLING_WIRE_FIELDS: tuple[str, ...] = (
    "typical_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "repeat_last_n",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "xtc_probability",
    "xtc_threshold",
    "logit_bias",
)


def _sampling_out(request: Request, body: dict[str, Any]) -> None:
    """Put the set :data:`SAMPLING_WIRE_FIELDS` into ``body``: ``logit_bias`` keys as
    strings (JSON object keys), breakers as a list. Extensions go to every upstream:
    one that does not know a field refuses it (OpenAI answers 400), never us silently."""
    for key in SAMPLING_WIRE_FIELDS:
        v = getattr(request, key)
        if v is None:
            continue
        if key == "logit_bias":
            v = {str(k): b for k, b in v.items()}
        elif key == "dry_sequence_breakers":
            v = list(v)
        body[key] = v


def _sampling_in(body: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SAMPLING_WIRE_FIELDS` a body sets (``null`` is unset), for ``Request``
    to validate (string ``logit_bias`` keys, ranges, limits)."""
    out = {key: body[key] for key in SAMPLING_WIRE_FIELDS if body.get(key) is not None}
    breakers = out.get("dry_sequence_breakers")
    if breakers is not None and not isinstance(breakers, list):
        raise InvalidRequest("dry_sequence_breakers must be a list of strings")
    return out


#: Reply-changing Request fields :func:`request_to_openai` sends upstream; any other set
#: field is refused by the one rule in inferd.request_fields (docs/adr/0021-*.md).
OPENAI_HONOURED: frozenset[str] = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "seed", "response_format", "ignore_eos"}
) | frozenset(SAMPLING_WIRE_FIELDS)
#: ``reasoning_effort`` is sent as it is (OpenAI's field; ADR 0025).
OPENAI_HONOURED |= {"reasoning_effort"}
#: ``n`` choices and ``logprobs`` are sent as they are (ADR 0022).
OPENAI_HONOURED |= {"n", "logprobs", "top_logprobs"}
#: ``parallel_tool_calls: false`` is sent with the tools (ADR 0023).
OPENAI_HONOURED |= {"parallel_tool_calls"}


def request_to_openai(
    request: Request, *, model: str | None = None, vision: bool = True
) -> dict[str, Any]:
    """``request`` as an OpenAI Chat Completions body.

    ``model`` overrides ``request.model``; the body has no ``model`` when both are
    unset. Unset sampling fields are omitted so the upstream's defaults apply.
    ``top_k``, ``min_p``, ``ignore_eos`` and the llama-server sampling extensions
    (:data:`SAMPLING_WIRE_FIELDS`) are sent only when set. ``thinking`` has no portable
    Chat Completions form and is not sent. ``stream`` / ``stream_options`` are the caller's business
    (the adapter adds them), so this mapping serves streaming and non-streaming alike.

    ``vision=False`` turns any image into an :class:`InvalidRequest` instead of a
    confusing upstream 400 later.
    """
    refuse_unhonoured(request, "openai-compatible upstream", OPENAI_HONOURED)
    body: dict[str, Any] = {}
    name = model if model is not None else request.model
    if name is not None:
        body["model"] = name
    body["messages"] = _messages_out(request, vision)
    if request.tools:
        tools = []
        for t in request.tools:
            fn: dict[str, Any] = {"name": t.name}
            if t.description:
                fn["description"] = t.description
            fn["parameters"] = dict(t.parameters)
            tools.append({"type": "function", "function": fn})
        body["tools"] = tools
    if request.tool_choice is not None:
        body["tool_choice"] = _tool_choice_out(request.tool_choice)
    if request.tools and not request.parallel_tool_calls:  # OpenAI refuses it without tools
        body["parallel_tool_calls"] = False
    for key in ("temperature", "top_p", "max_tokens", "seed", "top_k", "min_p"):
        v = getattr(request, key)
        if v is not None:
            body[key] = v
    if request.stop:
        body["stop"] = list(request.stop)
    if request.response_format is not None:
        body["response_format"] = dict(request.response_format)
    if request.ignore_eos:
        body["ignore_eos"] = True
    _sampling_out(request, body)
    _choices_out(request, body)
    if request.reasoning_effort is not None:  # docs/adr/0025-raw-completions-and-reasoning.md
        body["reasoning_effort"] = request.reasoning_effort
    return body


# =========================================================================== request in


def _decode_data_url(url: str, where: str) -> tuple[bytes, str] | None:
    """(bytes, media type) for a base64 ``data:`` URL, ``None`` for any other URL."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise InvalidRequest(f"{where}: data URLs must be base64 (data:<type>;base64,...)")
    media_type = head[: -len(";base64")] or "application/octet-stream"
    try:
        return base64.b64decode(payload, validate=True), media_type
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: the data URL is not valid base64") from None


def _parts_in(content: Any, where: str, *, media: bool) -> list[Block]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextBlock(content)]
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content must be a string or a list of parts, got {type(content).__name__}"
        )
    blocks: list[Block] = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if isinstance(part, str):
            blocks.append(TextBlock(part))
            continue
        if not isinstance(part, Mapping):
            raise InvalidRequest(f"{pw} must be an object with a 'type'")
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{pw}.text must be a string")
            blocks.append(TextBlock(text))
        elif kind == "image_url" and media:
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, Mapping) else iu
            if not isinstance(url, str) or not url:
                raise InvalidRequest(f"{pw}.image_url.url must be a non-empty string")
            decoded = _decode_data_url(url, pw)
            if decoded is None:
                blocks.append(ImageBlock(url=url))
            else:
                blocks.append(ImageBlock(data=decoded[0], media_type=decoded[1]))
        elif kind == "input_audio" and media:
            ia = part.get("input_audio")
            if not isinstance(ia, Mapping) or not isinstance(ia.get("data"), str):
                raise InvalidRequest(f"{pw}.input_audio needs base64 'data' and 'format'")
            try:
                data = base64.b64decode(ia["data"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequest(f"{pw}.input_audio.data is not valid base64") from None
            blocks.append(AudioBlock(data=data, format=str(ia.get("format") or "wav")))
        else:
            allowed = "text, image_url or input_audio" if media else "text"
            raise InvalidRequest(f"{pw} has type {echo(kind)}; expected {allowed}")
    return blocks


def _arguments_in(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if not isinstance(raw, str):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON string")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(f"{where}.function.arguments is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}.function.arguments must encode a JSON object")
    return value


def _message_in(m: Any, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(m, Mapping):
        raise InvalidRequest(f"{where} must be an object with 'role' and 'content'")
    role = m.get("role")
    if role == "developer":  # OpenAI's newer name for system
        role = "system"
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequest(f"{where} (tool) needs a 'tool_call_id'")
        parts = _parts_in(m.get("content"), where, media=False)  # text only
        text = "".join(b.text for b in parts if isinstance(b, TextBlock))
        return Message.tool(call_id, text)
    if role == "assistant":
        blocks = _reasoning_in(m, where) + _parts_in(m.get("content"), where, media=False)
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise InvalidRequest(f"{where}.tool_calls must be a list")
        for j, c in enumerate(calls):
            cw = f"{where}.tool_calls[{j}]"
            fn = c.get("function") if isinstance(c, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise InvalidRequest(f"{cw} needs function.name")
            cid = c.get("id")
            if not isinstance(cid, str) or not cid:
                raise InvalidRequest(f"{cw} needs an 'id'")
            blocks.append(ToolUseBlock(cid, fn["name"], _arguments_in(fn.get("arguments"), cw)))
        return Message("assistant", blocks or [TextBlock("")])
    if role in ("system", "user"):
        blocks = _parts_in(m.get("content"), where, media=role == "user")
        return Message(role, blocks)
    raise InvalidRequest(
        f"{where}.role is {echo(role)}; expected system, developer, user, assistant or tool"
    )


def _tool_in(t: Any, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(t, Mapping):
        raise InvalidRequest(f"{where} must be an object")
    if t.get("type", "function") != "function":
        raise InvalidRequest(f"{where}.type is {echo(t.get('type'))}; only 'function' is supported")
    fn = t.get("function")
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"{where}.function.name must be a string")
    params = fn.get("parameters")
    return Tool(
        fn["name"],
        str(fn.get("description") or ""),
        params if params is not None else {"type": "object", "properties": {}},
    )


def _thinking_in(body: Mapping[str, Any]) -> bool:
    effort = body.get("reasoning_effort")
    if isinstance(effort, str):
        return effort not in ("none", "minimal")
    reasoning = body.get("reasoning")
    if isinstance(reasoning, Mapping):
        e = reasoning.get("effort")
        return not (isinstance(e, str) and e in ("none", "minimal"))
    thinking = body.get("thinking")
    if isinstance(thinking, bool):
        return thinking
    if isinstance(thinking, Mapping):
        return thinking.get("type", "enabled") != "disabled"
    kwargs = body.get("chat_template_kwargs")
    if isinstance(kwargs, Mapping) and "enable_thinking" in kwargs:
        return bool(kwargs["enable_thinking"])
    return False


def _reasoning_in(m: Mapping[str, Any], where: str) -> list[Block]:
    """An assistant turn's earlier reasoning: ``reasoning_content`` (llama-server, vLLM,
    DeepSeek, whose thinking-with-tools mode needs it sent back) or vLLM's newer
    ``reasoning``, as a ThinkingBlock (docs/adr/0025-raw-completions-and-reasoning.md)."""
    for key in ("reasoning_content", "reasoning"):
        text = m.get(key)
        if text is None:
            continue
        if not isinstance(text, str):
            raise InvalidRequest(f"{where}.{key} must be a string")
        return [ThinkingBlock(text)] if text else []
    return []


def _effort_in(body: Mapping[str, Any]) -> Any:
    """``reasoning_effort`` (or the Responses-style ``reasoning.effort``) as sent; the
    Request checks the level and derives ``thinking`` from it (ADR 0025)."""
    effort = body.get("reasoning_effort")
    if effort is None:
        reasoning = body.get("reasoning")
        if isinstance(reasoning, Mapping):
            effort = reasoning.get("effort")
    return effort


def _stop_in(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list):
        return tuple(stop)
    raise InvalidRequest("'stop' must be a string or a list of strings")


def _choices_in(body: Mapping[str, Any]) -> dict[str, Any]:
    """``n``, ``logprobs`` and ``top_logprobs`` as set (``null`` is unset); ``Request``
    checks them (docs/adr/0022-n-choices-and-logprobs.md)."""
    out = {key: body[key] for key in ("n", "logprobs", "top_logprobs") if body.get(key) is not None}
    if out.get("top_logprobs") is not None and "logprobs" not in out:
        raise InvalidRequest("top_logprobs needs logprobs=true")
    return out


def _choices_out(request: Request, body: dict[str, Any]) -> None:
    """Put ``n``/``logprobs``/``top_logprobs`` into an upstream body when set."""
    if request.n != 1:
        body["n"] = request.n
    if request.logprobs:
        body["logprobs"] = True
        if request.top_logprobs is not None:
            body["top_logprobs"] = request.top_logprobs


def request_from_openai(body: Mapping[str, Any]) -> Request:
    """Read an OpenAI Chat Completions request body into a :class:`Request`.

    Accepts what real clients send: string or part-list content, ``developer``
    messages, assistant ``tool_calls`` (arguments as a JSON string or an object),
    ``tool`` messages, ``max_completion_tokens``, ``stop`` as a string or a list, and
    the llama-server extensions ``top_k``, ``min_p``, ``ignore_eos`` and
    :data:`SAMPLING_WIRE_FIELDS` (penalties, DRY, XTC, ``logit_bias``), and our
    ``speculative: false`` (no drafting for this request, ADR 0027). Thinking is
    on when ``reasoning_effort`` (other than none/minimal), ``reasoning``,
    ``thinking`` or ``chat_template_kwargs.enable_thinking`` asks for it. Fields that
    do not change the reply (``stream``, ``user``, ``metadata``, ...) are ignored, so
    a client's extra fields never fail a request. Every problem is an
    :class:`InvalidRequest` naming the field.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequest("a Chat Completions request must be a JSON object")
    check_depth(body)
    messages = _messages_in(body.get("messages"))
    tools = _tools_in(body.get("tools"))
    tc_raw = body.get("tool_choice")
    # "auto" without tools means "no tools"; clients send it routinely.
    tool_choice = None if (tc_raw == "auto" and not tools) else tc_raw
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    stops = _stop_in(body.get("stop"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    try:
        return Request(
            messages=messages,
            tools=tools,
            tool_choice=tool_choice,  # type: ignore[arg-type]
            temperature=body.get("temperature"),
            top_p=body.get("top_p"),
            top_k=body.get("top_k"),
            min_p=body.get("min_p"),
            max_tokens=max_tokens,
            stop=stops,
            seed=body.get("seed"),
            **_sampling_in(body),
            response_format=body.get("response_format"),
            thinking=_thinking_in(body),
            reasoning_effort=_effort_in(body),
            ignore_eos=body.get("ignore_eos", False),
            speculative=speculative_in(body),
            parallel_tool_calls=_or_default(body.get("parallel_tool_calls"), True),
            model=model or None,
            **_choices_in(body),
        )
    except InvalidRequest:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a reader missed a check
        raise InvalidRequest(f"malformed Chat Completions request ({type(e).__name__})") from None


def _messages_in(msgs: Any) -> tuple[Message, ...]:
    """``messages``: a non-empty list of at most MAX_MESSAGES, refused before walking it."""
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequest("'messages' must be a non-empty list")
    if len(msgs) > MAX_MESSAGES:
        raise InvalidRequest(f"{len(msgs)} messages given; at most {MAX_MESSAGES} (MAX_MESSAGES)")
    return tuple(_message_in(m, i) for i, m in enumerate(msgs))


def _tools_in(raw_tools: Any) -> tuple[Tool, ...]:
    """``tools``: absent, null or a list of at most MAX_TOOLS function definitions."""
    raw_tools = raw_tools or []
    if not isinstance(raw_tools, list):
        raise InvalidRequest("'tools' must be a list")
    if len(raw_tools) > MAX_TOOLS:
        raise InvalidRequest(f"{len(raw_tools)} tools given; at most {MAX_TOOLS} (MAX_TOOLS)")
    return tuple(_tool_in(t, i) for i, t in enumerate(raw_tools))


def speculative_in(body: Mapping[str, Any]) -> Any:
    """Our ``speculative`` body extension, for Chat Completions and Completions alike
    (ADR 0027): absent or null means on; :class:`Request` refuses a non-bool by name."""
    return _or_default(body.get("speculative"), True)


def _or_default(value: Any, default: Any) -> Any:
    """``value``, or ``default`` when the client sent null or nothing."""
    return default if value is None else value


# =========================================================================== chunks out


class ChunkWriter:
    """Events -> OpenAI ``chat.completion.chunk`` dicts, for one streamed reply.

    The first :meth:`write` also emits the ``role: assistant`` chunk OpenAI clients
    expect. Tool calls stream as OpenAI streams them (ADR 0023): a call's first
    :class:`ToolUseDelta` becomes a ``tool_calls`` delta with its index, id, type, name
    and first fragment, later ones carry only ``index`` and the next fragment, and its
    complete :class:`ToolUse` adds only what the fragments lacked; a :class:`ToolUse`
    with no deltas before it becomes one delta with the whole arguments. :class:`Done`
    becomes the ``finish_reason`` chunk followed,
    when ``include_usage`` is set (the client sent ``stream_options.include_usage``),
    by the usage chunk with ``choices: []``. Nothing is written after ``Done``.

    With ``n`` choices (docs/adr/0022-n-choices-and-logprobs.md) every chunk carries its
    event's ``index`` in ``choices[0].index``, each choice gets its role chunk and its
    ``finish_reason`` chunk, and the reply is finished after the ``n``-th ``Done``;
    ``Text.logprobs`` become ``choices[0].logprobs.content``.
    """

    __slots__ = (
        "_base",
        "_calls",
        "_dones",
        "_finished",
        "_roles",
        "_started",
        "_tool_index",
        "created",
        "id",
        "include_usage",
        "model",
        "n",
    )

    def __init__(
        self,
        model: str,
        id: str,
        *,
        created: int | None = None,
        include_usage: bool = True,
        n: int = 1,
    ) -> None:
        self.n = n  # choices: finished after n Done events (ADR 0022)
        self._dones: list[Done] = []
        self._roles: set[int] = set()
        self.model = model
        self.id = id
        self.created = int(time.time()) if created is None else created
        self.include_usage = include_usage
        self._started = False
        self._finished = False
        self._tool_index = 0
        #: call id -> ((choice, the call's index in it), arguments sent so far)
        self._calls: dict[str, tuple[tuple[int, int], str]] = {}
        self._base: dict[str, Any] = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
        }

    @property
    def finished(self) -> bool:
        """True once ``Done`` has been written."""
        return self._finished

    def _chunk(
        self,
        delta: dict[str, Any],
        finish: str | None = None,
        index: int = 0,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> dict[str, Any]:
        c = dict(self._base)
        lps = {"content": [lp.to_dict() for lp in logprobs]} if logprobs else None
        c["choices"] = [{"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}]
        return c

    def _choice_start(self, index: int) -> list[dict[str, Any]]:
        """The role chunk of choice ``index`` > 0 before its first event (ADR 0022)."""
        if index in self._roles:
            return []
        self._roles.add(index)
        return [self._chunk({"role": "assistant", "content": ""}, index=index)]

    def _done(self, event: Done) -> list[dict[str, Any]]:
        """The ``finish_reason`` chunk of a choice; after the last choice's, the usage
        chunk (the prompt once, completion tokens summed over the choices)."""
        self._dones.append(event)
        out = [self._chunk({}, finish_reason(event.stop_reason), event.index)]
        if len(self._dones) < self.n:
            return out
        self._finished = True
        if self.include_usage:
            c = dict(self._base)
            c["choices"] = []
            c["usage"] = usage_to_openai(choices_usage(self._dones))
            out.append(c)
        out[-1]["timings"] = timings_to_llama(self._dones)  # where llama-server puts it
        return out

    def start(self) -> list[dict[str, Any]]:
        """The role chunk, if not sent yet (a bridge may flush it before any event)."""
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def write(self, event: Event) -> list[dict[str, Any]]:
        """The chunks for one event (possibly none)."""
        if self._finished:
            raise InvalidRequest("ChunkWriter: an event arrived after Done")
        out = self.start()
        index = event.index
        if index:
            out.extend(self._choice_start(index))
        if isinstance(event, Text):
            if event.text or event.logprobs:
                out.append(self._chunk({"content": event.text}, None, index, event.logprobs))
        elif isinstance(event, Thinking):
            if event.text:
                out.append(self._chunk({"reasoning_content": event.text}, None, index))
        elif isinstance(event, (ToolUse, ToolUseDelta)):
            out.extend(self._tool_call(event))
        elif isinstance(event, Done):
            out.extend(self._done(event))
        else:
            raise InvalidRequest(f"ChunkWriter: unknown event {type(event).__name__}")
        return out

    def _tool_call(self, event: ToolUse | ToolUseDelta) -> list[dict[str, Any]]:
        """The ``tool_calls`` chunk for a delta, or for a complete call what is left."""
        seen = self._calls.get(event.id)
        if isinstance(event, ToolUseDelta):
            frag = event.arguments_fragment
        else:
            args = event.raw_arguments or _dumps(dict(event.input or {}))
            done = seen[1] if seen is not None else ""
            frag = args[len(done) :] if args.startswith(done) else ""
        if seen is None:
            # a choice's calls are numbered 0, 1, ... (ids are unique across choices)
            at = sum(1 for i, _ in self._calls.values() if i[0] == event.index)
            call = {
                "index": at,
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": frag},
            }
            self._calls[event.id] = ((event.index, at), frag)
        elif frag:
            call = {"index": seen[0][1], "function": {"arguments": frag}}
            self._calls[event.id] = (seen[0], seen[1] + frag)
        else:
            return []
        return [self._chunk({"tool_calls": [call]}, None, event.index)]


def _tool_call_out(call: ToolUse) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {
            "name": call.name,
            "arguments": call.raw_arguments or _dumps(dict(call.input or {})),
        },
    }


def response_to_completion(
    response: Response, *, model: str, id: str, created: int | None = None
) -> dict[str, Any]:
    """A whole reply as a non-streaming ``chat.completion`` object.

    Reasoning goes in ``message.reasoning_content`` (the llama-server / vLLM /
    DeepSeek convention) only when there is some. A reply of ``n`` choices
    (``response.choices``) has ``n`` entries in ``choices`` and their usage summed;
    logprobs, when asked, are ``choices[i].logprobs.content``
    (docs/adr/0022-n-choices-and-logprobs.md).
    """
    choices = response.choices or (response,)
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [_choice_out(c, i) for i, c in enumerate(choices)],
        "usage": usage_to_openai(response.usage),
        "timings": timings_to_llama([c.done for c in choices]),
    }


def _choice_out(response: Response, index: int) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": response.text if response.text or not response.tool_calls else None,
    }
    if response.thinking:
        message["reasoning_content"] = response.thinking
    if response.tool_calls:
        message["tool_calls"] = [_tool_call_out(c) for c in response.tool_calls]
    lps = response.logprobs
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": [lp.to_dict() for lp in lps]} if lps else None,
        "finish_reason": finish_reason(response.stop_reason),
    }


# =========================================================================== errors

_ERROR_TYPES: dict[str, tuple[str, int]] = {
    InvalidRequest.code: ("invalid_request_error", 400),
    EmbedUnsupported.code: ("invalid_request_error", 400),
    NotReady.code: ("server_error", 503),
    QueueFull.code: ("rate_limit_error", 429),
    BackendUnavailable.code: ("server_error", 502),
    "model_load_error": ("server_error", 500),
    "internal": ("server_error", 500),
}


def http_status(exc: BaseException) -> int:
    """The HTTP status a bridge should answer ``exc`` with (unknown errors: 500)."""
    code = exc.code if isinstance(exc, InferdError) else "internal"
    return _ERROR_TYPES.get(code, ("server_error", 500))[1]


def error_object(exc: BaseException) -> dict[str, Any]:
    """An OpenAI error object ``{"error": {message, type, code, param}}`` for ``exc``.

    inferd errors keep their message (they never hold secrets); any other exception
    is reported by type only, since its text may hold anything.
    """
    if isinstance(exc, InferdError):
        message, code = exc.message, exc.code
    else:
        message, code = f"internal error ({type(exc).__name__}); see the server log", "internal"
    etype = _ERROR_TYPES.get(code, ("server_error", 500))[0]
    return {"error": {"message": message, "type": etype, "code": code, "param": None}}


# =========================================================================== embeddings


def embed_request_to_openai(request: EmbedRequest, *, model: str | None) -> dict[str, Any]:
    """An ``/v1/embeddings`` body: the input list, plus ``dimensions`` when set."""
    body: dict[str, Any] = {"input": list(request.input), "encoding_format": "float"}
    if model is not None:
        body["model"] = model
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    return body


def embed_request_from_openai(body: Mapping[str, Any]) -> EmbedRequest:
    """Read an ``/v1/embeddings`` request body (string or list input)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("an embeddings request must be a JSON object")
    check_depth(body, what="embeddings request")
    inp = body.get("input")
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list) or not all(isinstance(s, str) for s in inp):
        raise InvalidRequest(
            "'input' must be a string or a list of strings (token arrays are not supported)"
        )
    fmt = body.get("encoding_format")
    if fmt not in (None, "float"):
        raise InvalidRequest(f"encoding_format={echo(fmt)} is not supported; use 'float'")
    return EmbedRequest(tuple(inp), body.get("dimensions"))


def embed_result_from_openai(body: Any, *, count: int) -> EmbedResult:
    """An :class:`EmbedResult` from an ``/v1/embeddings`` response, in input order.

    Upstreams may return ``data`` out of order; each item's ``index`` puts it back.
    ``count`` is the number of inputs sent; anything else is an upstream fault.
    """
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        raise BackendUnavailable("embeddings response has no 'data' list")
    slots: list[tuple[float, ...] | None] = [None] * count
    for pos, item in enumerate(data):
        if not isinstance(item, Mapping) or not isinstance(item.get("embedding"), list):
            raise BackendUnavailable(f"embeddings response data[{pos}] has no 'embedding' list")
        idx = item.get("index", pos)
        if not isinstance(idx, int) or not 0 <= idx < count or slots[idx] is not None:
            raise BackendUnavailable(
                f"embeddings response data[{pos}] has a bad or repeated index {echo(idx)}"
            )
        slots[idx] = tuple(float(x) for x in item["embedding"])
    if any(v is None for v in slots):
        raise BackendUnavailable(f"embeddings response has {len(data)} vectors for {count} inputs")
    vectors = tuple(v for v in slots if v is not None)
    dims = {len(v) for v in vectors}
    if len(dims) != 1:
        raise BackendUnavailable(f"embeddings response vectors differ in length: {sorted(dims)}")
    return EmbedResult(
        vectors, dims.pop(), str(body.get("model") or ""), usage_from_openai(body.get("usage"))
    )


def embed_result_to_openai(result: EmbedResult, *, model: str | None = None) -> dict[str, Any]:
    """An ``/v1/embeddings`` response object for ``result`` (the bridge's answer)."""
    u = result.usage
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": list(v)}
            for i, v in enumerate(result.embeddings)
        ],
        "model": model if model is not None else result.model,
        "usage": {"prompt_tokens": u.input_tokens, "total_tokens": u.input_tokens},
    }


# =========================================================================== embeddings, base64
# Added for the HTTP bridge (issue 8): openai-python asks for ``encoding_format="base64"``
# by default, so a server must answer it. Kept separate from the float path above.


def embed_encoding_format(body: Mapping[str, Any]) -> str:
    """The ``encoding_format`` an ``/v1/embeddings`` request asks for: float or base64."""
    fmt = body.get("encoding_format") if isinstance(body, Mapping) else None
    if fmt in (None, "float"):
        return "float"
    if fmt == "base64":
        return "base64"
    raise InvalidRequest(f"encoding_format={echo(fmt)} is not supported; use 'float' or 'base64'")


def embed_result_to_openai_base64(
    result: EmbedResult, *, model: str | None = None
) -> dict[str, Any]:
    """Like :func:`embed_result_to_openai`, each vector as base64 of little-endian float32."""
    import struct

    out = embed_result_to_openai(result, model=model)
    for item, vec in zip(out["data"], result.embeddings, strict=True):
        item["embedding"] = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
    return out
