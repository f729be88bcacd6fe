"""The local llama.cpp backend: ``LlamaCpp`` and its parts.

One module per concern: ``loader`` (checks and verifies GGUF files), ``chat_template``
(renders the model's Jinja template), ``output`` (the per-model output-parser seam),
``scheduler`` (continuous batching on one context) and ``backend`` (generation and
embeddings). Grammars for tools and ``response_format`` come from ``inferd.chat``.
"""

from __future__ import annotations

from inferd.backends.llamacpp.backend import LlamaCpp

__all__ = ["LlamaCpp"]
