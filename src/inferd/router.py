"""A Backend over several backends: priority order plus a circuit breaker per backend.

Why a router at all: a program that prefers its laptop model but may fall back to a
cloud upstream (or the other way round) should not have to write the failover logic,
and must not get it wrong in the one place where it matters: once a backend has
yielded an event, the caller has seen part of *that* backend's answer, so switching
backends would splice two different replies. Failover therefore happens only before
the first event (the stream contract in ``inferd.backend``); after that a failure is the caller's
``BackendUnavailable``.

The breaker keeps a failing backend from eating every request's latency budget:
``failure_threshold`` failures within ``failure_window_s`` open it for ``open_for_s``;
then one trial request is let through (half-open) and its outcome closes or re-opens it.
``InvalidRequest`` is the caller's fault and never counts.

Two policies pick the order backends are tried in
(docs/adr/0020-replicas-least-loaded-router.md): ``"priority"`` (the order given: a
preferred backend and its fallbacks) and ``"least_loaded"`` (replicas of one model:
fewest open streams plus reported queue depth first, ties round robin, a conversation
kept on one replica by affinity while the load allows; see :mod:`inferd.balance`).
Background health probes (:mod:`inferd.health`) let either skip a backend that stopped
answering before a request pays for it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

from inferd.backend import Backend, ended_without_done
from inferd.balance import (
    DEFAULT_AFFINITY_MAX_IMBALANCE,
    LoadBalancer,
    affinity_key,
    check_affinity,
    check_policy,
    check_prefix_chars,
    replica_ids,
)
from inferd.errors import (
    BackendUnavailable,
    EmbedUnsupported,
    InferdError,
    InternalError,
    InvalidRequest,
    QueueFull,
)
from inferd.health import DEFAULT_HEALTH_INTERVAL_S, DEFAULT_HEALTH_TIMEOUT_S, HealthMonitor
from inferd.types import (
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    RerankRequest,
    RerankResult,
)

#: Failures within the window that open a breaker.
DEFAULT_FAILURE_THRESHOLD = 3
#: Seconds over which failures are counted.
DEFAULT_FAILURE_WINDOW_S = 60.0
#: Seconds an open breaker stays open before one trial request is let through.
DEFAULT_OPEN_FOR_S = 30.0

log = logging.getLogger("inferd.router")

BreakerState = Literal["closed", "open", "half_open"]
T = TypeVar("T")
#: ``health_interval_s`` left out: probes every DEFAULT_HEALTH_INTERVAL_S for
#: ``least_loaded`` (replicas), none for ``priority`` (as before probes existed).
_POLICY_DEFAULT: Any = object()


class CircuitBreaker:
    """Closed -> open after N failures in a window -> half-open after a pause -> closed.

    Time comes from an injected ``clock`` so tests can walk through the states without
    sleeping. Only one trial runs while half-open: the others are skipped, because the
    point of half-open is to risk one request, not a burst.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        failure_window_s: float = DEFAULT_FAILURE_WINDOW_S,
        open_for_s: float = DEFAULT_OPEN_FOR_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if failure_window_s <= 0 or open_for_s < 0:
            raise ValueError("failure_window_s must be > 0 and open_for_s >= 0")
        self.failure_threshold = failure_threshold
        self.failure_window_s = failure_window_s
        self.open_for_s = open_for_s
        self._clock = clock
        self._failures: deque[float] = deque()
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.open_for_s:
            return "half_open"
        return "open"

    def acquire(self) -> str | None:
        """Take a slot for one request: ``None`` when allowed, else why not."""
        state = self.state
        if state == "closed":
            return None
        if state == "open":
            assert self._opened_at is not None
            left = self.open_for_s - (self._clock() - self._opened_at)
            return f"circuit breaker open (retry in {left:.1f}s)"
        if self._trial_running:
            return "circuit breaker half-open, a trial request is running"
        self._trial_running = True
        return None

    def release(self) -> None:
        """The request ended without a verdict (cancelled, invalid): free the trial slot."""
        self._trial_running = False

    def success(self) -> None:
        self._failures.clear()
        self._opened_at = None
        self._trial_running = False

    def failure(self) -> None:
        now = self._clock()
        if self._opened_at is not None:  # a failed trial (or a straggler): open again
            self._opened_at = now
            self._trial_running = False
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.failure_window_s:
            self._failures.popleft()
        if len(self._failures) >= self.failure_threshold:
            self._opened_at = now
            self._failures.clear()

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "recent_failures": len(self._failures)}


