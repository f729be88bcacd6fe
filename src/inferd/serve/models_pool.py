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
from inferd.types import Capabilities, EmbedRequest, EmbedResult, Event, Request

log = logging.getLogger("inferd.serve.models")

#: Seconds an idle model stays loaded when neither its config nor the request says.
DEFAULT_KEEP_ALIVE_S = 300.0
#: Seconds after a failed load before the next request may try again (doubles per
#: consecutive failure, up to MAX_LOAD_RETRY_S).
DEFAULT_LOAD_RETRY_S = 10.0
MAX_LOAD_RETRY_S = 300.0
#: Longest the idle reaper sleeps between checks (it also wakes on every change).
REAP_MAX_SLEEP_S = 1.0
#: Bytes per KV cache element in the estimate (llama.cpp's default f16 cache).
KV_BYTES_PER_ELEMENT = 2

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


# --------------------------------------------------------------------------- views

#: Largest admin status line read back (``inferd ps``, the bridge's ``/v1/models``).
MAX_ADMIN_REPLY_BYTES = 8 * 1024 * 1024
#: Seconds to wait for the daemon's admin socket to answer.
ADMIN_TIMEOUT_S = 5.0


async def read_admin_status(admin: Path, timeout_s: float = ADMIN_TIMEOUT_S) -> dict[str, Any]:
    """One status line from a daemon's admin socket (``OSError`` when nobody answers)."""
    import orjson

    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_unix_connection(admin, limit=MAX_ADMIN_REPLY_BYTES)
        try:
            writer.write(b'{"type":"status"}\n')
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
    if not line:
        raise ConnectionError(f"the daemon at {admin} closed the admin socket without a reply")
    status = orjson.loads(line)
    if not isinstance(status, dict):
        raise ConnectionError(f"the daemon at {admin} sent a malformed status")
    return status


async def pool_view(backend: Backend) -> dict[str, Any] | None:
    """``{"pool": ...}`` of an in-process pool or of the daemon behind a ``Client``;
    ``{}`` when no pool serves (one fixed backend list); ``None`` when unknown (the
    daemon does not answer)."""
    status = getattr(backend, "pool_status", None)
    if callable(status):
        return {"pool": status()}
    sock = getattr(backend, "socket_path", None)
    if sock is None:
        return {}
    from inferd.serve.config import admin_socket_path

    try:
        got = await read_admin_status(admin_socket_path(Path(sock)))
    except (OSError, TimeoutError, ValueError):
        return None
    pool = got.get("pool")
    return {"pool": pool} if isinstance(pool, dict) else {}


def served_names(pool: dict[str, Any]) -> list[str]:
    """Names a request may use, from a :meth:`ModelPool.pool_status` dict."""
    return [*(m["name"] for m in pool.get("models", ())), *pool.get("groups", {})]


def openai_model_list(pool: dict[str, Any], created: int) -> list[dict[str, Any]]:
    """``/v1/models`` entries: every model with its state, then the groups."""
    out = [
        {
            "id": m["name"],
            "object": "model",
            "created": created,
            "owned_by": "inferd",
            "state": m["state"],
        }
        for m in pool.get("models", ())
    ]
    for name, members in pool.get("groups", {}).items():
        out.append(
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "inferd",
                "state": "group",
                "models": members,
            }
        )
    return out


