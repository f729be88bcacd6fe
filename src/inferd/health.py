"""Background health probes for a Router's backends.

Why in the background (docs/adr/0020-replicas-least-loaded-router.md): a replica that
stopped answering (a paused or wedged daemon, a dead host) costs every request sent to
it a timeout before failover. One task per Router probes every backend each
:data:`DEFAULT_HEALTH_INTERVAL_S` seconds, concurrently, each probe bounded by
:data:`DEFAULT_HEALTH_TIMEOUT_S`; the Router then skips a backend whose last probe
failed, before a request pays for it. The task starts on the Router's first use (it
needs a running loop) and :meth:`HealthMonitor.aclose` ends it.

What a probe asks, cheapest first:

* a backend with an async ``probe()`` method: that (returns ``True``/``False`` or raises);
* the daemon ``Client``: its ``capabilities`` round trip (``refresh()``);
* ``OpenAICompat`` (a remote bridge, llama-server, a cloud API): ``GET /models`` with
  its own session and credentials, healthy on a 2xx;
* anything else: ``refresh_state()`` then ``ready()``.

After a good probe, outside its timeout (a slow answer costs the load figure, never the
verdict), the queue depth: a daemon's admission queue from its admin socket (best
effort: another user's daemon may not let us in), else the backend's ``queue_depth()``
when it has one (a nested Router reports its open streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inferd.backend import Backend
from inferd.errors import InferdError
from inferd.limits import echo

#: Seconds between two probes of the same backend.
DEFAULT_HEALTH_INTERVAL_S = 5.0
#: Seconds one probe may take before its backend counts as unhealthy.
DEFAULT_HEALTH_TIMEOUT_S = 2.0

log = logging.getLogger("inferd.health")


@dataclass
class Health:
    """The last probe's verdict on one backend (healthy until a probe says otherwise)."""

    healthy: bool = True
    queue_depth: int = 0
    reason: str = ""
    probes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "queue_depth": self.queue_depth, "probes": self.probes}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_interval(interval_s: float | None, timeout_s: float) -> None:
    """``ValueError`` for a negative interval or a non-positive timeout."""
    if interval_s is not None and (not _number(interval_s) or interval_s < 0):
        raise ValueError(f"health_interval_s must be >= 0 (0: no probes), got {echo(interval_s)}")
    if not _number(timeout_s) or not timeout_s > 0:
        raise ValueError(f"health_timeout_s must be > 0, got {echo(timeout_s)}")


async def _http_probe(backend: Any) -> bool:
    """``GET {base_url}/models`` with the backend's own session and credentials: an
    OpenAI-compatible upstream (a bridge, llama-server, a cloud API) answers it cheaply
    without running the model. Only a 2xx counts: a refused key fails every request too."""
    from inferd.backends.openai_compat.client import endpoint_url

    http = backend._client
    url = endpoint_url(backend.base_url, "models")
    async with http.session().get(url, headers=http._credentials()) as resp:
        await resp.read()
        return 200 <= resp.status < 300 and backend.ready()


async def probe(backend: Backend) -> bool:
    """Whether one backend would serve a request now; raises when it is unreachable."""
    custom = getattr(backend, "probe", None)
    if callable(custom):
        return bool(await custom())
    from inferd.backends.openai_compat import OpenAICompat
    from inferd.serve.client import Client

    if isinstance(backend, Client):
        await backend.refresh()  # the capabilities round trip, with the daemon's readiness
    elif isinstance(backend, OpenAICompat):
        return await _http_probe(backend)
    else:
        await backend.refresh_state()
    return backend.ready()


async def queue_depth(backend: Backend, timeout_s: float) -> int:
    """Requests waiting at the backend, where it reports them; 0 where it does not.

    Asked after a good probe and outside its timeout, so a slow answer here costs the
    load figure, never the health verdict: the daemon's admission queue from its admin
    socket (``Client``), else the backend's own ``queue_depth()`` if it has one.
    """
    from inferd.serve.client import Client, admin_status

    if isinstance(backend, Client):
        try:
            status = await admin_status(backend.socket_path, timeout_s=timeout_s)
            return max(0, int(status["queue"]["queued"]))
        except (InferdError, OSError, ValueError, TypeError, KeyError):
            return 0
    depth_of = getattr(backend, "queue_depth", None)
    return max(0, int(depth_of())) if callable(depth_of) else 0


class HealthMonitor:
    """One asyncio task probing ``backends`` on an interval; verdicts in :attr:`health`."""

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        interval_s: float | None = DEFAULT_HEALTH_INTERVAL_S,
        timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S,
    ) -> None:
        check_interval(interval_s, timeout_s)
        self.backends = tuple(backends)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.health = [Health() for _ in self.backends]
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Completed rounds of probes (tests wait for it to grow, not for time to pass).
        self.rounds = 0

    @property
    def enabled(self) -> bool:
        return bool(self.interval_s)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the probe task if enabled, not closed and not already running in this
        loop (a router reused under a new ``asyncio.run`` gets a task in the new loop)."""
        if not self.enabled or self._closed:
            return
        loop = asyncio.get_running_loop()
        if self.running and self._task is not None and self._task.get_loop() is loop:
            return
        self._task = loop.create_task(self._loop(), name="inferd-health-probes")

    async def probe_all(self) -> None:
        """One round: every backend probed at once, each within the timeout."""
        await asyncio.gather(*(self._probe_one(i) for i in range(len(self.backends))))
        self.rounds += 1

    async def _probe_one(self, i: int) -> None:
        backend, h = self.backends[i], self.health[i]
        try:
            async with asyncio.timeout(self.timeout_s):
                healthy = await probe(backend)
            depth = await queue_depth(backend, self.timeout_s) if healthy else 0
            reason = "" if healthy else "not ready"
        except TimeoutError:
            healthy, depth, reason = False, 0, f"no answer within {self.timeout_s:g}s"
        except (InferdError, OSError) as e:  # aiohttp's connection errors are OSErrors
            healthy, depth, reason = False, 0, type(e).__name__
        except Exception as e:  # an HTTP library's error, or a bug: never end the loop
            if not type(e).__module__.startswith("aiohttp"):
                log.warning("health probe of %r failed with %s", backend.name, type(e).__name__)
            healthy, depth, reason = False, 0, type(e).__name__
        if healthy != h.healthy:
            log.info("backend %r is %s", backend.name, "healthy" if healthy else "unhealthy")
        h.healthy, h.queue_depth, h.reason = healthy, depth, reason
        h.probes += 1

    async def _loop(self) -> None:
        assert self.interval_s
        while not self._closed:
            await self.probe_all()
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        """Stop probing and wait for the task to end. Safe to call twice."""
        self._closed = True
        task, self._task = self._task, None
        if task is None or task.done():
            return
        if task.get_loop() is not asyncio.get_running_loop():
            with contextlib.suppress(RuntimeError):  # that loop is gone or elsewhere
                task.cancel()
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
