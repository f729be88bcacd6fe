"""Load and fuzz: many concurrent clients, injected failures, random frames.

Every request must end in exactly one ``done`` or one ``error`` frame, frames never
cross to another request, nothing is lost, and no input crashes the daemon. Loops are
bounded in count and in time (``LOAD_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferd.errors import BackendUnavailable, QueueFull
from inferd.serve.client import Client, admin_status
from inferd.types import Done, Request, Text

from .serve_helpers import DaemonProc, RawConn, gen_frame, short_tmpdir, write_config

#: Concurrent clients in the load tests.
CLIENTS = 200
#: Wall-clock bound for one load test.
LOAD_TIMEOUT_S = 60.0
TOKENS = [f"w{i} " for i in range(8)]
#: The Mock drops its stream after this many tokens: requests for more fail mid-stream.
DROP_AFTER = 5
MAX_CONCURRENT, MAX_QUEUED = 32, 300


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    with short_tmpdir() as d:
        cfg = write_config(
            d / "c.toml",
            [
                {
                    "type": "mock",
                    "name": "flaky",
                    "tokens": TOKENS,
                    "delay": 0.002,
                    "drop_after": DROP_AFTER,
                }
            ],
            daemon={"max_concurrent": MAX_CONCURRENT, "max_queued": MAX_QUEUED},
            router={"failure_threshold": 1_000_000},  # keep failures mid-stream, not pre-stream
        )
        proc = DaemonProc.start(cfg, d / "infer.sock", "--max-frame-bytes", "4096")
        yield proc
        proc.stop()


def check_stream(rid: str, frames: list[dict], max_tokens: int) -> str:
    """Asserts one request's frames are a clean prefix plus one terminal; returns its end."""
    assert frames, f"{rid}: nothing received"
    *body, last = frames
    assert all(f["type"] == "text" and f["id"] == rid for f in body), rid
    assert [f["event"]["text"] for f in body] == TOKENS[: len(body)], rid
    assert last["id"] == rid
    if last["type"] == "done":
        assert max_tokens <= DROP_AFTER
        assert len(body) == max_tokens == last["event"]["usage"]["output_tokens"]
        return "done"
    assert last["type"] == "error", last
    if last["code"] == "queue_full":
        assert body == []
        return "queue_full"
    assert last["code"] == "backend_unavailable" and max_tokens > DROP_AFTER, last
    assert len(body) == DROP_AFTER
    return "failed"


async def test_200_raw_clients_each_request_ends_exactly_once(daemon: DaemonProc) -> None:
    rng = random.Random(1234)
    plans = {
        c: {f"c{c}-r{j}": rng.randint(1, len(TOKENS)) for j in range(rng.randint(1, 3))}
        for c in range(CLIENTS)
    }

    async def one_client(c: int) -> dict[str, str]:
        conn = await RawConn.open(daemon.sock)
        try:
            for rid, n in plans[c].items():
                await conn.send(gen_frame(rid, max_tokens=n))
            got = await conn.until_terminal(set(plans[c]), timeout=LOAD_TIMEOUT_S)
            assert set(got) == set(plans[c]), f"frames of another request: {set(got)}"
            ends = {rid: check_stream(rid, got[rid], plans[c][rid]) for rid in plans[c]}
            # nothing trails a terminal frame: the next frame answers this probe
            await conn.send({"type": "capabilities", "id": "probe"})
            assert (await conn.recv())["type"] == "capabilities"
            return ends
        finally:
            await conn.close()

    results = await asyncio.wait_for(
        asyncio.gather(*(one_client(c) for c in range(CLIENTS))), LOAD_TIMEOUT_S
    )
    ends = [e for r in results for e in r.values()]
    total = sum(len(p) for p in plans.values())
    assert len(ends) == total
    assert ends.count("done") > 0 and ends.count("failed") > 0, ends
    print({k: ends.count(k) for k in ("done", "failed", "queue_full")})
    st_ = await admin_status(daemon.sock)
    assert st_["queue"]["running"] == 0 and st_["queue"]["queued"] == 0
    assert st_["counters"]["queue_full"] >= ends.count("queue_full")


async def test_200_tasks_multiplexed_on_one_client(daemon: DaemonProc) -> None:
    client = Client(daemon.sock)
    rng = random.Random(99)
    wants = [rng.randint(1, len(TOKENS)) for _ in range(CLIENTS)]

    async def one(n: int) -> str:
        events = []
        try:
            async for ev in client.generate(Request.chat("hi", max_tokens=n)):
                events.append(ev)
        except QueueFull:
            assert events == []
            return "queue_full"
        except BackendUnavailable:
            assert n > DROP_AFTER and events == [Text(t) for t in TOKENS[:DROP_AFTER]]
            return "failed"
        assert events[:-1] == [Text(t) for t in TOKENS[:n]] and isinstance(events[-1], Done)
        return "done"

    try:
        ends = await asyncio.wait_for(asyncio.gather(*(one(n) for n in wants)), LOAD_TIMEOUT_S)
    finally:
        await client.aclose()
    assert len(ends) == CLIENTS and "done" in ends and "failed" in ends
    assert client.active_streams == 0


