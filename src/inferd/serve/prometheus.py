"""Prometheus metrics for the bridge (``GET /metrics``) and the daemon (``--metrics-port``).

Why ``prometheus_client``: the exposition format, histogram buckets and label escaping
are what every scraper and dashboard expects, and a well-kept library gets them right
(docs/adr/0016-metrics-traces-cors.md). Each :class:`Telemetry` owns a
``CollectorRegistry`` of its own, never the
process-global one, so tests and several bridges in one process do not collide.

Cost: a request is counted once, when it ends (:meth:`Telemetry.finish`), never per
token. Gauges that live elsewhere (breaker states, the llama.cpp scheduler's KV cells
and batch counters, the daemon's admission queue) are read at scrape time by
:class:`_LiveCollector`; the scheduler's ``kv_used()`` holds its context lock for one
query only, and its counters are a copy of a dict, so a scrape never waits longer
than one decode step.

Names follow Prometheus conventions under ``inferd_``; the ``llamacpp:`` aliases carry
llama-server's names (see the mapping table in ADR 0016) so its dashboards carry over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inferd.types import Done

__all__ = ["CONTENT_TYPE_LATEST", "Telemetry"]

#: Time-to-first-token buckets (seconds): interactive replies live well under a second.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Time-per-output-token buckets (seconds): 1 ms (big GPU) to 1 s (CPU, large model).
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: End-to-end request latency buckets (seconds).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Model-load time buckets (seconds).
LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Distinct ``(backend, model)`` label pairs kept; later ones count under
#: :data:`OVERFLOW_LABEL`. Clients choose the model string, so without a bound a
#: client could grow the registry (and every scrape) without end.
MAX_LABEL_SETS = 64
#: Longest label value kept (longer ones are cut), for the same reason.
MAX_LABEL_CHARS = 128
#: The label value that stands for "one of too many" (an unnamed model is "").
OVERFLOW_LABEL = "_other"
#: Outcomes of a request: ``ok``, ``cancelled``, ``incomplete`` (ended without Done),
#: or the ``code`` of the :class:`~inferd.errors.InferdError` it failed with.
OK, CANCELLED, INCOMPLETE = "ok", "cancelled", "incomplete"
#: Breaker states reported per backend (one series each, 1 for the current state).
BREAKER_STATES = ("closed", "open", "half_open")


class Telemetry:
    """The metrics of one bridge or daemon, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        pair = ("backend", "model")
        self.requests = Counter(
            "inferd_requests", "Generation requests by outcome", (*pair, "outcome"), registry=r
        )
        self.errors = Counter(
            "inferd_errors", "Failed requests by inferd error code", ("code",), registry=r
        )
        self.prompt_tokens = Counter(
            "inferd_prompt_tokens", "Prompt tokens (cached ones included)", pair, registry=r
        )
        self.cached_tokens = Counter(
            "inferd_prompt_cached_tokens", "Prompt tokens served from a KV cache", pair, registry=r
        )
        self.generated_tokens = Counter(
            "inferd_generated_tokens", "Generated (output) tokens", pair, registry=r
        )
        self.in_flight = Gauge("inferd_requests_in_flight", "Streams being served", registry=r)
        self.ttft = Histogram(
            "inferd_time_to_first_token_seconds",
            "Seconds from request to first event",
            pair,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "inferd_time_per_output_token_seconds",
            "Seconds per generated token after the first",
            pair,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "inferd_request_duration_seconds",
            "Seconds from request to its end",
            pair,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "inferd_queue_wait_seconds",
            "Seconds a daemon request waited for an admission slot",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.loads = Counter("inferd_model_loads", "Backend (model) loads finished", registry=r)
        self.load_time = Histogram(
            "inferd_model_load_seconds",
            "Seconds to load the backends",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self._pairs: set[tuple[str, str]] = set()
        self._uncached = 0  # llamacpp:prompt_tokens_total excludes cached tokens
        self._cached = 0
        self._predicted = 0
        self._live = _LiveCollector(self)
        r.register(self._live)

    # ------------------------------------------------------------------ recording

    def watch(self, backend: Any = None, *, admission: Any = None) -> None:
        """Read breaker states and scheduler gauges from ``backend`` (and the daemon's
        admission queue) at scrape time."""
        if backend is not None:
            self._live.backend = backend
        if admission is not None:
            self._live.admission = admission

    def labels(self, backend: str | None, model: str | None) -> tuple[str, str]:
        """A bounded ``(backend, model)`` label pair (see :data:`MAX_LABEL_SETS`)."""
        pair = (_cut(backend), _cut(model))
        if pair in self._pairs:
            return pair
        if len(self._pairs) >= MAX_LABEL_SETS:
            return OVERFLOW_LABEL, OVERFLOW_LABEL
        self._pairs.add(pair)
        return pair

    def finish(
        self,
        backend: str | None,
        model: str | None,
        outcome: str,
        *,
        start: float,
        first: float | None,
        done: Done | None,
    ) -> None:
        """Count one ended request: O(1), whatever the number of tokens it produced."""
        end = time.perf_counter()
        if done is not None and done.backend:
            backend = done.backend
        pair = self.labels(backend, model)
        self.requests.labels(*pair, outcome).inc()
        if outcome not in (OK, CANCELLED, INCOMPLETE):
            self.errors.labels(outcome).inc()
        self.latency.labels(*pair).observe(end - start)
        if first is not None:
            self.ttft.labels(*pair).observe(first - start)
        if done is None:
            return
        u = done.usage
        self.prompt_tokens.labels(*pair).inc(u.input_tokens)
        self.cached_tokens.labels(*pair).inc(u.cached_tokens)
        self.generated_tokens.labels(*pair).inc(u.output_tokens)
        self._uncached += max(0, u.input_tokens - u.cached_tokens)
        self._cached += u.cached_tokens
        self._predicted += u.output_tokens
        if first is not None and u.output_tokens > 1:
            self.tpot.labels(*pair).observe((end - first) / (u.output_tokens - 1))

    def model_loaded(self, seconds: float, count: int = 1) -> None:
        """``count`` backends finished loading in ``seconds``."""
        self.loads.inc(count)
        self.load_time.observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _cut(value: str | None) -> str:
    return (value or "")[:MAX_LABEL_CHARS]


def _walk(backend: Any, router: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(router name, backend, breaker or None)`` for every backend, routers unfolded."""
    children = getattr(backend, "backends", None)
    breaker: Callable[[int], Any] | None = getattr(backend, "breaker", None)
    if isinstance(children, tuple) and breaker is not None:
        for i, child in enumerate(children):
            yield backend.name, child, breaker(i)
            yield from ((r, b, br) for r, b, br in _walk(child, backend.name) if br is None)
        return
    yield router, backend, None


def _stats(backend: Any) -> dict[str, int] | None:
    """A copy of a LlamaCpp scheduler's counters (retried if the thread changed them)."""
    read = getattr(backend, "batching_stats", None)
    if not callable(read) or getattr(backend, "_sched", None) is None:
        return None
    for _ in range(3):
        try:
            return dict(read())
        except RuntimeError:  # dict changed size during the copy: try again
            continue
    return None


class _LiveCollector(Collector):
    """Gauges read at scrape time from the backend tree and the admission queue."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.backend: Any = None
        self.admission: Any = None

    def describe(self) -> list[Any]:
        return []  # names depend on the backends; nothing to check ahead of time

    def collect(self) -> Iterator[Any]:
        t = self.telemetry
        breakers = GaugeMetricFamily(
            "inferd_circuit_breaker_state",
            "1 for the current breaker state of each routed backend",
            labels=("router", "backend", "state"),
        )
        queued = GaugeMetricFamily("inferd_requests_queued", "Requests waiting for a slot")
        waiting = 0 if self.admission is None else int(self.admission.queued)
        llama = _LlamaFamilies()
        for router, backend, breaker in _walk(self.backend) if self.backend is not None else ():
            if breaker is not None:
                for state in BREAKER_STATES:
                    value = 1.0 if breaker.state == state else 0.0
                    breakers.add_metric((router, backend.name, state), value)
            stats = _stats(backend)
            if stats is not None:
                waiting += llama.add(backend, stats)
        queued.add_metric((), waiting)
        yield breakers
        yield queued
        yield from llama.families()
        yield from _aliases(t, llama)


#: ``inferd_llamacpp_cache_events_total{cache, event}``: the scheduler counter behind each
#: pair, by cache. The scheduler's own copies are always reported (0 until one happens).
CACHE_EVENTS = {
    "host_ram": {"saved": "ram_saved", "restored": "ram_restored", "evicted": "ram_evicted"},
    "slot": {"copied": "slot_copies"},
    "burst": {"copied": "burst_copies"},
    "media": {
        "hit": "media_cache_hits",
        "miss": "media_cache_misses",
        "evicted": "media_cache_evicted",
    },
}
#: Caches that may be off: reported only when this counter of theirs exists.
OPTIONAL_CACHES = {"host_ram": "ram_saved", "media": "media_cache_hits"}


def cache_events(stats: dict[str, int]) -> Iterator[tuple[str, str, int]]:
    """``(cache, event, count)`` of every cache that is on, from ``batching_stats()``."""
    for cache, events in CACHE_EVENTS.items():
        if cache in OPTIONAL_CACHES and OPTIONAL_CACHES[cache] not in stats:
            continue
        for event, key in events.items():
            yield cache, event, int(stats.get(key, 0))


class _LlamaFamilies:
    """Per-LlamaCpp gauges and counters from its scheduler (ADR 0008)."""

    def __init__(self) -> None:
        lab = ("backend",)
        self.kv_used = GaugeMetricFamily(
            "inferd_llamacpp_kv_cells_used", "KV cells held by running streams", labels=lab
        )
        self.kv_total = GaugeMetricFamily(
            "inferd_llamacpp_kv_cells_total", "KV cells of the context (n_ctx)", labels=lab
        )
        self.active = GaugeMetricFamily(
            "inferd_llamacpp_streams_active", "Sequences being decoded", labels=lab
        )
        self.queued = GaugeMetricFamily(
            "inferd_llamacpp_streams_queued", "Sequences waiting for a slot", labels=lab
        )
        self.steps = CounterMetricFamily(
            "inferd_llamacpp_decode_steps", "llama_decode calls (scheduler steps)", labels=lab
        )
        self.batch_tokens = CounterMetricFamily(
            "inferd_llamacpp_batch_tokens",
            "Tokens decoded over all steps (divide by steps: mean batch size per step)",
            labels=lab,
        )
        self.max_batch = GaugeMetricFamily(
            "inferd_llamacpp_batch_tokens_max", "Largest batch of one step", labels=lab
        )
        self.cache = CounterMetricFamily(
            "inferd_llamacpp_cache_events",
            "Work a cache saved or cost: prompt cells reused by copy or from host memory "
            "(ADR 0030, 0031), media encodes reused (ADR 0032)",
            labels=("backend", "cache", "event"),
        )
        self.drafts = CounterMetricFamily(
            "inferd_llamacpp_draft_tokens",
            "Speculative decoding (ADR 0027): draft tokens the target verified, by outcome "
            "(accepted or rejected); divide accepted by both: the acceptance rate",
            labels=("backend", "outcome"),
        )
        self.verifications = CounterMetricFamily(
            "inferd_llamacpp_draft_verifications",
            "Speculative decoding: drafts verified (one per stream and step that drafted)",
            labels=lab,
        )
        self.totals = dict.fromkeys(_TOTALS, 0)

    def add(self, backend: Any, stats: dict[str, int]) -> int:
        """Add one backend's values; returns its queued sequences."""
        sched = backend._sched
        name = (backend.name,)
        used, total = int(sched.kv_used()), int(sched.n_ctx)
        active, queued = int(sched.n_active), int(sched.n_queued)
        self.kv_used.add_metric(name, used)
        self.kv_total.add_metric(name, total)
        self.active.add_metric(name, active)
        self.queued.add_metric(name, queued)
        self.steps.add_metric(name, stats.get("steps", 0))
        self.batch_tokens.add_metric(name, stats.get("batch_tokens", 0))
        self.max_batch.add_metric(name, stats.get("max_batch", 0))
        for cache, event, count in cache_events(stats):
            self.cache.add_metric((backend.name, cache, event), count)
        drafted, accepted = stats.get("spec_drafted", 0), stats.get("spec_accepted", 0)
        self.drafts.add_metric((backend.name, "accepted"), accepted)
        self.drafts.add_metric((backend.name, "rejected"), drafted - accepted)
        verified = stats.get("spec_steps", 0)  # drafts verified, one per stream and step
        self.verifications.add_metric(name, verified)
        steps = stats.get("steps", 0)
        values = (used, total, active, queued, steps, drafted, accepted, verified)
        for key, value in zip(_TOTALS, values, strict=True):
            self.totals[key] += value
        return queued

    def families(self) -> Iterator[Any]:
        yield from (self.kv_used, self.kv_total, self.active, self.queued)
        yield from (self.steps, self.batch_tokens, self.max_batch, self.cache)
        yield from (self.drafts, self.verifications)


#: The sums over every LlamaCpp backend that llama-server's names report.
_TOTALS = ("kv_used", "kv_total", "active", "queued", "steps", "drafted", "accepted", "verified")


def _aliases(t: Telemetry, llama: _LlamaFamilies) -> Iterator[Any]:
    """llama-server's names for the same quantities (ADR 0016's mapping table)."""
    tot = llama.totals

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(f"llamacpp:{name}", doc, value=value)

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"llamacpp:{name}", doc, value=value)

    yield counter(
        "prompt_tokens", "Number of prompt tokens processed, excluding cached tokens", t._uncached
    )
    yield counter(
        "prompt_tokens_cached", "Number of prompt tokens reused from the cache", t._cached
    )
    yield counter("tokens_predicted", "Number of generation tokens processed", t._predicted)
    yield counter("n_decode", "Total number of llama_decode() calls", tot["steps"])
    yield gauge("requests_processing", "Number of requests processing", tot["active"])
    yield gauge("requests_deferred", "Number of requests deferred", tot["queued"])
    ratio = tot["kv_used"] / tot["kv_total"] if tot["kv_total"] else 0.0
    yield gauge("kv_cache_usage_ratio", "KV-cache usage. 1 means 100 percent usage.", ratio)
    yield gauge("kv_cache_tokens", "KV-cache tokens.", tot["kv_used"])
    yield counter(
        "spec_decode_num_draft_tokens", "Speculative: Total draft tokens generated", tot["drafted"]
    )
    yield counter(
        "spec_decode_num_accepted_tokens",
        "Speculative: Total draft tokens accepted by the target model",
        tot["accepted"],
    )
    yield counter(
        "spec_decode_num_drafts",
        "Speculative: Total speculative decoding verification steps",
        tot["verified"],
    )
