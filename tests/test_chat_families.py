"""The tool-call families of ADR 0024, against llama.cpp's own parsing cases.

Each case restates an input of llama.cpp's ``tests/test-chat.cpp`` (Qwen 3.5,
Qwen3-Coder, Nemotron 3 Nano / Nano v2, GLM 4.6 / 4.7, MiniMax M2, DeepSeek V3.1 / R1,
functionary v3.1 / v3.2, and Gemma 4's edge cases) with the content, reasoning and
calls llama.cpp expects, written here as our own data. ``in_thinking`` marks the
cases whose prompt opened the reasoning block (llama.cpp's forced-open thinking).
Differences by design: inferd trims whitespace around reasoning and after a call
(llama.cpp keeps DeepSeek's ``"REASONING\\n"``); it is noted per case.

Every case is fed whole, one character at a time, and split in two at every
position. Then: each real template from ``vendor/llama.cpp/models/templates`` is
detected as its family and renders tools and a call through our template path; the
call the template renders parses back to the same call; and every ``tool_choice``
grammar's sentences parse as valid calls, and llama.cpp accepts each grammar.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferd.chat import detect_format, get_parser, merge_events, parser_for
from inferd.chat.family_grammar import FAMILY_GRAMMARS, family_grammar
from inferd.chat.plan import plan_chat
from inferd.chat.tool_prompt import MAX_LOGGED_DECISIONS, tool_path
from inferd.types import (
    Event,
    Message,
    Request,
    Text,
    Thinking,
    Tool,
    ToolChoice,
    ToolUse,
    ToolUseBlock,
    ToolUseDelta,
)
from tests.conftest import missing
from tests.gbnf_sample import Sampler

TEMPLATES = Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "models" / "templates"

# ------------------------------------------------------------------ llama.cpp's tools

_INT = {"type": "integer"}
_STR = {"type": "string"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required)}


SCHEMAS: dict[str, dict[str, Any]] = {
    "special_function": _obj({"arg1": _INT}, ("arg1",)),
    "special_function_with_opt": _obj({"arg1": _INT, "arg2": _INT}, ("arg1",)),
    "python": _obj({"code": _STR}, ("code",)),
    "html": _obj({"markup": _STR}, ("markup",)),
    "edit": _obj({"filename": _STR, "oldString": _STR, "newString": _STR}),
    "todo_list": _obj({"todos": {"type": "array", "items": {"type": "object"}}}),
    "tool_2req_4opt": _obj(
        {"req1": _STR, "req2": _INT, "opt1": _STR, "opt2": _INT, "opt3": _STR, "opt4": _INT},
        ("req1", "req2"),
    ),
    "tool_2req_5opt": _obj(
        {"req1": _STR, "req2": _INT, **{f"opt{i}": _STR if i % 2 else _INT for i in range(1, 6)}},
        ("req1", "req2"),
    ),
    "set_nullable_str": _obj({"name": {"type": ["string", "null"]}}),
    "set_nullable_str_nf": _obj({"name": {"type": ["null", "string"]}}),
    "set_nullable_int": _obj({"count": {"type": ["integer", "null"]}}),
    "set_union": _obj(
        {
            "value": {"anyOf": [{"type": "string"}, {"type": "object"}]},
            "amount": {"type": ["string", "number"]},
        }
    ),
    "set_unit": _obj({"unit": {"enum": ["celsius", "fahrenheit"]}}),
    "empty_args": _obj({}),
    "empty_args_no_props": {"type": "object"},
    "run_in_terminal": _obj({"command": _STR}, ("command",)),
    "get_time": _obj({"city": _STR}, ("city",)),
    "get_weather": _obj({"city": _STR}, ("city",)),
    "read_file_diff_md": _obj({"review_id": _STR, "file_id": _STR}),
}


def counter_ids() -> Callable[[], str]:
    it = itertools.count(1)
    return lambda: f"id{next(it)}"


def call(n: int, name: str, args: dict[str, Any]) -> ToolUse:
    return ToolUse(f"id{n}", name, args, json.dumps(args, ensure_ascii=False))


THOUGHTS = Thinking("I'm\nthinking")
HELLO = Text("Hello, world!\nWhat's up?")
SPECIAL = call(1, "special_function", {"arg1": 1})


@dataclass
class Case:
    id: str
    fmt: str
    text: str
    expected: list[Event]
    in_thinking: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def qcall(name: str, *params: tuple[str, str], bare: bool = False) -> str:
    """A Qwen3-Coder style call block, as those models write it."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    head = "" if bare else "<tool_call>\n"
    return f"{head}<function={name}>\n{body}</function>\n</tool_call>"


