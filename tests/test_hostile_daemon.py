"""Hostile clients against the real daemon (issue 13 items 3, 4, 5, 7, 11, 12, 15, 18).

Each test runs ``python -m inferd.serve.daemon`` with the limit under test set low in
its config, and asserts what the limit guarantees: a refusal that names the limit, a
connection that lives on (or is closed, where that is the rule), another client that is
still served, and memory measured from ``/proc`` with a generous bound (ADR 0010).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from inferd.serve.client import admin_status

from .serve_helpers import DaemonProc, RawConn, gen_frame, short_tmpdir, write_config

TOKENS = [f"t{i} " for i in range(50)]  # 50 x 10 ms


@contextlib.contextmanager
def own_daemon(
    daemon: dict[str, Any] | None = None, backend: dict[str, Any] | None = None, *args: str
) -> Iterator[DaemonProc]:
    with short_tmpdir() as d:
        spec = backend or {"type": "mock", "tokens": TOKENS, "delay": 0.01}
        cfg = write_config(d / "c.toml", [spec], daemon=daemon)
        proc = DaemonProc.start(cfg, d / "infer.sock", *args)
        try:
            yield proc
        finally:
            proc.stop()


async def eof(conn: RawConn, timeout: float = 10.0) -> bool:
    """True when the daemon closed the connection (after any frames still in the pipe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = await asyncio.wait_for(conn.reader.readline(), timeout)
        except ConnectionError:  # closed while we were still writing to it
            return True
        if not line:
            return True
    return False


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


# --------------------------------------------------------------------------- item 3


async def test_connections_beyond_max_connections_get_an_error_then_eof() -> None:
    with own_daemon({"max_connections": 2}) as proc:
        a, b = await RawConn.open(proc.sock), await RawConn.open(proc.sock)
        await a.send({"type": "capabilities", "id": 1})
        assert (await a.recv())["type"] == "capabilities"
        c = await RawConn.open(proc.sock)
        f = await c.recv()
        assert f["type"] == "error" and f["id"] is None and f["code"] == "queue_full"
        assert "max_connections" in f["message"]
        assert await eof(c)
        await b.send(gen_frame("b", max_tokens=2))  # the admitted ones are untouched
        assert (await b.until_terminal({"b"}))["b"][-1]["type"] == "done"
        await a.close()
        await asyncio.sleep(0.2)
        d = await RawConn.open(proc.sock)  # a freed place is given again
        await d.send(gen_frame("d", max_tokens=1))
        assert (await d.until_terminal({"d"}))["d"][-1]["type"] == "done"
        st = await admin_status(proc.sock)
        assert st["counters"]["refused_connections"] == 1
        for conn in (b, c, d):
            await conn.close()


async def test_unfinished_frames_share_max_buffered_bytes() -> None:
    budget = 1024 * 1024
    with own_daemon({"max_buffered_bytes": budget, "max_frame_bytes": 4 * budget}) as proc:
        a, b = await RawConn.open(proc.sock), await RawConn.open(proc.sock)
        await a.send(b'{"type":"generate","id":"a","pad":"' + b"x" * (700 * 1024))

        async def a_is_held() -> bool:
            return (await admin_status(proc.sock))["buffered_bytes"] >= 700 * 1024

        await wait_until(a_is_held)
        await b.send(b'{"type":"generate","id":"b","pad":"' + b"y" * (600 * 1024) + b'"}\n')
        f = await b.recv()
        assert f["type"] == "error" and f["code"] == "queue_full" and f["id"] is None
        assert "max_buffered_bytes" in f["message"]
        await b.send(gen_frame("b2", max_tokens=1))  # b lives on
        assert (await b.until_terminal({"b2"}))["b2"][-1]["type"] == "done"
        await a.send(b'"}\n')  # a's frame was kept whole: it is answered by its id
        f = await a.recv()
        assert f["id"] == "a" and f["code"] == "invalid_request" and "pad" in f["message"]
        st = await admin_status(proc.sock)
        assert st["buffered_bytes"] == 0 and st["limits"]["max_buffered_bytes"] == budget
        await a.close()
        await b.close()


async def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_frame_that_never_ends_is_closed_after_frame_timeout() -> None:
    with own_daemon({"frame_timeout_s": 1.0}) as proc:
        idle = await RawConn.open(proc.sock)
        slow = await RawConn.open(proc.sock)
        await slow.send(b'{"type":')

        async def drip() -> None:  # one byte every 0.2 s, forever
            with contextlib.suppress(ConnectionError, RuntimeError):
                while True:
                    await asyncio.sleep(0.2)
                    await slow.send(b" ")

        dripper = asyncio.create_task(drip())
        try:
            f = await slow.recv(timeout=20)
            assert f["type"] == "error" and f["id"] is None
            assert "frame_timeout_s" in f["message"]
            assert await eof(slow)
        finally:
            dripper.cancel()
        # silence between frames is not a started frame: the idle connection still serves
        await idle.send({"type": "capabilities", "id": "still"})
        assert (await idle.recv())["id"] == "still"
        assert (await admin_status(proc.sock))["counters"]["closed_connections"] == 1
        await idle.close()
        await slow.close()


async def test_an_element_bomb_is_refused_before_parsing_and_others_keep_streaming() -> None:
    """60 MiB of ``{},`` parsed to a 2 GB peak and stalled the loop for seconds."""
    with own_daemon() as proc:
        before = peak_rss_bytes(proc.proc.pid)
        n = 20 * 1024 * 1024
        bomb = b'{"type":"generate","id":"bomb","messages":[' + b"{}," * n + b"{}]}\n"
        other, bad = await RawConn.open(proc.sock), await RawConn.open(proc.sock)
        await other.send(gen_frame("other"))  # 50 tokens, one per 10 ms
        assert (await other.recv())["type"] == "text"
        gaps: list[float] = []

        async def read_other() -> list[dict]:
            frames, last = [], time.monotonic()
            while not frames or frames[-1]["type"] == "text":
                frames.append(await other.recv(timeout=60))
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            return frames

        reader = asyncio.create_task(read_other())
        await bad.send(bomb)
        f = await bad.recv(timeout=60)
        frames = await reader
        assert f["type"] == "error" and f["code"] == "invalid_request"
        assert "max_frame_elements" in f["message"]
        assert frames[-1]["type"] == "done"
        assert max(gaps) < 3.0  # generous: parsing the bomb held the loop for seconds
        grown = peak_rss_bytes(proc.proc.pid) - before
        print(
            f"bomb: daemon peak grew {grown >> 20} MiB; other stream's largest gap {max(gaps):.3f}s"
        )
        assert grown < 512 * 1024 * 1024, f"daemon peak grew by {grown >> 20} MiB"
        await bad.send(gen_frame("after", max_tokens=1))
        assert (await bad.until_terminal({"after"}))["after"][-1]["type"] == "done"
        await other.close()
        await bad.close()


# --------------------------------------------------------------------------- item 4


async def test_a_reply_over_max_reply_bytes_fails_only_its_request() -> None:
    with own_daemon({"max_reply_bytes": 64 * 1024}) as proc:
        conn = await RawConn.open(proc.sock)
        await conn.send(gen_frame("g", max_tokens=20))
        await conn.send({"type": "embed", "id": "e", "input": ["x"] * 20, "dimensions": 2000})
        await conn.send({"type": "embed", "id": "small", "input": ["x"]})
        got = await conn.until_terminal({"g", "e", "small"})
        err = got["e"][-1]
        assert err["type"] == "error" and err["code"] == "frame_too_large"
        assert "max_reply_bytes" in err["message"]
        assert got["g"][-1]["type"] == "done" and len(got["g"]) == 21
        assert got["small"][-1]["type"] == "embedding"
        await conn.close()


# --------------------------------------------------------------------------- item 5


async def test_a_client_that_never_reads_loses_its_slot_after_write_stall_timeout() -> None:
    big = ["x" * 8192] * 500  # 4 MB: far more than the socket buffers hold
    with own_daemon(
        {"max_concurrent": 1, "write_stall_timeout_s": 1.0},
        {"type": "mock", "tokens": big},
    ) as proc:
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a plain socket never
        deaf.connect(str(proc.sock))  # read (an asyncio reader would read eagerly)
        deaf.sendall(orjson.dumps(gen_frame("deaf")) + b"\n")
        await asyncio.sleep(0.3)
        polite = await RawConn.open(proc.sock)
        await polite.send(gen_frame("polite", max_tokens=2))
        got = await polite.until_terminal({"polite"}, timeout=30)  # forever before the fix
        assert got["polite"][-1]["type"] == "done" and len(got["polite"]) == 3
        st = await admin_status(proc.sock)
        assert st["counters"]["write_stalls"] >= 1 and st["queue"]["running"] == 0
        deaf.close()
        await polite.close()


async def test_one_connection_cannot_take_the_whole_queue() -> None:
    with own_daemon(
        {"max_concurrent": 1, "max_queued": 8, "max_queued_per_connection": 2},
        {"type": "mock", "tokens": ["a"] * 10, "delay": 0.05},
    ) as proc:
        greedy, other = await RawConn.open(proc.sock), await RawConn.open(proc.sock)
        for rid in range(5):
            await greedy.send(gen_frame(rid))
        await other.send(gen_frame("o"))
        got = await greedy.until_terminal(set(range(5)), timeout=30)
        ends = [got[r][-1] for r in range(5)]
        assert [e["type"] for e in ends] == ["done", "done", "done", "error", "error"]
        assert all("max_queued_per_connection" in e["message"] for e in ends[3:])
        assert (await other.until_terminal({"o"}, timeout=30))["o"][-1]["type"] == "done"
        await greedy.close()
        await other.close()


# --------------------------------------------------------------------------- items 7, 11, 15


def with_deep(frame: dict[str, Any], key: str, depth: int = 1000) -> bytes:
    """``frame`` with ``key`` set to a list nested ``depth`` deep (orjson will not write it)."""
    deep = b"[" * depth + b'"x"' + b"]" * depth
    return orjson.dumps({**frame, key: "@"}).replace(b'"@"', deep) + b"\n"


async def test_deep_nesting_is_an_error_for_its_id_and_the_connection_lives() -> None:
    with own_daemon() as proc:
        conn = await RawConn.open(proc.sock)
        await conn.send(gen_frame("slow"))
        tools = {**gen_frame("deeptools"), "tools": [{"type": "@"}]}
        cases = {
            "deep": with_deep(gen_frame("deep"), "tool_choice"),
            "deeptype": with_deep(gen_frame("deeptype"), "type"),
            "deeptools": orjson.dumps(tools).replace(b'"@"', b"[" * 999 + b"]" * 999) + b"\n",
        }
        for raw in cases.values():
            await conn.send(raw)
        await conn.send(with_deep(gen_frame("x"), "id"))
        got = await conn.until_terminal({*cases, None, "slow"})
        for rid in cases:
            err = got[rid][-1]
            assert err["type"] == "error" and err["code"] == "invalid_request", err
            assert len(err["message"]) < 1100
        assert "MAX_JSON_DEPTH" in got["deep"][-1]["message"]
        assert got[None][-1]["code"] == "invalid_request" and "'id'" in got[None][-1]["message"]
        assert got["slow"][-1]["type"] == "done" and len(got["slow"]) == 51  # nothing lost
        await conn.close()


async def test_errors_never_echo_a_value_whole() -> None:
    with own_daemon() as proc:
        conn = await RawConn.open(proc.sock)
        huge = "z" * (4 * 1024 * 1024)
        frames = [
            {"type": huge, "id": "t"},
            {"type": "generate", "id": huge, "messages": []},
            {**gen_frame("k"), huge: 1},
            {"type": "embed", "id": "e", "input": ["a"], huge: 1},
            {"type": "teleport", "id": "x" * 256},
        ]
        for frame in frames:
            await conn.send(frame)
            line = await asyncio.wait_for(conn.reader.readline(), 30)
            f = orjson.loads(line)
            assert f["type"] == "error" and f["code"] == "invalid_request"
            assert len(line) < 2000, len(line)
        await conn.close()


async def test_embed_frames_refuse_unknown_keys_like_generate_frames() -> None:
    with own_daemon() as proc:
        conn = await RawConn.open(proc.sock)
        await conn.send({"type": "embed", "id": "e", "input": ["a"], "dimension": 4})
        f = await conn.recv()
        assert f["id"] == "e" and f["code"] == "invalid_request" and "dimension" in f["message"]
        await conn.send({"type": "generate", **gen_frame("g"), "dimension": 4})
        f = await conn.recv()
        assert f["id"] == "g" and f["code"] == "invalid_request" and "dimension" in f["message"]
        await conn.close()


# --------------------------------------------------------------------------- items 12, 18


async def test_an_unexpected_exception_reaches_the_client_as_its_type_only(caplog) -> None:
    from inferd.backends.mock import Mock
    from inferd.serve.daemon import Daemon

    class Leaky(Mock):
        async def generate(self, request):
            raise RuntimeError("cannot open /home/alice/.keys (token=sk-abc123)")
            yield  # pragma: no cover

    with short_tmpdir() as d:
        daemon = Daemon(Leaky(), d / "infer.sock")
        await daemon.start()
        try:
            conn = await RawConn.open(daemon.socket_path)
            await conn.send(gen_frame("r1"))
            f = await conn.recv()
            assert f["type"] == "error" and f["id"] == "r1" and f["code"] == "internal"
            assert "RuntimeError" in f["message"] and "r1" in f["message"]
            assert "sk-abc123" not in f["message"] and "alice" not in f["message"]
            assert "sk-abc123" in caplog.text  # the detail is in the daemon's log
            await conn.close()
        finally:
            await daemon.close()


async def test_sigterm_with_open_connections_is_quiet_and_a_leaving_client_is_info() -> None:
    with own_daemon({"drain_timeout_s": 0.3}, None, "--log-level", "INFO") as proc:
        idle = await RawConn.open(proc.sock)
        partial = await RawConn.open(proc.sock)
        await partial.send(b'{"type":"gen')
        leaver = await RawConn.open(proc.sock)
        await leaver.send(gen_frame("gone"))
        assert (await leaver.recv())["type"] == "text"
        await leaver.close()
        busy = await RawConn.open(proc.sock)
        await busy.send(gen_frame("busy"))
        assert (await busy.recv())["type"] == "text"
        await asyncio.sleep(0.2)
        proc.proc.send_signal(15)
        got = await busy.until_terminal({"busy"})
        assert got["busy"][-1]["code"] == "backend_unavailable"
        assert await asyncio.to_thread(proc.proc.wait, 15) == 0
        err = proc.proc.stderr.read().decode()
        assert "Traceback" not in err and "CancelledError" not in err and "ERROR" not in err, err
        assert "INFO a client left with 1 request(s) in flight" in err
        for conn in (idle, partial, busy):
            await conn.close()
