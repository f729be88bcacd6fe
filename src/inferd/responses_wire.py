"""OpenAI Responses API (``POST /v1/responses``) <-> inferd types, stateless.

The bridge serves the Responses API for SDK code written against
``client.responses.create`` (docs/adr/0014-anthropic-messages-both-ways.md). The
bridge keeps no state, so ``previous_response_id`` and ``store: true`` are refused
with a 400 that says so, as Ollama does; a client sends the whole conversation as
``input`` items instead. Everything else a request may carry is honoured or refused
by name: ``input`` (a string or message / ``function_call`` / ``function_call_output``
items), ``instructions``, function tools, ``tool_choice``, ``reasoning.effort``
(thinking on or off, the same rule as the chat endpoint: ``none``/``minimal`` off,
any other level on; our Request has no depth), ``text.format`` (``json_schema``,
``json_object``, ``text``), ``max_output_tokens``, ``temperature``, ``top_p``.

:class:`ResponsesStreamWriter` writes our events as the typed stream events
(``response.created``, ``response.output_item.added``, ``response.output_text.delta``,
``response.reasoning_summary_text.delta``, ``response.function_call_arguments.delta``
/ ``.done``, ..., ``response.completed``), each with its ``sequence_number``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from inferd.errors import InvalidRequest
from inferd.limits import check_depth, echo
from inferd.openai_wire import _decode_data_url
from inferd.types import (
    MAX_MESSAGES,
    MAX_TOOLS,
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
    Tool,
    ToolChoice,
    ToolUse,
    ToolUseBlock,
    Usage,
)

#: Fields a ``/v1/responses`` body may have; others are refused by name.
KNOWN_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "reasoning",
        "text",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "store",
        "previous_response_id",
        "metadata",
        "parallel_tool_calls",
        "user",
        "truncation",
    }
)
#: ``reasoning.effort`` values that turn thinking off; every other level turns it on.
THINKING_OFF = frozenset({"none", "minimal"})
EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# =========================================================================== in


def _refuse_state(body: Mapping[str, Any]) -> None:
    if body.get("previous_response_id") is not None:
        raise InvalidRequest(
            "previous_response_id is not supported: this server is stateless and stores "
            "no responses; send the whole conversation as input items"
        )
    if body.get("store") is True:
        raise InvalidRequest(
            "store: true is not supported: this server is stateless; send store: false "
            "(or leave it out) and pass earlier turns as input items"
        )
    if body.get("parallel_tool_calls") is False:
        raise InvalidRequest("parallel_tool_calls: false is not supported")
    if body.get("truncation") not in (None, "disabled"):
        raise InvalidRequest(f"truncation {echo(body.get('truncation'))} is not supported")


def _content_in(content: Any, where: str) -> list[Block]:
    if isinstance(content, str):
        return [TextBlock(content)]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts")
    out: list[Block] = []
    for j, p in enumerate(content):
        pw = f"{where}.content[{j}]"
        kind = p.get("type") if isinstance(p, Mapping) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            out.append(TextBlock(p["text"]))
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            decoded = _decode_data_url(p["image_url"], pw)
            out.append(
                ImageBlock(url=p["image_url"])
                if decoded is None
                else ImageBlock(data=decoded[0], media_type=decoded[1])
            )
        elif kind == "refusal" and isinstance(p.get("refusal"), str):
            out.append(TextBlock(p["refusal"]))
        else:
            raise InvalidRequest(
                f"{pw} has type {echo(kind)}; expected input_text, output_text or "
                "input_image (with an image_url)"
            )
    return out


def _call_in(item: Mapping[str, Any], where: str) -> ToolUseBlock:
    call_id, name, raw = item.get("call_id"), item.get("name"), item.get("arguments", "")
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(raw, str):
        raise InvalidRequest(f"{where} needs string call_id, name and arguments")
    try:
        args = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise InvalidRequest(f"{where}.arguments is not valid JSON") from None
    if not isinstance(args, dict):
        raise InvalidRequest(f"{where}.arguments must encode a JSON object")
    return ToolUseBlock(call_id, name, args)


def _append(msgs: list[Message], role: str, blocks: list[Block]) -> None:
    """Consecutive assistant items (text, calls) form one assistant message."""
    if role == "assistant" and msgs and msgs[-1].role == "assistant":
        msgs[-1] = Message("assistant", (*msgs[-1].content, *blocks))
    else:
        msgs.append(Message(role, blocks))  # type: ignore[arg-type]


def _item_in(item: Any, i: int, msgs: list[Message]) -> None:
    where = f"input[{i}]"
    if not isinstance(item, Mapping):
        raise InvalidRequest(f"{where} must be an object")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise InvalidRequest(
                f"{where}.role {echo(role)} is not user, assistant, system or developer"
            )
        mapped = "system" if role == "developer" else role
        _append(msgs, mapped, _content_in(item.get("content"), where))
    elif kind == "function_call":
        _append(msgs, "assistant", [_call_in(item, where)])
    elif kind == "function_call_output":
        out = item.get("output")
        if not isinstance(item.get("call_id"), str) or not isinstance(out, str):
            raise InvalidRequest(f"{where} needs a string call_id and output")
        msgs.append(Message.tool(item["call_id"], out))
    elif kind == "reasoning":
        return  # an earlier turn's reasoning: local models do not take it back
    else:
        raise InvalidRequest(
            f"{where} has type {echo(kind)}; expected message, function_call, "
            "function_call_output or reasoning"
        )


def _messages_in(body: Mapping[str, Any]) -> list[Message]:
    msgs: list[Message] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("instructions must be a string")
        msgs.append(Message.system(instructions))
    inp = body.get("input")
    if isinstance(inp, str):
        msgs.append(Message.user(inp))
        return msgs
    if not isinstance(inp, list) or not inp:
        raise InvalidRequest("input must be a string or a non-empty list of items")
    if len(inp) > MAX_MESSAGES:
        raise InvalidRequest(f"{len(inp)} input items; at most {MAX_MESSAGES} (MAX_MESSAGES)")
    for i, item in enumerate(inp):
        _item_in(item, i, msgs)
    return msgs


def _tools_in(raw: Any) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise InvalidRequest(f"tools must be a list of at most {MAX_TOOLS} (MAX_TOOLS)")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, Mapping) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, Mapping) else None
            raise InvalidRequest(
                f"tools[{i}] has type {echo(kind)}; only function tools are supported"
            )
        params = t.get("parameters")
        tools.append(
            Tool(
                t.get("name", ""),
                str(t.get("description") or ""),
                params if isinstance(params, Mapping) else {"type": "object", "properties": {}},
            )
        )
    return tuple(tools)


def _tool_choice_in(tc: Any) -> ToolChoice | None:
    if tc is None or (isinstance(tc, str) and tc in ("auto", "none", "required")):
        return ToolChoice.parse(tc)
    if isinstance(tc, Mapping) and tc.get("type") == "function" and isinstance(tc.get("name"), str):
        return ToolChoice("tool", tc["name"])
    raise InvalidRequest(
        f"tool_choice {echo(tc)} is not auto, none, required or {{'type': 'function', 'name': ...}}"
    )


def _thinking_in(reasoning: Any) -> bool:
    if reasoning is None:
        return False
    if not isinstance(reasoning, Mapping):
        raise InvalidRequest("reasoning must be an object like {'effort': 'medium'}")
    effort = reasoning.get("effort")
    if effort is None:
        return True
    if effort not in EFFORTS:
        raise InvalidRequest(f"reasoning.effort {echo(effort)} is not one of {sorted(EFFORTS)}")
    return effort not in THINKING_OFF


def _format_in(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, Mapping) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), Mapping):
        spec = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        if "strict" in fmt:
            spec["strict"] = bool(fmt["strict"])
        return {"type": "json_schema", "json_schema": spec}
    raise InvalidRequest(
        "text.format must be {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'name': ..., 'schema': {...}}"
    )


def request_from_responses(body: Mapping[str, Any]) -> Request:
    """A :class:`Request` from an untrusted ``/v1/responses`` body."""
    check_depth(body, what="request body")
    unknown = set(body) - KNOWN_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown or unsupported field(s): {echo(sorted(unknown))}")
    _refuse_state(body)
    model = body.get("model")
    try:
        return Request(
            messages=tuple(_messages_in(body)),
            tools=_tools_in(body.get("tools")),
            tool_choice=_tool_choice_in(body.get("tool_choice")),
            temperature=body.get("temperature"),
            top_p=body.get("top_p"),
            max_tokens=body.get("max_output_tokens"),
            response_format=_format_in(body.get("text")),
            thinking=_thinking_in(body.get("reasoning")),
            model=model if isinstance(model, str) else None,
        )
    except (KeyError, TypeError, AttributeError) as e:  # a reader missed a check
        raise InvalidRequest(f"malformed request ({type(e).__name__})") from None


# =========================================================================== out


def usage_to_responses(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.input_tokens + u.output_tokens,
    }


def _echo_fields(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The request settings a Response object repeats back."""
    text = body.get("text") if isinstance(body.get("text"), Mapping) else None
    return {
        "model": model,
        "instructions": body.get("instructions"),
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": True,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"),
        "previous_response_id": None,
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "text": text or {"format": {"type": "text"}},
        "truncation": "disabled",
        "metadata": body.get("metadata") or {},
        "store": False,
        "user": body.get("user"),
    }