def _qwen_cases() -> list[Case]:
    q = "qwen3_coder"
    code = 'def hello():\n    print("Hello, world!")\n\nhello()'
    opt = ("special_function_with_opt", ("arg1", "1"), ("arg2", "2"))
    both = [SPECIAL, call(2, "special_function_with_opt", {"arg1": 1, "arg2": 2})]
    edit = ("filename", "foo.c"), ("oldString", "#iclunde")
    return [
        Case(
            "qwen35-thoughts",
            q,
            "I'm\nthinking\n</think>\n\nHello, world!\nWhat's up?",
            [THOUGHTS, HELLO],
            in_thinking=True,
        ),
        Case("qwen35-call", q, qcall("special_function", ("arg1", "1")), [SPECIAL]),
        Case(
            "qwen35-thoughts-call",
            q,
            "I'm\nthinking\n</think>\n\n" + qcall("special_function", ("arg1", "1")),
            [THOUGHTS, SPECIAL],
            in_thinking=True,
        ),
        Case(
            "qwen35-parallel",
            q,
            qcall("special_function", ("arg1", "1")) + "\n" + qcall(*opt),
            both,
        ),
        Case(
            "qwen35-code", q, qcall("python", ("code", code)), [call(1, "python", {"code": code})]
        ),
        Case(
            "qwen35-edit",
            q,
            qcall("edit", *edit, ("newString", "#include")),
            [
                call(
                    1,
                    "edit",
                    {"filename": "foo.c", "oldString": "#iclunde", "newString": "#include"},
                )
            ],
        ),
        Case(
            "qwen35-edit-trailing-newline",
            q,
            qcall("edit", *edit, ("newString", "#include\n")),
            [
                call(
                    1,
                    "edit",
                    {"filename": "foo.c", "oldString": "#iclunde", "newString": "#include\n"},
                )
            ],
        ),
        Case(
            "qwen35-indented-code",
            q,
            qcall("python", ("code", '    print("Hello, world!")')),
            [call(1, "python", {"code": '    print("Hello, world!")'})],
        ),
        Case(
            "qwen35-empty-args",
            q,
            "<tool_call>\n<function=empty_args>\n</function>\n</tool_call>",
            [call(1, "empty_args", {})],
        ),
        Case(
            "qwen35-no-props",
            q,
            "<tool_call>\n<function=empty_args_no_props>\n</function>\n</tool_call>",
            [call(1, "empty_args_no_props", {})],
        ),
        Case(
            "qwen35-empty-reasoning",
            q,
            "</think>\n\n" + qcall("special_function", ("arg1", "1")),
            [SPECIAL],
            in_thinking=True,
        ),
        Case(
            "qwen35-forced-open-call",
            q,
            "</think>\n\n" + qcall("run_in_terminal", ("command", "pwd")),
            [call(1, "run_in_terminal", {"command": "pwd"})],
            in_thinking=True,
        ),
        Case(
            "qwen35-json-after-thinking",
            q,
            "I need to output the invoice details in JSON\n</think>\n\n"
            '{"amount": 123.45, "date": "2025-12-03"}',
            [
                Thinking("I need to output the invoice details in JSON"),
                Text('{"amount": 123.45, "date": "2025-12-03"}'),
            ],
            in_thinking=True,
        ),
        Case("coder-text", q, "Hello, world!\nWhat's up?", [HELLO]),
        Case(
            "coder-text-then-bare-function",
            q,
            "Let me call it.\n" + qcall("special_function", ("arg1", "1"), bare=True),
            [Text("Let me call it.\n"), SPECIAL],
        ),
        Case(
            "qwen35-call-ends-open-thinking",
            q,
            "Need to inspect the current directory.\n"
            + qcall("run_in_terminal", ("command", "pwd")),
            [
                Thinking("Need to inspect the current directory."),
                call(1, "run_in_terminal", {"command": "pwd"}),
            ],
            in_thinking=True,
        ),
        Case(
            "coder-bare-function", q, qcall("special_function", ("arg1", "1"), bare=True), [SPECIAL]
        ),
        Case(
            "coder-bare-then-block",
            q,
            qcall("special_function", ("arg1", "1"), bare=True) + "\n" + qcall(*opt),
            both,
        ),
        Case("coder-cjk", q, qcall("python", ("code", "格")), [call(1, "python", {"code": "格"})]),
        Case(
            "coder-html",
            q,
            qcall(
                "html", ("markup", "<html>\n <head>\n  <title>Hello!</title>\n </head>\n</html>")
            ),
            [
                call(
                    1,
                    "html",
                    {"markup": "<html>\n <head>\n  <title>Hello!</title>\n </head>\n</html>"},
                )
            ],
        ),
        Case(
            "coder-todo-array",
            q,
            qcall(
                "todo_list",
                (
                    "todos",
                    '[{"item": "Check stuff", "selected": false}, '
                    '{"item": "Prepare stuff", "selected": true}]',
                ),
            ),
            [
                call(
                    1,
                    "todo_list",
                    {
                        "todos": [
                            {"item": "Check stuff", "selected": False},
                            {"item": "Prepare stuff", "selected": True},
                        ]
                    },
                )
            ],
        ),
        Case(
            "coder-required-order",
            q,
            qcall("edit", ("newString", "#include"), *edit),
            [
                call(
                    1,
                    "edit",
                    {"newString": "#include", "filename": "foo.c", "oldString": "#iclunde"},
                )
            ],
        ),
        Case(
            "coder-2req4opt",
            q,
            qcall("tool_2req_4opt", ("req2", "42"), ("req1", "hello"), ("opt2", "200")),
            [call(1, "tool_2req_4opt", {"req2": 42, "req1": "hello", "opt2": 200})],
        ),
        Case(
            "coder-2req4opt-reversed",
            q,
            qcall(
                "tool_2req_4opt",
                ("req1", "hello"),
                ("req2", "42"),
                ("opt4", "100"),
                ("opt2", "200"),
            ),
            [call(1, "tool_2req_4opt", {"req1": "hello", "req2": 42, "opt4": 100, "opt2": 200})],
        ),
        Case(
            "coder-2req5opt",
            q,
            qcall(
                "tool_2req_5opt",
                ("req1", "world"),
                ("req2", "7"),
                ("opt5", "last"),
                ("opt3", "middle"),
                ("opt1", "first"),
            ),
            [
                call(
                    1,
                    "tool_2req_5opt",
                    {"req1": "world", "req2": 7, "opt5": "last", "opt3": "middle", "opt1": "first"},
                )
            ],
        ),
        Case(
            "coder-2req5opt-shuffled",
            q,
            qcall(
                "tool_2req_5opt",
                ("req1", "test"),
                ("req2", "99"),
                ("opt3", "c"),
                ("opt1", "a"),
                ("opt5", "e"),
                ("opt4", "4"),
                ("opt2", "2"),
            ),
            [
                call(
                    1,
                    "tool_2req_5opt",
                    {
                        "req1": "test",
                        "req2": 99,
                        "opt3": "c",
                        "opt1": "a",
                        "opt5": "e",
                        "opt4": 4,
                        "opt2": 2,
                    },
                )
            ],
        ),
        Case(
            "coder-nullable-str",
            q,
            qcall("set_nullable_str", ("name", "hello world")),
            [call(1, "set_nullable_str", {"name": "hello world"})],
        ),
        Case(
            "coder-nullable-str-null-first",
            q,
            qcall("set_nullable_str_nf", ("name", "hello world")),
            [call(1, "set_nullable_str_nf", {"name": "hello world"})],
        ),
        Case(
            "coder-nullable-int",
            q,
            qcall("set_nullable_int", ("count", "42")),
            [call(1, "set_nullable_int", {"count": 42})],
        ),
        Case(
            "coder-nullable-str-null",
            q,
            qcall("set_nullable_str", ("name", "null")),
            [call(1, "set_nullable_str", {"name": None})],
        ),
        Case(
            "coder-union",
            q,
            qcall("set_union", ("value", '{"a": 1}'), ("amount", "2 dollars")),
            [call(1, "set_union", {"value": {"a": 1}, "amount": "2 dollars"})],
        ),
        Case(
            "coder-union-not-json",
            q,
            qcall("set_union", ("value", "{not valid json"), ("amount", "42")),
            [call(1, "set_union", {"value": "{not valid json", "amount": 42})],
        ),
        Case(
            "coder-enum-no-type",
            q,
            qcall("set_unit", ("unit", "celsius")),
            [call(1, "set_unit", {"unit": "celsius"})],
        ),
        # Nemotron 3 Nano writes the same syntax, with a newline after the block.
        Case(
            "nemotron3-thoughts",
            q,
            "I'm\nthinking\n</think>\nHello, world!\nWhat's up?",
            [THOUGHTS, HELLO],
            in_thinking=True,
        ),
        Case("nemotron3-call", q, qcall("special_function", ("arg1", "1")) + "\n", [SPECIAL]),
        Case(
            "nemotron3-thoughts-call",
            q,
            "I'm\nthinking\n</think>\n" + qcall("special_function", ("arg1", "1")) + "\n",
            [THOUGHTS, SPECIAL],
            in_thinking=True,
        ),
        Case(
            "nemotron3-parallel",
            q,
            qcall("special_function", ("arg1", "1")) + "\n" + qcall(*opt) + "\n",
            both,
        ),
    ]


