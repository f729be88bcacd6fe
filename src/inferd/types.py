"""Typed request, content blocks, events, capabilities and embeddings.

Everything here is an immutable, slotted dataclass with a readable repr and a JSON
form (``to_dict`` / ``from_dict``, tagged by ``type`` where a union needs it): the
daemon, the bridge and the benchmark reports all speak these dicts.

Validation happens at construction, so an invalid :class:`Request` cannot exist
(``docs/adr/0003-validate-requests-at-construction.md``); every failure is an
:class:`~inferd.errors.InvalidRequest` (a ``ValueError``) naming the field, and every
size a request can carry has a named bound below. The ``from_dict`` readers take
untrusted JSON: they bound its depth (:func:`inferd.limits.check_depth`) before
walking it and repeat client values only through :func:`inferd.limits.echo`.
They read bare objects; wire framing (a frame's ``id`` and ``type``) belongs to
:mod:`inferd.serve.wire`. This module imports only :mod:`inferd.errors` and
:mod:`inferd.limits` (the other bottom-layer modules), except that
:meth:`Request.from_openai` / :meth:`Request.to_openai` import
:mod:`inferd.openai_wire` when called (see their docstrings).
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeAlias

from inferd.errors import InvalidRequest, ended_without_done
from inferd.limits import check_depth, echo

#: The public types, re-exported whole by :mod:`inferd` (listed here once). The
#: limits and the ``*_from_dict`` readers are public too, under ``inferd.types``.
__all__ = [
    "AcceleratorInfo",
    "Attachment",
    "AudioBlock",
    "Block",
    "Capabilities",
    "Done",
    "EmbedRequest",
    "EmbedResult",
    "Event",
    "ImageBlock",
    "Message",
    "Request",
    "RerankRequest",
    "RerankResult",
    "Response",
    "Role",
    "StopReason",
    "Text",
    "TextBlock",
    "Thinking",
    "ThinkingBlock",
    "Timings",
    "Tool",
    "ToolChoice",
    "ToolResultBlock",
    "ToolUse",
    "ToolUseBlock",
    "ToolUseDelta",
    "Usage",
]

# --------------------------------------------------------------------------- limits
# Values outside these bounds are rejected as absurd, never clamped. Each bounds
# something a client can send, so that no request (and no reply it asks for) can
# outgrow what the daemon and the bridge frame (issue 13, item 4).

#: Highest sampling temperature.
MAX_TEMPERATURE = 100.0
#: Largest ``top_k`` (far above any vocabulary).
MAX_TOP_K = 1_000_000
#: Largest ``max_tokens`` (backends clamp further to their context).
MAX_TOKENS_LIMIT = 10_000_000
#: Most stop sequences in one request, and most characters in one of them.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 1024
#: Most tools in one request.
MAX_TOOLS = 512
#: Most messages in one request (a long agent transcript has a few hundred).
MAX_MESSAGES = 10_000
#: Most attachments in one request.
MAX_ATTACHMENTS = 256
#: Most strings in one embeddings request (OpenAI's own limit is 2048).
MAX_EMBED_INPUTS = 2048
#: Largest ``dimensions`` an embeddings request may ask for (the widest real models
#: have 4096-12288; 9,000,000 would make a reply no frame can carry).
MAX_EMBED_DIMENSIONS = 16_384
#: Most documents in one rerank request (Cohere's own limit is 1000).
MAX_RERANK_DOCUMENTS = 1024
#: Longest ``keep_alive`` a request may ask for (30 days); a negative one means "keep
#: the model loaded until the daemon stops", as in Ollama.
MAX_KEEP_ALIVE_S = 30 * 24 * 3600.0
#: Most choices one request may ask for (``n``; docs/adr/0022-n-choices-and-logprobs.md).
MAX_CHOICES = 16
#: Most alternatives per token in ``top_logprobs`` (OpenAI's own limit).
MAX_TOP_LOGPROBS = 20
#: Most entries in ``logit_bias``; a bias must lie in [-100, 100] (OpenAI's range, -100
#: bans the token; docs/adr/0021-per-request-sampling-chain.md).
MAX_LOGIT_BIAS = 1024
LOGIT_BIAS_RANGE = 100.0
#: Most DRY sequence breakers, each at most MAX_STOP_CHARS characters.
MAX_DRY_BREAKERS = 64
#: Penalty bounds: OpenAI's [-2, 2] for presence/frequency; llama.cpp's repeat penalty is
#: a divisor (> 0, 1 disables) and its windows count tokens (-1: the whole context).
MAX_REPEAT_PENALTY = 100.0
MAX_PENALTY_WINDOW = 1 << 20
#: Most entries in a request's ``lora`` scale override; a scale must be finite, within
#: +-MAX_LORA_SCALE (docs/adr/0026-grammar-fast-path-and-context-knobs.md).
MAX_LORA_ENTRIES = 16
MAX_LORA_SCALE = 100.0
#: Longest ``affinity_key`` a request may carry (a Router hashes it; docs/adr/0020-*).
MAX_AFFINITY_KEY_CHARS = 256
#: ``reasoning_effort`` values (OpenAI's; docs/adr/0025-raw-completions-and-reasoning.md).
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
#: The levels that turn reasoning off: a ``Request`` with one has ``thinking=False``,
#: with any other level ``thinking=True`` (docs/adr/0025-raw-completions-and-reasoning.md).
REASONING_OFF = ("none", "minimal")
#: Longest raw-completion ``prompt`` (characters); frames bound it further.
MAX_PROMPT_CHARS = 16 * 1024 * 1024
#: Ollama-style duration units accepted in a ``keep_alive`` string ("90s", "5m", "1h").
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, what: str = "keep_alive") -> float | None:
    """Seconds from a number or an Ollama duration (``"5m"``, ``"90s"``, ``"-1"``).

    ``None`` stays ``None`` (the model's own default applies); a negative value is -1
    (never unload); anything else is ``InvalidRequest`` naming ``what``
    (docs/adr/0015-several-models-load-on-demand.md).
    """
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and 0 < len(value) <= 32:
        text = value.strip().lower()
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
        try:
            seconds = float(text[: len(text) - len(unit)]) * _DURATION_UNITS.get(unit, 1.0)
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds > MAX_KEEP_ALIVE_S:
        raise InvalidRequest(
            f"{what}={echo(value)} must be seconds or a duration like '5m', '90s', '1h' "
            f"(negative: keep loaded), at most {MAX_KEEP_ALIVE_S:g}s (MAX_KEEP_ALIVE_S)"
        )
    return -1.0 if seconds < 0 else seconds


def _freeze(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: Any, where: str) -> bytes | None:
    """Strict base64 (``None`` stays ``None``): ``"!!!"`` is an error, not ``b""``."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise InvalidRequest(f"{where} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where} is not valid base64: {echo(text)}") from None


