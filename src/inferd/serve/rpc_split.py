"""``RpcSplit``: a model split over ggml RPC workers, held by a supervised child process.

Why a child: ggml-rpc's client aborts the process (``GGML_ABORT``) when a worker's
socket breaks, and nothing in ggml can catch it. So the libllama model that talks to
the workers lives in a child process, a private ``inferd serve`` daemon on a Unix
socket in a 0700 temporary directory, and this backend talks to it through
:class:`~inferd.serve.client.Client` (docs/adr/0019-rpc-backend.md):

* at load every worker is probed first (version, devices; a ``ModelLoadError`` names
  an unreachable or mismatched one), then the child loads the split;
* a worker killed mid-stream aborts the child: its socket closes, the stream ends with
  ``BackendUnavailable`` (never a hang, never a crash of this process);
* the next request finds the child gone and loads it again (workers probed again): a
  restarted worker is reconnected then; while one is still down the request fails
  before its first event with ``BackendUnavailable``, so a Router fails over;
* the child dies with this process (it watches a pipe from us) and is stopped by
  :meth:`aclose`/:meth:`close` (SIGTERM, then SIGKILL after :data:`CHILD_STOP_GRACE_S`).

``LlamaCpp(model, rpc_servers=[...])`` returns one of these; ``rpc_in_process=True``
loads in the calling process instead (benchmarks; a dead worker then aborts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

from inferd.backend import Backend
from inferd.backends.llamacpp.options import LlamaCppOptions
from inferd.backends.llamacpp.rpc_probe import probe_all
from inferd.errors import BackendUnavailable, InvalidRequest, ModelLoadError, NotReady
from inferd.types import (
    Capabilities,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    RerankRequest,
    RerankResult,
)

#: Seconds the child may take to load the split (every worker receives its weights).
DEFAULT_CHILD_LOAD_TIMEOUT_S = 600.0
#: Seconds the child gets to exit after SIGTERM before SIGKILL.
CHILD_STOP_GRACE_S = 5.0
#: Bytes of the child's stderr quoted in an error (ggml's abort message is in it).
STDERR_TAIL_BYTES = 1500
_POLL_S = 0.05
#: Settings that cannot cross into the child (callables) or are decided here.
_NOT_SENT = ("progress", "output_parser", "pull_progress", "rpc_in_process", "rpc_read_timeout_s")


class RpcSplit(Backend):
    """A split model in a supervised child (see the module docstring)."""

    name = "llamacpp"

    def __init__(
        self,
        model: str | os.PathLike[str],
        options: LlamaCppOptions,
        *,
        load_timeout_s: float = DEFAULT_CHILD_LOAD_TIMEOUT_S,
    ) -> None:
        if options.output_parser is not None:
            raise InvalidRequest(
                "output_parser cannot be used with rpc_servers: the model runs in a child "
                "process (set tool_format instead, or rpc_in_process=True)"
            )
        from inferd.backends.llamacpp.backend import LlamaCpp

        self.options = options
        if options.name:
            self.name = options.name
        self.load_timeout_s = load_timeout_s
        self.model_path = LlamaCpp._resolve(model, options)
        self._dir = Path(tempfile.mkdtemp(prefix="inferd-rpc-"))
        self._child: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._client: Any = None
        self._caps = Capabilities()
        self._closed = False
        self._restart_lock: asyncio.Lock | None = None
        self._spawn_lock = threading.Lock()
        self.restarts = 0
        try:
            self._spawn()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ child

    @property
    def socket_path(self) -> Path:
        return self._dir / "split.sock"

    @property
    def child_pid(self) -> int | None:
        """The child's pid while it runs (tests watch it)."""
        c = self._child
        return c.pid if c is not None and c.poll() is None else None

    def _child_args(self) -> list[str]:
        opts = {
            f.name: getattr(self.options, f.name)
            for f in dataclasses.fields(self.options)
            if f.name not in _NOT_SENT
        }
        return [
            sys.executable,
            "-m",
            "inferd.serve.rpc_split",
            str(self.model_path),
            str(self.socket_path),
            str(self._dir / "caps.json"),
            json.dumps(opts),
        ]

    def _spawn(self) -> None:
        """Probe the workers, start the child, wait until it serves (blocking)."""
        with self._spawn_lock:
            probe_all(self.options.rpc_servers)
            self._stop_child()
            for name in ("caps.json", "split.sock"):
                (self._dir / name).unlink(missing_ok=True)
            self._stderr = open(self._dir / "stderr.log", "w+b")
            self._child = subprocess.Popen(
                self._child_args(),
                stdin=subprocess.PIPE,  # the child exits when this pipe closes (we died)
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
            )
            self._wait_serving()
            from inferd.serve.client import Client

            self._client = Client(self.socket_path)

    def _wait_serving(self) -> None:
        caps_file = self._dir / "caps.json"
        deadline = time.monotonic() + self.load_timeout_s
        assert self._child is not None
        while not (caps_file.exists() and self.socket_path.exists()):
            if self._child.poll() is not None:
                raise ModelLoadError(
                    f"the RPC split over {', '.join(self.options.rpc_servers)} failed to "
                    f"load: {self.child_error()}"
                )
            if time.monotonic() > deadline:
                self._stop_child()
                raise ModelLoadError(
                    f"the RPC split did not load within {self.load_timeout_s:g}s (load_timeout_s)"
                )
            time.sleep(_POLL_S)
        caps = Capabilities.from_dict(json.loads(caps_file.read_text()))
        self._caps = caps

    def child_error(self) -> str:
        """The end of the child's stderr (ggml's abort reason), one line."""
        if self._stderr is None:
            return "no output"
        self._stderr.flush()
        with open(self._stderr.name, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - STDERR_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        useful = [ln for ln in lines if "error" in ln.lower() or "abort" in ln.lower()]
        return "; ".join((useful or lines)[-3:]) or "no output"

    def _alive(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if child is None:
            return
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(CHILD_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if child.stdin is not None:
            child.stdin.close()

    async def _ensure(self) -> Any:
        """The Client of a live child, loading the split again if the child died."""
        if self._closed:
            raise NotReady(f"backend {self.name!r} is closed")
        if self._restart_lock is None:
            self._restart_lock = asyncio.Lock()
        async with self._restart_lock:
            if not self._alive():
                old, self._client = self._client, None
                if old is not None:
                    await old.aclose()
                try:
                    await asyncio.to_thread(self._spawn)
                except ModelLoadError as e:
                    raise BackendUnavailable(f"cannot reload the RPC split: {e.message}") from None
                self.restarts += 1
        return self._client

    # ------------------------------------------------------------------ Backend

    def ready(self) -> bool:
        """Open: a dead child is loaded again by the next request."""
        return not self._closed

    def capabilities(self) -> Capabilities:
        return self._caps

    async def generate(self, request: Request) -> AsyncIterator[Event]:  # type: ignore[override]
        client = await self._ensure()
        stream = client.generate(request)
        try:
            while True:
                try:
                    event = await self._next(stream)
                except StopAsyncIteration:
                    return
                yield event
        finally:
            await stream.aclose()

    async def _next(self, stream: AsyncIterator[Event]) -> Event:
        """The child's next event; a child that died (a worker was lost) or that stays
        silent for ``rpc_read_timeout_s`` (a worker host vanished) ends the stream with
        ``BackendUnavailable``, and the next request loads the split again."""
        timeout_s = self.options.rpc_read_timeout_s
        workers = ", ".join(self.options.rpc_servers)
        try:
            async with asyncio.timeout(timeout_s):
                return await anext(stream)
        except TimeoutError:
            await asyncio.to_thread(self._stop_child)
            raise BackendUnavailable(
                f"no reply from the RPC split for {timeout_s:g}s (rpc_read_timeout_s): a "
                f"worker of {workers} may be unreachable"
            ) from None
        except BackendUnavailable:
            if self._child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(self._child.wait, CHILD_STOP_GRACE_S)
            if not self._alive():
                raise BackendUnavailable(
                    f"the RPC split lost a worker ({workers}): {self.child_error()}"
                ) from None
            raise

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        return await (await self._ensure()).embed(request)  # type: ignore[no-any-return]

    async def rerank(self, request: RerankRequest) -> RerankResult:
        return await (await self._ensure()).rerank(request)  # type: ignore[no-any-return]

    async def tokenize(
        self,
        content: str | list[str | int],
        *,
        add_special: bool = False,
        parse_special: bool = True,
    ) -> list[int]:
        client = await self._ensure()
        return await client.tokenize(  # type: ignore[no-any-return]
            content, add_special=add_special, parse_special=parse_special
        )

    async def detokenize(self, tokens: list[int]) -> str:
        return await (await self._ensure()).detokenize(tokens)  # type: ignore[no-any-return]

    async def apply_template(self, request: Request) -> str:
        return await (await self._ensure()).apply_template(request)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the child and remove its directory. Safe to call twice."""
        self._closed = True
        self._stop_child()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        return (
            f"<RpcSplit name={self.name!r} rpc_servers={list(self.options.rpc_servers)} "
            f"alive={self._alive()}>"
        )


# --------------------------------------------------------------------------- the child


def _die_with_parent() -> None:
    """Exit when the parent's end of stdin closes (the parent died or stopped us)."""
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    os._exit(0)


def child_main(argv: Sequence[str]) -> int:
    """Load the split in this process and serve it on a private daemon socket."""
    model, socket_path, caps_file, opts_json = argv
    threading.Thread(target=_die_with_parent, daemon=True).start()
    from inferd.backends.llamacpp.backend import LlamaCpp
    from inferd.serve.daemon import Daemon

    opts = json.loads(opts_json)
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
    backend = LlamaCpp(model, rpc_in_process=True, **opts)
    tmp = Path(caps_file + ".tmp")
    tmp.write_text(json.dumps(backend.capabilities().to_dict()))
    tmp.rename(caps_file)
    return asyncio.run(Daemon(backend, socket_path).run())


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
