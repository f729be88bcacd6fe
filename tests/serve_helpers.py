"""Helpers for tests that run the daemon and the bridge as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

SRC = Path(__file__).resolve().parents[1] / "src"
#: Seconds a subprocess may take to come up before the test fails: generous, because a
#: busy 2-core box starting six daemons at once took over 20 s (a start, not a hang).
START_TIMEOUT_S = 90.0


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test's environment with this checkout's ``src`` first on the path."""
    old = os.environ.get("PYTHONPATH")
    path = str(SRC) if not old else f"{SRC}{os.pathsep}{old}"
    return {**os.environ, "PYTHONPATH": path, **extra}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return orjson.dumps(v).decode()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def write_config(
    path: Path,
    backends: list[Mapping[str, Any]],
    daemon: Mapping[str, Any] | None = None,
    router: Mapping[str, Any] | None = None,
) -> Path:
    lines: list[str] = []
    for section, table in (("daemon", daemon), ("router", router)):
        if table:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for b in backends:
        lines.append("[[backend]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in b.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths are limited to ~107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="ifd-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _admin_ready(admin: Path) -> dict[str, Any] | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(admin))
        s.sendall(b'{"type":"status"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                return None
            buf += chunk
        status = orjson.loads(buf)
        return status if status.get("status") == "ready" else None
    except OSError:
        return None
    finally:
        s.close()


class DaemonProc:
    """``python -m inferd.serve.daemon`` with a config, its socket in a short dir."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.admin = sock.with_name("admin.sock")

    @classmethod
    def start(cls, config: Path, sock: Path, *args: str, wait: bool = True) -> DaemonProc:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "inferd.serve.daemon",
                "--config",
                str(config),
                "--socket",
                str(sock),
                *args,
            ],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        d = cls(proc, sock)
        if wait:
            d.wait_ready()
        return d

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited early: {self.proc.stderr.read().decode()}")
            status = _admin_ready(self.admin)
            if status is not None:
                return status
            time.sleep(0.05)
        raise TimeoutError("daemon did not become ready")

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.terminate()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class RawConn:
    """A raw NDJSON connection to the daemon for protocol-level tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: Path) -> RawConn:
        r, w = await asyncio.open_unix_connection(sock, limit=256 * 1024 * 1024)
        return cls(r, w)

    async def send(self, frame: Mapping[str, Any] | bytes) -> None:
        data = frame if isinstance(frame, bytes) else orjson.dumps(frame) + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise EOFError("daemon closed the connection")
        return orjson.loads(line)  # type: ignore[no-any-return]

    async def until_terminal(self, ids: set[Any], timeout: float = 20.0) -> dict[Any, list]:
        """Read until every id in ``ids`` has its done/error frame; frames by id."""
        out: dict[Any, list] = {i: [] for i in ids}
        left = set(ids)
        while left:
            f = await self.recv(timeout)
            out.setdefault(f.get("id"), []).append(f)
            if f["type"] in ("done", "error", "embedding"):
                left.discard(f.get("id"))
        return out

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def gen_frame(rid: Any, prompt: str = "hi", **kw: Any) -> dict[str, Any]:
    from inferd.types import Request

    return {"type": "generate", "id": rid, **Request.chat(prompt, **kw).to_dict()}


class BridgeProc:
    """``python -m inferd.serve.bridge --port 0 ...``; the URL is read from its first line."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc = proc
        self.url = url

    @classmethod
    def start(
        cls, *args: str, env: Mapping[str, str] | None = None, wait: bool = True
    ) -> BridgeProc:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inferd.serve.bridge", "--port", "0", *args],
            env=subprocess_env(**(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        bridge = cls(proc, "")
        if wait:
            bridge.wait_url()
        return bridge

    def wait_url(self) -> str:
        """Read the 'listening on URL' line (bridges may start in parallel, then wait)."""
        import selectors

        proc = self.proc
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(START_TIMEOUT_S)
        sel.close()
        line = proc.stdout.readline().decode() if ready else ""
        if "listening on " not in line:
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"bridge did not start: {line!r} {err}")
        self.url = line.split("listening on ", 1)[1].strip()
        return self.url

    def stop(self) -> int | None:
        rc = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return rc


@contextlib.asynccontextmanager
async def bridge_in_process(backend: Any, **kw: Any) -> AsyncIterator[tuple[str, Any, Any]]:
    """The bridge app over ``backend`` on 127.0.0.1 (any free port), run as ``inferd
    bridge`` runs it (``BridgeRunner``): yields ``(url, app, runner)``."""
    from aiohttp import web

    from inferd.serve.bridge import BridgeRunner, make_app

    app = make_app(backend, **kw)
    runner = BridgeRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}", app, runner
    finally:
        await runner.cleanup()


async def raw_http(
    url: str, data: bytes, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to an HTTP server and read its whole answer (it must close or send
    a Content-Length): ``(status, headers lower-cased, body)``."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await asyncio.wait_for(
                reader.readexactly(int(headers["content-length"])), timeout
            )
        else:
            body = await asyncio.wait_for(reader.read(), timeout)
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