def _glm_cases() -> list[Case]:
    g = "glm4"
    one = "<tool_call>special_function<arg_key>arg1</arg_key><arg_value>1</arg_value></tool_call>"
    opt = (
        "<tool_call>special_function_with_opt<arg_key>arg1</arg_key><arg_value>1</arg_value>"
        "<arg_key>arg2</arg_key><arg_value>2</arg_value></tool_call>"
    )
    return [
        Case(
            "glm46-call",
            g,
            "<tool_call>special_function\n<arg_key>arg1</arg_key>\n"
            "<arg_value>1</arg_value>\n</tool_call>",
            [SPECIAL],
        ),
        Case("glm47-text", g, "Hello, world!\nWhat's up?", [HELLO]),
        Case(
            "glm47-thoughts",
            g,
            "I'm\nthinking</think>Hello, world!\nWhat's up?",
            [THOUGHTS, HELLO],
            in_thinking=True,
        ),
        Case("glm47-call", g, one, [SPECIAL]),
        Case(
            "glm47-thoughts-call",
            g,
            "I'm\nthinking</think>" + one,
            [THOUGHTS, SPECIAL],
            in_thinking=True,
        ),
        Case(
            "glm47-parallel",
            g,
            one + opt,
            [SPECIAL, call(2, "special_function_with_opt", {"arg1": 1, "arg2": 2})],
        ),
        Case(
            "glm47-no-args",
            g,
            "Let me read the diff content.</think><tool_call>read_file_diff_md</tool_call>",
            [Thinking("Let me read the diff content."), call(1, "read_file_diff_md", {})],
            in_thinking=True,
        ),
    ]


def _minimax_cases() -> list[Case]:
    m = "minimax"
    return [
        Case(
            "minimax-text", m, "\n</think>\n\nHello, world!\nWhat's up?", [HELLO], in_thinking=True
        ),
        Case(
            "minimax-thoughts",
            m,
            "I'm\nthinking\n</think>\n\nHello, world!\nWhat's up?",
            [THOUGHTS, HELLO],
            in_thinking=True,
        ),
        Case(
            "minimax-empty-args",
            m,
            "Let's call a tool:\n</think>\n\n<minimax:tool_call>\n"
            '<invoke name="empty_args">\n</invoke>\n</minimax:tool_call>',
            [Thinking("Let's call a tool:"), call(1, "empty_args", {})],
            in_thinking=True,
        ),
        Case(
            "minimax-call",
            m,
            '\n</think>\n\n<minimax:tool_call>\n<invoke name="special_function">'
            '\n<parameter name="arg1">1</parameter>\n</invoke>\n</minimax:tool_call>',
            [SPECIAL],
            in_thinking=True,
        ),
    ]


def _open_thinking_cases() -> list[Case]:
    """A call right inside a prompt-opened reasoning block (``required`` forces one)."""
    mini = (
        '<minimax:tool_call>\n<invoke name="special_function">\n<parameter name="arg1">1'
        "</parameter>\n</invoke>\n</minimax:tool_call>"
    )
    glm = "<tool_call>special_function<arg_key>arg1</arg_key><arg_value>1</arg_value></tool_call>"
    return [
        Case("minimax-call-in-open-thinking", "minimax", mini, [SPECIAL], in_thinking=True),
        Case(
            "glm-call-ends-open-thinking",
            "glm4",
            "Adding.\n" + glm,
            [Thinking("Adding."), SPECIAL],
            in_thinking=True,
        ),
        Case(
            "deepseek-call-in-open-thinking",
            "deepseek",
            f'{B}get_time{SEP}{{"city": "Oslo"}}{E}',
            [call(1, "get_time", {"city": "Oslo"})],
            in_thinking=True,
        ),
    ]


def _nemotron_cases() -> list[Case]:
    n = "nemotron"
    block = '<TOOLCALL>[{"name": "special_function", "arguments": {"arg1": 1}}]</TOOLCALL>'
    return [
        Case(
            "nemotron2-call",
            n,
            "I'm\nthinking\n</think>\n" + block,
            [THOUGHTS, SPECIAL],
            in_thinking=True,
        ),
        Case(
            "nemotron2-call-newlines",
            n,
            "I'm\nthinking\n</think>\n\n" + block + "\n",
            [THOUGHTS, SPECIAL],
            in_thinking=True,
        ),
    ]


B, E = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>", "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
SEP, MID = "<｜tool▁sep｜>", "<｜tool▁call▁end｜><｜tool▁call▁begin｜>"


def _deepseek_cases() -> list[Case]:
    d = "deepseek"
    r1 = f'{B}function{SEP}special_function\n```json\n{{"arg1": 1}}```{E}'
    return [
        Case(
            "v31-call",
            d,
            f'{B}get_time{SEP}{{"city": "XYZCITY"}}{E}',
            [call(1, "get_time", {"city": "XYZCITY"})],
        ),
        Case(
            "v31-reasoning-call",
            d,
            f'REASONING</think>{B}get_time{SEP}{{"city": "Tokyo"}}{E}',
            [Thinking("REASONING"), call(1, "get_time", {"city": "Tokyo"})],
            in_thinking=True,
        ),
        Case(
            "v31-reasoning-content-parallel",
            d,
            f'REASONING</think>CONTENT{B}get_time{SEP}{{"city": "Paris"}}{MID}get_weather{SEP}'
            f'{{"city": "Paris"}}{E}',
            [
                Thinking("REASONING"),
                Text("CONTENT"),
                call(1, "get_time", {"city": "Paris"}),
                call(2, "get_weather", {"city": "Paris"}),
            ],
            in_thinking=True,
        ),
        # llama.cpp keeps the reasoning as "REASONING\n"; inferd trims it (by design).
        Case(
            "v31-reasoning-content",
            d,
            "REASONING</think>\nCONTENT",
            [Thinking("REASONING"), Text("CONTENT")],
            in_thinking=True,
        ),
        Case("v31-content", d, "CONTENT", [Text("CONTENT")]),
        Case(
            "r1-empty-reasoning", d, "</think>Hello, world!\nWhat's up?", [HELLO], in_thinking=True
        ),
        Case(
            "r1-thoughts",
            d,
            "I'm\nthinking</think>Hello, world!\nWhat's up?",
            [THOUGHTS, HELLO],
            in_thinking=True,
        ),
        Case("r1-call", d, "</think>" + r1, [SPECIAL], in_thinking=True),
        Case("r1-distill-call", d, r1, [SPECIAL]),
    ]


