"""inferd.limits: the depth check and the echo cut every untrusted edge uses (ADR 0010)."""

from __future__ import annotations

from typing import Any

import pytest

from inferd.errors import InvalidRequest
from inferd.limits import (
    MAX_ECHO_CHARS,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_JSON_DEPTH,
    check_depth,
    cut_message,
    echo,
)


def nested(n: int, inner: Any = 1) -> Any:
    value = inner
    for i in range(n):
        value = [value] if i % 2 else {"k": value}
    return value


def test_limits_are_named_with_their_defaults() -> None:
    assert (MAX_JSON_DEPTH, MAX_ECHO_CHARS, MAX_ERROR_MESSAGE_CHARS) == (64, 80, 1000)


def test_check_depth_accepts_the_limit_and_refuses_one_more() -> None:
    check_depth(nested(MAX_JSON_DEPTH))
    with pytest.raises(InvalidRequest, match="MAX_JSON_DEPTH=64") as info:
        check_depth(nested(MAX_JSON_DEPTH + 1), what="frame")
    assert "the frame nests" in info.value.message
    check_depth(nested(3), max_depth=3)
    with pytest.raises(InvalidRequest):
        check_depth(nested(4), max_depth=3)


def test_check_depth_is_iterative_far_past_the_recursion_limit() -> None:
    with pytest.raises(InvalidRequest):
        check_depth(nested(200_000))
    check_depth([[1] * 10_000] * 100)  # wide is fine: only depth is bounded


def test_echo_cuts_strings_bytes_and_containers() -> None:
    assert echo("hi") == "'hi'" and echo(3) == "3" and echo(None) == "None"
    long = echo("a" * 1_000_000)
    assert len(long) < MAX_ECHO_CHARS + 40 and "1000000 long, cut" in long
    assert "cut" in echo(b"b" * 500)
    assert len(echo(["x" * 1000] * 1000)) < MAX_ECHO_CHARS + 40


def test_echo_is_safe_on_deep_lists_and_huge_ints() -> None:
    value: Any = 1
    for _ in range(100_000):
        value = [value]
    assert echo(value).startswith("[[[")  # no RecursionError
    assert echo(10**10_000) == f"<int of {(10**10_000).bit_length()} bits>"  # no ValueError


def test_cut_message_bounds_any_error_text() -> None:
    assert cut_message("short") == "short"
    cut = cut_message("m" * 50_000)
    assert len(cut) < MAX_ERROR_MESSAGE_CHARS + 60 and "50000 characters" in cut
