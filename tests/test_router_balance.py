"""Router over replicas: least-loaded order, affinity, health probes (ADR 0020).

The first half drives in-process Mocks (the rules, with exact expectations); the second
runs three ``inferd serve`` daemons as subprocesses on Unix sockets, reached through
``Client``, and asserts on the counts the daemons themselves report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from inferd.backends.mock import Mock
from inferd.balance import (
    DEFAULT_AFFINITY_MAX_IMBALANCE,
    MAX_AFFINITY_PREFIX_CHARS,
    LoadBalancer,
    conversation_prefix,
    rendezvous,
    replica_ids,
)
from inferd.errors import BackendUnavailable, EmbedUnsupported, InvalidRequest
from inferd.health import DEFAULT_HEALTH_INTERVAL_S, DEFAULT_HEALTH_TIMEOUT_S
from inferd.router import Router
from inferd.serve.client import Client, admin_status
from inferd.serve.config import ConfigError, parse_config
from inferd.types import Capabilities, Done, Message, Request, RerankRequest, RerankResult

from .serve_helpers import DaemonProc, short_tmpdir, write_config

#: Seconds a condition the test waits for (a probe verdict) may take on a loaded box.
WAIT_S = 60.0


async def collect(backend: Any, request: Request) -> list[Any]:
    return [ev async for ev in backend.generate(request)]


async def served_by(router: Router, request: Request) -> str:
    events = await collect(router, request)
    assert isinstance(events[-1], Done)
    return str(events[-1].backend)


async def wait_for(cond: Any, what: str, timeout: float = WAIT_S) -> None:
    """Poll ``cond()`` until true; fail naming ``what`` after a generous deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def mocks(n: int, **kw: Any) -> list[Mock]:
    return [Mock(["x"], name=f"m{i}", **kw) for i in range(n)]


def conversation(opening: str, turns: int) -> list[Request]:
    """The requests of one multi-turn chat: each repeats the history before it."""
    history = [Message("system", "You are terse."), Message("user", opening)]
    out = [Request(messages=tuple(history))]
    for t in range(1, turns):
        history += [Message("assistant", f"reply {t}"), Message("user", f"and then {t}?")]
        out.append(Request(messages=tuple(history)))
    return out


# --------------------------------------------------------------------------- rules


def test_defaults_are_the_documented_ones() -> None:
    assert DEFAULT_AFFINITY_MAX_IMBALANCE == 4
    assert (DEFAULT_HEALTH_INTERVAL_S, DEFAULT_HEALTH_TIMEOUT_S) == (5.0, 2.0)
    assert MAX_AFFINITY_PREFIX_CHARS == 1_000_000


def test_rendezvous_moves_only_the_keys_a_new_replica_wins() -> None:
    keys = [f"conversation-{i}" for i in range(3000)]
    three, four = ("a", "b", "c"), ("a", "b", "c", "d")
    before = [three[rendezvous(k, three)] for k in keys]
    after = [four[rendezvous(k, four)] for k in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == "d" for _, a in moved)  # a key moves only to the newcomer
    assert 0.15 < len(moved) / len(keys) < 0.35  # about 1/4 of them
    spread = Counter(before)
    assert all(700 < spread[r] < 1300 for r in three), spread
    # removing a replica moves only the keys it held
    two = ("a", "c")
    gone = [k for k, b in zip(keys, before, strict=True) if b != "b"]
    assert all(two[rendezvous(k, two)] == three[rendezvous(k, three)] for k in gone)


def test_replica_ids_are_distinct_and_stable() -> None:
    assert replica_ids(["d", "e", "d", "d"]) == ("d", "e", "d#1", "d#2")


def test_ties_are_round_robin_and_lower_load_wins() -> None:
    lb = LoadBalancer(("a", "b", "c"))
    firsts = []
    for _ in range(6):
        firsts.append(lb.order([0, 0, 0], [True] * 3)[0])
        lb.picked(firsts[-1])
    assert firsts == [0, 1, 2, 0, 1, 2]
    assert lb.order([3, 1, 2], [True] * 3) == [1, 2, 0]
    # with one replica out of the tie, the other two still alternate
    firsts = []
    for _ in range(4):
        firsts.append(lb.order([9, 0, 0], [True] * 3)[0])
        lb.picked(firsts[-1])
    assert firsts == [1, 2, 1, 2]