def dsml(block: str, *invokes: tuple[str, list[tuple[str, str, str]]]) -> str:
    """A DeepSeek V3.2 / V4 DSML block, as those models write it."""
    d = "｜DSML｜"
    out = f"<{d}{block}>\n"
    for name, params in invokes:
        out += f'<{d}invoke name="{name}">\n'
        for key, flag, value in params:
            out += f'<{d}parameter name="{key}" string="{flag}">{value}</{d}parameter>\n'
        out += f"</{d}invoke>\n"
    return out + f"</{d}{block}>"


def _dsml_cases() -> list[Case]:
    out: list[Case] = []
    for fmt, block in (("deepseek_v32", "function_calls"), ("deepseek_v4", "tool_calls")):
        tokyo = dsml(block, ("get_time", [("city", "true", "Tokyo")]))
        paris = [("city", "true", "Paris")]
        one = dsml(block, ("special_function", [("arg1", "false", "1")]))
        mixed = dsml(block, ("magic_int", [("ref", "false", "42"), ("name", "true", "foo bar")]))
        out += [
            Case(f"{fmt}-text", fmt, "Hello, world!\nWhat's up?", [HELLO]),
            Case(
                f"{fmt}-thoughts",
                fmt,
                "I'm\nthinking</think>Hello, world!\nWhat's up?",
                [THOUGHTS, HELLO],
                in_thinking=True,
            ),
            Case(
                f"{fmt}-thoughts-call",
                fmt,
                "Let me check the time</think>\n\n" + tokyo,
                [Thinking("Let me check the time"), call(1, "get_time", {"city": "Tokyo"})],
                in_thinking=True,
            ),
            Case(f"{fmt}-int-call", fmt, one, [SPECIAL]),
            Case(
                f"{fmt}-parallel",
                fmt,
                "Calling both</think>\n\n"
                + dsml(block, ("get_time", paris), ("get_weather", paris)),
                [
                    Thinking("Calling both"),
                    call(1, "get_time", {"city": "Paris"}),
                    call(2, "get_weather", {"city": "Paris"}),
                ],
                in_thinking=True,
            ),
            # llama.cpp trims this text; inferd keeps text before a call as written.
            Case(
                f"{fmt}-content-then-call",
                fmt,
                "Thinking about it</think>Let me call the function.\n\n" + one,
                [Thinking("Thinking about it"), Text("Let me call the function.\n\n"), SPECIAL],
                in_thinking=True,
            ),
            Case(
                f"{fmt}-mixed",
                fmt,
                "Multi-arg call</think>\n\n" + mixed,
                [Thinking("Multi-arg call"), call(1, "magic_int", {"ref": 42, "name": "foo bar"})],
                in_thinking=True,
            ),
            # V4's grammar ends reasoning at the call, with no </think>
            Case(
                f"{fmt}-call-in-open-thinking",
                fmt,
                "Let me check the time\n\n" + tokyo,
                [Thinking("Let me check the time"), call(1, "get_time", {"city": "Tokyo"})],
                in_thinking=True,
            ),
        ]
    typed = [
        ("magic_int", "ref", "-14", -14),
        ("amount", "orig", "3.14", 3.14),
        ("toggle", "enabled", "true", True),
        ("todo_list", "todos", '["buy milk","walk dog"]', ["buy milk", "walk dog"]),
        ("set_config", "config", '{"theme":"dark","level":2}', {"theme": "dark", "level": 2}),
    ]
    for name, key, raw, value in typed:
        text = "Test</think>\n\n" + dsml("function_calls", (name, [(key, "false", raw)]))
        out.append(
            Case(
                f"deepseek_v32-{name}",
                "deepseek_v32",
                text,
                [Thinking("Test"), call(1, name, {key: value})],
                in_thinking=True,
            )
        )
    text = "</think>\n\n" + dsml("function_calls", ("get_time", [("city", "true", "XYZCITY")]))
    out.append(
        Case(
            "deepseek_v32-empty-reasoning",
            "deepseek_v32",
            text,
            [call(1, "get_time", {"city": "XYZCITY"})],
            in_thinking=True,
        )
    )
    return out


def _functionary_cases() -> list[Case]:
    return [
        Case("v31-text", "functionary_v31", "Hello, world!\nWhat's up?", [HELLO]),
        Case(
            "v31-call",
            "functionary_v31",
            '<function=special_function>{"arg1": 1}</function>',
            [SPECIAL],
        ),
        Case("v32-text", "functionary_v32", "all\nHello, world!\nWhat's up?", [HELLO]),
        Case("v32-call", "functionary_v32", 'special_function\n{"arg1": 1}', [SPECIAL]),
        # Not in llama.cpp's cases: text, then a call after the '>>>' separator.
        Case(
            "v32-text-then-call",
            "functionary_v32",
            'all\nChecking.>>>special_function\n{"arg1": 1}',
            [Text("Checking."), SPECIAL],
        ),
    ]


def _gemma4_cases() -> list[Case]:
    g = "gemma4"
    return [
        Case(
            "gemma4-stray-closer",
            g,
            "<|channel>thought\n<channel|>Hello, world!\nWhat's up?<channel|>",
            [HELLO],
        ),
        Case(
            "gemma4-empty-block-after",
            g,
            "<|channel>thought\n<channel|>Hello, world!\nWhat's up?<|channel>thought\n<channel|>",
            [HELLO],
        ),
        Case(
            "gemma4-empty-block-and-stray",
            g,
            "<|channel>thought\n<channel|>Hello, world!\n"
            "What's up?<|channel>thought\n<channel|><channel|>",
            [HELLO],
        ),
        Case(
            "gemma4-doubled-opener",
            g,
            "<|channel><|channel>thought\n<channel|>Hello, world!\nWhat's up?",
            [HELLO],
        ),
        Case(
            "gemma4-thoughts-stray",
            g,
            "<|channel>thought\nI'm\nthinking<channel|>Hi<channel|> there",
            [THOUGHTS, Text("Hi there")],
        ),
    ]


