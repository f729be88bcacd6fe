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
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Literal

from inferd.backend import Backend, ended_without_done
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

log = logging.getLogger("inferd.router")

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

    async def refresh_state(self) -> None:
        """Let every backend make its ``ready()``/``capabilities()`` current."""
        for b in self.backends:
            await b.refresh_state()

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Pick (pre-stream, with failover), then relay the committed backend's stream."""
        if self._closed:
            raise BackendUnavailable(f"router {self.name!r} is closed; create a new one")
        await self.refresh_state()
        skipped: list[str] = []
        for backend, breaker in self._candidates(request, skipped):
            opened = await self._first_event(backend, breaker, request, skipped)
            if opened is None:
                continue
            relay = self._relay(backend, breaker, *opened)
            try:
                async for event in relay:
                    yield event
            finally:  # leaving early closes the relay (and the stream) now, not at GC
                await relay.aclose()
            return
        raise _unservable(self.backends, request) or BackendUnavailable(
            "no backend could serve the request: " + "; ".join(skipped)
        )

    def _candidates(
        self, request: Request, skipped: list[str]
    ) -> Iterator[tuple[Backend, CircuitBreaker]]:
        """Backends in priority order that are ready, capable and not tripped.

        Lazy on purpose: a half-open breaker's trial slot is taken only when its backend
        is about to be tried.
        """
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
            yield backend, breaker

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
    ) -> AsyncIterator[Event]:
        """The committed phase: no failover (the caller has seen output), one verdict."""
        verdict = False
        try:
            event = first
            while not isinstance(event, Done):
                yield event
                try:
                    event = await stream.__anext__()
                except StopAsyncIteration:
                    raise ended_without_done(backend.name) from None
            breaker.success()
            verdict = True
            yield event.replace(backend=backend.name)
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
        if self._closed:
            raise BackendUnavailable(f"router {self.name!r} is closed; create a new one")
        await self.refresh_state()
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
                skipped.append(f"{backend.name}: {_describe(backend.name, e)}")
                continue
            except Exception as e:
                breaker.failure()
                skipped.append(f"{backend.name}: {_describe(backend.name, e)}")
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
