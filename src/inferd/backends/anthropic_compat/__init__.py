"""Anthropic's Messages API (and servers that speak it) as an inferd backend.

``client`` does HTTP (the OpenAI-compatible backend's session, retries and redirect
rules, with Anthropic's ``x-api-key`` / ``anthropic-version`` headers and its 529);
``stream`` decodes the Messages SSE events into ours; ``adapter`` holds the
:class:`AnthropicCompat` backend. The request mapping lives in
:mod:`inferd.anthropic_wire`, shared with the bridge's ``/v1/messages``
(docs/adr/0014-anthropic-messages-both-ways.md).
"""

from inferd.backends.anthropic_compat.adapter import AnthropicCompat

__all__ = ["AnthropicCompat"]
