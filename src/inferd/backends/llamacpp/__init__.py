"""The local llama.cpp backend: ``LlamaCpp`` and its parts.

One module per concern: ``loader`` (checks and verifies GGUF files), ``chat_template``
(renders the model's Jinja template), ``grammar`` (response_format -> GBNF), ``output``
(the per-model output-parser seam) and ``backend`` (generation and embeddings).
"""

from __future__ import annotations

from inferd.backends.llamacpp.backend import LlamaCpp

__all__ = ["LlamaCpp"]