CASES = [
    *_qwen_cases(),
    *_glm_cases(),
    *_minimax_cases(),
    *_nemotron_cases(),
    *_open_thinking_cases(),
    *_deepseek_cases(),
    *_dsml_cases(),
    *_functionary_cases(),
    *_gemma4_cases(),
]


def run(case: Case, pieces: list[str]) -> tuple[list[Event], list[str]]:
    opts: dict[str, Any] = {"id_factory": counter_ids(), "in_thinking": case.in_thinking}
    if getattr(get_parser(case.fmt), "accepts_schemas", False):
        opts["schemas"] = SCHEMAS
    if case.in_thinking:
        opts["thinking"] = True
    p = get_parser(case.fmt, **opts, **case.options)
    out: list[Event] = []
    for piece in pieces:
        out.extend(p.feed(piece))
    out.extend(p.finish())
    return merge_events(out), p.malformed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_whole_and_every_split(case: Case) -> None:
    text = case.text
    assert run(case, [text]) == (case.expected, [])
    assert run(case, list(text)) == (case.expected, []), "one character at a time"
    for i in range(len(text) + 1):
        assert run(case, [text[:i], text[i:]]) == (case.expected, []), i


_SOUP = st.lists(
    st.sampled_from(
        [
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<function=f>",
            "</function>",
            "<function=",
            "<parameter=a>",
            "</parameter>",
            "<arg_key>a</arg_key>",
            "<arg_value>1</arg_value>",
            "<minimax:tool_call>",
            "</minimax:tool_call>",
            '<invoke name="f">',
            "</invoke>",
            '<parameter name="a">',
            "<TOOLCALL>",
            "</TOOLCALL>",
            B,
            E,
            SEP,
            MID,
            ">>>",
            "all\n",
            "<|channel>",
            "<channel|>",
            "thought",
            "<|tool_call>",
            "<tool_call|>",
            '{"a": 1}',
            "[",
            "]",
            "<",
            "\n",
            " ",
            "x",
            "é",
            "<｜DSML｜function_calls>",
            "</｜DSML｜function_calls>",
            '<｜DSML｜invoke name="f">',
            "</｜DSML｜invoke>",
            '<｜DSML｜parameter name="a" string="true">',
            "</｜DSML｜parameter>",
        ]
    ),
    max_size=25,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    text=_SOUP,
    fmt=st.sampled_from([*sorted(FAMILY_GRAMMARS), "gemma4"]),
    in_thinking=st.booleans(),
    data=st.data(),
)
def test_random_soup_is_split_invariant(
    text: str, fmt: str, in_thinking: bool, data: st.DataObject
) -> None:
    """Whatever a model writes, any split gives the same events and nothing crashes."""
    in_thinking = in_thinking and get_parser(fmt).thinking
    case = Case("soup", fmt, text, [], in_thinking=in_thinking)
    whole = run(case, [text])
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(case, pieces) == whole
    assert run(case, list(text)) == whole


def _streamed(case: Case, pieces: list[str]) -> list[Event]:
    opts: dict[str, Any] = {"id_factory": counter_ids(), "stream_arguments": True}
    if getattr(get_parser(case.fmt), "accepts_schemas", False):
        opts["schemas"] = SCHEMAS
    if case.in_thinking:
        opts.update(thinking=True, in_thinking=True)
    p = get_parser(case.fmt, **opts)
    out = [e for piece in pieces for e in p.feed(piece)]
    return out + p.finish()


#: cases whose arguments must arrive in several pieces when fed a character at a time
_LONG = ("qwen35-code", "coder-html", "glm47-parallel", "v31-reasoning-call", "v31-call")

CALL_CASES = [c for c in CASES if any(isinstance(e, ToolUse) for e in c.expected)]


@pytest.mark.parametrize("case", CALL_CASES, ids=[c.id for c in CALL_CASES])
def test_streamed_arguments_join_to_the_call(case: Case) -> None:
    """With ``stream_arguments`` (ADR 0023) each call's fragments, joined, are exactly
    its ``raw_arguments``, before its ToolUse; the other events do not change."""
    for pieces in ([case.text], list(case.text)):
        events = _streamed(case, pieces)
        plain = merge_events([e for e in events if not isinstance(e, ToolUseDelta)])
        assert plain == case.expected
        for n, tool in enumerate(e for e in events if isinstance(e, ToolUse)):
            at = events.index(tool)
            deltas = [e for e in events[:at] if isinstance(e, ToolUseDelta) and e.id == tool.id]
            assert deltas and all(d.call_index == n and d.name == tool.name for d in deltas)
            assert "".join(d.arguments_fragment for d in deltas) == tool.raw_arguments
            if len(pieces) > 1 and case.id in _LONG:
                assert len([d for d in deltas if d.arguments_fragment]) > 2, deltas


def test_families_registered_with_their_grammar() -> None:
    from inferd.chat import available_formats

    assert set(FAMILY_GRAMMARS) <= set(available_formats())
    for name in ("qwen3_coder", "glm4", "minimax", "nemotron", "deepseek", "deepseek_v32"):
        assert name in FAMILY_GRAMMARS


@pytest.mark.parametrize(
    ("fmt", "text", "why"),
    [
        ("qwen3_coder", "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n", "cut"),
        ("qwen3_coder", "<tool_call>\nnot a function\n</tool_call>", "function"),
        ("glm4", "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>", "name"),
        ("glm4", "<tool_call>f<arg_key>a</arg_key>junk</tool_call>", "unexpected"),
        ("minimax", '<minimax:tool_call>\n<invoke name="f">\n</minimax:tool_call>', "invoke"),
        ("deepseek", "<｜tool▁calls▁begin｜>nothing<｜tool▁calls▁end｜>", "begin"),
        ("deepseek", f"{B}f{SEP}not json{E}", "JSON"),
        ("functionary_v31", "<function=f>not json</function>", "JSON"),
        ("functionary_v32", "f {no newline", "recipient"),
        ("nemotron", "<TOOLCALL>[{]</TOOLCALL>", "JSON"),
    ],
)
def test_malformed_calls_fall_back_to_text(fmt: str, text: str, why: str) -> None:
    p = get_parser(fmt)
    events = merge_events(p.feed(text) + p.finish())
    assert all(isinstance(e, Text) for e in events), events
    assert "".join(e.text for e in events if isinstance(e, Text)).strip()
    if why != "cut":
        assert p.malformed and why.lower() in p.malformed[0].lower(), p.malformed


def test_functionary_v32_text_streams_as_written() -> None:
    p = get_parser("functionary_v32", id_factory=counter_ids())
    assert p.feed("al") == [] and p.feed("l\nHel") == [Text("Hel")]
    assert p.feed("lo >") == [Text("lo ")]  # '>' may start the '>>>' separator
    assert p.feed('>>special_function\n{"arg1": 1}') == []
    assert p.finish() == [SPECIAL]


