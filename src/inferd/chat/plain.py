"""``plain``: no tool calls; text passes through, ``<think>`` only when asked.

The default for templates without a known tool format. With ``thinking=True``
(DeepSeek R1 distills and other templates that mention ``<think>``) the reasoning
block becomes :class:`~inferd.types.Thinking`.
"""

from __future__ import annotations

from inferd.chat._stream import SentinelParser


class PlainParser(SentinelParser):
    """Text (and optionally ``<think>`` reasoning), never a tool call."""

    name = "plain"