def test_affinity_yields_to_load_beyond_the_limit() -> None:
    lb = LoadBalancer(("a", "b", "c"), max_imbalance=2)
    key = "k:chat-42"
    want = rendezvous(key, lb.ids)
    loads = [0, 0, 0]
    loads[want] = 2  # within the limit: still preferred
    assert lb.order(loads, [True] * 3, key)[0] == want
    loads[want] = 3  # over it: the least-loaded replica instead
    assert lb.order(loads, [True] * 3, key)[0] != want
    lb.picked(want)  # tried last: only affinity puts it first among equals
    assert lb.order([0, 0, 0], [True] * 3, key)[0] == want
    healthy = [True] * 3
    healthy[want] = False
    assert lb.order([0, 0, 0], healthy, key)[0] != want  # unhealthy: not preferred


def test_conversation_prefix_is_shared_by_every_turn() -> None:
    turns = conversation("Tell me about lighthouses.", 4)
    prefixes = {conversation_prefix(r, 4096) for r in turns}
    assert len(prefixes) == 1
    other = conversation("Tell me about rivers.", 1)[0]
    assert conversation_prefix(other, 4096) not in prefixes
    assert conversation_prefix(turns[0], 5) == "syste"


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"policy": "random"}, "policy"),
        ({"affinity_prefix_chars": 0}, "affinity_prefix_chars"),
        ({"affinity_prefix_chars": MAX_AFFINITY_PREFIX_CHARS + 1}, "affinity_prefix_chars"),
        ({"affinity_max_imbalance": -1}, "affinity_max_imbalance"),
        ({"health_interval_s": -1.0}, "health_interval_s"),
        ({"health_timeout_s": 0}, "health_timeout_s"),
    ],
)
def test_bad_options_are_refused_naming_them(kw: dict[str, Any], word: str) -> None:
    kw = {"policy": "least_loaded", **kw}
    with pytest.raises(ValueError, match=word):
        Router(mocks(1), **kw)
    with pytest.raises(ConfigError, match=word):
        parse_config({"router": kw, "backend": [{"type": "mock"}]})


def test_derived_affinity_under_priority_is_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match="least_loaded"):
        Router(mocks(2), affinity_prefix_chars=100)
    with pytest.raises(ConfigError, match="affinity_prefix_chars needs"):
        parse_config({"router": {"affinity_prefix_chars": 100}, "backend": [{"type": "mock"}]})


def test_config_takes_the_policy_and_affinity_options() -> None:
    cfg = parse_config(
        {
            "router": {
                "policy": "least_loaded",
                "affinity_prefix_chars": 512,
                "affinity_max_imbalance": 2,
                "health_interval_s": 1.5,
            },
            "backend": [{"type": "mock", "name": "r1"}, {"type": "mock", "name": "r2"}],
        }
    )
    router = Router(mocks(2), **cfg.router)
    assert (router.policy, router.affinity_prefix_chars) == ("least_loaded", 512)
    assert router.health.interval_s == 1.5 and router._balancer.max_imbalance == 2


# --------------------------------------------------------------------------- in-process


async def test_least_loaded_spreads_idle_requests_round_robin() -> None:
    ms = mocks(3)
    async with Router(ms, policy="least_loaded", health_interval_s=0) as router:
        names = [await served_by(router, Request.chat("hi")) for _ in range(6)]
    assert names == ["m0", "m1", "m2", "m0", "m1", "m2"]
    assert router.outstanding == [0, 0, 0]


async def test_priority_policy_is_unchanged() -> None:
    ms = mocks(3)
    async with Router(ms) as router:
        names = {await served_by(router, Request.chat("hi")) for _ in range(4)}
        assert not router.health.running  # priority: no probes unless asked
    assert names == {"m0"}