def test_values_without_a_schema_are_read_leniently() -> None:
    p = get_parser("qwen3_coder", id_factory=counter_ids())
    text = qcall("f", ("n", "42"), ("s", "hello"), ("o", '{"a": [1]}'), ("z", "null"))
    (ev,) = p.feed(text) + p.finish()
    assert ev == call(1, "f", {"n": 42, "s": "hello", "o": {"a": [1]}, "z": None})


# ------------------------------------------------------------------ real templates

#: template -> family; every one of these templates renders tools itself.
FAMILY_TEMPLATES = {
    "Qwen3-Coder.jinja": "qwen3_coder",
    "Qwen3.5-4B.jinja": "qwen3_coder",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja": "qwen3_coder",
    "StepFun3.5-Flash.jinja": "qwen3_coder",
    "GLM-4.6.jinja": "glm4",
    "GLM-4.7-Flash.jinja": "glm4",
    "MiniMax-M2.jinja": "minimax",
    "NVIDIA-Nemotron-Nano-v2.jinja": "nemotron",
    "deepseek-ai-DeepSeek-V3.2.jinja": "deepseek_v32",
    "deepseek-ai-DeepSeek-V4.jinja": "deepseek_v4",
    "deepseek-ai-DeepSeek-V4-Flash-0731.jinja": "deepseek_v4",
    "meetkai-functionary-medium-v3.1.jinja": "functionary_v31",
}

#: llama.cpp's own R1 template writes ``tools | map(...) | tojson``, which our sandboxed
#: renderer cannot serialise (a generator): detection only.
DETECTED_ONLY = {"llama-cpp-deepseek-r1.jinja": "deepseek", "MiniMax-M3.jinja": "plain"}

#: templates that write DeepSeek calls but never show the model its tools.
TOOL_LESS_DEEPSEEK = (
    "deepseek-ai-DeepSeek-V3.1.jinja",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja",
)

WEATHER = Tool("get_weather", "Current weather for a city", SCHEMAS["get_weather"])


def _template(name: str) -> str:
    path = TEMPLATES / name
    if not path.is_file():
        missing(f"llama.cpp's model templates ({path.parent} is fetched by the build)")
    return path.read_text(encoding="utf-8")


def _render(src: str, request: Request) -> tuple[Any, str]:
    from inferd.backends.llamacpp.chat_template import ChatTemplate

    plan = plan_chat(src, request)
    prompt = ChatTemplate(src, bos_token="<s>", eos_token="</s>").render(
        plan.messages, tools=plan.tools, **plan.template_kwargs
    )
    return plan, prompt


def _conversation(call_args: dict[str, Any]) -> Request:
    return Request(
        (
            Message.system("Be brief."),
            Message.user("Weather in Zürich?"),
            Message.assistant([ToolUseBlock("abcDEF123", "get_weather", call_args)]),
            Message.tool("abcDEF123", "14 degrees and sunny"),
            Message.assistant("It is 14 degrees and sunny."),
            Message.user("And in Lyon?"),
        ),
        tools=(WEATHER,),
    )


@pytest.mark.parametrize("name", sorted(DETECTED_ONLY))
def test_real_template_detected(name: str) -> None:
    assert detect_format(_template(name)) == DETECTED_ONLY[name]


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_real_template_detected_and_renders_tools(name: str) -> None:
    src = _template(name)
    fmt = FAMILY_TEMPLATES[name]
    assert detect_format(src) == fmt
    plan, prompt = _render(src, _conversation({"city": "Zürich"}))
    assert plan.format == fmt and not plan.folded
    assert "get_weather" in prompt and "Current weather for a city" in prompt
    assert "Zürich" in prompt and "14 degrees and sunny" in prompt and "And in Lyon?" in prompt
    assert plan.parser(prompt).name == fmt


def test_functionary_v32_renders_tools_and_opens_the_recipient() -> None:
    """v3.2 concatenates a history call's arguments as a *string*, which the template
    mapper does not give it (ADR 0024: left out), so only a first turn renders."""
    src = _template("meetkai-functionary-medium-v3.2.jinja")
    assert detect_format(src) == "functionary_v32"
    plan, prompt = _render(src, Request((Message.user("Weather in Zürich?"),), tools=(WEATHER,)))
    assert plan.format == "functionary_v32" and not plan.folded
    assert "get_weather" in prompt and prompt.endswith(">>>")
    p = plan.parser(prompt)
    events = merge_events(p.feed('get_weather\n{"city": "Zürich"}') + p.finish())
    assert [(e.name, e.input) for e in events if isinstance(e, ToolUse)] == [
        ("get_weather", {"city": "Zürich"})
    ]


#: where each family's rendered history call starts and ends in the prompt.
_ROUND_TRIP = {
    "Qwen3-Coder.jinja": ("<tool_call>", "</tool_call>"),
    "Qwen3.5-4B.jinja": ("<tool_call>", "</tool_call>"),
    "GLM-4.6.jinja": ("<tool_call>get_weather", "</tool_call>"),
    "GLM-4.7-Flash.jinja": ("<tool_call>get_weather", "</tool_call>"),
    "MiniMax-M2.jinja": ("<minimax:tool_call>\n<invoke", "</minimax:tool_call>"),
    "NVIDIA-Nemotron-Nano-v2.jinja": ("<TOOLCALL>[{", "</TOOLCALL>"),
    "meetkai-functionary-medium-v3.1.jinja": ("<function=get_weather", "</function>"),
    "deepseek-ai-DeepSeek-V3.2.jinja": ("<｜DSML｜function_calls>", "</｜DSML｜function_calls>"),
    "deepseek-ai-DeepSeek-V4.jinja": ("<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>"),
    # These show the model no tools: the history call is rendered all the same.
    "deepseek-ai-DeepSeek-V3.1.jinja": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": (
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
    ),
}


@pytest.mark.parametrize("name", sorted(_ROUND_TRIP))
def test_the_call_a_template_renders_parses_back(name: str) -> None:
    """The model is trained on what its template writes: our parser must read it."""
    src = _template(name)
    args = {"city": "Zürich", "days": 3}
    req = _conversation(args)
    tools = (Tool("get_weather", "w", _obj({"city": _STR, "days": _INT})),)
    req = Request(req.messages, tools=() if name in TOOL_LESS_DEEPSEEK else tools)
    plan, prompt = _render(src, req)
    start, end = _ROUND_TRIP[name]
    i = prompt.rindex(start, 0, prompt.index("14 degrees"))
    j = prompt.index(end, i) + len(end)
    p = plan.parser("")
    events = merge_events(p.feed(prompt[i:j]) + p.finish())
    calls = [e for e in events if isinstance(e, ToolUse)]
    assert len(calls) == 1, (prompt[i:j], events, p.malformed)
    assert calls[0].name == "get_weather" and calls[0].input == args