def _describe(backend: str, exc: BaseException) -> str:
    """Why ``backend`` was passed over, in words fit for the caller.

    inferd errors carry messages written for callers. Any other exception is a bug or
    a library's failure whose text may hold anything (paths, URLs, payloads): the caller
    gets its type and a reference; the log gets the reference at WARNING and the
    traceback at DEBUG.
    """
    if isinstance(exc, InferdError):
        return f"failed with {type(exc).__name__}: {exc.message}"
    ref = uuid.uuid4().hex[:12]
    log.warning("backend %r failed with %s (ref %s)", backend, type(exc).__name__, ref)
    log.debug("backend %r failure (ref %s)", backend, ref, exc_info=exc)
    return f"failed with {type(exc).__name__} (see the server log, ref {ref})"


def _unservable(backends: tuple[Backend, ...], request: Request) -> InvalidRequest | None:
    """``InvalidRequest`` naming what is missing when *no* backend could ever serve it.

    The caller's request asks for something (images, audio, tools) that none of the
    backends offers; that is the request's fault (400), not an outage (502).
    """
    lacks = [(b.name, b.capabilities().covers(request)) for b in backends]
    if any(reason is None for _, reason in lacks):
        return None
    why = "; ".join(f"{name}: {reason}" for name, reason in lacks)
    return InvalidRequest(f"no backend can serve this request ({why})")