# --------------------------------------------------------------------------- fuzz

_keys = st.sampled_from(
    [
        "type",
        "id",
        "messages",
        "input",
        "max_tokens",
        "tools",
        "stop",
        "temperature",
        "role",
        "content",
        "x",
    ]
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**70),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["generate", "embed", "cancel", "capabilities", "user"]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=12,
)
_frames = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),  # stdlib: big ints, NaN, Infinity too
    st.binary(min_size=4097, max_size=6000),  # over this daemon's 4096-byte frame limit
)


@pytest.fixture(scope="module")
def fuzz_conn(daemon: DaemonProc) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    s.connect(str(daemon.sock))
    yield s
    s.close()


def _probe(s: socket.socket, tag: int) -> None:
    """Send a capabilities probe and read until its answer: the connection still works."""
    s.sendall(orjson.dumps({"type": "capabilities", "id": f"probe-{tag}"}) + b"\n")
    buf = b""
    for _ in range(10_000):  # bounded: a reply stream is a few frames
        while b"\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, "daemon closed the connection"
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        frame = orjson.loads(line)
        assert isinstance(frame, dict) and "type" in frame
        if frame.get("id") == f"probe-{tag}":
            assert frame["type"] == "capabilities"
            return
    raise AssertionError("probe answer never came")


_counter = iter(range(10**9))


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=st.lists(_frames, min_size=1, max_size=4))
def test_fuzzed_frames_never_crash_the_daemon(
    daemon: DaemonProc, fuzz_conn: socket.socket, frames: list[bytes]
) -> None:
    for f in frames:
        fuzz_conn.sendall(f.replace(b"\n", b" ") + b"\n")
    _probe(fuzz_conn, next(_counter))
    assert daemon.proc.poll() is None


# --------------------------------------------------------------------------- SmolLM2

#: Concurrent clients against the real local model.
LLAMA_CLIENTS = 16


@pytest.mark.llama
@pytest.mark.slow
async def test_16_clients_on_smollm2(smollm2_path) -> None:
    try:
        import inferd._fast._llama  # noqa: F401
    except ImportError as e:
        from .conftest import missing

        missing(f"the compiled llama.cpp core ({e})")
    with short_tmpdir() as d:
        cfg = write_config(
            d / "c.toml",
            [
                # one thread: on a busy 2-core CI box llama.cpp's spinning threads contend ~10x
                {
                    "type": "llamacpp",
                    "model": str(smollm2_path),
                    "n_ctx": 512,
                    "n_threads": 1,
                    "name": "smol",
                },
            ],
        )
        proc = DaemonProc.start(cfg, d / "infer.sock")
        try:
            client = Client(proc.sock)

            async def one(i: int) -> list:
                req = Request.chat(f"Count to {i + 3}.", max_tokens=4, temperature=0.0)
                return [ev async for ev in client.generate(req)]

            results = await asyncio.wait_for(
                asyncio.gather(*(one(i) for i in range(LLAMA_CLIENTS)), return_exceptions=True),
                LOAD_TIMEOUT_S * 2,
            )
            await client.aclose()
            for events in results:
                assert isinstance(events, list), events
                assert sum(isinstance(e, Done) for e in events) == 1
                assert isinstance(events[-1], Done) and events[-1].backend == "smol"
                assert 1 <= events[-1].usage.output_tokens <= 4
            st_ = await admin_status(proc.sock)
            assert st_["counters"]["requests"] == LLAMA_CLIENTS
            assert st_["counters"]["ttft_s"]["p50"] is not None
        finally:
            proc.stop()


# --------------------------------------------------------------------------- the bridge

#: Clients of the bridge load test, and how many of them misbehave in each way.
BRIDGE_CLIENTS = 200
NEVER_READ = 20
LEAVE_MID_STREAM = 20
GARBAGE = 20
#: The bridge daemon's stream: far longer than a stalled reader's buffers hold.
BRIDGE_TOKENS = ["t" * 1024] * 3000
#: Well-behaved clients ask for this many tokens.
GOOD_TOKENS = 8
#: Growth of this process's resident memory (bridge and clients) tolerated by the load.
BRIDGE_RSS_GROWTH_LIMIT = 300 * 1024 * 1024


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def bridge_daemon() -> Iterator[DaemonProc]:
    with short_tmpdir() as d:
        cfg = write_config(
            d / "big.toml",
            [{"type": "mock", "name": "big", "tokens": BRIDGE_TOKENS}],
            daemon={"max_concurrent": 64, "max_queued": MAX_QUEUED},
        )
        proc = DaemonProc.start(cfg, d / "infer.sock")
        yield proc
        proc.stop()