@pytest.mark.parametrize("name", TOOL_LESS_DEEPSEEK)
def test_deepseek_templates_without_tools_use_the_built_in_prompt(name: str) -> None:
    src = _template(name)
    assert detect_format(src) == "deepseek"
    plan, prompt = _render(src, _conversation({"city": "Zürich"}))
    assert plan.format == "hermes" and plan.folded
    assert "get_weather" in prompt and "<tool_call>" in prompt
    assert plan_chat(src, Request((Message.user("hi"),))).format == "deepseek"


def test_unrecognised_tool_syntax_gets_the_built_in_prompt_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    src = _template("MiniMax-M3.jinja")  # <tool_call> inside a syntax we do not parse
    assert detect_format(src) == "plain"
    with caplog.at_level(logging.INFO, logger="inferd.chat.tool_prompt"):
        plan, prompt = _render(src, _conversation({"city": "Zürich"}))
    assert plan.format == "hermes" and plan.folded
    assert '{"type": "object"' in prompt or "get_weather" in prompt
    assert "<tool_call>" in prompt and "<tool_response>" in prompt
    (record,) = [r for r in caplog.records if "tool format hermes" in r.getMessage()]
    assert "does not recognise" in record.getMessage() and "]<]minimax[>[" in record.getMessage()
    # A template whose tool syntax matches no rule at all: the same path.
    generic = "{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[-1].content }}"
    path = tool_path(generic, True)
    assert (path.format, path.folded) == ("hermes", True)
    assert "matches no known" in path.reason
    assert tool_path(generic, True, "qwen3_coder").format == "qwen3_coder"


def test_each_decision_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    src = _template("Qwen3-Coder.jinja") + "{# a template no other test decided on #}"
    with caplog.at_level(logging.INFO, logger="inferd.chat.tool_prompt"):
        for _ in range(3):
            assert tool_path(src, True).format == "qwen3_coder"
        for i in range(MAX_LOGGED_DECISIONS + 1):  # the memory of decisions is bounded
            tool_path(f"{{{{ tools }}}} {i}", True)
        tool_path(src, True)
    mine = [r for r in caplog.records if "qwen3_coder" in r.getMessage()]
    assert len(mine) == 2  # once, then again after being forgotten
    assert "'<tool_call>' and '<function=' and '<parameter='" in mine[0].getMessage()


def test_plan_hands_the_tool_schemas_to_the_parser() -> None:
    """A string parameter that looks like a number stays a string (the schema says so)."""
    src = _template("Qwen3-Coder.jinja")
    tool = Tool("dial", "d", _obj({"number": _STR, "times": _INT}, ("number",)))
    plan = plan_chat(src, Request((Message.user("Call home"),), tools=(tool,)))
    assert plan.options == {"schemas": {"dial": tool.parameters}}
    p = plan.parser("")
    events = p.feed(qcall("dial", ("number", "0044123"), ("times", "2"))) + p.finish()
    assert [e.input for e in events if isinstance(e, ToolUse)] == [
        {"number": "0044123", "times": 2}
    ]
    assert plan_chat(src, Request((Message.user("hi"),))).options == {}


def test_parser_for_opens_thinking_from_the_real_prompt() -> None:
    src = _template("GLM-4.7-Flash.jinja")
    plan, prompt = _render(src, Request((Message.user("2+2?"),), thinking=True))
    assert prompt.endswith("<think>")  # GLM 4.7 opens the block in the prompt
    p = parser_for(src, prompt, tool_format=plan.format)
    events = merge_events(p.feed("Four, I think.</think>4") + p.finish())
    assert events == [Thinking("Four, I think."), Text("4")]
    plan, prompt = _render(src, Request((Message.user("2+2?"),), thinking=False))
    p = plan.parser(prompt)
    assert merge_events(p.feed("4") + p.finish()) == [Text("4")]


# ------------------------------------------------------------------ grammars

GRAMMAR_TOOLS = (
    Tool("get_weather", "w", _obj({"city": _STR, "unit": {"enum": ["c", "f"]}}, ("city",))),
    Tool("add", "a", _obj({"a": {"type": "number"}, "b": _INT, "note": _STR}, ("a", "b"))),
    Tool("ping", "no arguments"),
)
_BY_NAME = {t.name: dict(t.parameters) for t in GRAMMAR_TOOLS}


@pytest.mark.parametrize("fmt", sorted(FAMILY_GRAMMARS))
@pytest.mark.parametrize("parallel", [False, True])
def test_required_grammar_sentences_parse_as_valid_calls(fmt: str, parallel: bool) -> None:
    g = family_grammar(fmt, "required", GRAMMAR_TOOLS, None, parallel=parallel)
    sampler = Sampler(g.text, seed=11)
    many = False
    for _ in range(80):
        text = sampler.sentence()
        opts = {"schemas": _BY_NAME} if getattr(get_parser(fmt), "accepts_schemas", 0) else {}
        p = get_parser(fmt, **opts)
        events = merge_events(p.feed(text) + p.finish())
        assert p.malformed == [], (text, p.malformed)
        assert events and all(isinstance(e, ToolUse) for e in events), (text, events)
        many |= len(events) > 1
        if not parallel:
            assert len(events) == 1, text
        for e in events:
            assert isinstance(e, ToolUse) and e.input is not None
            jsonschema.validate(dict(e.input), _BY_NAME[e.name])
    assert many is parallel