class Router(Backend):
    """Serve each request from the best backend that is ready, capable and not tripped.

    Itself a :class:`~inferd.backend.Backend`, so routers nest and the daemon serves
    one without special cases. ``Done.backend`` names the backend that served.

    :param policy: ``"priority"`` (the order given) or ``"least_loaded"`` (replicas).
    :param affinity_prefix_chars: with ``least_loaded``, derive an affinity key from the
        first this many characters of the conversation's opening when a request has no
        ``affinity_key`` (``None``: only explicit keys).
    :param affinity_max_imbalance: streams by which an affine replica may be busier than
        the least-loaded one and still be preferred.
    :param health_interval_s: seconds between background probes (0: none; left out:
        :data:`~inferd.health.DEFAULT_HEALTH_INTERVAL_S` for ``least_loaded``, none for
        ``priority``).
    :param health_timeout_s: seconds one probe may take.
    """

    name = "router"

    def __init__(
        self,
        backends: Iterable[Backend],
        *,
        policy: str = "priority",
        affinity_prefix_chars: int | None = None,
        affinity_max_imbalance: int = DEFAULT_AFFINITY_MAX_IMBALANCE,
        health_interval_s: float | None = _POLICY_DEFAULT,
        health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        failure_window_s: float = DEFAULT_FAILURE_WINDOW_S,
        open_for_s: float = DEFAULT_OPEN_FOR_S,
        clock: Callable[[], float] = time.monotonic,
        name: str = "router",
    ) -> None:
        self.backends: tuple[Backend, ...] = tuple(backends)
        if not self.backends:
            raise ValueError("Router needs at least one backend")
        self.name = name
        self.policy = check_policy(policy)
        self.affinity_prefix_chars = check_prefix_chars(affinity_prefix_chars)
        check_affinity(policy, affinity_prefix_chars)
        self._balancer = LoadBalancer(
            replica_ids(b.name for b in self.backends), max_imbalance=affinity_max_imbalance
        )
        if health_interval_s is _POLICY_DEFAULT:
            health_interval_s = DEFAULT_HEALTH_INTERVAL_S if policy == "least_loaded" else None
        self.health = HealthMonitor(
            self.backends, interval_s=health_interval_s, timeout_s=health_timeout_s
        )
        # only backends that override the hook are awaited per request (it costs a
        # coroutine each, and most backends' state is local)
        self._refreshing = tuple(
            b for b in self.backends if type(b).refresh_state is not Backend.refresh_state
        )
        #: Streams this router has open (or is opening) on each backend.
        self.outstanding = [0] * len(self.backends)
        self._breakers = [
            CircuitBreaker(
                failure_threshold=failure_threshold,
                failure_window_s=failure_window_s,
                open_for_s=open_for_s,
                clock=clock,
            )
            for _ in self.backends
        ]
        self._closed = False

    # ------------------------------------------------------------------ introspection

    def breaker(self, index_or_name: int | str) -> CircuitBreaker:
        """The breaker of one backend, by position or by name."""
        if isinstance(index_or_name, int):
            return self._breakers[index_or_name]
        for b, br in zip(self.backends, self._breakers, strict=True):
            if b.name == index_or_name:
                return br
        raise KeyError(index_or_name)

    def status(self) -> list[dict[str, Any]]:
        """Per backend: name, ready, breaker state, health and open streams (admin socket)."""
        return [
            {
                "name": b.name,
                "ready": b.ready(),
                **br.to_dict(),
                **h.to_dict(),
                "outstanding": n,
            }
            for b, br, h, n in zip(
                self.backends, self._breakers, self.health.health, self.outstanding, strict=True
            )
        ]

    def queue_depth(self) -> int:
        """Streams open through this router (what a parent router's probe reads)."""
        return sum(self.outstanding)

    def ready(self) -> bool:
        return not self._closed and any(b.ready() for b in self.backends)

    def capabilities(self) -> Capabilities:
        """The union: a request is servable when *some* backend covers it."""
        caps = [b.capabilities() for b in self.backends]
        accel = next((c.accelerator for c in caps if c.accelerator is not None), None)
        return Capabilities(
            v2=True,
            tools=any(c.tools for c in caps),
            vision=any(c.vision for c in caps),
            audio=any(c.audio for c in caps),
            thinking=any(c.thinking for c in caps),
            embed=any(c.embed for c in caps),
            accelerator=accel,
            tokenize=any(c.tokenize for c in caps),
            rerank=any(c.rerank for c in caps),
        )

    # ------------------------------------------------------------------ generate

    async def refresh_state(self) -> None:
        """Let every backend make its ``ready()``/``capabilities()`` current; start the
        health probes on first use (they need a running loop)."""
        self.health.start()
        for b in self._refreshing:
            await b.refresh_state()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable(f"router {self.name!r} is closed; create a new one")

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Pick (pre-stream, with failover), then relay the committed backend's stream."""
        self._check_open()
        await self.refresh_state()
        skipped: list[str] = []
        for i in self._candidates(request, skipped):
            backend, breaker = self.backends[i], self._breakers[i]
            self.outstanding[i] += 1
            self._balancer.picked(i)
            try:
                opened = await self._first_event(backend, breaker, request, skipped)
                if opened is None:
                    continue
                relay = self._relay(backend, breaker, *opened, choices=request.n)
                try:
                    async for event in relay:
                        yield event
                finally:  # leaving early closes the relay (and the stream) now, not at GC
                    await relay.aclose()
                return
            finally:
                self.outstanding[i] -= 1
        raise _unservable(self.backends, request) or BackendUnavailable(
            "no backend could serve the request: " + "; ".join(skipped)
        )

    def _order(self, request: Request | None) -> list[int]:
        """Backend indices in the order to try: given order, or by load and affinity."""
        if self.policy == "priority":
            return list(range(len(self.backends)))
        health = self.health.health
        loads = [n + h.queue_depth for n, h in zip(self.outstanding, health, strict=True)]
        key = affinity_key(request, self.affinity_prefix_chars) if request else None
        return self._balancer.order(loads, [h.healthy for h in health], key)

    def _skip_reason(self, i: int) -> str | None:
        """Why backend ``i`` is passed over before any request reaches it, if it is."""
        backend, h = self.backends[i], self.health.health[i]
        if not backend.ready():
            return "not ready"
        if not h.healthy:
            return f"unhealthy (health probe: {h.reason})"
        return None

    def _candidates(self, request: Request, skipped: list[str]) -> Iterator[int]:
        """Backends in policy order that are ready, healthy, capable and not tripped.

        Lazy on purpose: a half-open breaker's trial slot is taken only when its backend
        is about to be tried.
        """
        for i in self._order(request):
            backend, breaker = self.backends[i], self._breakers[i]
            why = self._skip_reason(i)
            if why is not None:
                skipped.append(f"{backend.name}: {why}")
                continue
            lacks = backend.capabilities().covers(request)
            if lacks is not None:
                skipped.append(f"{backend.name}: lacks capability ({lacks})")
                continue
            blocked = breaker.acquire()
            if blocked is not None:
                skipped.append(f"{backend.name}: {blocked}")
                continue
            yield i

    async def _first_event(
        self, backend: Backend, breaker: CircuitBreaker, request: Request, skipped: list[str]
    ) -> tuple[AsyncIterator[Event], Event] | None:
        """Open ``backend``'s stream up to its first event; ``None`` means fail over."""
        stream = backend.generate(request)
        try:
            return stream, await stream.__anext__()
        except InvalidRequest:
            breaker.release()
            await _aclose(stream)
            raise
        except QueueFull as e:  # busy, not broken: try the next one, no breaker hit
            breaker.release()
            skipped.append(f"{backend.name}: {_describe(backend.name, e)}")
        except StopAsyncIteration:
            breaker.failure()
            skipped.append(f"{backend.name}: {ended_without_done(backend.name).message}")
            return None
        except Exception as e:  # NotReady, BackendUnavailable, InternalError, bugs
            breaker.failure()
            skipped.append(f"{backend.name}: {_describe(backend.name, e)}")
        except BaseException:  # cancelled while waiting for the first event
            breaker.release()
            await _aclose(stream)
            raise
        await _aclose(stream)
        return None

    async def _relay(
        self,
        backend: Backend,
        breaker: CircuitBreaker,
        stream: AsyncIterator[Event],
        first: Event,
        choices: int = 1,
    ) -> AsyncGenerator[Event, None]:
        """The committed phase: no failover (the caller has seen output), one verdict.
        The stream ends at its ``choices``-th ``Done`` (one per choice, ADR 0022)."""
        verdict = False
        try:
            event = first
            while not isinstance(event, Done) or choices > 1:
                if isinstance(event, Done):
                    choices -= 1
                    event = event.replace(backend=backend.name)
                yield event
                try:
                    event = await stream.__anext__()
                except StopAsyncIteration:
                    raise ended_without_done(backend.name) from None
            breaker.success()
            verdict = True
            yield event if event.backend == backend.name else event.replace(backend=backend.name)
        except (BackendUnavailable, InternalError):
            breaker.failure()
            verdict = True
            raise
        except Exception as e:  # the contract says BackendUnavailable mid-stream
            breaker.failure()
            verdict = True
            raise BackendUnavailable(
                f"backend {backend.name!r} failed mid-stream: {_describe(backend.name, e)}"
            ) from e
        finally:
            if not verdict:
                breaker.release()
            await _aclose(stream)

    # ------------------------------------------------------------------ embed

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        self._check_open()
        await self.refresh_state()
        skipped: list[str] = []
        any_embed = False
        for i in self._order(None):
            backend, breaker = self.backends[i], self._breakers[i]
            if not backend.capabilities().embed:
                skipped.append(f"{backend.name}: lacks capability (no embeddings)")
                continue
            any_embed = True
            why = self._skip_reason(i) or breaker.acquire()
            if why is not None:
                skipped.append(f"{backend.name}: {why}")
                continue
            self.outstanding[i] += 1
            try:
                result = await backend.embed(request)
            except InvalidRequest:
                breaker.release()
                raise
            except (EmbedUnsupported, QueueFull) as e:
                breaker.release()
                skipped.append(f"{backend.name}: {_describe(backend.name, e)}")
                continue
            except Exception as e:
                breaker.failure()
                skipped.append(f"{backend.name}: {_describe(backend.name, e)}")
                continue
            except BaseException:
                breaker.release()
                raise
            finally:
                self.outstanding[i] -= 1
            breaker.success()
            return result
        msg = "no backend could embed the request: " + "; ".join(skipped)
        if not any_embed:
            raise EmbedUnsupported(msg)
        raise BackendUnavailable(msg)

    # ------------------------------------------------------------------ tokens, rerank

    async def _delegate(
        self, flag: str, call: Callable[[Backend], Awaitable[T]], missing: Exception
    ) -> T:
        """``call`` on the first ready, healthy backend whose capabilities have ``flag``;
        the next one when it is unavailable (the caller's errors are raised as they are).

        Why the first and not the least loaded: these are quick, stateless questions
        about one model's tokenizer or reranker, and replicas of a model answer alike.
        """
        self._check_open()
        await self.refresh_state()
        skipped: list[str] = []
        capable = False
        for i, backend in enumerate(self.backends):
            if not getattr(backend.capabilities(), flag):
                continue
            capable = True
            why = self._skip_reason(i)
            if why is not None:
                skipped.append(f"{backend.name}: {why}")
                continue
            try:
                return await call(backend)
            except (InvalidRequest, EmbedUnsupported):
                raise
            except InferdError as e:
                skipped.append(f"{backend.name}: {_describe(backend.name, e)}")
        if not capable:
            raise missing
        raise BackendUnavailable(f"no backend could answer ({flag}): " + "; ".join(skipped))

    async def tokenize(
        self,
        content: str | list[str | int],
        *,
        add_special: bool = False,
        parse_special: bool = True,
    ) -> list[int]:
        return await self._delegate(
            "tokenize",
            lambda b: b.tokenize(content, add_special=add_special, parse_special=parse_special),
            self._no_tokenizer(),
        )

    async def token_pieces(self, tokens: list[int]) -> list[bytes]:
        return await self._delegate(
            "tokenize", lambda b: b.token_pieces(tokens), self._no_tokenizer()
        )

    async def detokenize(self, tokens: list[int]) -> str:
        return await self._delegate(
            "tokenize", lambda b: b.detokenize(tokens), self._no_tokenizer()
        )

    async def apply_template(self, request: Request) -> str:
        return await self._delegate(
            "tokenize", lambda b: b.apply_template(request), self._no_tokenizer()
        )

    async def rerank(self, request: RerankRequest) -> RerankResult:
        return await self._delegate(
            "rerank",
            lambda b: b.rerank(request),
            EmbedUnsupported(f"no backend of router {self.name!r} reranks"),
        )

    async def aclose(self) -> None:
        """Stop the health probes and close every backend (the router owns them).
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self.health.aclose()
        for b in self.backends:
            await b.aclose()


async def _aclose(stream: AsyncIterator[Event]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
