"""Timing helpers shared by the micro-benchmarks (medians, never means: shared boxes).

Why interleaved: issue 12 ("Honest benchmarks") found contenders timed one after the
other, all repeats of one before the next, so a burst of load from another job could
land on one contender only. :func:`interleaved_times` runs every contender once per
round (round robin, starting one further each round, so none is always first after a
warm cache) and :func:`ratio` pairs the contenders' times round by round: a load spike
hits both sides of a ratio alike, and the median of per-round ratios is what we quote.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
