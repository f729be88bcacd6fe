"""The daemon's counters and latency percentiles, as the admin socket reports them.

Why a window: a daemon runs for weeks; percentiles over a sliding window of the last
:data:`METRICS_WINDOW` samples keep memory bounded and show the present, not the
average since boot (ADR 0005).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

#: Latency samples kept for the admin percentiles (a sliding window, bounded memory).
METRICS_WINDOW = 1024

#: Counters reported under ``counters`` in the admin status, in this order.
COUNTERS = (
    "requests",
    "embeddings",
    "tokens",
    "errors",
    "queue_full",
    "cancelled",
    "write_stalls",
    "refused_connections",
    "closed_connections",
)


def percentiles(samples: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 by nearest rank; ``None`` without samples."""
    if not samples:
        return {"p50": None, "p90": None, "p99": None}
    s = sorted(samples)
    n = len(s)

    def rank(p: float) -> float:
        return s[min(n - 1, max(0, math.ceil(p * n - 1e-9) - 1))]  # rank = ceil(p*n)

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99)}


class Metrics:
    """Counters since start and a window of TTFT / tokens-per-second samples.

    ``write_stalls``: streams cancelled because their reader took nothing for the
    write-stall timeout; ``refused_connections``: connections turned away at the
    connection limit; ``closed_connections``: connections the daemon closed itself
    (a frame that never finished).
    """

    def __init__(self, window: int = METRICS_WINDOW) -> None:
        self.requests = 0
        self.embeddings = 0
        self.tokens = 0
        self.errors = 0
        self.queue_full = 0
        self.cancelled = 0
        self.write_stalls = 0
        self.refused_connections = 0
        self.closed_connections = 0
        self.ttft_s: deque[float] = deque(maxlen=window)
        self.tokens_per_s: deque[float] = deque(maxlen=window)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        out["ttft_s"] = percentiles(self.ttft_s)
        out["tokens_per_s"] = percentiles(self.tokens_per_s)
        return out
