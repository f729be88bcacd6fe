"""The daemon as a real subprocess: protocol, admission, cancel, drain, socket ownership."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferd.errors import BackendUnavailable, InvalidRequest, NotReady, QueueFull
from inferd.serve import wire
from inferd.serve.admission import (
    DEFAULT_FRAME_TIMEOUT_S,
    DEFAULT_MAX_BUFFERED_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_PER_CONNECTION,
    DEFAULT_WRITE_STALL_TIMEOUT_S,
    Admission,
    Limits,
)
from inferd.serve.client import Client, admin_status
from inferd.serve.config import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED
from inferd.types import Done, EmbedRequest, Request, Text

from .serve_helpers import (
    DaemonProc,
    RawConn,
    gen_frame,
    short_tmpdir,
    subprocess_env,
    write_config,
)

TOKENS = [f"t{i} " for i in range(50)]  # 50 x 10 ms: long enough to cancel mid-way


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    with short_tmpdir() as d:
        cfg = write_config(
            d / "c.toml",
            [
                {"type": "mock", "name": "m1", "tokens": TOKENS, "delay": 0.01},
            ],
        )
        proc = DaemonProc.start(cfg, d / "run" / "infer.sock")
        yield proc
        proc.stop()


async def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_defaults_are_named() -> None:
    assert (DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUED) == (16, 64)
    assert DEFAULT_MAX_QUEUED_PER_CONNECTION == 32 and DEFAULT_MAX_CONNECTIONS == 512
    assert DEFAULT_MAX_BUFFERED_BYTES == 256 * 1024 * 1024
    assert (DEFAULT_FRAME_TIMEOUT_S, DEFAULT_WRITE_STALL_TIMEOUT_S) == (30.0, 60.0)
    lim = Limits()
    assert (lim.max_frame_bytes, lim.max_reply_bytes) == (wire.MAX_FRAME_BYTES,) * 2
    assert lim.max_frame_elements == wire.MAX_FRAME_ELEMENTS == 250_000
    with pytest.raises(ValueError, match="max_connections"):
        Limits(max_connections=0)
    with pytest.raises(ValueError, match="write_stall_timeout_s"):
        Limits(write_stall_timeout_s=-1)
    with pytest.raises(ValueError, match="max_reply_bytes must be an integer >= 4096"):
        Limits(max_reply_bytes=100)  # an error frame must always fit in a reply


async def test_admission_is_fifo_with_a_per_connection_share() -> None:
    adm = Admission(Limits(max_concurrent=1, max_queued=3, max_queued_per_connection=2))
    a, b = object(), object()
    first = adm.admit(a)
    assert first.state == "running" and first.granted.done()
    queued = [adm.admit(a), adm.admit(a)]
    with pytest.raises(QueueFull, match="max_queued_per_connection"):
        adm.admit(a)
    other = adm.admit(b)
    with pytest.raises(QueueFull, match="max_concurrent, max_queued"):
        adm.admit(b)
    adm.finish(queued[0])  # left while waiting: its place is freed, nobody is granted
    assert adm.status()["queued"] == 2 and adm.running == 1
    adm.finish(first)
    assert queued[1].state == "running" and other.state == "queued"
    adm.finish(queued[1])
    await adm.wait(other)
    assert other.state == "running" and adm.queued == 0
    adm.finish(other)
    adm.finish(other)  # idempotent
    assert adm.running == 0
    adm.draining = True
    with pytest.raises(BackendUnavailable, match="draining"):
        adm.admit(a)


async def test_admin_status_and_socket_permissions(daemon: DaemonProc) -> None:
    st = await admin_status(daemon.sock)
    assert st["status"] == "ready"
    assert st["capabilities"]["tools"] is True
    assert st["accelerator"]["kind"] == "cpu"
    assert st["queue"]["max_concurrent"] == DEFAULT_MAX_CONCURRENT
    assert {"requests", "tokens", "errors", "ttft_s", "tokens_per_s"} <= set(st["counters"])
    assert st["backends"][0]["name"] == "m1"
    assert stat.S_IMODE(daemon.sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.admin.stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.sock.parent.stat().st_mode) == 0o700


async def test_multiplexed_requests_on_one_connection(daemon: DaemonProc) -> None:
    conn = await RawConn.open(daemon.sock)
    ids = {f"r{i}" for i in range(8)} | {1, 2}
    for i, rid in enumerate(sorted(ids, key=str)):
        await conn.send(gen_frame(rid, max_tokens=3 + i % 4))
    await conn.send({"type": "embed", "id": "e1", "input": ["hello", "x"]})
    got = await conn.until_terminal(ids | {"e1"})
    for i, rid in enumerate(sorted(ids, key=str)):
        frames = got[rid]
        n = 3 + i % 4
        assert [f["event"]["text"] for f in frames[:-1]] == TOKENS[:n]
        assert frames[-1]["type"] == "done" and frames[-1]["event"]["backend"] == "m1"
        assert frames[-1]["event"]["stop_reason"] == "max_tokens"
        assert frames[-1]["event"]["usage"]["output_tokens"] == n
        assert "ttft_s" in frames[-1]["event"]["timings"]
    emb = got["e1"][0]
    assert emb["type"] == "embedding" and len(emb["embeddings"]) == 2
    await conn.close()


async def test_malformed_frames_get_errors_and_the_connection_survives(
    daemon: DaemonProc,
) -> None:
    conn = await RawConn.open(daemon.sock)
    cases = [
        (b"this is not json\n", None, "not valid JSON"),
        (b"[1,2,3]\n", None, "expected a JSON object"),
        (b'{"type":"generate","id":{"a":1}}\n', None, "'id' must be"),
        (b'{"type":"generate"}\n', None, "'id' must be"),
        (b'{"type":"teleport","id":"x"}\n', "x", "unknown frame type"),
        (b'{"type":"generate","id":"y"}\n', "y", "messages"),
        (b'{"type":"generate","id":"z","messages":[],"bogus":1}\n', "z", "bogus"),
        (b'{"type":"embed","id":"w","input":[]}\n', "w", "embed input is empty"),
        (
            b'{"type":"generate","id":"t","messages":[{"role":"user","content":"hi"}],'
            b'"temperature":-1}\n',
            "t",
            "temperature",
        ),
    ]
    for raw, rid, needle in cases:
        await conn.send(raw)
        f = await conn.recv()
        assert f["type"] == "error", raw
        assert f["id"] == rid
        assert f["code"] == "invalid_request"
        assert needle in f["message"], (raw, f["message"])
    await conn.send(gen_frame("ok", max_tokens=2))
    got = await conn.until_terminal({"ok"})
    assert got["ok"][-1]["type"] == "done"
    await conn.close()


async def test_duplicate_in_flight_id_is_refused(daemon: DaemonProc) -> None:
    conn = await RawConn.open(daemon.sock)
    await conn.send(gen_frame("dup", max_tokens=20))
    await conn.send(gen_frame("dup", max_tokens=20))
    frames = []
    while not any(f["type"] == "done" for f in frames):
        frames.append(await conn.recv())
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1 and "already in flight" in errors[0]["message"]
    await conn.close()


async def test_frame_too_large_is_skipped_and_the_connection_survives(
    daemon: DaemonProc,
) -> None:
    conn = await RawConn.open(daemon.sock)
    big = b'{"type":"generate","id":"big","pad":"' + b"a" * wire.MAX_FRAME_BYTES + b'"}\n'
    await conn.send(big)
    f = await conn.recv(timeout=30)
    assert f == {"type": "error", "id": None, "code": "frame_too_large", "message": f["message"]}
    assert str(wire.MAX_FRAME_BYTES) in f["message"]
    await conn.send(gen_frame("after", max_tokens=2))
    got = await conn.until_terminal({"after"})
    assert got["after"][-1]["type"] == "done"
    await conn.close()


async def test_cancel_frame_stops_the_generation(daemon: DaemonProc) -> None:
    before = (await admin_status(daemon.sock))["counters"]["cancelled"]
    conn = await RawConn.open(daemon.sock)
    await conn.send(gen_frame("c1"))
    assert (await conn.recv())["type"] == "text"
    await conn.send({"type": "cancel", "id": "c1"})

    async def cancelled() -> bool:
        st = await admin_status(daemon.sock)
        return st["counters"]["cancelled"] > before and st["queue"]["running"] == 0

    await wait_for(cancelled)
    # the id is free again; frames of the cancelled stream may still be in the pipe
    await conn.send(gen_frame("c1", max_tokens=1))
    while True:
        f = await conn.recv()
        if f["type"] in ("done", "error"):
            break
    assert f["type"] == "done"
    await conn.close()


async def test_client_disconnect_cancels_its_generations(daemon: DaemonProc) -> None:
    before = (await admin_status(daemon.sock))["counters"]["cancelled"]
    conn = await RawConn.open(daemon.sock)
    for rid in ("d1", "d2", "d3"):
        await conn.send(gen_frame(rid))
    assert (await conn.recv())["type"] == "text"
    await conn.close()

    async def all_cancelled() -> bool:
        st = await admin_status(daemon.sock)
        return st["counters"]["cancelled"] >= before + 3 and st["queue"]["running"] == 0

    await wait_for(all_cancelled, timeout=2.0)  # well before the 0.5 s streams would end


async def test_client_backend_surface(daemon: DaemonProc) -> None:
    client = Client(daemon.sock)
    assert client.ready()  # socket present
    assert client.capabilities().embed  # blocking probe before connecting
    events = [e async for e in client.generate(Request.chat("hi", max_tokens=3))]
    assert events[:3] == [Text(t) for t in TOKENS[:3]]
    assert isinstance(events[-1], Done) and events[-1].backend == "m1"
    res = await client.embed(EmbedRequest(("a", "b")))
    assert len(res.embeddings) == 2 and res.dimensions == 8
    with pytest.raises(InvalidRequest, match="dimensions"):
        await client.embed(_bad_embed())
    # leaving early sends cancel; the connection keeps serving
    gen = client.generate(Request.chat("hi"))
    assert await gen.__anext__() == Text(TOKENS[0])
    await gen.aclose()
    assert client.active_streams == 0
    events = [e async for e in client.generate(Request.chat("hi", max_tokens=1))]
    assert isinstance(events[-1], Done)
    await client.aclose()
    assert not client.ready()


def _bad_embed() -> EmbedRequest:
    """An EmbedRequest that only the daemon rejects (built around validation)."""
    req = EmbedRequest(("a",))
    object.__setattr__(req, "dimensions", -3)
    return req


async def test_client_without_daemon_is_backend_unavailable(tmp_path: Path) -> None:
    client = Client(tmp_path / "nobody.sock")
    assert not client.ready()
    with pytest.raises(BackendUnavailable, match="is `inferd serve` running"):
        async for _ in client.generate(Request.chat("hi")):
            pass
    await client.aclose()


# --------------------------------------------------------------------------- own daemons


async def test_queue_full_when_running_and_queued_are_at_their_limits() -> None:
    with short_tmpdir() as d:
        cfg = write_config(
            d / "c.toml",
            [{"type": "mock", "tokens": ["a", "b"], "delay": 0.2}],
            daemon={"max_concurrent": 1, "max_queued": 1},
        )
        proc = DaemonProc.start(cfg, d / "infer.sock")
        try:
            conn = await RawConn.open(proc.sock)
            for rid in (1, 2, 3):
                await conn.send(gen_frame(rid))
            got = await conn.until_terminal({1, 2, 3})
            assert got[3] == [
                {"type": "error", "id": 3, "code": "queue_full", "message": got[3][0]["message"]}
            ]
            assert "max_concurrent" in got[3][0]["message"]
            assert got[1][-1]["type"] == "done" and got[2][-1]["type"] == "done"
            st = await admin_status(proc.sock)
            assert st["counters"]["queue_full"] == 1
            assert st["queue"] == {
                "running": 0,
                "queued": 0,
                "max_concurrent": 1,
                "max_queued": 1,
                "max_queued_per_connection": DEFAULT_MAX_QUEUED_PER_CONNECTION,
            }
            await conn.close()
        finally:
            proc.stop()


async def test_admin_reports_queue_depth_while_busy() -> None:
    with short_tmpdir() as d:
        cfg = write_config(
            d / "c.toml",
            [{"type": "mock", "tokens": ["a"] * 20, "delay": 0.05}],
            daemon={"max_concurrent": 2, "max_queued": 5},
        )
        proc = DaemonProc.start(cfg, d / "infer.sock")
        try:
            conn = await RawConn.open(proc.sock)
            for rid in range(5):
                await conn.send(gen_frame(rid))
            await conn.recv()
            st = await admin_status(proc.sock)
            assert st["queue"]["running"] == 2 and st["queue"]["queued"] == 3
            await conn.close()
        finally:
            proc.stop()


async def test_sigterm_drains_in_flight_requests_and_exits_0() -> None:
    with short_tmpdir() as d:
        cfg = write_config(d / "c.toml", [{"type": "mock", "tokens": ["a"] * 10, "delay": 0.05}])
        proc = DaemonProc.start(cfg, d / "infer.sock")
        try:
            conn = await RawConn.open(proc.sock)
            await conn.send(gen_frame("inflight"))
            assert (await conn.recv())["type"] == "text"
            proc.proc.send_signal(15)
            await asyncio.sleep(0.1)
            st = await admin_status(proc.sock)
            assert st["status"] == "draining"
            await conn.send(gen_frame("late"))  # refused: draining
            got = await conn.until_terminal({"inflight", "late"})
            assert got["late"][-1]["code"] == "backend_unavailable"
            assert "draining" in got["late"][-1]["message"]
            assert got["inflight"][-1]["type"] == "done"
            assert len(got["inflight"]) == 10  # 9 more frames + done: nothing lost
            assert await asyncio.to_thread(proc.proc.wait, 10) == 0
            assert not proc.sock.exists() and not proc.admin.exists()
        finally:
            proc.stop()


async def test_drain_timeout_cancels_with_an_error_frame() -> None:
    with short_tmpdir() as d:
        cfg = write_config(
            d / "c.toml",
            [{"type": "mock", "tokens": ["a"] * 100, "delay": 0.05}],
            daemon={"drain_timeout_s": 0.3},
        )
        proc = DaemonProc.start(cfg, d / "infer.sock")
        try:
            conn = await RawConn.open(proc.sock)
            await conn.send(gen_frame("long"))
            await conn.recv()
            t0 = time.monotonic()
            proc.proc.send_signal(15)
            got = await conn.until_terminal({"long"})
            assert got["long"][-1]["type"] == "error"
            assert got["long"][-1]["code"] == "backend_unavailable"
            assert "drain timeout" in got["long"][-1]["message"]
            assert await asyncio.to_thread(proc.proc.wait, 10) == 0
            assert time.monotonic() - t0 < 3.0
        finally:
            proc.stop()


def test_stale_socket_is_removed_and_a_live_one_refused() -> None:
    with short_tmpdir() as d:
        cfg = write_config(d / "c.toml", [{"type": "mock"}])
        sock = d / "infer.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sock))  # bound, never listening, file left behind: a crash's leftover
        stale.close()
        assert sock.exists()
        first = DaemonProc.start(cfg, sock)
        try:
            second = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "inferd.serve.daemon",
                    "--config",
                    str(cfg),
                    "--socket",
                    str(sock),
                ],
                env=subprocess_env(),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert second.returncode != 0
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "another inferd daemon" in lines[0], second.stderr
            assert first.proc.poll() is None and sock.exists()  # the first is untouched
        finally:
            assert first.terminate() == 0


def test_config_problems_are_one_clear_line() -> None:
    with short_tmpdir() as d:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "inferd.serve.daemon",
                "--config",
                str(d / "none.toml"),
                "--socket",
                str(d / "s.sock"),
            ],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [r.stderr.strip()]
        assert "not found" in r.stderr and r.stderr.startswith("inferd serve: error:")


def test_default_socket_path_follows_xdg_runtime_dir(monkeypatch) -> None:
    from inferd.serve.config import default_socket_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    assert default_socket_path() == Path("/run/user/4242/inferd/infer.sock")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    p = default_socket_path()
    assert p.name == "infer.sock" and str(os.getuid()) in p.parent.name


async def test_admin_reports_loading_progress_then_ready() -> None:
    """In-process: the sockets answer while a slow loader runs in its thread."""
    import threading

    from inferd.backends.mock import Mock
    from inferd.serve.daemon import Daemon

    gate = threading.Event()

    def loader(progress) -> Mock:
        progress(0, 0.25)
        gate.wait(10)
        return Mock(["x"], name="late")

    with short_tmpdir() as d:
        daemon = Daemon(None, d / "infer.sock")
        task = asyncio.create_task(daemon.run(loader, backend_count=2))
        await wait_for(lambda: _async(daemon.admin_path.exists()))
        st = await admin_status(d / "infer.sock")
        assert st["status"] == "loading" and st["progress"] == 0.125
        client = Client(d / "infer.sock")
        with pytest.raises(NotReady, match="still loading"):
            async for _ in client.generate(Request.chat("hi")):
                pass
        gate.set()

        async def is_ready() -> bool:
            return (await admin_status(d / "infer.sock"))["status"] == "ready"

        await wait_for(is_ready)
        events = [e async for e in client.generate(Request.chat("hi"))]
        assert events[-1].backend == "late"
        await client.aclose()
        os.kill(os.getpid(), 15)  # the daemon's loop handler turns it into a drain
        assert await asyncio.wait_for(task, 10) == 0
        assert not daemon.socket_path.exists()


async def test_load_failure_is_a_daemon_error() -> None:
    from inferd.errors import ModelLoadError
    from inferd.serve.daemon import Daemon, DaemonError

    def loader(progress):
        raise ModelLoadError("model file /nowhere.gguf is missing")

    with short_tmpdir() as d:
        daemon = Daemon(None, d / "infer.sock")
        with pytest.raises(DaemonError, match=r"nowhere\.gguf is missing"):
            await daemon.run(loader)
        assert not daemon.socket_path.exists() and not daemon.lock_path.exists()


async def _async(value):
    return value


def test_metrics_window_is_bounded_and_percentiles_are_nearest_rank() -> None:
    from inferd.serve.metrics import METRICS_WINDOW, Metrics, percentiles

    assert METRICS_WINDOW == 1024
    m = Metrics(window=10)
    for i in range(100):
        m.ttft_s.append(float(i))
    assert len(m.ttft_s) == 10 and min(m.ttft_s) == 90.0
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    p = percentiles([float(i) for i in range(1, 101)])
    assert (p["p50"], p["p90"], p["p99"]) == (50.0, 90.0, 99.0)


async def test_small_client_stream_buffer_still_delivers_everything(daemon: DaemonProc) -> None:
    client = Client(daemon.sock, stream_buffer_frames=2)
    got = []
    async for ev in client.generate(Request.chat("hi", max_tokens=30)):
        got.append(ev)
        await asyncio.sleep(0.005)  # slower than the 10 ms producer only now and then
    assert got[:-1] == [Text(t) for t in TOKENS[:30]] and isinstance(got[-1], Done)
    await client.aclose()


async def test_load_timeout_serves_anyway() -> None:
    from inferd.backends.mock import Mock
    from inferd.serve.daemon import Daemon

    with short_tmpdir() as d:
        daemon = Daemon(Mock(ready=False), d / "infer.sock", load_timeout_s=0.1)
        await daemon.start()
        try:
            await asyncio.wait_for(daemon.wait_loaded(), 5)
            assert daemon.status == "ready"
        finally:
            await daemon.close()


async def test_leaving_a_stream_with_a_full_buffer_frees_the_connection(
    daemon: DaemonProc,
) -> None:
    client = Client(daemon.sock, stream_buffer_frames=2)
    gen = client.generate(Request.chat("hi"))
    await gen.__anext__()
    await asyncio.sleep(0.1)  # the queue fills; the connection's reader waits on it
    await gen.aclose()

    async def again() -> list:
        return [e async for e in client.generate(Request.chat("hi", max_tokens=2))]

    events = await asyncio.wait_for(again(), 10)  # hung forever before the queue was drained
    assert isinstance(events[-1], Done)
    await client.aclose()