def _obj(d: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise InvalidRequest(f"{where} must be a JSON object, got {type(d).__name__}")
    return d


def _get(d: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """``d[key]``, which must be present and of type ``kind``."""
    if key not in d:
        raise InvalidRequest(f"{where} needs {key!r}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise InvalidRequest(f"{where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _opt(
    d: Mapping[str, Any], key: str, where: str, default: Any, kind: type | tuple[type, ...] = str
) -> Any:
    """``d[key]`` if present and not null (it must be of type ``kind``), else ``default``."""
    if d.get(key) is None:
        return default
    return _get(d, key, where, kind)


def _seq(value: Any, name: str, *, one: type | None = None) -> tuple[Any, ...]:
    """A list/tuple field as a tuple (a lone ``one``-typed value counts as one item)."""
    if one is not None and isinstance(value, one):
        return (value,)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidRequest(f"{name} must be a list, got {type(value).__name__}")
    return tuple(value)


# --------------------------------------------------------------------------- blocks

Role: TypeAlias = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class TextBlock:
    """Plain text content."""

    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


@dataclass(frozen=True, slots=True)
class ImageBlock:
    """An image: inline ``data`` (with ``media_type``), a ``url``, or an ``attachment`` id."""

    data: bytes | None = None
    media_type: str = "image/png"
    url: str | None = None
    attachment: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.data, self.url, self.attachment)) != 1:
            raise InvalidRequest(
                "ImageBlock needs exactly one of data=, url= or attachment= "
                f"(got data={self.data is not None}, url={self.url is not None}, "
                f"attachment={echo(self.attachment)})"
            )

    def __repr__(self) -> str:
        src = (
            f"data=<{len(self.data)} bytes>"
            if self.data is not None
            else f"url={self.url!r}"
            if self.url
            else f"attachment={self.attachment!r}"
        )
        return f"ImageBlock({src}, media_type={self.media_type!r})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "image",
            "data": _b64(self.data),
            "media_type": self.media_type,
            "url": self.url,
            "attachment": self.attachment,
        }


@dataclass(frozen=True, slots=True)
class AudioBlock:
    """Audio: inline ``data`` in ``format`` (wav, mp3, ...) or an ``attachment`` id."""

    data: bytes | None = None
    format: str = "wav"
    attachment: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.attachment is None):
            raise InvalidRequest("AudioBlock needs exactly one of data= or attachment=")

    def __repr__(self) -> str:
        src = (
            f"data=<{len(self.data)} bytes>"
            if self.data is not None
            else (f"attachment={self.attachment!r}")
        )
        return f"AudioBlock({src}, format={self.format!r})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "audio",
            "data": _b64(self.data),
            "format": self.format,
            "attachment": self.attachment,
        }


@dataclass(frozen=True, slots=True)
class ToolUseBlock:
    """A tool call made by the assistant in an earlier turn."""

    id: str
    name: str
    input: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "tool_use", "id": self.id, "name": self.name, "input": dict(self.input)}


@dataclass(frozen=True, slots=True)
class ToolResultBlock:
    """The result of a tool call, sent back to the model."""

    tool_use_id: str
    content: str
    is_error: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "tool_result",
            "tool_use_id": self.tool_use_id,
            "content": self.content,
            "is_error": self.is_error,
        }


def _short(signature: str | None) -> str:
    """A signature in a repr: opaque and long, so its length only."""
    return "None" if signature is None else f"<{len(signature)} chars>"


@dataclass(frozen=True, slots=True)
class ThinkingBlock:
    """The assistant's reasoning in an earlier turn, sent back with the conversation.

    Only assistant messages hold it. ``signature`` is the provider's seal on it
    (Anthropic's extended thinking): a follow-up turn with thinking and tools must send
    the signed block back unchanged. Templates that render reasoning get it as
    ``reasoning_content``; the others ignore it
    (docs/adr/0014-anthropic-messages-both-ways.md).
    """

    text: str
    signature: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise InvalidRequest(
                f"ThinkingBlock.text must be a string, not {type(self.text).__name__}"
            )
        if self.signature is not None and not isinstance(self.signature, str):
            raise InvalidRequest(
                f"ThinkingBlock.signature must be a string or None, not "
                f"{type(self.signature).__name__}"
            )

    def __repr__(self) -> str:
        return f"ThinkingBlock(text={self.text!r}, signature={_short(self.signature)})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "thinking", "text": self.text}
        if self.signature is not None:
            d["signature"] = self.signature
        return d


Block: TypeAlias = (
    TextBlock | ImageBlock | AudioBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock
)


def block_from_dict(d: Mapping[str, Any], where: str = "block") -> Block:
    """Build a content block from its ``to_dict`` form (``where`` names it in errors)."""
    d = _obj(d, where)
    kind = d.get("type")
    if kind == "text":
        return TextBlock(_get(d, "text", where))
    if kind == "image":
        return ImageBlock(
            data=_unb64(d.get("data"), f"{where}.data"),
            media_type=_opt(d, "media_type", where, "image/png"),
            url=_opt(d, "url", where, None),
            attachment=_opt(d, "attachment", where, None),
        )
    if kind == "audio":
        return AudioBlock(
            data=_unb64(d.get("data"), f"{where}.data"),
            format=_opt(d, "format", where, "wav"),
            attachment=_opt(d, "attachment", where, None),
        )
    if kind == "tool_use":
        return ToolUseBlock(
            _get(d, "id", where), _get(d, "name", where), _opt(d, "input", where, {}, Mapping)
        )
    if kind == "tool_result":
        return ToolResultBlock(
            _get(d, "tool_use_id", where),
            _opt(d, "content", where, ""),
            _opt(d, "is_error", where, False, bool),
        )
    if kind == "thinking":
        return ThinkingBlock(_get(d, "text", where), _opt(d, "signature", where, None))
    raise InvalidRequest(
        f"{where} has unknown content block type {echo(kind)}; expected text, image, audio, "
        "tool_use, tool_result or thinking"
    )