def response_shell(
    body: Mapping[str, Any], model: str, id: str, created: int, status: str
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
        **_echo_fields(body, model),
    }


def _finish(shell: dict[str, Any], output: list[dict[str, Any]], done: Done) -> dict[str, Any]:
    incomplete = done.stop_reason is StopReason.MAX_TOKENS
    return {
        **shell,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": output,
        "usage": usage_to_responses(done.usage),
    }


def _message_item(id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        if status == "completed"
        else [],
    }


def _reasoning_item(id: str, text: str | None) -> dict[str, Any]:
    summary = [] if text is None else [{"type": "summary_text", "text": text}]
    return {"type": "reasoning", "id": id, "summary": summary}


def _call_item(id: str, call: ToolUse, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": id,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def _arguments(call: ToolUse) -> str:
    return call.raw_arguments or orjson.dumps(dict(call.input or {})).decode()


def response_to_responses(
    response: Response, body: Mapping[str, Any], *, model: str
) -> dict[str, Any]:
    """A whole reply as one Response object (non-streamed)."""
    output: list[dict[str, Any]] = []
    if response.thinking:
        output.append(_reasoning_item(_new_id("rs"), response.thinking))
    if response.text:
        output.append(_message_item(_new_id("msg"), response.text))
    for c in response.tool_calls:
        output.append(_call_item(_new_id("fc"), c, _arguments(c), "completed"))
    shell = response_shell(body, model, _new_id("resp"), int(time.time()), "in_progress")
    return _finish(shell, output, response.done)


def sse(data: Mapping[str, Any]) -> bytes:
    return b"event: " + str(data["type"]).encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ResponsesStreamWriter:
    """Our events -> Responses stream events. One output item per run of text, of
    thinking (a reasoning item with one summary part) and per tool call."""

    def __init__(self, body: Mapping[str, Any], model: str) -> None:
        self.shell = response_shell(body, model, _new_id("resp"), int(time.time()), "in_progress")
        self._seq = 0
        self._output: list[dict[str, Any]] = []
        self._open: str | None = None
        self._parts: list[str] = []
        self.finished = False

    def _ev(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse(data)

    def start(self) -> bytes:
        return self._ev("response.created", response=self.shell) + self._ev(
            "response.in_progress", response=self.shell
        )

    @property
    def _index(self) -> int:
        return len(self._output) - 1

    def _close(self) -> list[bytes]:
        """Events that end the open text or reasoning item, if any."""
        kind, self._open = self._open, None
        if kind is None:
            return []
        item = self._output[-1]
        text = "".join(self._parts)
        self._parts = []
        at = {"item_id": item["id"], "output_index": self._index}
        if kind == "text":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            self._output[-1] = _message_item(item["id"], text)
            out = [
                self._ev(
                    "response.output_text.done", **at, content_index=0, text=text, logprobs=[]
                ),
                self._ev("response.content_part.done", **at, content_index=0, part=part),
            ]
        else:
            part = {"type": "summary_text", "text": text}
            self._output[-1] = _reasoning_item(item["id"], text)
            out = [
                self._ev("response.reasoning_summary_text.done", **at, summary_index=0, text=text),
                self._ev("response.reasoning_summary_part.done", **at, summary_index=0, part=part),
            ]
        out.append(
            self._ev("response.output_item.done", output_index=self._index, item=self._output[-1])
        )
        return out

    def _open_item(self, kind: str) -> list[bytes]:
        out = self._close()
        self._open = kind
        if kind == "text":
            item = _message_item(_new_id("msg"), "", status="in_progress")
        else:
            item = _reasoning_item(_new_id("rs"), None)
        self._output.append(item)
        at = {"item_id": item["id"], "output_index": self._index}
        out.append(self._ev("response.output_item.added", output_index=self._index, item=item))
        if kind == "text":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out.append(self._ev("response.content_part.added", **at, content_index=0, part=part))
        else:
            part = {"type": "summary_text", "text": ""}
            out.append(
                self._ev("response.reasoning_summary_part.added", **at, summary_index=0, part=part)
            )
        return out

    def _text(self, kind: str, text: str) -> list[bytes]:
        out = [] if self._open == kind else self._open_item(kind)
        self._parts.append(text)
        at = {"item_id": self._output[-1]["id"], "output_index": self._index}
        if kind == "text":
            out.append(
                self._ev(
                    "response.output_text.delta", **at, content_index=0, delta=text, logprobs=[]
                )
            )
        else:
            out.append(
                self._ev("response.reasoning_summary_text.delta", **at, summary_index=0, delta=text)
            )
        return out

    def _call(self, call: ToolUse) -> list[bytes]:
        out = self._close()
        fid, args = _new_id("fc"), _arguments(call)
        self._output.append(_call_item(fid, call, args, "completed"))
        at = {"item_id": fid, "output_index": self._index}
        added = _call_item(fid, call, "", "in_progress")
        return [
            *out,
            self._ev("response.output_item.added", output_index=self._index, item=added),
            self._ev("response.function_call_arguments.delta", **at, delta=args),
            self._ev("response.function_call_arguments.done", **at, name=call.name, arguments=args),
            self._ev("response.output_item.done", output_index=self._index, item=self._output[-1]),
        ]

    def write(self, event: Event) -> bytes:
        if isinstance(event, Text):
            out = self._text("text", event.text)
        elif isinstance(event, Thinking):  # a signature alone has no Responses field
            out = self._text("reasoning", event.text) if event.text else []
        elif isinstance(event, ToolUse):
            out = self._call(event)
        else:
            assert isinstance(event, Done)
            out = self._close()
            final = _finish(self.shell, self._output, event)
            kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
            out.append(self._ev(kind, response=final))
            self.finished = True
        return b"".join(out)

    def error(self, code: str, message: str) -> bytes:
        """The ``error`` event for a failure after the stream started."""
        return self._ev("error", code=code, message=message, param=None)
