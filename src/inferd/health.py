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
* the daemon ``Client``: its ``capabilities`` round trip (``refresh()``), then the
  daemon's admin socket for its admission queue depth (best effort: a daemon on
  another user's socket may not let us in);
* ``OpenAICompat`` (a remote bridge, llama-server, a cloud API): ``GET /models`` with
  its own session and credentials, healthy on a 2xx;
* anything else: ``refresh_state()`` then ``ready()``, and ``queue_depth()`` when the
  backend has one (a nested Router reports its open streams).
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


async def _client_probe(client: Any) -> tuple[bool, int]:
    from inferd.serve.client import admin_status

    await client.refresh()
    depth = 0
    with contextlib.suppress(InferdError, OSError, ValueError, TypeError, AttributeError):
        status = await admin_status(client.socket_path, timeout_s=DEFAULT_HEALTH_TIMEOUT_S)
        depth = int(status["queue"]["queued"])
    return client.ready(), depth


async def _http_probe(backend: Any) -> tuple[bool, int]:
    """``GET {base_url}/models`` with the backend's own session and credentials: an
    OpenAI-compatible upstream (a bridge, llama-server, a cloud API) answers it cheaply
    without running the model. Only a 2xx counts: a refused key fails every request too."""
    from inferd.backends.openai_compat.client import endpoint_url

    http = backend._client
    url = endpoint_url(backend.base_url, "models")
    async with http.session().get(url, headers=http._credentials()) as resp:
        await resp.read()
        return 200 <= resp.status < 300 and backend.ready(), 0


async def probe(backend: Backend) -> tuple[bool, int]:
    """``(healthy, queue depth)`` of one backend; raises when the backend is unreachable."""
    custom = getattr(backend, "probe", None)
    if callable(custom):
        return bool(await custom()), 0
    from inferd.backends.openai_compat import OpenAICompat
    from inferd.serve.client import Client

    if isinstance(backend, Client):
        return await _client_probe(backend)
    if isinstance(backend, OpenAICompat):
        return await _http_probe(backend)
    await backend.refresh_state()
    depth_of = getattr(backend, "queue_depth", None)
    depth = int(depth_of()) if callable(depth_of) else 0
    return backend.ready(), depth


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
                healthy, depth = await probe(backend)
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
        h.healthy, h.queue_depth, h.reason = healthy, max(0, depth), reason
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