_BLOCK_TYPES = (TextBlock, ImageBlock, AudioBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock)


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message: a role and a tuple of content blocks.

    ``content`` may be given as a string (one text block) or any iterable of blocks.
    """

    role: Role
    content: tuple[Block, ...]

    def __init__(self, role: Role, content: str | Iterable[Block]) -> None:
        if role not in ROLES:
            raise InvalidRequest(f"unknown message role {echo(role)}; expected one of {ROLES}")
        blocks: tuple[Block, ...]
        if isinstance(content, str):
            blocks = (TextBlock(content),)
        else:
            blocks = _seq(content, f"{role} message content")
        for b in blocks:
            if not isinstance(b, _BLOCK_TYPES):
                raise InvalidRequest(
                    f"{role} message has an unknown content block {type(b).__name__}; use "
                    "TextBlock, ImageBlock, AudioBlock, ToolUseBlock, ToolResultBlock or "
                    "ThinkingBlock"
                )
            if isinstance(b, ThinkingBlock) and role != "assistant":
                raise InvalidRequest(
                    f"{role} message holds a ThinkingBlock; only assistant messages may"
                )
        _freeze(self, "role", role)
        _freeze(self, "content", blocks)

    @classmethod
    def system(cls, text: str) -> Message:
        return cls("system", text)

    @classmethod
    def user(cls, content: str | Iterable[Block]) -> Message:
        return cls("user", content)

    @classmethod
    def assistant(cls, content: str | Iterable[Block]) -> Message:
        return cls("assistant", content)

    @classmethod
    def tool(cls, tool_use_id: str, content: str, is_error: bool = False) -> Message:
        return cls("tool", (ToolResultBlock(tool_use_id, content, is_error),))

    @property
    def text(self) -> str:
        """All text blocks joined (the form most chat templates want)."""
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "content": [b.to_dict() for b in self.content]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "message") -> Message:
        d = _obj(d, where)
        role = _get(d, "role", where)
        content = d.get("content", ())
        if isinstance(content, str):
            return cls(role, content)
        blocks = _seq(content, f"{where}.content")
        return cls(
            role, [block_from_dict(b, f"{where}.content[{j}]") for j, b in enumerate(blocks)]
        )


@dataclass(frozen=True, slots=True)
class Attachment:
    """Binary media referenced from blocks by ``id`` (keeps big payloads out of messages)."""

    id: str
    kind: Literal["image", "audio"]
    data: bytes
    media_type: str = "application/octet-stream"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InvalidRequest("attachment id must be a non-empty string")
        if self.kind not in ("image", "audio"):
            raise InvalidRequest(f"attachment {echo(self.id)} has unknown kind {echo(self.kind)}")
        if not isinstance(self.data, bytes):
            raise InvalidRequest(f"attachment {echo(self.id)}: data must be bytes")

    def __repr__(self) -> str:
        return (
            f"Attachment(id={self.id!r}, kind={self.kind!r}, data=<{len(self.data)} bytes>, "
            f"media_type={self.media_type!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "data": _b64(self.data),
            "media_type": self.media_type,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "attachment") -> Attachment:
        """From ``to_dict`` form; ``data`` must be strict base64 (``"!!!"`` is refused)."""
        d = _obj(d, where)
        return cls(
            _get(d, "id", where),
            _get(d, "kind", where),
            _unb64(_get(d, "data", where), f"{where}.data") or b"",
            _opt(d, "media_type", where, "application/octet-stream"),
        )


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON schema (an object)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise InvalidRequest("tool name must be a non-empty string")
        if not isinstance(self.description, str):
            raise InvalidRequest(f"tool {echo(self.name)}: description must be a string")
        if not isinstance(self.parameters, Mapping):
            raise InvalidRequest(f"tool {echo(self.name)}: parameters must be a JSON-schema object")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "tool") -> Tool:
        d = _obj(d, where)
        return cls(
            _get(d, "name", where),
            _opt(d, "description", where, ""),
            _opt(d, "parameters", where, None, Mapping) or {"type": "object", "properties": {}},
        )


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``auto``, ``required``, ``none``, or ``tool`` with a ``name``.

    Requests accept the plain strings and ``{"name": ...}`` too; see :meth:`parse`.
    """

    kind: Literal["auto", "required", "none", "tool"]
    name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "required", "none", "tool"):
            raise InvalidRequest(
                f"tool_choice {echo(self.kind)} is not one of auto, required, none, or a tool name"
            )
        if (self.kind == "tool") != bool(self.name):
            raise InvalidRequest("tool_choice 'tool' needs a name (and only it)")

    @classmethod
    def parse(cls, value: ToolChoice | str | Mapping[str, Any] | None) -> ToolChoice | None:
        if value is None or isinstance(value, ToolChoice):
            return value
        if isinstance(value, str):
            if value in ("auto", "required", "none"):
                return cls(value)  # type: ignore[arg-type]
            return cls("tool", value)
        if isinstance(value, Mapping):
            if value.get("kind") in ("auto", "required", "none"):
                return cls(value["kind"])
            fn = value.get("function")
            name = value.get("name") or (fn.get("name") if isinstance(fn, Mapping) else None)
            if isinstance(name, str) and name:
                return cls("tool", name)
        raise InvalidRequest(f"cannot read tool_choice {echo(value)}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}


# --------------------------------------------------------------------------- request


def _check_range(
    name: str, value: float | int | None, lo: float, hi: float, limit: str = ""
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < lo or value > hi:
        named = f" ({limit})" if limit else ""
        raise InvalidRequest(f"{name}={echo(value)} is out of range [{lo}, {hi}]{named}")


@dataclass(frozen=True, slots=True)
class Request:
    """One chat request, the same for every backend.

    Sampling fields left as ``None`` use the backend's (or upstream's) default.
    ``ignore_eos`` keeps generating past end-of-generation tokens (benchmarks need
    exact token counts; llama-server accepts the same flag).
    """

    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    response_format: Mapping[str, Any] | None = None
    thinking: bool = False
    attachments: tuple[Attachment, ...] = ()
    ignore_eos: bool = False
    model: str | None = None
    #: seconds the model stays loaded after this request (Ollama's ``keep_alive``;
    #: ``None``: the model's default, negative: until the daemon stops). Only a daemon
    #: that loads models on demand uses it (docs/adr/0015-several-models-load-on-demand.md).
    keep_alive: float | None = None
    # -- issue 15: the rest of the Chat Completions surface. ``None`` leaves the
    # backend's default; a backend that cannot honour a set field refuses it through
    # inferd.request_fields (one rule for every backend).
    typical_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: tuple[str, ...] | None = None
    xtc_probability: float | None = None
    xtc_threshold: float | None = None
    #: token id -> bias added to its logit, in [-100, 100]; -100 bans the token.
    logit_bias: Mapping[int, float] | None = None
    #: how many choices to generate (each with its own ``index`` on events).
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None
    #: False: at most one tool call per reply.
    parallel_tool_calls: bool = True
    #: emit ToolUseDelta events while a call's arguments are generated.
    stream_tool_arguments: bool = False
    reasoning_effort: str | None = None
    #: routes a conversation to the same replica (inferd.router); never changes a reply.
    affinity_key: str | None = None
    #: LoRA adapter (index or path) -> scale for this request, as llama-server's ``lora``
    #: (docs/adr/0026-grammar-fast-path-and-context-knobs.md).
    lora: Mapping[int | str, float] | None = None
    #: a raw completion: this text is the whole prompt, no chat template, ``messages``
    #: empty (:meth:`completion`; docs/adr/0025-raw-completions-and-reasoning.md).
    prompt: str | None = None
    #: False: no speculative decoding for this request on a backend with a draft. Never
    #: changes a reply (greedy: the same tokens; sampling: the target samples every
    #: position), so no backend refuses it (docs/adr/0027-speculative-decoding-batched.md).
    speculative: bool = True

    def __post_init__(self) -> None:
        _freeze(self, "messages", _seq(self.messages, "messages"))
        _freeze(self, "thinking", _effort_thinking(self.thinking, self.reasoning_effort))
        _freeze(self, "logit_bias", _logit_bias(self.logit_bias))
        _freeze(self, "lora", _lora(self.lora))
        if self.dry_sequence_breakers is not None:
            _freeze(
                self,
                "dry_sequence_breakers",
                _seq(self.dry_sequence_breakers, "dry_sequence_breakers", one=str),
            )
        _freeze(self, "keep_alive", parse_keep_alive(self.keep_alive))
        _freeze(self, "tools", _seq(self.tools, "tools"))
        _freeze(self, "stop", _seq(self.stop, "stop", one=str))
        _freeze(self, "attachments", _seq(self.attachments, "attachments"))
        _freeze(self, "tool_choice", ToolChoice.parse(self.tool_choice))
        self._validate()

    def _validate(self) -> None:
        if self.prompt is not None:
            self._validate_prompt()
        elif not self.messages:
            raise InvalidRequest("messages is empty: a request needs at least one message")
        _check_count("messages", len(self.messages), MAX_MESSAGES, "MAX_MESSAGES")
        _check_count("tools", len(self.tools), MAX_TOOLS, "MAX_TOOLS")
        _check_count("attachments", len(self.attachments), MAX_ATTACHMENTS, "MAX_ATTACHMENTS")
        _check_count("stop sequences", len(self.stop), MAX_STOP_SEQUENCES, "MAX_STOP_SEQUENCES")
        for i, m in enumerate(self.messages):
            if not isinstance(m, Message):
                raise InvalidRequest(f"messages[{i}] is a {type(m).__name__}, not a Message")
            if not m.content:
                raise InvalidRequest(f"messages[{i}] ({m.role}) has no content")
            if m.role != "assistant" and all(
                isinstance(b, TextBlock) and not b.text for b in m.content
            ):
                raise InvalidRequest(f"messages[{i}] ({m.role}) has empty text content")
        names = self._validate_tools()
        tc = self.tool_choice
        if tc is not None and tc.kind != "none" and not self.tools:
            raise InvalidRequest(f"tool_choice={tc.kind!r} given without any tools")
        if tc is not None and tc.kind == "tool" and tc.name not in names:
            raise InvalidRequest(
                f"tool_choice names tool {echo(tc.name)}, which is not among the tools "
                f"({echo(sorted(names))})"
            )
        _check_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE, "MAX_TEMPERATURE")
        _check_range("top_p", self.top_p, 0.0, 1.0)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("top_k", self.top_k, 0, MAX_TOP_K, "MAX_TOP_K")
        _check_range("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT, "MAX_TOKENS_LIMIT")
        _check_range("seed", self.seed, -(2**63), 2**64 - 1)
        for name in ("top_k", "max_tokens", "seed"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, int):
                raise InvalidRequest(f"{name} must be an integer, got {echo(v)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop sequences must be non-empty strings")
        longest = max((len(s) for s in self.stop), default=0)
        _check_count("characters in a stop sequence", longest, MAX_STOP_CHARS, "MAX_STOP_CHARS")
        for name in ("thinking", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false")
        if self.model is not None and not isinstance(self.model, str):
            raise InvalidRequest(f"model must be a string, got {type(self.model).__name__}")
        if self.response_format is not None:
            rf = self.response_format
            if not isinstance(rf, Mapping) or rf.get("type") not in (
                "json_schema",
                "json_object",
                "text",
            ):
                raise InvalidRequest(
                    "response_format must be {'type': 'json_schema', 'json_schema': {...}}, "
                    "{'type': 'json_object'} or {'type': 'text'}"
                )
        self._validate_attachments()
        self._validate_surface()

    def _validate_surface(self) -> None:
        """The issue-15 fields: ranges, types and the limits named above."""
        _check_range("typical_p", self.typical_p, 0.0, 1.0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), -2.0, 2.0)
        _check_range("repeat_penalty", self.repeat_penalty, 0.0, MAX_REPEAT_PENALTY)
        if self.repeat_penalty is not None and self.repeat_penalty <= 0:
            raise InvalidRequest("repeat_penalty must be > 0 (1.0 disables it)")
        for name in ("repeat_last_n", "dry_penalty_last_n"):
            _check_range(name, getattr(self, name), -1, MAX_PENALTY_WINDOW, "MAX_PENALTY_WINDOW")
        _check_range("dry_multiplier", self.dry_multiplier, 0.0, MAX_REPEAT_PENALTY)
        _check_range("dry_base", self.dry_base, 1.0, MAX_REPEAT_PENALTY)
        _check_range("dry_allowed_length", self.dry_allowed_length, 0, MAX_PENALTY_WINDOW)
        _check_range("xtc_probability", self.xtc_probability, 0.0, 1.0)
        _check_range("xtc_threshold", self.xtc_threshold, 0.0, 1.0)
        _check_range("n", self.n, 1, MAX_CHOICES, "MAX_CHOICES")
        _check_range("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS, "MAX_TOP_LOGPROBS")
        for name in ("repeat_last_n", "dry_allowed_length", "dry_penalty_last_n", "n"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise InvalidRequest(f"{name} must be an integer, got {echo(v)}")
        if self.top_logprobs is not None:
            if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int):
                raise InvalidRequest(
                    f"top_logprobs must be an integer, got {echo(self.top_logprobs)}"
                )
            if not self.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs=true")
        for name in ("logprobs", "parallel_tool_calls", "stream_tool_arguments", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false")
        breakers = self.dry_sequence_breakers or ()
        _check_count("dry_sequence_breakers", len(breakers), MAX_DRY_BREAKERS, "MAX_DRY_BREAKERS")
        if any(not s or len(s) > MAX_STOP_CHARS for s in breakers):
            raise InvalidRequest(
                f"dry_sequence_breakers must be non-empty strings of at most {MAX_STOP_CHARS} "
                "characters (MAX_STOP_CHARS)"
            )
        if self.reasoning_effort is not None and self.reasoning_effort not in REASONING_EFFORTS:
            raise InvalidRequest(
                f"reasoning_effort={echo(self.reasoning_effort)} is not one of "
                f"{', '.join(REASONING_EFFORTS)}"
            )
        key = self.affinity_key
        if key is not None and (not isinstance(key, str) or len(key) > MAX_AFFINITY_KEY_CHARS):
            raise InvalidRequest(
                f"affinity_key must be a string of at most {MAX_AFFINITY_KEY_CHARS} characters "
                "(MAX_AFFINITY_KEY_CHARS)"
            )

    def _validate_prompt(self) -> None:
        """A raw completion carries its whole prompt as text: nothing a chat template
        would render can come with it (docs/adr/0025-raw-completions-and-reasoning.md)."""
        if not isinstance(self.prompt, str) or not self.prompt:
            raise InvalidRequest(
                f"prompt must be a non-empty string, got {echo(self.prompt)}"
                if not isinstance(self.prompt, str)
                else "prompt is empty: a raw completion needs some text"
            )
        _check_count("characters in prompt", len(self.prompt), MAX_PROMPT_CHARS, "MAX_PROMPT_CHARS")
        clash = [
            name
            for name, given in (
                ("messages", bool(self.messages)),
                ("tools", bool(self.tools)),
                ("tool_choice", self.tool_choice is not None),
                ("response_format", self.response_format is not None),
                ("attachments", bool(self.attachments)),
                ("reasoning_effort", self.reasoning_effort is not None),
                ("thinking", self.thinking and self.reasoning_effort is None),
            )
            if given
        ]
        if clash:
            raise InvalidRequest(
                f"a raw completion (prompt=...) takes no {', '.join(clash)}: there is no chat "
                "template to render them; send a chat request (messages=...) instead"
            )

    def _validate_tools(self) -> set[str]:
        names: set[str] = set()
        for t in self.tools:
            if not isinstance(t, Tool):
                raise InvalidRequest(f"tools must be Tool objects, got {type(t).__name__}")
            if t.name in names:
                raise InvalidRequest(
                    f"duplicate tool name {echo(t.name)}: tool names must be unique"
                )
            names.add(t.name)
        return names

    def _validate_attachments(self) -> None:
        by_id: dict[str, Attachment] = {}
        for a in self.attachments:
            if not isinstance(a, Attachment):
                raise InvalidRequest(
                    f"attachments must be Attachment objects, not {type(a).__name__}"
                )
            if a.id in by_id:
                raise InvalidRequest(f"duplicate attachment id {echo(a.id)}")
            by_id[a.id] = a
        for i, m in enumerate(self.messages):
            for b in m.content:
                ref = getattr(b, "attachment", None)
                if ref is None:
                    continue
                want = "image" if isinstance(b, ImageBlock) else "audio"
                att = by_id.get(ref)
                if att is None:
                    raise InvalidRequest(
                        f"messages[{i}] refers to attachment {echo(ref)}, which is not in "
                        "request.attachments"
                    )
                if att.kind != want:
                    raise InvalidRequest(
                        f"messages[{i}] uses attachment {echo(ref)} as {want}, but it is {att.kind}"
                    )

    # -- conveniences ---------------------------------------------------------

    @classmethod
    def chat(cls, prompt: str, *, system: str | None = None, **kw: Any) -> Request:
        """A one-turn request: an optional system message and a user prompt."""
        msgs = [Message.system(system)] if system else []
        msgs.append(Message.user(prompt))
        return cls(tuple(msgs), **kw)

    @classmethod
    def completion(cls, prompt: str, **kw: Any) -> Request:
        """A raw completion: ``prompt`` is fed to the model as it is, without a chat
        template (the legacy ``/v1/completions``; docs/adr/0025-raw-completions-and-reasoning.md).
        """
        return cls((), prompt=prompt, **kw)

    def attachment(self, ref: str) -> Attachment:
        for a in self.attachments:
            if a.id == ref:
                return a
        raise InvalidRequest(f"no attachment {echo(ref)}")

    # The one import that points up a layer, deferred to call time: these two public
    # conveniences (README, callers) belong on Request, while the mapping itself
    # belongs with the rest of the OpenAI mapping in inferd.openai_wire, which builds
    # Requests and so must import this module. At import time the arrow is one-way.

    @classmethod
    def from_openai(cls, body: Mapping[str, Any]) -> Request:
        """Read an OpenAI Chat Completions request body (see :mod:`inferd.openai_wire`)."""
        from inferd.openai_wire import request_from_openai  # deferred: see above

        return request_from_openai(body)

    def to_openai(self, *, model: str | None = None) -> dict[str, Any]:
        """Write this request as an OpenAI Chat Completions body."""
        from inferd.openai_wire import request_to_openai  # deferred: see above

        return request_to_openai(self, model=model)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"messages": [m.to_dict() for m in self.messages]}
        if self.tools:
            d["tools"] = [t.to_dict() for t in self.tools]
        if self.tool_choice is not None:
            d["tool_choice"] = self.tool_choice.to_dict()
        if self.stop:
            d["stop"] = list(self.stop)
        if self.attachments:
            d["attachments"] = [a.to_dict() for a in self.attachments]
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "max_tokens",
            "seed",
            "response_format",
            "model",
            "keep_alive",
            *_SURFACE_OPTIONAL,
        ):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        if self.dry_sequence_breakers is not None:
            d["dry_sequence_breakers"] = list(self.dry_sequence_breakers)
        if self.logit_bias is not None:  # JSON object keys are strings
            d["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        if self.lora is not None:  # an int key (an index) travels as a list entry
            d["lora"] = [
                {"id" if isinstance(k, int) else "path": k, "scale": v}
                for k, v in self.lora.items()
            ]
        for name, default in _SURFACE_DEFAULTS.items():
            if getattr(self, name) != default:
                d[name] = getattr(self, name)
        if self.thinking:
            d["thinking"] = True
        if self.ignore_eos:
            d["ignore_eos"] = True
        if self.prompt is not None:
            d["prompt"] = self.prompt
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Request:
        """Inverse of :meth:`to_dict`, for untrusted JSON: unknown keys are refused."""
        d = _obj(d, "request")
        check_depth(d)
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidRequest(f"unknown request field(s): {echo(sorted(unknown))}")
        raw = d.get("messages")
        msgs = () if raw is None and d.get("prompt") is not None else _seq(raw, "request.messages")
        _check_count("messages", len(msgs), MAX_MESSAGES, "MAX_MESSAGES")
        tools = _seq(d.get("tools") or (), "request.tools")
        _check_count("tools", len(tools), MAX_TOOLS, "MAX_TOOLS")
        atts = _seq(d.get("attachments") or (), "request.attachments")
        _check_count("attachments", len(atts), MAX_ATTACHMENTS, "MAX_ATTACHMENTS")
        try:
            return cls._from_parts(d, msgs, tools, atts)
        except (KeyError, TypeError, AttributeError) as e:  # a reader missed a check
            raise InvalidRequest(f"malformed request ({type(e).__name__})") from None

    @classmethod
    def _from_parts(
        cls,
        d: Mapping[str, Any],
        msgs: tuple[Any, ...],
        tools: tuple[Any, ...],
        atts: tuple[Any, ...],
    ) -> Request:
        return cls(
            messages=tuple(Message.from_dict(m, f"messages[{i}]") for i, m in enumerate(msgs)),
            tools=tuple(Tool.from_dict(t, f"tools[{i}]") for i, t in enumerate(tools)),
            tool_choice=ToolChoice.parse(d.get("tool_choice")),
            temperature=d.get("temperature"),
            top_p=d.get("top_p"),
            top_k=d.get("top_k"),
            min_p=d.get("min_p"),
            max_tokens=d.get("max_tokens"),
            stop=d.get("stop") or (),
            seed=d.get("seed"),
            response_format=d.get("response_format"),
            thinking=d.get("thinking", False),
            attachments=tuple(
                Attachment.from_dict(a, f"attachments[{i}]") for i, a in enumerate(atts)
            ),
            ignore_eos=d.get("ignore_eos", False),
            model=d.get("model"),
            keep_alive=d.get("keep_alive"),
            dry_sequence_breakers=d.get("dry_sequence_breakers"),
            logit_bias=d.get("logit_bias"),
            lora=d.get("lora"),
            **{name: d.get(name) for name in _SURFACE_OPTIONAL},
            **{name: d.get(name, default) for name, default in _SURFACE_DEFAULTS.items()},
            prompt=d.get("prompt"),
        )


def _effort_thinking(thinking: Any, effort: Any) -> Any:
    """``thinking`` made consistent with ``reasoning_effort``: a level decides it (none and
    minimal: off; low, medium, high: on), and ``thinking=True`` with none/minimal is a
    contradiction, refused (docs/adr/0025-raw-completions-and-reasoning.md)."""
    if effort not in REASONING_EFFORTS:
        return thinking  # unset (or refused by _validate_surface)
    on = effort not in REASONING_OFF
    if thinking is True and not on:
        raise InvalidRequest(
            f"thinking=True contradicts reasoning_effort={echo(effort)}; "
            "leave thinking unset or pick low, medium or high"
        )
    return on


#: issue-15 fields written to / read from dicts as they are (None: unset) ...
_SURFACE_OPTIONAL = (
    "typical_p",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "repeat_last_n",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "xtc_probability",
    "xtc_threshold",
    "top_logprobs",
    "reasoning_effort",
    "affinity_key",
)
#: ... and those with a non-None default, written only when they differ from it.
_SURFACE_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "logprobs": False,
    "parallel_tool_calls": True,
    "stream_tool_arguments": False,
    "speculative": True,
}


def _logit_bias(value: Any) -> Mapping[int, float] | None:
    """A ``logit_bias`` as a read-only {token id: bias}: keys may be ints or decimal
    strings (JSON object keys are strings, as OpenAI clients send them)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequest("logit_bias must be an object mapping token ids to numbers")
    _check_count("logit_bias entries", len(value), MAX_LOGIT_BIAS, "MAX_LOGIT_BIAS")
    out: dict[int, float] = {}
    for k, v in value.items():
        if isinstance(k, bool) or not isinstance(k, (int, str)):
            raise InvalidRequest(f"logit_bias key {echo(k)} is not a token id")
        try:
            tok = int(k)
        except ValueError:
            raise InvalidRequest(f"logit_bias key {echo(k)} is not a token id") from None
        if tok < 0:
            raise InvalidRequest(f"logit_bias key {echo(k)} is not a token id (negative)")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidRequest(f"logit_bias[{tok}] must be a number, got {echo(v)}")
        _check_range(f"logit_bias[{tok}]", v, -LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE)
        out[tok] = float(v)
    return _ReadOnlyBias(out)


def _lora(value: Any) -> Mapping[int | str, float] | None:
    """A ``lora`` override as a read-only {adapter index or path: scale}. Accepts a
    mapping or llama-server's list of ``{"id": i, "scale": s}`` (``"path"`` in place of
    ``"id"`` names an adapter by its file)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        check_depth(value)
        pairs = []
        for e in value:
            if not isinstance(e, Mapping) or "scale" not in e or ("id" in e) == ("path" in e):
                raise InvalidRequest('lora entries must be {"id": index, "scale": number}')
            pairs.append((e["id"] if "id" in e else e["path"], e["scale"]))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise InvalidRequest("lora must map adapter indices (or paths) to scales")
    _check_count("lora entries", len(pairs), MAX_LORA_ENTRIES, "MAX_LORA_ENTRIES")
    out: dict[int | str, float] = {}
    for k, v in pairs:
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, str))
            or k == ""
            or (isinstance(k, int) and k < 0)
        ):
            raise InvalidRequest(f"lora key {echo(k)} is not an adapter index or path")
        if isinstance(k, str) and k.isdigit():
            k = int(k)  # JSON object keys are strings
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidRequest(f"lora[{echo(k)}] must be a number, got {echo(v)}")
        _check_range(f"lora[{echo(k)}]", v, -MAX_LORA_SCALE, MAX_LORA_SCALE)
        out[k] = float(v)
    return _ReadOnlyBias(out)