def _post(body: dict, host: str = "x") -> bytes:
    payload = orjson.dumps(body)
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


_GARBAGE = [
    b"\x00\xff\xfe not http at all\r\n\r\n",
    _post({"messages": "nope"}),
    _post({"messages": [{"role": "user", "content": "hi"}]})[:-10],  # then hang up
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope",
]


async def _good(h: aiohttp.ClientSession, url: str, i: int) -> str:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": GOOD_TOKENS}
    want = "t" * 1024 * GOOD_TOKENS
    if i % 2:
        async with h.post(f"{url}/v1/chat/completions", json=body) as r:
            got = await r.json()
        assert r.status == 200, got
        assert got["choices"][0]["message"]["content"] == want
        return "good"
    async with h.post(f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status == 200
        text = []
        async for line in r.content:
            if line.startswith(b"data: {"):
                chunk = orjson.loads(line[6:])
                text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    assert "".join(text) == want
    return "good"


async def _never_reads(url: str, stalled: list[socket.socket]) -> str:
    s = await asyncio.to_thread(
        _blocking_post, url, {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    stalled.append(s)  # closed by the test once the others are done
    return "never_read"


def _blocking_post(url: str, body: dict) -> socket.socket:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: stays small
    s.connect((host, int(port)))
    s.sendall(_post(body))
    return s


async def _leaves(h: aiohttp.ClientSession, url: str) -> str:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with h.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        for _ in range(3):
            await r.content.readline()
        r.close()  # hang up mid-stream
    return "left"


async def _garbage(url: str, i: int) -> str:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(_GARBAGE[i % len(_GARBAGE)])
        await writer.drain()
        if i % len(_GARBAGE) == 2:
            return "garbage"  # truncated request, then gone
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LOAD_TIMEOUT_S)
        assert head.split()[1] == b"400", head
        assert b"application/json" in head
        return "garbage"
    finally:
        writer.close()


async def test_200_bridge_clients_the_well_behaved_all_finish(bridge_daemon: DaemonProc) -> None:
    from inferd.serve.bridge import STATS_KEY

    from .serve_helpers import bridge_in_process

    client = Client(bridge_daemon.sock)
    stalled: list[socket.socket] = []
    kinds = (
        ["never_read"] * NEVER_READ
        + ["leave"] * LEAVE_MID_STREAM
        + ["garbage"] * GARBAGE
        + ["good"] * (BRIDGE_CLIENTS - NEVER_READ - LEAVE_MID_STREAM - GARBAGE)
    )
    random.Random(7).shuffle(kinds)
    async with bridge_in_process(client) as (url, app, runner):
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as h:
            await _good(h, url, 1)  # warm up before the memory baseline
            rss_before = _rss()

            def one(i: int, kind: str):  # type: ignore[no-untyped-def]
                if kind == "never_read":
                    return _never_reads(url, stalled)
                if kind == "leave":
                    return _leaves(h, url)
                if kind == "garbage":
                    return _garbage(url, i)
                return _good(h, url, i)

            try:
                ends = await asyncio.wait_for(
                    asyncio.gather(*(one(i, k) for i, k in enumerate(kinds))), LOAD_TIMEOUT_S
                )
                rss_peak = _rss()
            finally:
                for s in stalled:
                    s.close()
        assert ends.count("good") == kinds.count("good")
        assert len(stalled) == NEVER_READ

        async def settled() -> bool:
            st_ = await admin_status(bridge_daemon.sock)
            return (
                app[STATS_KEY].in_flight == 0
                and client.active_streams == 0
                and client.pool_stats()["busy"] == 0
                and not runner.server.connections
                and st_["queue"]["running"] == 0
                and st_["queue"]["queued"] == 0
                # only the idle pool stays open to the daemon
                and st_.get("connections", 0) <= client.max_idle_connections
            )

        async with asyncio.timeout(LOAD_TIMEOUT_S):
            while not await settled():
                await asyncio.sleep(0.1)
        assert app[STATS_KEY].clients_left >= LEAVE_MID_STREAM
        growth = max(rss_peak, _rss()) - rss_before
        print(f"bridge load: RSS grew by {growth / 2**20:.1f} MiB")
        assert growth < BRIDGE_RSS_GROWTH_LIMIT
    await client.aclose()
