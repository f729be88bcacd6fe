"""Chat formats for local models: output parsers, format detection, grammars.

One module per family (``plain``, ``hermes``, ``llama3``, ``mistral``, ``gemma4``, and
from ADR 0024 ``qwen3_coder``, ``glm4``, ``minimax``, ``nemotron``, ``deepseek``,
``deepseek_v32``, ``deepseek_v4``, ``functionary_v31``, ``functionary_v32``),
registered here by name so the backend, the CLI and tests pick one with a string::

    from inferd.chat import detect_format, get_parser
    parser = get_parser(detect_format(template))
    for piece in pieces:
        events = parser.feed(piece)
    events = parser.finish()

Every parser is a streaming state machine with ``feed(text) -> list[Event]`` and
``finish() -> list[Event]`` (the output seam of the llama.cpp backend): it never
leaks part of a sentinel into Text, accepts sentinels split anywhere, gives each call
a unique id, and turns a malformed call into Text (``parser.malformed`` says why).
"""

from __future__ import annotations

from typing import Any

from inferd.chat._stream import OutputParser, SentinelParser, merge_events
from inferd.chat.deepseek import DeepSeekParser
from inferd.chat.deepseek_dsml import DeepSeekV4Parser, DeepSeekV32Parser
from inferd.chat.fingerprints import (
    detect_format,
    detect_thinking,
    explain_format,
    prompt_opens_thinking,
)
from inferd.chat.functionary import FunctionaryV31Parser, FunctionaryV32Parser
from inferd.chat.gemma4 import Gemma4Parser
from inferd.chat.glm4 import Glm4Parser
from inferd.chat.hermes import HermesParser
from inferd.chat.llama3 import Llama3Parser
from inferd.chat.minimax import MiniMaxParser
from inferd.chat.mistral import MistralParser
from inferd.chat.nemotron import NemotronParser
from inferd.chat.plain import PlainParser
from inferd.chat.qwen3_coder import Qwen3CoderParser
from inferd.errors import InvalidRequest

_REGISTRY: dict[str, type[SentinelParser]] = {}


def register(cls: type[SentinelParser]) -> type[SentinelParser]:
    """Add a parser class under ``cls.name`` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (
    PlainParser,
    HermesParser,
    Llama3Parser,
    MistralParser,
    Gemma4Parser,
    Qwen3CoderParser,
    Glm4Parser,
    MiniMaxParser,
    NemotronParser,
    DeepSeekParser,
    DeepSeekV32Parser,
    DeepSeekV4Parser,
    FunctionaryV31Parser,
    FunctionaryV32Parser,
):
    register(_cls)


def available_formats() -> tuple[str, ...]:
    """Registered format names, sorted."""
    return tuple(sorted(_REGISTRY))


def parser_class(name: str) -> type[SentinelParser]:
    """The registered class for ``name``; InvalidRequest names the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidRequest(
            f"unknown tool format {name!r}; choose one of {', '.join(available_formats())}"
        ) from None


def get_parser(name: str, **options: Any) -> SentinelParser:
    """A fresh parser for format ``name`` (options: thinking, in_thinking, id_factory)."""
    return parser_class(name)(**options)


def parser_for(
    chat_template: str | None,
    prompt: str = "",
    *,
    tool_format: str | None = None,
    **options: Any,
) -> SentinelParser:
    """The parser a reply to ``prompt`` needs, from the template (or ``tool_format``).

    Thinking is recognised when the template mentions a reasoning block, and the
    parser starts inside it when the prompt left one open.
    """
    name = tool_format or detect_format(chat_template)
    cls = parser_class(name)
    thinking = options.pop("thinking", None)
    if thinking is None:
        thinking = cls.thinking_default or detect_thinking(chat_template)
    in_thinking = bool(thinking) and prompt_opens_thinking(prompt, cls.think_open, cls.think_close)
    return cls(thinking=thinking, in_thinking=in_thinking, **options)


__all__ = [
    "OutputParser",
    "SentinelParser",
    "available_formats",
    "detect_format",
    "detect_thinking",
    "explain_format",
    "get_parser",
    "merge_events",
    "parser_class",
    "parser_for",
    "prompt_opens_thinking",
    "register",
]
