"""Render a model's own Jinja chat template, the way llama-server and transformers do.

GGUF files carry the template their model was trained with (``tokenizer.chat_template``).
Rendering it -- rather than keeping a table of hand-written formats per model family --
means any model works on day one. The template is untrusted input, so it runs in
jinja2's ``ImmutableSandboxedEnvironment``. The variables follow the convention both
llama-server and transformers use: ``messages`` (dicts with ``role``/``content``, plus
``tool_calls`` / ``tool_call_id``), ``tools`` (OpenAI function form), ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception`` and ``strftime_now``; ``tojson`` keeps
non-ASCII text as is and accepts ``indent``, like transformers' filter.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inferd.chat.messages import template_messages, template_tools
from inferd.errors import InvalidRequest
from inferd.limits import echo
from inferd.types import REASONING_OFF, Message, Request, Tool


class TemplateError(InvalidRequest):
    """The template raised (``raise_exception``) or failed to render this conversation."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the conversation: {message}")


def _tojson(
    value: Any,
    indent: int | None = None,
    ensure_ascii: bool = False,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value,
        indent=indent,
        ensure_ascii=ensure_ascii,
        separators=tuple(separators) if separators else None,
        sort_keys=sort_keys,
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidRequest(
            f"the chat template does not parse (line {e.lineno}): {e.message}"
        ) from None


class ChatTemplate:
    """A compiled chat template plus the special tokens it may refer to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        if not source or not source.strip():
            raise InvalidRequest("the chat template is empty")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile(source)

    def render(
        self,
        messages: Sequence[Message] | Sequence[dict[str, Any]],
        *,
        tools: Sequence[Tool] = (),
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages`` (tools are passed only when there are some).

        Template-ready dicts (from :func:`inferd.chat.messages.template_messages`, which
        a :class:`~inferd.chat.plan.ChatPlan` holds) pass through unchanged; inferd
        :class:`~inferd.types.Message` objects go through that same mapper.
        """
        dicts = [m for m in messages if isinstance(m, dict)]
        if len(dicts) != len(messages):
            if dicts:
                raise InvalidRequest("render() takes Messages or template dicts, not a mix")
            dicts = template_messages(messages)  # type: ignore[arg-type]
        ctx: dict[str, Any] = {
            "messages": dicts,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools:
            ctx["tools"] = template_tools(tools)
        ctx.update(extra)
        try:
            return self._template.render(**ctx)
        except InvalidRequest:
            raise  # TemplateError from raise_exception, already worded
        except jinja2.exceptions.SecurityError as e:
            raise InvalidRequest(f"the chat template tried an unsafe operation: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise InvalidRequest(
                f"the chat template failed to render this conversation: {type(e).__name__}: {e}"
            ) from None


#: GPT-OSS's template prints ``"Reasoning: " + reasoning_effort``; its levels are low,
#: medium and high, and it cannot turn reasoning off.
_GPT_OSS_MARK = '"Reasoning: " + reasoning_effort'
GPT_OSS_LEVELS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high"}
#: A template that mentions one of these can put the model into a reasoning block.
_THINKING_MARKERS = re.compile(r"think|reasoning", re.IGNORECASE)


def reasoning_kwargs(source: str | None, request: Request) -> dict[str, Any]:
    """The template variables that carry ``request.reasoning_effort`` as the family expects.

    * ``enable_thinking`` (Qwen3, Gemma 4, GLM, DeepSeek V3.1+, SmolLM3, ...):
      ``request.thinking``, which a level decides (none/minimal off, others on);
    * GPT-OSS: ``reasoning_effort`` in its own levels (minimal reads as low; ``none`` is
      refused, the model always reasons);
    * any other template that reads ``reasoning_effort`` (Cohere, Solar, Hy3, DeepSeek
      V4) gets the level as sent, as llama-server passes it; a level the template does
      not know makes it raise, which is an ``InvalidRequest``.

    A template with neither switch cannot change its reasoning: a level that needs a
    change is refused naming ``reasoning_effort`` (docs/adr/0025-raw-completions-and-reasoning.md).
    Without ``reasoning_effort`` nothing is added (``enable_thinking`` then comes from
    ``thinking`` through :class:`inferd.chat.plan.ChatPlan`).
    """
    effort = request.reasoning_effort
    if effort is None:
        return {}
    src = source or ""
    kw: dict[str, Any] = {}
    if "enable_thinking" in src:
        kw["enable_thinking"] = request.thinking
    if _GPT_OSS_MARK in src:
        if effort not in GPT_OSS_LEVELS:
            raise InvalidRequest(
                f"reasoning_effort={echo(effort)} cannot be honoured: this model (GPT-OSS) "
                "always reasons; use low, medium or high"
            )
        kw["reasoning_effort"] = GPT_OSS_LEVELS[effort]
    elif "reasoning_effort" in src:
        kw["reasoning_effort"] = effort
    if kw:
        return kw
    thinks = bool(_THINKING_MARKERS.search(src))
    if thinks == (effort in REASONING_OFF):
        raise InvalidRequest(
            f"reasoning_effort={echo(effort)} cannot be honoured: this model's chat template "
            + (
                "has no switch to turn its reasoning off"
                if thinks
                else "has no reasoning; leave reasoning_effort unset or send none"
            )
        )
    return kw


def from_model(
    template: str | None,
    *,
    model_name: str,
    bos_token: str,
    eos_token: str,
    override: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ChatTemplate:
    """The override if given, else the model's template, else a clear error."""
    source = override if override is not None else template
    if not source:
        raise InvalidRequest(
            f"model {model_name!r} has no chat template (tokenizer.chat_template is missing "
            "from its GGUF metadata); pass chat_template='<jinja source>' to LlamaCpp"
        )
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)
