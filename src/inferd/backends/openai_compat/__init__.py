"""Any OpenAI Chat Completions upstream as an inferd backend.

``client`` does HTTP (session, URLs, retries, error mapping); ``adapter`` holds the
:class:`OpenAICompat` backend. The request/response mapping itself lives in
:mod:`inferd.openai_wire`, shared with ``Request.from_openai`` and the HTTP bridge.
"""

from inferd.backends.openai_compat.adapter import OpenAICompat

__all__ = ["OpenAICompat"]
