"""Everything a local backend needs to serve one request's tools, in one decision.

Given the model's chat template and a request, :func:`plan_chat` decides once:

* the *effective* tool format: ``tool_format=`` if given, else the template's
  fingerprint; a template that cannot render tools gets the built-in Hermes-style
  prompt (:mod:`inferd.chat.tool_prompt`), so its replies are read as ``hermes``;
* the messages (and tools) to render, in the shapes templates expect;
* the grammar (tool_choice / response_format), raising InvalidRequest up front for a
  combination or schema that cannot be served;
* how to build the output parser for the rendered prompt.

The backend renders ``messages``/``tools`` with its Jinja renderer, applies
``grammar`` to its sampler, and feeds generated text to ``parser(prompt)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferd.chat import SentinelParser, parser_class, parser_for
from inferd.chat._xml_args import schemas_of
from inferd.chat.grammar import Grammar, GrammarLimits
from inferd.chat.messages import template_messages, template_tools
from inferd.chat.tool_grammar import request_grammar
from inferd.chat.tool_prompt import fold_tools_into_messages, tool_path
from inferd.types import Request, Tool


@dataclass(frozen=True)
class ChatPlan:
    """The decisions for one request (see the module docstring)."""

    format: str
    template: str | None
    messages: list[dict[str, Any]]
    tools: tuple[Tool, ...]
    grammar: Grammar | None
    folded: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    #: Extra template variables: ``enable_thinking`` mirrors ``request.thinking`` for
    #: templates that read it (Qwen 3, Gemma 4, ...), as ``chat_template_kwargs`` does
    #: on llama-server and vLLM.
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def parser(self, prompt: str, **extra: Any) -> SentinelParser:
        """A fresh output parser for a reply to ``prompt`` (``extra``: parser options
        of this request, e.g. ``stream_arguments``)."""
        return parser_for(
            self.template, prompt, tool_format=self.format, **{**self.options, **extra}
        )


def effective_format(template: str | None, request: Request, tool_format: str | None = None) -> str:
    """The format replies are parsed in (and calls are constrained to).

    :func:`inferd.chat.tool_prompt.tool_path` decides (ADR 0024): an unrecognised
    tool syntax gets the built-in prompt, never a Hermes parser by accident.
    """
    return tool_path(template, bool(request.tools), tool_format).format


def plan_chat(
    template: str | None,
    request: Request,
    *,
    tool_format: str | None = None,
    limits: GrammarLimits | None = None,
    parallel_tool_calls: bool = True,
) -> ChatPlan:
    """Decide format, prompt inputs and grammar for ``request`` on this template.

    The grammar allows several calls when ``request.parallel_tool_calls`` does (OpenAI's
    default) and ``parallel_tool_calls`` is not False (ADR 0023)."""
    path = tool_path(template, bool(request.tools), tool_format)
    fmt = path.format
    messages = template_messages(request.messages)
    tools = tuple(request.tools)
    folded = path.folded
    # XML-style families type argument values by the tool's schema (ADR 0024).
    options = (
        {"schemas": schemas_of(tools)}
        if tools and getattr(parser_class(fmt), "accepts_schemas", False)
        else {}
    )
    if folded:
        messages = fold_tools_into_messages(messages, template_tools(tools))
        tools = ()
    grammar = request_grammar(
        request,
        fmt,
        parallel=parallel_tool_calls and request.parallel_tool_calls,
        mistral_v11=bool(template) and "[ARGS]" in template,  # type: ignore[operator]
        limits=limits,
    )
    kwargs = (
        {"enable_thinking": request.thinking} if template and "enable_thinking" in template else {}
    )
    return ChatPlan(
        fmt, template, messages, tools, grammar, folded, options=options, template_kwargs=kwargs
    )