class _ReadOnlyBias(dict):  # type: ignore[type-arg]
    """A dict that refuses changes, so a frozen Request stays frozen."""

    __slots__ = ()

    def _refuse(self, *a: Any, **k: Any) -> None:
        raise TypeError("Request.logit_bias is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]


def _check_count(what: str, n: int, limit: int, name: str) -> None:
    if n > limit:
        raise InvalidRequest(f"{n} {what} given; at most {limit} ({name})")


# --------------------------------------------------------------------------- events


class StopReason(enum.StrEnum):
    """Why a stream ended."""

    END_TURN = "end_turn"
    MAX_TOKENS = "max_tokens"
    TOOL_USE = "tool_use"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    ERROR = "error"

    def __repr__(self) -> str:
        return f"StopReason.{self.name}"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts. ``cached_tokens`` counts prompt tokens served from a KV/prefix cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Usage:
        """Inverse of :meth:`to_dict`; missing counts are 0, wrong types InvalidRequest."""
        d = _obj(d or {}, "usage")
        return cls(
            _opt(d, "input_tokens", "usage", 0, int),
            _opt(d, "output_tokens", "usage", 0, int),
            _opt(d, "cached_tokens", "usage", 0, int),
        )


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds to the first event, seconds in total, and generated tokens per second;
    with speculative decoding, the reply's drafted and accepted tokens (ADR 0027)."""

    ttft_s: float | None = None
    total_s: float = 0.0
    tokens_per_s: float | None = None
    #: draft tokens the target verified for this reply (llama-server's ``draft_n``);
    #: None when nothing was drafted.
    draft_tokens: int | None = None
    #: of those, the ones the target accepted (``draft_n_accepted``).
    draft_accepted: int | None = None

    @classmethod
    def measure(cls, start: float, first: float | None, end: float, tokens: int) -> Timings:
        """Timings from ``time.perf_counter()`` marks and the generated token count.

        Tokens/s covers the decode phase (first event to end) when there is one, so
        prompt processing does not dilute it; it is ``None`` with fewer than 2 tokens.
        """
        ttft = None if first is None else first - start
        span = end - (first if first is not None else start)
        tps = (tokens - 1) / span if tokens > 1 and span > 0 else None
        return cls(ttft, end - start, tps)

    def to_dict(self) -> dict[str, Any]:
        """The seconds always; the draft counts only when something was drafted."""
        out = {"ttft_s": self.ttft_s, "total_s": self.total_s, "tokens_per_s": self.tokens_per_s}
        if self.draft_tokens is not None:
            out |= {"draft_tokens": self.draft_tokens, "draft_accepted": self.draft_accepted}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Timings:
        """Inverse of :meth:`to_dict`; wrong types are InvalidRequest."""
        d = _obj(d or {}, "timings")
        num = (int, float)
        return cls(
            _opt(d, "ttft_s", "timings", None, num),
            float(_opt(d, "total_s", "timings", 0.0, num)),
            _opt(d, "tokens_per_s", "timings", None, num),
            _opt(d, "draft_tokens", "timings", None, int),
            _opt(d, "draft_accepted", "timings", None, int),
        )


#: Most bytes one token's ``TokenLogprob.bytes`` may hold (llama.cpp pieces are short).
MAX_TOKEN_BYTES = 256
#: Most ``TokenLogprob`` entries one event read from a dict may carry.
MAX_EVENT_LOGPROBS = 65_536


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives.

    ``bytes`` are the token's UTF-8 bytes (a character may span tokens, so ``token`` may
    hold a replacement character); ``top`` is ``(token, bytes, logprob)`` sorted by
    descending logprob. Carried on ``Text``/``Thinking``/``ToolUse`` events only when a
    request asks for ``logprobs`` (docs/adr/0022-n-choices-and-logprobs.md).
    """

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[tuple[str, tuple[int, ...], float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's ``logprobs.content[]`` entry."""
        return {
            "token": self.token,
            "logprob": self.logprob,
            "bytes": list(self.bytes),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in self.top
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "logprob") -> TokenLogprob:
        """Inverse of :meth:`to_dict` (also reads OpenAI's entries), for untrusted JSON."""
        d = _obj(d, where)
        top = _seq(d.get("top_logprobs") or (), f"{where}.top_logprobs")
        _check_count(f"{where}.top_logprobs", len(top), MAX_TOP_LOGPROBS, "MAX_TOP_LOGPROBS")
        alts = []
        for i, t in enumerate(top):
            t = _obj(t, f"{where}.top_logprobs[{i}]")
            alts.append((_lp_token(t, where), _lp_bytes(t, where), _lp_value(t, where)))
        return cls(_lp_token(d, where), _lp_bytes(d, where), _lp_value(d, where), tuple(alts))