async def test_least_loaded_picks_the_replica_with_fewest_open_streams() -> None:
    slow = [Mock(["a"] * 1000, name=f"m{i}", delay=0.01) for i in range(3)]
    router = Router(slow, policy="least_loaded", health_interval_s=0)
    held = [router.generate(Request.chat("hold")) for _ in range(4)]
    for s in held:
        await s.__anext__()  # four streams open: m0, m1, m2, m0
    assert router.outstanding == [2, 1, 1]
    await held[1].aclose()  # m1 now has none
    assert router.outstanding == [2, 0, 1]
    stream = router.generate(Request.chat("next"))
    await stream.__anext__()
    assert router.outstanding == [2, 1, 1]
    for s in [*held, stream]:
        await s.aclose()
    assert router.outstanding == [0, 0, 0]
    await router.aclose()


async def test_pre_stream_failover_keeps_the_counts_right() -> None:
    bad = Mock(["x"], name="bad", pre_stream_error="unavailable")
    good = Mock(["ok"], name="good")
    async with Router([bad, good], policy="least_loaded", health_interval_s=0) as router:
        for _ in range(6):  # round robin tries "bad" first every other time
            assert await served_by(router, Request.chat("hi")) == "good"
        assert router.outstanding == [0, 0]
        assert len(bad.requests) == 0
        assert router.breaker("bad").state == "open"


async def test_explicit_affinity_key_keeps_a_conversation_on_one_replica() -> None:
    async with Router(mocks(3), policy="least_loaded", health_interval_s=0) as router:
        for key in ("alice", "bob", "carol", "dave"):
            seen = {
                await served_by(router, Request.chat(f"turn {t}", affinity_key=key))
                for t in range(5)
            }
            assert len(seen) == 1, (key, seen)
        # the same requests without a key go round robin
        free = {await served_by(router, Request.chat("x")) for _ in range(3)}
        assert free == {"m0", "m1", "m2"}


async def test_derived_affinity_keeps_turns_together_and_yields_to_load() -> None:
    ms = [Mock(["a"] * 1000, name=f"m{i}", delay=0.01) for i in range(3)]
    router = Router(
        ms,
        policy="least_loaded",
        affinity_prefix_chars=2048,
        affinity_max_imbalance=1,
        health_interval_s=0,
    )
    turns = conversation("Tell me about lighthouses.", 4)
    homes = set()
    for req in turns:
        stream = router.generate(req)
        await stream.__anext__()
        homes.add(router.outstanding.index(1))
        await stream.aclose()
    assert len(homes) == 1
    home = homes.pop()
    held = []
    for _ in range(2):  # two streams on the home replica: over the limit of one
        s = router.generate(turns[0])
        await s.__anext__()
        held.append(s)
    assert router.outstanding[home] == 2
    s = router.generate(turns[1])
    await s.__anext__()
    assert router.outstanding[home] == 2  # the third went elsewhere
    for x in [*held, s]:
        await x.aclose()
    await router.aclose()