@pytest.mark.parametrize("fmt", sorted(FAMILY_GRAMMARS))
def test_named_choice_none_and_auto(fmt: str) -> None:
    g = family_grammar(fmt, "tool", GRAMMAR_TOOLS, ToolChoice("tool", "add"))
    sampler = Sampler(g.text, seed=3)
    for _ in range(20):
        opts = {"schemas": _BY_NAME} if getattr(get_parser(fmt), "accepts_schemas", 0) else {}
        p = get_parser(fmt, **opts)
        events = p.feed(sampler.sentence()) + p.finish()
        assert [e.name for e in events if isinstance(e, ToolUse)] == ["add"]
    opener = FAMILY_GRAMMARS[fmt].opener
    forbidden = FAMILY_GRAMMARS[fmt].forbid or opener
    none = Sampler(family_grammar(fmt, "none", GRAMMAR_TOOLS, None).text, seed=2, soft_depth=30)
    for _ in range(100):
        text = none.sentence()
        assert forbidden not in text
        p = get_parser(fmt)
        assert not [e for e in p.feed(text) + p.finish() if isinstance(e, ToolUse)], text
    # Qwen3-Coder: a call without its <tool_call> cannot slip through 'none' either.
    q = Sampler(family_grammar("qwen3_coder", "none", GRAMMAR_TOOLS, None).text, seed=4)
    assert not any("<function=" in q.sentence() for _ in range(50))
    auto = family_grammar(fmt, "auto", GRAMMAR_TOOLS, None)
    if fmt == "functionary_v32":
        assert not auto.lazy  # its first call has no opener to wait for
    else:
        import re

        assert auto.lazy and auto.trigger_tokens == (opener,)
        m = re.fullmatch(auto.trigger_patterns[0], f"Sure.\n{opener}xyz", re.S)
        assert m and m.group(1) == f"{opener}xyz"


@pytest.mark.parametrize(
    "forbidden", ["<function=", "</parameter>", "\n</parameter>", "aab", ">>>"]
)
def test_embedded_exclusion_rule_is_exact(forbidden: str) -> None:
    """The value/none automaton accepts exactly the texts without ``forbidden``."""
    import random

    from inferd.chat._xml_args import exclusion_rule
    from inferd.chat.grammar import SchemaConverter

    conv = SchemaConverter()
    start = exclusion_rule(conv, "v", forbidden)
    base = start[: -len("-s0")]
    trans: dict[int, dict[str, int]] = {}
    default: dict[int, int] = {}
    for i in range(len(forbidden)):
        trans[i] = {}
        for alt in conv.rules[f"{base}-s{i}"].split(" | ")[1:]:
            lit, _, target = alt.rpartition(f" {base}-s")
            if lit.startswith("[^"):
                default[i] = int(target)
            else:
                trans[i][json.loads(lit)] = int(target)

    def accepts(text: str) -> bool:
        state = 0
        for c in text:
            if c in trans[state]:
                state = trans[state][c]
            elif c in set(forbidden):
                return False
            else:
                state = default[state]
        return True

    rng = random.Random(0)
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(1, 4)):
            a = rng.randint(0, len(forbidden))
            b = rng.randint(a, len(forbidden))
            parts.append(forbidden[a:b] + rng.choice(["", "z", forbidden[0]]))
        text = "".join(parts)
        assert accepts(text) == (forbidden not in text), text


def test_request_grammar_dispatches_to_the_families() -> None:
    from inferd.chat.tool_grammar import request_grammar

    msgs = (Message.user("hi"),)
    req = Request(msgs, tools=GRAMMAR_TOOLS, tool_choice="required")
    g = request_grammar(req, "glm4")
    assert g is not None and "<arg_key>" in g.text and not g.lazy
    g = request_grammar(Request(msgs, tools=GRAMMAR_TOOLS), "minimax")
    assert g is not None and g.lazy and g.trigger_tokens == ("<minimax:tool_call>",)
    assert request_grammar(Request(msgs), "qwen3_coder") is None


def _llama_model() -> Any:
    try:
        from inferd._fast import _llama
    except ImportError as e:
        missing(f"the compiled llama binding ({e})")
    from inferd import models

    try:
        path = models.resolve("smollm2-135m", pull=True, progress=False)
    except Exception as e:
        missing(f"the smollm2-135m model ({e})")
    return _llama, _llama.Model(str(path))


def test_llama_cpp_accepts_every_family_grammar() -> None:
    _llama, model = _llama_model()
    try:
        for fmt in sorted(FAMILY_GRAMMARS):
            for kind in ("required", "none"):
                for parallel in (False, True):
                    g = family_grammar(fmt, kind, GRAMMAR_TOOLS, None, parallel=parallel)
                    _llama.Sampler(model, temperature=0.0, grammar=g.text).close()
            g = family_grammar(fmt, "auto", GRAMMAR_TOOLS, None)
            if g.lazy and getattr(_llama, "LAZY_GRAMMAR", False):
                _llama.Sampler(
                    model,
                    grammar=g.text,
                    grammar_trigger_patterns=list(g.trigger_patterns),
                    grammar_trigger_tokens=[],
                ).close()
            elif not g.lazy:
                _llama.Sampler(model, temperature=0.0, grammar=g.text).close()
    finally:
        model.close()


# ------------------------------------------------------------------ end to end

#: ``mode`` is a string that looks like a number: only the schema keeps it a string,
#: so a valid call shows the plan's schemas reached the parser.
ADD = Tool(
    "add",
    "Add two integers",
    _obj({"a": _INT, "b": _INT, "mode": {"enum": ["1", "2"]}}, ("a", "b", "mode")),
)

#: a family's real template on SmolLM2: our prompt, our grammar, our parser.
E2E_TEMPLATES = {
    "Qwen3-Coder.jinja": "qwen3_coder",
    "GLM-4.7-Flash.jinja": "glm4",
    "MiniMax-M2.jinja": "minimax",
    "NVIDIA-Nemotron-Nano-v2.jinja": "nemotron",
    "meetkai-functionary-medium-v3.1.jinja": "functionary_v31",
    "meetkai-functionary-medium-v3.2.jinja": "functionary_v32",
    "deepseek-ai-DeepSeek-V3.2.jinja": "deepseek_v32",
}


@pytest.mark.llama
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(E2E_TEMPLATES))
async def test_required_call_end_to_end_on_a_real_model(name: str, smollm2_path: Path) -> None:
    """SmolLM2 with the family's template: ``tool_choice=required`` gives a valid call."""
    try:
        from inferd.backends.llamacpp import LlamaCpp
        from inferd.errors import ModelLoadError

        backend = LlamaCpp(
            smollm2_path, n_ctx=2048, parallel=1, n_threads=1, chat_template=_template(name)
        )
    except (ImportError, ModelLoadError) as e:
        missing(f"the compiled llama.cpp core ({e})")
    try:
        req = Request(
            (Message.user("What is 2 plus 3?"),),
            tools=(ADD,),
            tool_choice="required",
            max_tokens=200,
            seed=1,
            parallel_tool_calls=False,
        )
        assert backend.plan(req).format == E2E_TEMPLATES[name]
        events = [e async for e in backend.generate(req)]
    finally:
        backend.close()
    calls = [e for e in events if isinstance(e, ToolUse)]
    assert len(calls) == 1 and calls[0].name == "add", events
    assert calls[0].input is not None
    jsonschema.validate(dict(calls[0].input), dict(ADD.parameters))
    assert not [e for e in events if isinstance(e, Text) and e.text.strip()], events
