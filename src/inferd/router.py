"""A Backend over several backends: priority order plus a circuit breaker per backend.

Why a router at all: a program that prefers its laptop model but may fall back to a
cloud upstream (or the other way round) should not have to write the failover logic,
and must not get it wrong in the one place where it matters: once a backend has
yielded an event, the caller has seen part of *that* backend's answer, so switching
backends would splice two different replies. Failover therefore happens only before
the first event (DESIGN.md, "pre-stream"); after that a failure is the caller's
``BackendUnavailable``.

The breaker keeps a failing backend from eating every request's latency budget:
``failure_threshold`` failures within ``failure_window_s`` open it for ``open_for_s``;
then one trial request is let through (half-open) and its outcome closes or re-opens it.
``InvalidRequest`` is the caller's fault and never counts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Literal

from inferd.backend import Backend
from inferd.errors import (
    BackendUnavailable,
    EmbedUnsupported,
    InferdError,
    InternalError,
    InvalidRequest,
    QueueFull,
)
from inferd.types import (
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
)

#: Failures within the window that open a breaker.
DEFAULT_FAILURE_THRESHOLD = 3
#: Seconds over which failures are counted.
DEFAULT_FAILURE_WINDOW_S = 60.0
#: Seconds an open breaker stays open before one trial request is let through.
DEFAULT_OPEN_FOR_S = 30.0

BreakerState = Literal["closed", "open", "half_open"]


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


def _describe(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    return f"failed with {type(exc).__name__}: {msg}"


class Router(Backend):
    """Serve each request from the first backend that is ready, capable and not tripped.

    Itself a :class:`~inferd.backend.Backend`, so routers nest and the daemon serves
    one without special cases. ``Done.backend`` names the backend that served.
    """

    name = "router"

    def __init__(
        self,
        backends: Iterable[Backend],
        *,
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
        """Per backend: name, ready, breaker state (for the daemon's admin socket)."""
        return [
            {"name": b.name, "ready": b.ready(), **br.to_dict()}
            for b, br in zip(self.backends, self._breakers, strict=True)
        ]

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
        )

    # ------------------------------------------------------------------ generate

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        if self._closed:
            raise BackendUnavailable(f"router {self.name!r} is closed; create a new one")
        skipped: list[str] = []
        for backend, breaker in zip(self.backends, self._breakers, strict=True):
            if not backend.ready():
                skipped.append(f"{backend.name}: not ready")
                continue
            lacks = backend.capabilities().covers(request)
            if lacks is not None:
                skipped.append(f"{backend.name}: lacks capability ({lacks})")
                continue
            blocked = breaker.acquire()
            if blocked is not None:
                skipped.append(f"{backend.name}: {blocked}")
                continue

            stream = backend.generate(request)
            try:
                first = await stream.__anext__()
            except InvalidRequest:
                breaker.release()
                await _aclose(stream)
                raise
            except QueueFull as e:  # busy, not broken: try the next one, no breaker hit
                breaker.release()
                skipped.append(f"{backend.name}: {_describe(e)}")
                await _aclose(stream)
                continue
            except StopAsyncIteration:
                breaker.failure()
                skipped.append(f"{backend.name}: ended its stream without a Done event")
                continue
            except Exception as e:  # NotReady, BackendUnavailable, InternalError, bugs
                breaker.failure()
                skipped.append(f"{backend.name}: {_describe(e)}")
                await _aclose(stream)
                continue
            except BaseException:  # cancelled while waiting for the first event
                breaker.release()
                await _aclose(stream)
                raise

            # Committed: from here on there is no failover (the caller has seen output).
            verdict = False
            try:
                event = first
                while True:
                    if isinstance(event, Done):
                        breaker.success()
                        verdict = True
                        yield event.replace(backend=backend.name)
                        return
                    yield event
                    try:
                        event = await stream.__anext__()
                    except StopAsyncIteration:
                        breaker.failure()
                        verdict = True
                        raise BackendUnavailable(
                            f"backend {backend.name!r} ended its stream without a Done event"
                        ) from None
            except BackendUnavailable:
                if not verdict:
                    breaker.failure()
                    verdict = True
                raise
            except InternalError:
                breaker.failure()
                verdict = True
                raise
            except InferdError as e:  # the contract says BackendUnavailable mid-stream
                breaker.failure()
                verdict = True
                raise BackendUnavailable(
                    f"backend {backend.name!r} failed mid-stream: {_describe(e)}"
                ) from e
            finally:
                if not verdict:
                    breaker.release()
                await _aclose(stream)
        raise BackendUnavailable("no backend could serve the request: " + "; ".join(skipped))

    # ------------------------------------------------------------------ embed

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        if self._closed:
            raise BackendUnavailable(f"router {self.name!r} is closed; create a new one")
        skipped: list[str] = []
        any_embed = False
        for backend, breaker in zip(self.backends, self._breakers, strict=True):
            if not backend.capabilities().embed:
                skipped.append(f"{backend.name}: lacks capability (no embeddings)")
                continue
            any_embed = True
            if not backend.ready():
                skipped.append(f"{backend.name}: not ready")
                continue
            blocked = breaker.acquire()
            if blocked is not None:
                skipped.append(f"{backend.name}: {blocked}")
                continue
            try:
                result = await backend.embed(request)
            except InvalidRequest:
                breaker.release()
                raise
            except (EmbedUnsupported, QueueFull) as e:
                breaker.release()
                skipped.append(f"{backend.name}: {_describe(e)}")
                continue
            except Exception as e:
                breaker.failure()
                skipped.append(f"{backend.name}: {_describe(e)}")
                continue
            except BaseException:
                breaker.release()
                raise
            breaker.success()
            return result
        msg = "no backend could embed the request: " + "; ".join(skipped)
        if not any_embed:
            raise EmbedUnsupported(msg)
        raise BackendUnavailable(msg)

    async def aclose(self) -> None:
        """Close every backend (the router owns them). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for b in self.backends:
            await b.aclose()


async def _aclose(stream: AsyncIterator[Event]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