class Probed(Mock):
    """A Mock whose readiness probe can fail while ``ready()`` still says yes."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.probe_ok = True
        self.probes = 0

    async def probe(self) -> bool:
        self.probes += 1
        return self.probe_ok


async def test_probes_skip_an_unhealthy_replica_and_take_it_back() -> None:
    ms = [Probed(["x"], name=f"m{i}") for i in range(3)]
    ms[1].probe_ok = False
    router = Router(ms, policy="least_loaded", health_interval_s=0.01)
    await served_by(router, Request.chat("first"))  # the first use starts the probes
    await wait_for(lambda: router.health.rounds >= 2, "two probe rounds")
    before = len(ms[1].requests)
    names = Counter([await served_by(router, Request.chat("hi")) for _ in range(10)])
    assert len(ms[1].requests) == before and "m1" not in names
    assert router.status()[1]["healthy"] is False
    ms[1].probe_ok = True
    await wait_for(lambda: router.health.health[1].healthy, "m1 healthy again")
    names = Counter([await served_by(router, Request.chat("hi")) for _ in range(3)])
    assert names["m1"] == 1
    await router.aclose()


async def test_every_replica_unhealthy_is_a_backend_unavailable_naming_the_probe() -> None:
    ms = [Probed(["x"], name=f"m{i}") for i in range(2)]
    for m in ms:
        m.probe_ok = False
    router = Router(ms, policy="least_loaded", health_interval_s=0.01)
    router.health.start()
    await wait_for(lambda: router.health.rounds >= 1, "a probe round")
    with pytest.raises(BackendUnavailable, match="health probe"):
        await collect(router, Request.chat("hi"))
    assert [len(m.requests) for m in ms] == [0, 0]
    await router.aclose()


def _probe_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "inferd-health-probes"]


async def test_probe_task_starts_lazily_and_aclose_leaves_no_task() -> None:
    ms = [Probed(["x"], name=f"m{i}") for i in range(2)]
    router = Router(ms, policy="least_loaded", health_interval_s=0.01)
    assert not router.health.running and not _probe_tasks()
    await served_by(router, Request.chat("hi"))
    assert router.health.running and len(_probe_tasks()) == 1
    await served_by(router, Request.chat("hi"))
    assert len(_probe_tasks()) == 1  # one task per router, not per request
    await wait_for(lambda: all(m.probes >= 3 for m in ms), "probes of both replicas")
    await router.aclose()
    assert not router.health.running and not _probe_tasks()
    done = [m.probes for m in ms]
    await asyncio.sleep(0.05)
    assert [m.probes for m in ms] == done  # nothing probes after aclose
    await router.aclose()  # twice is fine


class Tokenizing(Mock):
    """A Mock with a word tokenizer and a reranker (capabilities say so)."""

    def capabilities(self) -> Capabilities:
        return Capabilities(tokenize=True, rerank=True)

    async def tokenize(self, content: Any, *, add_special: bool = False, **_: Any) -> list[int]:
        return [len(w) for w in str(content).split()]

    async def detokenize(self, tokens: list[int]) -> str:
        return f"{self.name}:{len(tokens)}"

    async def apply_template(self, request: Request) -> str:
        return f"{self.name}|{request.messages[-1].text}"

    async def token_pieces(self, tokens: list[int]) -> list[bytes]:
        return [b"p"] * len(tokens)

    async def rerank(self, request: RerankRequest) -> RerankResult:
        raise BackendUnavailable(f"{self.name} reranker is down")


async def test_tokens_and_rerank_go_to_the_first_capable_healthy_backend() -> None:
    plain, t1, t2 = Mock(name="plain"), Tokenizing(name="t1"), Tokenizing(name="t2")
    async with Router([plain, t1, t2], policy="least_loaded", health_interval_s=0) as r:
        caps = r.capabilities()
        assert caps.tokenize and caps.rerank
        assert await r.tokenize("ab cde") == [2, 3]
        assert await r.detokenize([1, 2]) == "t1:2"
        assert await r.apply_template(Request.chat("hey")) == "t1|hey"
        assert await r.token_pieces([1]) == [b"p"]
        t1.set_ready(False)
        assert await r.detokenize([1]) == "t2:1"
        with pytest.raises(BackendUnavailable, match="t2 reranker is down"):
            await r.rerank(RerankRequest("q", ("a", "b")))
    async with Router([Mock(name="plain")]) as r:
        assert not r.capabilities().tokenize
        with pytest.raises(InvalidRequest, match="tokenize"):
            await r.tokenize("x")
        with pytest.raises(EmbedUnsupported, match="rerank"):
            await r.rerank(RerankRequest("q", ("a",)))


async def test_router_tokenizes_like_the_real_model_behind_it(smollm2_path: Path) -> None:
    from inferd.backends.llamacpp import LlamaCpp

    llama = LlamaCpp(smollm2_path, n_ctx=256, n_threads=1)
    async with Router([Mock(name="plain"), llama], policy="least_loaded") as r:
        assert r.capabilities().tokenize
        ids = await llama.tokenize("Hello lighthouse")
        assert await r.tokenize("Hello lighthouse") == ids and ids
        assert await r.detokenize(ids) == await llama.detokenize(ids)


# --------------------------------------------------------------------------- daemons


@contextlib.contextmanager
def daemons(n: int, tokens: int, delay: float) -> Iterator[list[DaemonProc]]:
    """``n`` ``inferd serve`` subprocesses with a Mock streaming ``tokens`` tokens."""
    with short_tmpdir() as d:
        procs: list[DaemonProc] = []
        try:
            for i in range(n):
                cfg = write_config(
                    d / f"c{i}.toml",
                    [{"type": "mock", "tokens": ["t"] * tokens, "delay": delay, "name": f"d{i}"}],
                    daemon={"max_concurrent": 128, "max_queued": 128},
                )
                procs.append(DaemonProc.start(cfg, d / f"s{i}" / "infer.sock", wait=False))
            for p in procs:
                p.wait_ready()
            yield procs
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.proc.pid, signal.SIGCONT)
                p.stop()


async def served(proc: DaemonProc) -> int:
    """Generations the daemon itself counted (its admin socket's ``counters``)."""
    status = await admin_status(proc.sock)
    return int(status["counters"]["requests"])


@contextlib.asynccontextmanager
async def router_over(procs: list[DaemonProc], **kw: Any) -> AsyncIterator[Router]:
    clients = [Client(p.sock, name=f"d{i}", pool_timeout_s=60) for i, p in enumerate(procs)]
    router = Router(clients, policy="least_loaded", **kw)
    try:
        yield router
    finally:
        await router.aclose()


async def test_64_clients_spread_within_20_percent_of_even() -> None:
    with daemons(3, tokens=5, delay=0.01) as procs:
        base = [await served(p) for p in procs]
        async with router_over(procs, health_interval_s=0) as router:

            async def client(c: int) -> None:
                for t in range(3):
                    await served_by(router, Request.chat(f"client {c} turn {t}"))

            await asyncio.gather(*(client(c) for c in range(64)))
            assert router.outstanding == [0, 0, 0]
        counts = [await served(p) - b for p, b in zip(procs, base, strict=True)]
    print(f"requests per daemon: {counts}")
    assert sum(counts) == 192
    even = sum(counts) / 3
    assert all(abs(c - even) <= 0.2 * even for c in counts), counts


async def test_a_daemon_killed_mid_run_loses_no_request_that_had_not_streamed() -> None:
    with daemons(3, tokens=20, delay=0.05) as procs:
        async with router_over(procs, health_interval_s=0.2, health_timeout_s=5.0) as router:
            outcomes: list[tuple[bool, str]] = []  # (had streamed, "done" or error type)
            first_wave = asyncio.Event()
            started = 0

            async def one(c: int, t: int) -> None:
                nonlocal started
                streamed = False
                try:
                    async for ev in router.generate(Request.chat(f"c{c} t{t}")):
                        if not streamed and t == 0:
                            started += 1
                            if started == 64:
                                first_wave.set()
                        streamed = True
                        if isinstance(ev, Done):
                            outcomes.append((True, "done"))
                except Exception as e:
                    outcomes.append((streamed, type(e).__name__))

            async def client(c: int) -> None:
                for t in range(3):
                    await one(c, t)

            run = asyncio.gather(*(client(c) for c in range(64)))
            await asyncio.wait_for(first_wave.wait(), WAIT_S)
            assert router.outstanding[1] > 0  # d1 holds streams that have begun
            procs[1].proc.kill()
            await asyncio.wait_for(run, WAIT_S * 3)
    failed = [o for o in outcomes if o[1] != "done"]
    print(f"{len(outcomes)} requests, {len(failed)} ended BackendUnavailable after streaming")
    assert len(outcomes) == 192
    assert {kind for _, kind in failed} <= {"BackendUnavailable"}, failed
    assert all(streamed for streamed, _ in failed), "a request failed before streaming"
    assert 1 <= len(failed) < 64, len(failed)


async def test_affinity_keeps_each_multi_turn_conversation_on_one_daemon() -> None:
    openings = [f"Conversation number {i}: tell me about topic {i}." for i in range(6)]
    with daemons(3, tokens=3, delay=0.0) as procs:
        async with router_over(procs, affinity_prefix_chars=256, health_interval_s=0) as router:
            homes = []
            for opening in openings:
                seen = {await served_by(router, r) for r in conversation(opening, 4)}
                assert len(seen) == 1, (opening, seen)
                homes.append(seen.pop())
            assert len(set(homes)) > 1  # different conversations, different replicas
            keyed = {
                await served_by(router, Request.chat(f"turn {t}", affinity_key="user-7"))
                for t in range(4)
            }
            assert len(keyed) == 1
        async with router_over(procs, health_interval_s=0) as control:  # affinity off
            seen = {await served_by(control, r) for r in conversation(openings[0], 4)}
            assert len(seen) > 1  # without affinity the turns would wander


async def test_a_stopped_daemon_is_skipped_by_the_probes_before_requests_reach_it() -> None:
    with daemons(3, tokens=3, delay=0.0) as procs:
        # a generous probe timeout: a busy box must not fail the healthy replicas' probes
        async with router_over(procs, health_interval_s=0.1, health_timeout_s=5.0) as router:
            await router.refresh_state()  # starts the probes
            await wait_for(
                lambda: router.health.rounds >= 1 and all(h.healthy for h in router.health.health),
                "every replica healthy",
            )
            warm = [await served_by(router, Request.chat("warm")) for _ in range(3)]
            assert sorted(warm) == ["d0", "d1", "d2"]
            before = await served(procs[2])
            os.kill(procs[2].proc.pid, signal.SIGSTOP)
            try:
                await wait_for(lambda: not router.health.health[2].healthy, "d2 unhealthy")
                names = await asyncio.gather(
                    *(served_by(router, Request.chat(f"q{i}")) for i in range(30))
                )
            finally:
                os.kill(procs[2].proc.pid, signal.SIGCONT)
            assert set(names) == {"d0", "d1"}
            assert await served(procs[2]) == before  # the replica's own count
            await wait_for(lambda: router.health.health[2].healthy, "d2 healthy again")
            again = [await served_by(router, Request.chat("back")) for _ in range(3)]
            assert "d2" in again
            assert await served(procs[2]) == before + again.count("d2")


async def test_serve_cli_sets_the_policy_over_the_config() -> None:
    with short_tmpdir() as d:
        cfg = write_config(
            d / "c.toml",
            [{"type": "mock", "name": "r0"}, {"type": "mock", "name": "r1"}],
            router={"policy": "priority"},
        )
        bad = DaemonProc.start(
            cfg, d / "b" / "infer.sock", "--affinity-prefix-chars", "0", wait=False
        )
        assert bad.proc.wait(60) == 1
        assert b"affinity_prefix_chars" in bad.proc.stderr.read()  # type: ignore[union-attr]
        bad.stop()
        proc = DaemonProc.start(cfg, d / "s" / "infer.sock", "--router-policy", "least_loaded")
        try:
            async with Client(proc.sock) as client:
                names = []
                for _ in range(4):
                    events = await collect(client, Request.chat("hi"))
                    names.append(events[-1].backend)
            status = await admin_status(proc.sock)
        finally:
            proc.stop()
    assert names == ["r0", "r1", "r0", "r1"]  # priority would have said r0 four times
    assert [b["outstanding"] for b in status["backends"]] == [0, 0]
    assert all(b["healthy"] for b in status["backends"])


async def test_probes_reach_openai_compatible_replicas_over_http() -> None:
    from inferd.backends.openai_compat import OpenAICompat

    from .serve_helpers import bridge_in_process

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with bridge_in_process(Mock(["up"], name="m")) as (url, _, _):
        dead = OpenAICompat(
            base_url=f"http://127.0.0.1:{dead_port}/v1", model="m", api_key="", name="dead"
        )
        live = OpenAICompat(base_url=f"{url}/v1", model="m", api_key="", name="live")
        router = Router([dead, live], policy="least_loaded", health_interval_s=0.05)
        try:
            router.health.start()
            await wait_for(lambda: router.health.rounds >= 1, "a probe round")
            assert [h.healthy for h in router.health.health] == [False, True]
            names = {await served_by(router, Request.chat("hi")) for _ in range(4)}
            assert names == {"live"}
            assert router.breaker("dead").state == "closed"  # skipped, never tried
        finally:
            await router.aclose()


def test_a_router_reused_under_a_new_loop_probes_in_that_loop() -> None:
    ms = [Probed(["x"], name=f"m{i}") for i in range(2)]
    router = Router(ms, policy="least_loaded", health_interval_s=0.01)

    async def use() -> asyncio.AbstractEventLoop:
        await served_by(router, Request.chat("hi"))
        before = ms[0].probes
        await wait_for(lambda: ms[0].probes > before, "a probe in this loop")
        task = router.health._task
        assert task is not None
        return task.get_loop()

    first = asyncio.run(use())
    second = asyncio.run(use())
    assert first is not second

    async def close() -> None:
        await router.aclose()

    asyncio.run(close())  # the task belongs to a closed loop: no error, nothing left
    assert not router.health.running


class Queued(Mock):
    """A Mock that reports a queue depth the way a busy replica would."""

    depth = 0

    def queue_depth(self) -> int:
        return self.depth


async def test_a_reported_queue_depth_counts_as_load() -> None:
    ms = [Queued(["x"], name=f"m{i}") for i in range(3)]
    ms[0].depth = 5
    router = Router(ms, policy="least_loaded", health_interval_s=0.01)
    router.health.start()
    await wait_for(lambda: router.health.health[0].queue_depth == 5, "m0's depth probed")
    names = [await served_by(router, Request.chat("hi")) for _ in range(6)]
    assert "m0" not in names and Counter(names) == {"m1": 3, "m2": 3}
    await router.aclose()


async def test_a_daemons_admission_queue_steers_requests_elsewhere() -> None:
    with short_tmpdir() as d:
        procs = []
        try:
            for i in range(2):
                cfg = write_config(
                    d / f"c{i}.toml",
                    [{"type": "mock", "tokens": ["t"] * 400, "delay": 0.05, "name": f"d{i}"}],
                    daemon={"max_concurrent": 1, "max_queued": 8},
                )
                procs.append(DaemonProc.start(cfg, d / f"s{i}" / "infer.sock"))
            direct = Client(procs[0].sock)  # another user of d0, not through the router
            held = [direct.generate(Request.chat(f"busy {i}")) for i in range(3)]
            waiting = [asyncio.ensure_future(s.__anext__()) for s in held]
            await wait_for(lambda: waiting[0].done(), "d0 running one stream")
            async with router_over(procs, health_interval_s=0.1, health_timeout_s=5.0) as router:
                await router.refresh_state()
                await wait_for(lambda: router.health.health[0].queue_depth == 2, "d0's queue")
                names = [
                    await served_by(router, Request.chat("hi", max_tokens=2)) for _ in range(4)
                ]
            for w in waiting:
                w.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            for s in held:
                await s.aclose()
            await direct.aclose()
        finally:
            for p in procs:
                p.stop()
    assert names == ["d1"] * 4  # d0 had two requests queued behind one running


async def test_bridge_tokenizes_through_a_router_over_the_real_model(smollm2_path: Path) -> None:
    """``inferd bridge --config`` serves a Router: /tokenize and /detokenize reach the
    model behind it (before, the Router answered with Backend's refusal: 400)."""
    import aiohttp

    from inferd.backends.llamacpp import LlamaCpp

    from .serve_helpers import bridge_in_process

    llama = LlamaCpp(smollm2_path, n_ctx=256, n_threads=1)
    router = Router([Mock(name="plain"), llama], policy="least_loaded", health_interval_s=0)
    want = await llama.tokenize("Hello lighthouse")
    try:
        async with bridge_in_process(router) as (url, _, _), aiohttp.ClientSession() as http:
            async with http.post(f"{url}/tokenize", json={"content": "Hello lighthouse"}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["tokens"] == want
            async with http.post(f"{url}/detokenize", json={"tokens": want}) as r:
                assert r.status == 200
                assert (await r.json())["content"] == await llama.detokenize(want)
    finally:
        await router.aclose()


async def test_bridge_cli_sets_the_policy_over_the_config() -> None:
    import aiohttp

    from .serve_helpers import BridgeProc

    with short_tmpdir() as d:
        cfg = write_config(
            d / "c.toml",
            [{"type": "mock", "name": "r0", "tokens": ["zero"]}, {"type": "mock", "name": "r1"}],
        )
        bad = BridgeProc.start("--config", str(cfg), "--affinity-prefix-chars", "64", wait=False)
        assert bad.proc.wait(60) == 1
        assert b"least_loaded" in bad.proc.stderr.read()  # type: ignore[union-attr]
        bad.stop()
        bridge = BridgeProc.start("--config", str(cfg), "--router-policy", "least_loaded")
        try:
            replies = []
            async with aiohttp.ClientSession() as http:
                for _ in range(4):
                    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                    async with http.post(f"{bridge.url}/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        replies.append((await r.json())["choices"][0]["message"]["content"])
        finally:
            bridge.stop()
    assert replies == ["zero", "mock-response", "zero", "mock-response"]  # priority: r0 only