def format_ps(status: dict[str, Any]) -> str:
    """``inferd ps``: one line per model (name, state, memory, streams, idle), or the
    fixed backends of a daemon without ``[[model]]`` tables."""
    pool = status.get("pool")
    if not isinstance(pool, dict):
        names = ", ".join(str(b.get("name")) for b in status.get("backends") or ())
        return f"no model pool (fixed backends: {names or '-'}; status {status.get('status')})"
    lines = [f"{'NAME':24} {'STATE':10} {'MEMORY':>10} {'STREAMS':>7} {'IDLE':>8} UNTIL"]
    for m in pool.get("models", ()):
        idle = f"{m['idle_s']:.0f}s" if "idle_s" in m else "-"
        if m.get("state") == "loading":
            until = f"loading {100 * m.get('progress', 0):.0f}%"
        elif "expires_in_s" in m:
            until = f"unload in {m['expires_in_s']:.0f}s"
        elif "retry_in_s" in m:
            until = f"failed, retry in {m['retry_in_s']:.0f}s"
        else:
            until = "-"
        mem = f"{m.get('bytes', 0) / 1e6:.1f} MB"
        lines.append(
            f"{m['name']:24} {m['state']:10} {mem:>10} {m.get('streams', 0):>7} {idle:>8} {until}"
        )
    budget = pool.get("max_loaded_bytes")
    limit = f" of {budget / 1e6:.1f} MB" if budget else ""
    lines.append(f"loaded: {pool.get('loaded_bytes', 0) / 1e6:.1f} MB{limit}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- building


def release_freed_memory() -> None:
    """Give memory freed by an unload back to the OS (glibc's ``malloc_trim``).

    glibc raises its mmap threshold each time a large mapped block is freed, so the KV
    cache of a model loaded a second time comes from the heap and stays in the process
    after ``free`` (measured: +66 MB per SmolLM2 pair on the second load/unload cycle);
    trimming returns it, so idle memory goes back to its level before the load. A no-op
    where libc has no ``malloc_trim`` (macOS, musl).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def estimate(spec: ModelSpec) -> tuple[Path | None, int]:
    """Resolve ``spec.source`` (a store name, a path, ``hf://``) and estimate its memory.

    Runs in a worker thread (a store name may be pulled). The estimate is the file size
    plus the KV cache at the configured ``n_ctx`` from the GGUF header; ``memory_bytes``
    in the config replaces it.
    """
    path: Path | None = None
    if spec.source is not None:
        from inferd import models

        try:
            path = models.resolve(spec.source)
        except ModelLoadError as e:
            raise ModelLoadError(f"model {spec.name!r}: {e.message}") from None
    if spec.memory_bytes is not None:
        return path, spec.memory_bytes
    if path is None:
        return None, 0
    n_ctx = int(spec.backend.options.get("n_ctx", 4096))
    return path, path.stat().st_size + kv_cache_bytes(path, n_ctx)


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


def kv_cache_bytes(path: Path, n_ctx: int) -> int:
    """KV cache bytes at ``n_ctx`` from the GGUF metadata (0 when the header lacks it)."""
    try:
        meta = _metadata_ints(path)
    except (ModelLoadError, OSError):
        return 0
    arch = meta.get("__arch__")
    layers = meta.get(f"{arch}.block_count", 0)
    heads = meta.get(f"{arch}.attention.head_count", 0)
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    embd = meta.get(f"{arch}.embedding_length", 0)
    if not (layers and heads and embd):
        return 0
    head_dim_k = meta.get(f"{arch}.attention.key_length", embd // heads)
    head_dim_v = meta.get(f"{arch}.attention.value_length", embd // heads)
    per_token = layers * kv_heads * (head_dim_k + head_dim_v) * KV_BYTES_PER_ELEMENT
    return int(n_ctx * per_token)


#: GGUF metadata types read as integers for the estimate (u8 .. i64) and their format.
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


def _metadata_ints(path: Path) -> dict[str, Any]:
    """Integer metadata and ``__arch__`` from the header, with :mod:`inferd.gguf`'s
    bounds-checked reader (a corrupt header is a ``ModelLoadError``, caught above)."""
    import mmap
    import struct

    from inferd import gguf

    out: dict[str, Any] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        r = gguf._Reader(mm, str(path))
        if r.size < 24 or bytes(mm[:4]) != gguf.GGUF_MAGIC:
            return out
        r.pos = 8
        r.u64("the tensor count")
        for i in range(r.u64("the metadata count")):
            key = r.string(f"metadata key #{i}", keep=True) or ""
            vtype = r.u32(f"the type of {key!r}")
            fmt = _INT_FORMATS.get(vtype)
            if fmt is not None:
                r.need(struct.calcsize(fmt), key)
                (out[key],) = struct.unpack_from(fmt, mm, r.pos)
                r.pos += struct.calcsize(fmt)
            elif key == "general.architecture" and vtype == gguf._STRING:
                out["__arch__"] = r.string(key, keep=True)
            else:
                gguf._skip_value(r, vtype, key)
    return out
