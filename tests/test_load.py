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
    assert all(f["type"] == "frame" and f["id"] == rid for f in body), rid
    assert [f["block"]["text"] for f in body] == TOKENS[: len(body)], rid
    assert last["id"] == rid
    if last["type"] == "done":
        assert max_tokens <= DROP_AFTER
        assert len(body) == max_tokens == last["usage"]["output_tokens"]
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
