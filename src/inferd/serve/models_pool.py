"""Several named models in one daemon, loaded on first use and unloaded when idle.

Why a pool rather than a list of warm backends: a machine holds a few models' weights
at most, and a user with ten GGUF files wants to name one in a request and have it
served, as with Ollama. :class:`ModelPool` is itself a :class:`~inferd.backend.Backend`
(the daemon and the bridge serve it without special cases) that picks the model by
``Request.model`` (docs/adr/0015-several-models-load-on-demand.md):

* **Load on first use, once.** Concurrent first requests share one load task (they
  wait; the admin status shows its progress); loading runs in a worker thread, one
  model at a time, so the event loop keeps serving loaded models.
* **Unload when idle.** After ``keep_alive`` seconds without a stream (the model's, or
  the last request's ``keep_alive`` as in Ollama; negative: never; 0: at once).
* **Memory budget.** Before a load, least recently used idle models are unloaded until
  the estimate (file size + KV cache) fits ``max_loaded_bytes``; a model with a running
  stream is never unloaded (the load waits for one to finish).
* **Failures.** A failed load is the request's ``ModelLoadError``; the daemon stays up
  and the next load is tried after a back-off (``load_retry_s``, doubling per failure
  up to :data:`MAX_LOAD_RETRY_S`). A request for a model being unloaded waits, then
  loads it again.
* **Groups.** A name from ``[groups]`` is served by a :class:`~inferd.router.Router`
  over its models: priority order, failover before the first event, breakers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from inferd.backend import Backend
from inferd.errors import InvalidRequest, ModelLoadError, NotReady
from inferd.limits import echo
from inferd.serve.config import BackendSpec, Config, ConfigError, ModelSpec, build_backend
from inferd.serve.model_memory import estimate, kv_cache_bytes, release_freed_memory
from inferd.serve.models_view import (
    format_ps,
    openai_model_list,
    pool_view,
    read_admin_status,
    served_names,
)
from inferd.types import Capabilities, EmbedRequest, EmbedResult, Event, Request

__all__ = [
    "DEFAULT_KEEP_ALIVE_S",
    "ModelNotFound",
    "ModelPool",
    "build_model",
    "estimate",
    "format_ps",
    "kv_cache_bytes",
    "openai_model_list",
    "pool_view",
    "read_admin_status",
    "served_names",
]

log = logging.getLogger("inferd.serve.models")

#: Seconds an idle model stays loaded when neither its config nor the request says.
DEFAULT_KEEP_ALIVE_S = 300.0
#: Seconds after a failed load before the next request may try again (doubles per
#: consecutive failure, up to MAX_LOAD_RETRY_S).
DEFAULT_LOAD_RETRY_S = 10.0
MAX_LOAD_RETRY_S = 300.0
#: Longest the idle reaper sleeps between checks (it also wakes on every change).
REAP_MAX_SLEEP_S = 1.0

State = Literal["unloaded", "loading", "loaded", "unloading", "failed"]


class ModelNotFound(InvalidRequest):
    """The request names a model the daemon does not serve (HTTP 404 on the bridge)."""


@dataclasses.dataclass(eq=False)
class _Model:
    """One configured model and where it stands."""

    spec: ModelSpec
    keep_alive: float
    state: State = "unloaded"
    backend: Backend | None = None
    task: asyncio.Task[None] | None = None
    streams: int = 0
    last_used: float = 0.0
    bytes: int = 0
    progress: float = 0.0
    loads: int = 0
    unloads: int = 0
    failures: int = 0
    error: str | None = None
    retry_at: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name


class ModelPool(Backend):
    """Serve named models, each loaded on demand; see the module docstring.

    ``build(spec, progress)`` makes a model's backend in a worker thread (default:
    resolve ``source`` with :func:`inferd.models.resolve`, then
    :func:`inferd.serve.config.build_backend`); ``estimate(spec)`` gives
    ``(path or None, bytes)`` before the load, for the budget.
    """

    name = "models"

    def __init__(
        self,
        specs: list[ModelSpec],
        *,
        groups: dict[str, list[str]] | None = None,
        default: str | None = None,
        keep_alive: float | None = None,
        max_loaded_bytes: int | None = None,
        load_retry_s: float = DEFAULT_LOAD_RETRY_S,
        router: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not specs:
            raise ValueError("ModelPool needs at least one model")
        ka = DEFAULT_KEEP_ALIVE_S if keep_alive is None else keep_alive
        self._models: dict[str, _Model] = {}
        for spec in specs:
            if spec.name in self._models:
                raise ConfigError(f"model name {spec.name!r} is configured twice")
            keep = ka if spec.keep_alive is None else spec.keep_alive
            self._models[spec.name] = _Model(spec, keep)
        self.max_loaded_bytes = max_loaded_bytes
        self.load_retry_s = load_retry_s
        self.default = default or specs[0].name
        self._clock = clock
        self._groups = self._make_groups(groups or {}, router or {})
        self._load_lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_config(cls, cfg: Config) -> ModelPool:
        """The pool of a config with ``[[model]]`` tables (``[pool]``, ``[groups]``)."""
        p = cfg.pool
        return cls(
            cfg.models,
            groups=cfg.groups,
            default=p.get("default"),
            keep_alive=p.get("keep_alive"),
            max_loaded_bytes=p.get("max_loaded_bytes"),
            load_retry_s=float(p.get("load_retry_s", DEFAULT_LOAD_RETRY_S)),
            router=cfg.router,
        )

    def _make_groups(self, groups: dict[str, list[str]], router: dict[str, Any]) -> dict[str, Any]:
        from inferd.router import Router

        out = {}
        for gname, members in groups.items():
            if gname in self._models:
                raise ConfigError(f"group {gname!r} has the name of a model")
            out[gname] = Router(
                [_Member(self, self._models[m]) for m in members], name=gname, **router
            )
        return out

    # ------------------------------------------------------------------ Backend

    def ready(self) -> bool:
        return not self._closed

    def capabilities(self) -> Capabilities:
        """The union over loaded models; a model not loaded yet promises tools only."""
        caps = [m.backend.capabilities() for m in self._models.values() if m.backend]
        caps.append(Capabilities(tools=True))
        return Capabilities(
            tools=any(c.tools for c in caps),
            vision=any(c.vision for c in caps),
            audio=any(c.audio for c in caps),
            thinking=any(c.thinking for c in caps),
            embed=any(c.embed for c in caps),
            accelerator=next((c.accelerator for c in caps if c.accelerator), None),
        )

    def names(self) -> list[str]:
        """Every name a request may use: models, then groups."""
        return [*self._models, *self._groups]

    def _pick(self, name: str | None) -> _Model | Any:
        target = name or self.default
        found = self._models.get(target) or self._groups.get(target)
        if found is None:
            raise ModelNotFound(
                f"model {echo(target)} is not served here; choose one of {self.names()}"
            )
        return found

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        if self._closed:
            raise NotReady("the model pool is closed")
        target = self._pick(request.model)
        stream = (
            self.serve(target, request) if isinstance(target, _Model) else target.generate(request)
        )
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()  # type: ignore[union-attr]  # both are async generators

    async def serve(self, m: _Model, request: Request) -> AsyncIterator[Event]:
        """One stream on model ``m``: acquire (load if needed), relay, release."""
        backend = await self._acquire(m, request.keep_alive)
        try:
            # the backend serves its own model: the pool's name means nothing to it
            stream = backend.generate(dataclasses.replace(request, model=None, keep_alive=None))
            try:
                async for event in stream:  # type: ignore[attr-defined]
                    yield event
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
        finally:
            self._release(m)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embeddings come from the default model (an ``EmbedRequest`` names none)."""
        target = self._pick(None)
        if not isinstance(target, _Model):
            return await target.embed(request)  # type: ignore[no-any-return]
        backend = await self._acquire(target, None)
        try:
            return await backend.embed(request)
        finally:
            self._release(target)

    async def aclose(self) -> None:
        """Stop the reaper, let loads finish, close every loaded model. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for m in self._models.values():
            if m.task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(m.task)
            if m.backend is not None:
                with contextlib.suppress(Exception):
                    await m.backend.aclose()
                m.backend, m.state = None, "unloaded"

    # ------------------------------------------------------------------ acquire / release

    def _loop_state(self) -> tuple[asyncio.Lock, asyncio.Event]:
        """Loop-bound objects, made on first use (the pool is built before the loop)."""
        if self._load_lock is None or self._changed is None:
            self._load_lock = asyncio.Lock()
            self._changed = asyncio.Event()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())
        return self._load_lock, self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _acquire(self, m: _Model, keep_alive: float | None) -> Backend:
        """The loaded backend of ``m`` with one more stream counted; loads when needed."""
        self._loop_state()
        tried = False  # one load attempt per request, even with load_retry_s = 0
        while True:
            if self._closed:
                raise NotReady("the model pool is closed")
            if m.state == "loaded" and m.backend is not None:
                m.streams += 1
                m.last_used = self._clock()
                if keep_alive is not None:
                    m.keep_alive = keep_alive
                return m.backend
            if m.task is not None:  # loading or unloading: wait for it, then look again
                tried = tried or m.state == "loading"
                with contextlib.suppress(Exception):
                    await asyncio.shield(m.task)
                continue
            if m.state == "failed" and (tried or self._clock() < m.retry_at):
                left = max(0.0, m.retry_at - self._clock())
                raise ModelLoadError(
                    f"model {m.name!r} failed to load ({m.error}); the next try is in "
                    f"{left:.1f}s (load_retry_s back-off)"
                )
            tried = True
            m.task = asyncio.create_task(self._load(m))

    def _release(self, m: _Model) -> None:
        m.streams -= 1
        m.last_used = self._clock()
        if m.streams == 0 and m.keep_alive == 0 and m.state == "loaded":
            self._unload(m, "keep_alive 0")
        self._notify()

    # ------------------------------------------------------------------ load / unload

    async def _load(self, m: _Model) -> None:
        """Resolve and estimate, make room under the budget, build: one at a time."""
        lock, _ = self._loop_state()
        m.state, m.progress, m.error = "loading", 0.0, None
        try:
            async with lock:
                path, m.bytes = await asyncio.to_thread(estimate, m.spec)
                await self._make_room(m)
                progress = self._progress_of(m)
                m.backend = await asyncio.to_thread(build_model, m.spec, path, progress)
            m.state, m.progress, m.failures = "loaded", 1.0, 0
            m.loads += 1
            m.last_used = self._clock()
            log.info("loaded model %r (~%d bytes)", m.name, m.bytes)
        except Exception as e:
            m.failures += 1
            m.state, m.bytes, m.backend = "failed", 0, None
            m.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            backoff = min(MAX_LOAD_RETRY_S, self.load_retry_s * 2 ** (m.failures - 1))
            m.retry_at = self._clock() + backoff
            log.warning("model %r failed to load: %s (retry after %.1fs)", m.name, m.error, backoff)
        finally:
            m.task = None
            self._notify()

    def _progress_of(self, m: _Model) -> Callable[[float], bool]:
        def progress(fraction: float) -> bool:  # from the loading thread: a gauge store
            m.progress = max(0.0, min(1.0, float(fraction)))
            return True

        return progress

    def _held_bytes(self) -> int:
        return sum(m.bytes for m in self._models.values() if m.state in ("loaded", "unloading"))

    async def _make_room(self, m: _Model) -> None:
        """Unload idle models, least recently used first, until ``m`` fits the budget."""
        budget = self.max_loaded_bytes
        if budget is None:
            return
        if m.bytes > budget:
            raise ModelLoadError(
                f"model {m.name!r} needs about {m.bytes} bytes (file + KV cache), more than "
                f"max_loaded_bytes={budget}; raise the budget or lower n_ctx"
            )
        while self._held_bytes() + m.bytes > budget:
            idle = [x for x in self._models.values() if x.state == "loaded" and x.streams == 0]
            assert self._changed is not None
            changed = self._changed
            if idle:
                victim = min(idle, key=lambda x: x.last_used)
                task = self._unload(victim, f"memory budget, for {m.name!r}")
                await asyncio.shield(task)
            else:  # every loaded model is streaming: wait for one to finish
                await changed.wait()

    def _unload(self, m: _Model, why: str) -> asyncio.Task[None]:
        """Start unloading ``m`` (requests for it wait on the task, then load again)."""
        backend, m.backend, m.state = m.backend, None, "unloading"
        log.info("unloading model %r (%s)", m.name, why)

        async def close() -> None:
            try:
                if backend is not None:
                    await backend.aclose()
                    await asyncio.to_thread(release_freed_memory)
            except Exception as e:  # the model is gone either way; nobody awaits this
                log.warning("closing model %r failed: %s", m.name, type(e).__name__)
            finally:
                m.state, m.bytes, m.progress = "unloaded", 0, 0.0
                m.unloads += 1
                m.task = None
                self._notify()

        m.task = asyncio.create_task(close())
        return m.task

    async def _reap(self) -> None:
        """Unload models idle past their keep_alive; sleeps until the next expiry."""
        while not self._closed:
            now = self._clock()
            wake = REAP_MAX_SLEEP_S
            for m in self._models.values():
                if m.state != "loaded" or m.streams or m.keep_alive < 0:
                    continue
                left = m.last_used + m.keep_alive - now
                if left <= 0:
                    self._unload(m, f"idle for keep_alive={m.keep_alive:g}s")
                else:
                    wake = min(wake, left)
            changed = self._changed
            assert changed is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wake)

    # ------------------------------------------------------------------ status

    def pool_status(self) -> dict[str, Any]:
        """For the admin socket, ``inferd ps`` and ``/v1/models``."""
        now = self._clock()
        return {
            "default": self.default,
            "max_loaded_bytes": self.max_loaded_bytes,
            "loaded_bytes": self._held_bytes(),
            "groups": {g: [b.name for b in r.backends] for g, r in self._groups.items()},
            "models": [_model_status(m, now) for m in self._models.values()],
        }

    def load_count(self, name: str) -> int:
        return self._models[name].loads


def _model_status(m: _Model, now: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": m.name,
        "type": m.spec.backend.type,
        "state": m.state,
        "streams": m.streams,
        "bytes": m.bytes,
        "keep_alive_s": m.keep_alive,
        "loads": m.loads,
        "unloads": m.unloads,
        "load_failures": m.failures,
    }
    if m.spec.source is not None:
        out["source"] = m.spec.source
    if m.state == "loading":
        out["progress"] = round(m.progress, 3)
    if m.state == "loaded":
        idle = 0.0 if m.streams else now - m.last_used
        out["idle_s"] = round(idle, 3)
        if not m.streams and m.keep_alive >= 0:
            out["expires_in_s"] = round(max(0.0, m.keep_alive - idle), 3)
    if m.state == "failed":
        out["error"] = m.error
        out["retry_in_s"] = round(max(0.0, m.retry_at - now), 3)
    return out


class _Member(Backend):
    """One model of a group, as the group's Router sees it."""

    def __init__(self, pool: ModelPool, m: _Model) -> None:
        self._pool = pool
        self._m = m
        self.name = m.name

    def ready(self) -> bool:
        m = self._m
        return not (m.state == "failed" and self._pool._clock() < m.retry_at)

    def capabilities(self) -> Capabilities:
        """A loaded model's own; before its first load, promise everything (the model
        refuses what it lacks when asked)."""
        if self._m.backend is not None:
            return self._m.backend.capabilities()
        return Capabilities(tools=True, vision=True, audio=True, thinking=True)

    def generate(self, request: Request) -> AsyncIterator[Event]:
        return self._pool.serve(self._m, request)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        backend = await self._pool._acquire(self._m, None)
        try:
            return await backend.embed(request)
        finally:
            self._pool._release(self._m)


# --------------------------------------------------------------------------- building


def build_model(
    spec: ModelSpec, path: Path | None, progress: Callable[[float], Any] | None = None
) -> Backend:
    """Build one model's backend (blocking): the config's options, named after the model."""
    opts = dict(spec.backend.options)
    opts.setdefault("name", spec.name)
    if path is not None:
        opts["model"] = str(path)
    built = BackendSpec(spec.backend.type, opts, spec.backend.api_key_env)
    try:
        return build_backend(built, None, progress)
    except ConfigError as e:
        raise ModelLoadError(f"model {spec.name!r}: {e}") from None