def _lp_token(d: Mapping[str, Any], where: str) -> str:
    tok = d.get("token")
    if not isinstance(tok, str):
        raise InvalidRequest(f"{where}.token must be a string, got {echo(tok)}")
    return tok


def _lp_bytes(d: Mapping[str, Any], where: str) -> tuple[int, ...]:
    raw = d.get("bytes")
    if raw is None:  # OpenAI may send null; the token's own UTF-8 then
        return tuple(_lp_token(d, where).encode())
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_TOKEN_BYTES:
        raise InvalidRequest(f"{where}.bytes must be a list of at most {MAX_TOKEN_BYTES} bytes")
    if any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < 256 for b in raw):
        raise InvalidRequest(f"{where}.bytes must hold integers 0..255")
    return tuple(raw)


def _lp_value(d: Mapping[str, Any], where: str) -> float:
    v = d.get("logprob")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequest(f"{where}.logprob must be a number, got {echo(v)}")
    return float(v)


def _logprobs_dict(d: dict[str, Any], index: int, logprobs: tuple[TokenLogprob, ...]) -> None:
    """Add ``index`` and ``logprobs`` to an event dict only when set: old frames stay valid."""
    if index:
        d["index"] = index
    if logprobs:
        d["logprobs"] = [lp.to_dict() for lp in logprobs]


