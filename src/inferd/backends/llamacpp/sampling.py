"""A request's sampling settings as one sequence's own libllama sampler chain.

:func:`sampler_kwargs` turns a :class:`~inferd.types.Request` (plus the backend's
defaults) into the keywords of ``inferd._fast._llama.Sampler``, which builds the chain in
llama.cpp's order (logit bias, penalties, DRY, top-k, typical, top-p, min-p, XTC,
temperature, seeded draw). A chain is built per sequence, so two concurrent streams with
different settings never share one (docs/adr/0021-per-request-sampling-chain.md).

Unset fields take llama-server's defaults, so the same request means the same thing
here and through ``OpenAICompat`` in front of llama-server. A window of ``-1``
(``repeat_last_n``, ``dry_penalty_last_n``) means the whole sequence, as in llama.cpp.
"""

from __future__ import annotations

from typing import Any

from inferd.types import Request

#: Sampling defaults when a request leaves a field unset (llama-server's defaults).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_TYPICAL_P = 1.0
DEFAULT_REPEAT_LAST_N = 64
DEFAULT_DRY_BASE = 1.75
DEFAULT_DRY_ALLOWED_LENGTH = 2
DEFAULT_DRY_PENALTY_LAST_N = 64
DEFAULT_XTC_THRESHOLD = 0.1

#: The Request fields this module turns into the chain: LlamaCpp honours them
#: (inferd.request_fields refuses a set field outside a backend's honoured set).
SAMPLING_FIELDS: frozenset[str] = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "typical_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repeat_penalty",
        "repeat_last_n",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "dry_sequence_breakers",
        "xtc_probability",
        "xtc_threshold",
        "logit_bias",
    }
)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _window(value: int | None, default: int, n_ctx_seq: int) -> int:
    """A look-back window in tokens; ``-1`` is the whole sequence."""
    n = default if value is None else int(value)
    return n_ctx_seq if n < 0 else n


def sampler_kwargs(
    request: Request,
    *,
    repeat_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    n_ctx_seq: int,
) -> dict[str, Any]:
    """``Sampler`` keywords for ``request``; the three penalties default to the backend's
    own settings (``LlamaCppOptions``), the rest to llama-server's."""
    r = request
    return {
        "temperature": float(_or(r.temperature, DEFAULT_TEMPERATURE)),
        "top_k": int(_or(r.top_k, DEFAULT_TOP_K)),
        "top_p": float(_or(r.top_p, DEFAULT_TOP_P)),
        "min_p": float(_or(r.min_p, DEFAULT_MIN_P)),
        "typical_p": float(_or(r.typical_p, DEFAULT_TYPICAL_P)),
        "repeat_penalty": float(_or(r.repeat_penalty, repeat_penalty)),
        "frequency_penalty": float(_or(r.frequency_penalty, frequency_penalty)),
        "presence_penalty": float(_or(r.presence_penalty, presence_penalty)),
        "penalty_last_n": _window(r.repeat_last_n, DEFAULT_REPEAT_LAST_N, n_ctx_seq),
        "dry_multiplier": float(_or(r.dry_multiplier, 0.0)),
        "dry_base": float(_or(r.dry_base, DEFAULT_DRY_BASE)),
        "dry_allowed_length": int(_or(r.dry_allowed_length, DEFAULT_DRY_ALLOWED_LENGTH)),
        "dry_penalty_last_n": _window(r.dry_penalty_last_n, DEFAULT_DRY_PENALTY_LAST_N, n_ctx_seq),
        "dry_sequence_breakers": r.dry_sequence_breakers,
        "xtc_probability": float(_or(r.xtc_probability, 0.0)),
        "xtc_threshold": float(_or(r.xtc_threshold, DEFAULT_XTC_THRESHOLD)),
        "logit_bias": dict(r.logit_bias) if r.logit_bias else None,
        "seed": r.seed,
    }
