"""Timing helpers shared by the micro-benchmarks (medians, never means: shared boxes).

Why interleaved: issue 12 ("Honest benchmarks") found contenders timed one after the
other, all repeats of one before the next, so a burst of load from another job could
land on one contender only. :func:`interleaved_times` runs every contender once per
round (round robin, starting one further each round, so none is always first after a
warm cache) and :func:`ratio` pairs the contenders' times round by round: a load spike
hits both sides of a ratio alike, and the median of per-round ratios is what we quote.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

#: The coverage asked of :func:`median_interval` when a report gives none.
INTERVAL_CONFIDENCE = 0.95


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: bool = True
) -> dict[str, list[float]]:
    """Wall times of each contender, ``repeats`` rounds, contenders round robin per round."""
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(time_once(contenders[name]))
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of ``time[slow] / time[fast]`` (how many times faster ``fast`` is)."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True))


def per_round(times: dict[str, list[float]], slow: str, fast: str) -> list[float]:
    """The per-round ratios behind :func:`ratio` (reported beside it)."""
    return [round(s / f, 2) for s, f in zip(times[slow], times[fast], strict=True)]


def median_interval(
    values: Sequence[float], confidence: float = INTERVAL_CONFIDENCE
) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of ``values``.

    Per-round ratios on a shared box are not normal (one slow round is a long tail),
    so no mean and standard error: the interval is two order statistics,
    ``[x(k), x(n+1-k)]`` (sorted, 1-based), which holds the true median with
    probability ``1 - 2 * P(Binomial(n, 1/2) <= k - 1)`` whatever the distribution.
    ``k`` is the largest that still reaches ``confidence``. With too few rounds even
    ``[min, max]`` falls short (fewer than six for 95%); that interval is returned
    with the coverage it has, which the caller prints, so a short run says so.
    Returns ``(low, high, coverage)``.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval of no values")
    k = 1
    below = 1 / 2**n  # P(Binomial(n, 1/2) <= k - 1)
    while 2 * (k + 1) <= n + 1:  # x(k+1) <= x(n-k): the interval still has two ends
        wider = below + math.comb(n, k) / 2**n
        if 1 - 2 * wider < confidence:
            break
        k, below = k + 1, wider
    return xs[k - 1], xs[n - k], 1 - 2 * below


def describe_ratio(ratios: Sequence[float]) -> str:
    """``0.98x (95% interval 0.95-1.01, 24 rounds)``: the median of per-round ratios
    with the interval :func:`median_interval` gives it, for every report's line."""
    low, high, coverage = median_interval(ratios)
    return (
        f"{statistics.median(ratios):.2f}x ({coverage:.0%} interval {low:.2f}-{high:.2f}, "
        f"{len(ratios)} rounds)"
    )


def describe_speedup(times: dict[str, list[float]], slow: str, fast: str) -> str:
    """How many times faster ``fast`` ran than ``slow`` (:func:`describe_ratio` of the
    per-round ``time[slow] / time[fast]``), then the per-round ratios themselves."""
    pairs = zip(times[slow], times[fast], strict=True)
    return f"{describe_ratio([s / f for s, f in pairs])}; per round {per_round(times, slow, fast)}"