def _event_extras(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The optional ``index``/``logprobs`` of an event dict (validated)."""
    out: dict[str, Any] = {}
    index = d.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_CHOICES:
        raise InvalidRequest(f"{where}.index must be an integer 0..{MAX_CHOICES - 1}")
    if index:
        out["index"] = index
    lps = d.get("logprobs")
    if lps:
        seq = _seq(lps, f"{where}.logprobs")
        _check_count(f"{where}.logprobs", len(seq), MAX_EVENT_LOGPROBS, "MAX_EVENT_LOGPROBS")
        out["logprobs"] = tuple(
            TokenLogprob.from_dict(x, f"{where}.logprobs[{i}]") for i, x in enumerate(seq)
        )
    return out


@dataclass(frozen=True, slots=True)
class Text:
    """A piece of the reply's visible text.

    ``index`` is the choice it belongs to (``Request.n``); ``logprobs`` the tokens this
    piece came from, when the request asked for them
    (docs/adr/0022-n-choices-and-logprobs.md).
    """

    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()

    def __getattr__(self, name: str) -> Any:
        # The compiled chunk decoder (_fast/_chunks_c.pyx) builds Text events without
        # __init__ and sets only ``text``; an unset slot reads as its default.
        if name == "index":
            return 0
        if name == "logprobs":
            return ()
        raise AttributeError(name)

    def __repr__(self) -> str:
        extra = f", index={self.index}" if self.index else ""
        if self.logprobs:
            extra += f", logprobs=<{len(self.logprobs)} tokens>"
        return f"Text(text={self.text!r}{extra})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "text", "text": self.text}
        if self.index or self.logprobs:
            _logprobs_dict(d, self.index, self.logprobs)
        return d


@dataclass(frozen=True, slots=True)
class Thinking:
    """A piece of the model's reasoning (shown dimmed, never mixed into ``Text``).

    ``signature`` is set on the event that *ends* a signed reasoning block (Anthropic's
    ``signature_delta``; that event's ``text`` is usually empty): keep it to send the
    block back in a follow-up turn (:meth:`Response.message`). Callers that ignore it
    see only an extra empty piece (docs/adr/0014-anthropic-messages-both-ways.md).
    """

    text: str
    signature: str | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()

    def __getattr__(self, name: str) -> Any:
        # The compiled chunk decoder (_fast/_chunks_c.pyx) builds Thinking events
        # without __init__ and sets only ``text``; an unset slot reads as its default.
        if name == "signature":
            return None
        if name == "index":
            return 0
        if name == "logprobs":
            return ()
        raise AttributeError(name)

    def __repr__(self) -> str:
        sig = "" if self.signature is None else f", signature={_short(self.signature)}"
        if self.index:
            sig += f", index={self.index}"
        if self.logprobs:
            sig += f", logprobs=<{len(self.logprobs)} tokens>"
        return f"Thinking(text={self.text!r}{sig})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "thinking", "text": self.text}
        if self.signature is not None:
            d["signature"] = self.signature
        if self.index or self.logprobs:
            _logprobs_dict(d, self.index, self.logprobs)
        return d


@dataclass(frozen=True, slots=True)
class ToolUse:
    """One *complete* tool call.

    ``input`` is the parsed arguments object, or ``None`` when ``raw_arguments`` is
    not valid JSON (the raw text is always kept so nothing is lost).
    """

    id: str
    name: str
    input: Mapping[str, Any] | None
    raw_arguments: str = ""
    #: the choice it belongs to, and the tokens the call was written with (when asked)
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "tool_use",
            "id": self.id,
            "name": self.name,
            "input": None if self.input is None else dict(self.input),
            "raw_arguments": self.raw_arguments,
        }
        if self.index or self.logprobs:
            _logprobs_dict(d, self.index, self.logprobs)
        return d


#: Largest ``ToolUseDelta.call_index`` read from a dict (a reply's calls, counted from 0;
#: an upstream's argument limits allow about a million calls, ``_stream_common``).
MAX_CALL_INDEX = 1 << 20


@dataclass(frozen=True, slots=True)
class ToolUseDelta:
    """A piece of a tool call's arguments as they are written (opt-in per request with
    ``Request.stream_tool_arguments``; the bridge always asks for it).

    ``call_index`` is the call's position among the reply's calls in the order they
    began (0, 1, ...); ``id``
    and ``name`` are repeated on every piece, and ``arguments_fragment`` is the next
    piece of the arguments string: the fragments of one call, joined, equal its final
    ``ToolUse.raw_arguments``. The complete :class:`ToolUse` still follows every call,
    so a caller that ignores deltas sees no change; a call that turns out malformed gets
    no ``ToolUse`` (its text follows as ``Text``). ``index`` is the choice and
    ``logprobs`` the tokens the piece came from, as on every event
    (docs/adr/0023-tool-call-streaming-and-stop-reasons.md).
    """

    call_index: int
    id: str
    name: str
    arguments_fragment: str = ""
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "tool_use_delta",
            "call_index": self.call_index,
            "id": self.id,
            "name": self.name,
            "arguments_fragment": self.arguments_fragment,
        }
        if self.index or self.logprobs:
            _logprobs_dict(d, self.index, self.logprobs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "tool_use_delta") -> ToolUseDelta:
        """Inverse of :meth:`to_dict`, for untrusted JSON (wrong types: InvalidRequest)."""
        d = _obj(d, where)
        pos = d.get("call_index")
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= MAX_CALL_INDEX:
            raise InvalidRequest(f"{where}.call_index must be an integer 0..{MAX_CALL_INDEX}")
        extra = _event_extras(d, where) if ("index" in d or "logprobs" in d) else {}
        return cls(
            pos,
            _get(d, "id", where),
            _get(d, "name", where),
            _opt(d, "arguments_fragment", where, ""),
            **extra,
        )


@dataclass(frozen=True, slots=True)
class Done:
    """The last event of every completed stream; exactly one per stream and choice.

    A request with ``n > 1`` gets one ``Done`` per choice (``index``), each with that
    choice's own usage (the prompt counted in each); the stream is complete after the
    ``n``-th. :func:`choices_usage` sums them as OpenAI reports it
    (docs/adr/0022-n-choices-and-logprobs.md).
    """

    stop_reason: StopReason
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    backend: str | None = None
    index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.stop_reason, StopReason):
            _freeze(self, "stop_reason", StopReason(self.stop_reason))

    def replace(self, **changes: Any) -> Done:
        """A copy with some fields changed (backends fill timings and their name)."""
        vals = {f.name: getattr(self, f.name) for f in fields(self)}
        vals.update(changes)
        return Done(**vals)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": "done",
            "stop_reason": self.stop_reason.value,
            "usage": self.usage.to_dict(),
            "timings": self.timings.to_dict(),
            "backend": self.backend,
        }
        if self.index:
            d["index"] = self.index
        return d


def choices_usage(dones: Sequence[Done]) -> Usage:
    """The usage of a stream of ``n`` choices as OpenAI reports it: the prompt once
    (each choice's ``Done`` counts it), completion tokens summed over the choices."""
    if not dones:
        return Usage()
    first = dones[0].usage
    return Usage(
        first.input_tokens,
        sum(d.usage.output_tokens for d in dones),
        first.cached_tokens,
    )


Event: TypeAlias = Text | Thinking | ToolUse | ToolUseDelta | Done


def event_from_dict(d: Mapping[str, Any], where: str = "event") -> Event:
    """Inverse of ``Event.to_dict()``; the same rule as :func:`block_from_dict`."""
    d = _obj(d, where)
    kind = d.get("type")
    extra = _event_extras(d, where) if ("index" in d or "logprobs" in d) else {}
    if kind == "text":
        return Text(_get(d, "text", where), **extra)
    if kind == "thinking":
        return Thinking(_get(d, "text", where), _opt(d, "signature", where, None), **extra)
    if kind == "tool_use":
        return ToolUse(
            _get(d, "id", where),
            _get(d, "name", where),
            _opt(d, "input", where, None, Mapping),
            _opt(d, "raw_arguments", where, ""),
            **extra,
        )
    if kind == "tool_use_delta":
        return ToolUseDelta.from_dict(d, where)
    if kind == "done":
        reason = _get(d, "stop_reason", where)
        if reason not in StopReason._value2member_map_:
            raise InvalidRequest(f"{where}.stop_reason {echo(reason)} is not a stop reason")
        return Done(
            StopReason(reason),
            Usage.from_dict(_opt(d, "usage", where, None, Mapping)),
            Timings.from_dict(_opt(d, "timings", where, None, Mapping)),
            _opt(d, "backend", where, None),
            extra.get("index", 0),
        )
    raise InvalidRequest(
        f"{where} has unknown event type {echo(kind)}; expected text, thinking, tool_use, "
        "tool_use_delta or done"
    )


# --------------------------------------------------------------------------- capabilities

AcceleratorKind: TypeAlias = Literal["cpu", "cuda", "metal", "vulkan", "rocm", "remote"]


#: Most RPC devices read from a peer's capabilities (16 servers, a few devices each).
MAX_RPC_DEVICES = 256


def _rpc_list(value: Any) -> list[Any]:
    return value[:MAX_RPC_DEVICES] if isinstance(value, list) else []


@dataclass(frozen=True, slots=True)
class RpcDevice:
    """A device of a ggml RPC worker a split model uses (docs/adr/0019-rpc-backend.md)."""

    endpoint: str
    name: str = ""
    memory_total: int = 0
    memory_free: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "name": self.name,
            "memory_total": self.memory_total,
            "memory_free": self.memory_free,
        }


@dataclass(frozen=True, slots=True)
class AcceleratorInfo:
    """Where a local model computes. ``gpu_layers`` is how many layers are offloaded;
    ``rpc_devices`` the remote devices of a model split over RPC workers."""

    kind: AcceleratorKind = "cpu"
    gpu_layers: int = 0
    device_name: str = ""
    vram_total_bytes: int = 0
    rpc_devices: tuple[RpcDevice, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "gpu_layers": self.gpu_layers,
            "device_name": self.device_name,
            "vram_total_bytes": self.vram_total_bytes,
        }
        if self.rpc_devices:
            out["rpc_devices"] = [d.to_dict() for d in self.rpc_devices]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AcceleratorInfo:
        """Inverse of :meth:`to_dict` (unknown keys ignored, for newer peers)."""
        return cls(
            kind=d.get("kind", "cpu"),
            gpu_layers=int(d.get("gpu_layers", 0)),
            device_name=str(d.get("device_name", "")),
            vram_total_bytes=int(d.get("vram_total_bytes", 0)),
            rpc_devices=tuple(
                RpcDevice(
                    str(r.get("endpoint", "")),
                    str(r.get("name", "")),
                    int(r.get("memory_total", 0)),
                    int(r.get("memory_free", 0)),
                )
                for r in _rpc_list(d.get("rpc_devices"))
                if isinstance(r, Mapping)
            ),
        )


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the router matches requests against this."""

    v2: bool = True
    tools: bool = False
    vision: bool = False
    audio: bool = False
    thinking: bool = False
    embed: bool = False
    accelerator: AcceleratorInfo | None = None
    #: ``tokenize``/``detokenize``/``apply_template`` work (the backend holds a tokenizer)
    tokenize: bool = False
    #: ``rerank`` works (a reranker model: rank pooling)
    rerank: bool = False

    def covers(self, request: Request) -> str | None:
        """``None`` when this backend can serve ``request``, else the reason it cannot."""
        if request.tools and not self.tools:
            return "no tool support"
        for m in request.messages:
            for b in m.content:
                if isinstance(b, ImageBlock) and not self.vision:
                    return "no vision support"
                if isinstance(b, AudioBlock) and not self.audio:
                    return "no audio support"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "v2": self.v2,
            "tools": self.tools,
            "vision": self.vision,
            "audio": self.audio,
            "thinking": self.thinking,
            "embed": self.embed,
            "accelerator": self.accelerator.to_dict() if self.accelerator else None,
            "tokenize": self.tokenize,
            "rerank": self.rerank,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Capabilities:
        """Inverse of :meth:`to_dict`. Unknown keys are ignored and missing flags are
        false, so a client can read the capabilities of a newer or older daemon."""
        acc = d.get("accelerator")
        accel = AcceleratorInfo.from_dict(acc) if isinstance(acc, Mapping) else None
        flags = {
            k: bool(d.get(k, False))
            for k in ("tools", "vision", "audio", "thinking", "embed", "tokenize", "rerank")
        }
        return cls(v2=bool(d.get("v2", True)), accelerator=accel, **flags)


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Texts to embed; ``dimensions`` truncates (then re-normalises) where supported."""

    input: tuple[str, ...]
    dimensions: int | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        inp = _seq(self.input, "embed input", one=str)
        if not inp:
            raise InvalidRequest("embed input is empty: give at least one string")
        _check_count("embed inputs", len(inp), MAX_EMBED_INPUTS, "MAX_EMBED_INPUTS")
        if any(not isinstance(s, str) for s in inp):
            raise InvalidRequest("embed input must be strings")
        _freeze(self, "input", inp)
        dims = self.dimensions
        if dims is not None and (
            not isinstance(dims, int)
            or isinstance(dims, bool)
            or not 1 <= dims <= MAX_EMBED_DIMENSIONS
        ):
            raise InvalidRequest(
                f"dimensions={echo(dims)} must be an integer from 1 to {MAX_EMBED_DIMENSIONS} "
                "(MAX_EMBED_DIMENSIONS)"
            )
        if self.task is not None and not isinstance(self.task, str):
            raise InvalidRequest(f"task must be a string, got {type(self.task).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"input": list(self.input), "dimensions": self.dimensions, "task": self.task}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbedRequest:
        """Inverse of :meth:`to_dict`, for untrusted JSON: unknown keys are refused, as
        :meth:`Request.from_dict` refuses them (one rule for every request kind)."""
        d = _obj(d, "embed request")
        check_depth(d, what="embed request")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidRequest(f"unknown embed request field(s): {echo(sorted(unknown))}")
        inp = d.get("input")
        if inp is None:
            raise InvalidRequest("embed request needs 'input'")
        return cls(inp, d.get("dimensions"), d.get("task"))


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """One vector per input string, in input order."""

    embeddings: tuple[tuple[float, ...], ...]
    dimensions: int
    model: str = ""
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self) -> None:
        _freeze(self, "embeddings", tuple(tuple(v) for v in self.embeddings))

    def __repr__(self) -> str:
        return (
            f"EmbedResult(<{len(self.embeddings)} x {self.dimensions}>, "
            f"model={self.model!r}, usage={self.usage!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "embeddings": [list(v) for v in self.embeddings],
            "dimensions": self.dimensions,
            "model": self.model,
            "usage": self.usage.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbedResult:
        """Inverse of :meth:`to_dict`; the same reader rule (InvalidRequest, named field)."""
        where = "embed result"
        d = _obj(d, where)
        rows = []
        for i, v in enumerate(_seq(_get(d, "embeddings", where, list), f"{where}.embeddings")):
            row = _seq(v, f"{where}.embeddings[{i}]")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row):
                raise InvalidRequest(f"{where}.embeddings[{i}] must hold only numbers")
            rows.append(row)
        return cls(
            tuple(rows),
            _get(d, "dimensions", where, int),
            _opt(d, "model", where, ""),
            Usage.from_dict(_opt(d, "usage", where, None, Mapping)),
        )


@dataclass(frozen=True, slots=True)
class RerankRequest:
    """A query and the documents to score against it; ``top_n`` keeps the best ones."""

    query: str
    documents: tuple[str, ...]
    top_n: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.query, str):
            raise InvalidRequest(f"query must be a string, got {type(self.query).__name__}")
        docs = _seq(self.documents, "documents")
        if not docs:
            raise InvalidRequest("documents is empty: give at least one string")
        _check_count("documents", len(docs), MAX_RERANK_DOCUMENTS, "MAX_RERANK_DOCUMENTS")
        if any(not isinstance(d, str) for d in docs):
            raise InvalidRequest("documents must be strings")
        _freeze(self, "documents", docs)
        n = self.top_n
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise InvalidRequest(f"top_n={echo(n)} must be an integer >= 1")


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One relevance score per document, in input order (higher: more relevant)."""

    scores: tuple[float, ...]
    model: str = ""
    usage: Usage = field(default_factory=Usage)

    def ranked(self, top_n: int | None = None) -> list[tuple[int, float]]:
        """``(index, score)`` best first (ties keep input order), at most ``top_n``."""
        order = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])
        return [(i, self.scores[i]) for i in order[:top_n]]


# --------------------------------------------------------------------------- response


@dataclass(frozen=True, slots=True)
class Response:
    """A whole stream collected: what :func:`inferd.complete` returns."""

    text: str
    thinking: str
    tool_calls: tuple[ToolUse, ...]
    done: Done
    #: The reasoning as blocks: a run of Thinking events is one block, ended early by
    #: an event with a ``signature`` (which the block keeps).
    thinking_blocks: tuple[ThinkingBlock, ...] = ()
    #: Every choice of a request with ``n > 1``, by index (this Response is choice 0);
    #: empty for one choice (docs/adr/0022-n-choices-and-logprobs.md).
    choices: tuple[Response, ...] = ()
    #: The tokens of the text with their logprobs, when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def stop_reason(self) -> StopReason:
        return self.done.stop_reason

    @property
    def usage(self) -> Usage:
        """The whole stream's usage: the prompt once, every choice's tokens summed."""
        if not self.choices:
            return self.done.usage
        return choices_usage([c.done for c in self.choices])

    @classmethod
    def collect(cls, events: Sequence[Event]) -> Response:
        """The stream as one Response; with several choices (events with ``index``
        above 0) choice 0, whose ``choices`` holds every choice."""
        if all(not ev.index for ev in events):
            return cls._collect_one(events)
        by_index: dict[int, list[Event]] = {}
        for ev in events:
            by_index.setdefault(ev.index, []).append(ev)
        choices = tuple(cls._collect_one(by_index[i]) for i in sorted(by_index))
        first = choices[0]
        return cls(
            first.text,
            first.thinking,
            first.tool_calls,
            first.done,
            first.thinking_blocks,
            choices,
            first.logprobs,
        )

    @classmethod
    def _collect_one(cls, events: Sequence[Event]) -> Response:
        lps: list[TokenLogprob] = []
        text, thinking, calls, run = [], [], [], []
        blocks: list[ThinkingBlock] = []
        done: Done | None = None
        for ev in events:
            if isinstance(ev, ToolUseDelta):
                continue  # the complete ToolUse follows (ADR 0023)
            if isinstance(ev, Thinking):
                thinking.append(ev.text)
                run.append(ev.text)
                if ev.signature is not None:
                    blocks.append(ThinkingBlock("".join(run), ev.signature))
                    run = []
                continue
            if run:
                blocks.append(ThinkingBlock("".join(run)))
                run = []
            if isinstance(ev, Text):
                text.append(ev.text)
                if ev.logprobs:
                    lps.extend(ev.logprobs)
            elif isinstance(ev, ToolUse):
                calls.append(ev)
            elif isinstance(ev, Done):
                done = ev
        if done is None:
            raise ended_without_done()
        if run:
            blocks.append(ThinkingBlock("".join(run)))
        return cls(
            "".join(text), "".join(thinking), tuple(calls), done, tuple(blocks), (), tuple(lps)
        )

    def message(self) -> Message:
        """This reply as the assistant turn of a follow-up request: the thinking blocks
        (signatures kept), the text, then the tool calls (a call whose arguments were
        not valid JSON is sent back with an empty input)."""
        blocks: list[Block] = [b for b in self.thinking_blocks if b.text or b.signature]
        if self.text:
            blocks.append(TextBlock(self.text))
        blocks.extend(ToolUseBlock(c.id, c.name, dict(c.input or {})) for c in self.tool_calls)
        return Message("assistant", blocks or [TextBlock("")])
