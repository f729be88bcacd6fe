"""Per-request sampling fields (issue 15, docs/adr/0021-per-request-sampling-chain.md).

On the real SmolLM2: the binding's chain (exact token ids), ``LlamaCpp``, the daemon and
the bridge driven by openai-python, and ``OpenAICompat`` in front of llama.cpp's own
``llama-server`` with a recording proxy between them that shows what the server got.
Every comparison is computed here (greedy or a fixed seed), never a stored reply.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from inferd.anthropic_wire import request_to_anthropic
from inferd.backends.anthropic_compat import AnthropicCompat
from inferd.backends.openai_compat import OpenAICompat
from inferd.errors import InvalidRequest
from inferd.openai_wire import SAMPLING_WIRE_FIELDS, request_from_openai, request_to_openai
from inferd.types import MAX_LOGIT_BIAS, Done, Request, Text

from .conftest import require_llama_core
from .serve_helpers import BridgeProc, DaemonProc, short_tmpdir, write_config
from .test_llama_server import llama_server, llama_server_bin  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.llama, pytest.mark.slow]

#: A prompt whose greedy reply repeats itself, so penalties and DRY have work to do.
PROMPT = "Write the word 'banana' fifteen times, separated by spaces."
#: Tokens per reply: enough for a repetition to start, small for a 2-core box.
N = 24
#: Settings of a sampled reply compared with and without one more sampler.
SAMPLED: dict[str, Any] = {"temperature": 0.5, "seed": 42}
#: A sampled chain under which SmolLM2 often repeats one word, so DRY and the penalties
#: have a repetition to act on; :func:`repeating_settings` finds a seed for it.
REPEATING_CHAIN: dict[str, Any] = {"temperature": 0.5, "typical_p": 0.3}
#: A seeded sampled reply (any seed: compared with llama-server, not for repetition).
REPEATING: dict[str, Any] = {**REPEATING_CHAIN, "seed": 7}
#: The repetition :func:`repeating_settings` asks of a reply, and the seeds it tries.
MIN_REPEATS, MAX_SEEDS = 5, 32
_repeating_seed: dict[str, int] = {}
#: Every extension field set at once (values inside every range), as one request sends.
EVERY_FIELD: dict[str, Any] = {
    "typical_p": 0.9,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "repeat_penalty": 1.1,
    "repeat_last_n": 32,
    "dry_multiplier": 0.8,
    "dry_base": 1.75,
    "dry_allowed_length": 2,
    "dry_penalty_last_n": 48,
    "dry_sequence_breakers": ["\n", ";"],
    "xtc_probability": 0.5,
    "xtc_threshold": 0.2,
}


@pytest.fixture(scope="module")
def backend(smollm2_path: Path) -> Iterator[Any]:
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=1024, n_threads=1, parallel=2)
    yield b
    b.close()


async def reply(backend: Any, prompt: str = PROMPT, **kw: Any) -> str:
    events = [ev async for ev in backend.generate(Request.chat(prompt, max_tokens=N, **kw))]
    assert isinstance(events[-1], Done) and sum(isinstance(e, Done) for e in events) == 1
    return "".join(e.text for e in events if isinstance(e, Text))


def chain_ids(backend: Any, prompt: str = PROMPT, n: int = N, **settings: Any) -> list[int]:
    """The token ids one binding-level chain draws for ``prompt`` (greedy unless told)."""
    from inferd._fast import _llama as L

    model = backend.model
    toks = backend.tokenize_prompt(backend.render(Request.chat(prompt)))
    settings.setdefault("temperature", 0.0)
    sampler = L.Sampler(model, **settings)
    ctx = L.Context(model, n_threads=1, n_ctx=512, n_batch=256, n_seq_max=1)
    try:
        batch = L.Batch(256)
        last = batch.add_sequence(toks, 0, 0)
        ctx.decode(batch)
        out = [sampler.sample(ctx, last)]
        one, pos = L.Batch(1), len(toks)
        while len(out) < n and not model.is_eog(out[-1]):
            one.clear()
            one.add(out[-1], pos, 0, True)
            ctx.decode(one)
            out.append(sampler.sample(ctx, 0))
            pos += 1
    finally:
        ctx.close()
        sampler.close()
    return out


def most_repeated(text: str) -> int:
    return max(collections.Counter(text.split()).values(), default=0)


def longest_repeat(text: str) -> int:
    """The longest run of words and spaces that repeats an earlier run (what DRY cuts)."""
    units = re.findall(r"\S+|\s+", text)
    best = 0
    for i in range(1, len(units)):
        for j in range(i):
            n = 0
            while i + n < len(units) and units[j + n] == units[i + n]:
                n += 1
            best = max(best, n)
    return best


async def repeating_settings(backend: Any) -> dict[str, Any]:
    """:data:`REPEATING_CHAIN` with the first seed whose reply repeats one word at least
    :data:`MIN_REPEATS` times. Which seed does depends on the CPU: a sampled draw follows
    the logits' last bits, and those differ between SIMD kernels (an AVX-512 machine
    drew other replies than the machine the seed was first chosen on), so the seed is
    searched for, once."""
    if "seed" not in _repeating_seed:
        for seed in range(1, MAX_SEEDS + 1):
            if most_repeated(await reply(backend, **REPEATING_CHAIN, seed=seed)) >= MIN_REPEATS:
                _repeating_seed["seed"] = seed
                break
        else:
            pytest.fail(f"no seed in 1..{MAX_SEEDS} gave a reply repeating a word")
    return {**REPEATING_CHAIN, "seed": _repeating_seed["seed"]}


# ----------------------------------------------------------------- logit_bias


async def test_logit_bias_ban_never_appears_and_changes_the_reply(backend) -> None:
    plain = chain_ids(backend)
    first = plain[0]
    common = collections.Counter(plain).most_common(1)[0][0]
    banned = chain_ids(backend, logit_bias={first: -100, common: -100})
    assert first not in banned and common not in banned
    assert banned != plain
    # LlamaCpp's reply is exactly the binding's chain: the ban reached the sequence.
    text = await reply(backend, temperature=0, logit_bias={first: -100, common: -100})
    assert text == backend.model.detokenize(banned)
    assert text != await reply(backend, temperature=0)
    # A positive bias pulls a token in: +100 on a token makes it the greedy choice.
    forced = chain_ids(backend, n=3, logit_bias={common: 100})
    assert forced == [common] * 3


async def test_logit_bias_keys_arrive_as_strings(backend) -> None:
    first = chain_ids(backend, n=1)[0]
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "max_tokens": N,
        "logit_bias": {str(first): -100},
    }
    r = request_from_openai(body)
    assert dict(r.logit_bias or {}) == {first: -100.0}
    text = await reply(backend, temperature=0, logit_bias={first: -100})
    events = [ev async for ev in backend.generate(r)]
    assert "".join(e.text for e in events if isinstance(e, Text)) == text


def test_binding_limits_and_the_dry_cache(backend) -> None:
    """The binding's own bounds (for callers that skip ``Request``) and the per-model
    cache of prepared DRY samplers (DRY_CACHE_SIZE), whose clones draw as fresh ones."""
    from inferd._fast import _llama as L

    model = backend.model
    too_long = L.MAX_SAMPLER_HISTORY + 1
    for kw, name in [
        ({"penalty_last_n": too_long}, "repeat_last_n"),
        ({"dry_penalty_last_n": too_long}, "dry_penalty_last_n"),
        ({"penalty_last_n": -1}, "repeat_last_n"),
        ({"typical_p": 1.5}, "typical_p"),
        ({"logit_bias": {i: 1.0 for i in range(L.MAX_BINDING_LOGIT_BIAS + 1)}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias"),
        (
            {
                "dry_multiplier": 1.0,
                "dry_sequence_breakers": ["x"] * (L.MAX_BINDING_DRY_BREAKERS + 1),
            },
            "dry_sequence_breakers",
        ),
    ]:
        with pytest.raises(ValueError, match=name):
            L.Sampler(model, **kw)
    dry = {"dry_multiplier": 0.8, "dry_allowed_length": 1}
    fresh = chain_ids(backend, n=12, **dry, dry_base=1.5)
    for i in range(L.DRY_CACHE_SIZE + 3):  # evicts the oldest prepared samplers
        L.Sampler(model, temperature=0, dry_multiplier=0.8, dry_base=2.0 + i).close()
    assert len(L._dry_protos[model]) == L.DRY_CACHE_SIZE
    assert chain_ids(backend, n=12, **dry, dry_base=1.5) == fresh  # prepared anew
    assert chain_ids(backend, n=12, **dry, dry_base=1.5) == fresh  # a clone of it


# ----------------------------------------------------------------- penalties, DRY, XTC


async def test_penalties_change_a_repetitive_reply(backend) -> None:
    base = await reply(backend, temperature=0)
    assert most_repeated(base) >= 5, base  # the prompt does make it repeat
    for kw in ({"repeat_penalty": 1.5}, {"frequency_penalty": 1.5}):
        got = await reply(backend, temperature=0, **kw)
        assert got != base, kw
        assert most_repeated(got) < most_repeated(base), (kw, got)
    # repeat_last_n=0 turns the penalty off (llama.cpp's meaning): the reply is the plain one
    assert await reply(backend, temperature=0, repeat_penalty=1.5, repeat_last_n=0) == base


async def test_dry_breaks_a_greedy_repetition(backend) -> None:
    base = await reply(backend, temperature=0)
    dry = await reply(backend, temperature=0, dry_multiplier=0.8)
    assert dry != base
    assert most_repeated(dry) < most_repeated(base), dry
    # a window of -1 is the whole sequence, as in llama.cpp
    assert await reply(backend, temperature=0, dry_multiplier=0.8, dry_penalty_last_n=-1)


async def test_dry_settings_are_prepared_off_the_event_loop(backend, monkeypatch) -> None:
    """Preparing DRY walks the vocabulary; doing it on the loop would let one client's
    new settings stall every other stream (no client may stall another)."""
    import threading

    seen: list[bool] = []
    prepare = backend._prepare_choices

    def spy(request: Request) -> Any:
        seen.append(threading.current_thread() is threading.main_thread())
        return prepare(request)

    monkeypatch.setattr(backend, "_prepare_choices", spy)
    await reply(backend, temperature=0, dry_multiplier=0.8, dry_allowed_length=3)
    await reply(backend, temperature=0)
    assert seen == [False, True]  # DRY in a worker thread; plain requests stay inline


@pytest.mark.parametrize(
    ("base", "extra"),
    [
        ("repeating", {"dry_multiplier": 0.8}),
        ("repeating", {"presence_penalty": 1.0}),
        ("repeating", {"frequency_penalty": 1.0}),
        ("sampled", {"typical_p": 0.3}),
        ("sampled", {"xtc_probability": 1.0, "xtc_threshold": 0.1}),
    ],
    ids=["dry", "presence", "frequency", "typical", "xtc"],
)
async def test_each_sampler_changes_a_seeded_reply(backend, base, extra) -> None:
    repeats = base == "repeating"  # DRY and penalties act on repetition: find some
    settings = await repeating_settings(backend) if repeats else SAMPLED
    plain = await reply(backend, **settings)
    assert await reply(backend, **settings) == plain  # the seed makes it repeatable
    if repeats:
        assert most_repeated(plain) >= MIN_REPEATS, plain
    got = await reply(backend, **settings, **extra)
    assert got != plain
    assert await reply(backend, **settings, **extra) == got
    if repeats:
        # what each one penalises: DRY a sequence that repeats an earlier one (it may
        # keep the word and vary what follows), the penalties a word seen before
        measure = longest_repeat if "dry_multiplier" in extra else most_repeated
        assert measure(got) < measure(plain), got


async def test_concurrent_streams_keep_their_own_chains(backend) -> None:
    """Two streams with different settings, decoded in the same steps, each equal the
    same request run alone (split KV layout: a batched reply equals its solo reply)."""
    first = chain_ids(backend, n=1)[0]
    a = {"temperature": 0, "logit_bias": {first: -100}, "repeat_penalty": 1.3}
    b = {**SAMPLED, "dry_multiplier": 0.8, "xtc_probability": 0.5, "typical_p": 0.9}
    prompt_b = "Name five fruits and say why each one is good."
    solo = []
    for prompt, kw in ((PROMPT, a), (prompt_b, b)):
        backend.clear_prefix_cache()
        solo.append(await reply(backend, prompt, **kw))
    backend.clear_prefix_cache()
    together = await asyncio.gather(reply(backend, PROMPT, **a), reply(backend, prompt_b, **b))
    assert backend.batching_stats()["max_seqs"] >= 2  # they did share decode steps
    assert list(together) == solo


# ----------------------------------------------------------------- bad input


async def test_bad_input_names_the_field(backend) -> None:
    n_vocab = backend.model.n_vocab
    with pytest.raises(InvalidRequest, match=rf"logit_bias.*{n_vocab + 5}"):
        await reply(backend, temperature=0, logit_bias={n_vocab + 5: -100})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"logit_bias": {"5": "high"}}, r"logit_bias\[5\] must be a number"),
        ({"logit_bias": {"five": 1}}, "logit_bias key"),
        ({"logit_bias": {"5": 101}}, r"logit_bias\[5\]"),
        ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "MAX_LOGIT_BIAS"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"repeat_last_n": -2}, "repeat_last_n"),
        ({"typical_p": 1.5}, "typical_p"),
        ({"dry_base": 0.5}, "dry_base"),
        ({"dry_sequence_breakers": "\n"}, "dry_sequence_breakers"),
        ({"dry_sequence_breakers": [""]}, "dry_sequence_breakers"),
        ({"xtc_probability": "often"}, "xtc_probability"),
    ]
    for extra, pattern in cases:
        body = {"messages": [{"role": "user", "content": "hi"}], **extra}
        with pytest.raises(InvalidRequest, match=pattern):
            request_from_openai(body)


def test_wire_round_trip_and_anthropic_refusal() -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "logit_bias": {"12": -100, "7": 2.5},
        **EVERY_FIELD,
    }
    r = request_from_openai(body)
    out = request_to_openai(r)
    assert {k: out[k] for k in SAMPLING_WIRE_FIELDS} == {k: body[k] for k in SAMPLING_WIRE_FIELDS}
    assert set(SAMPLING_WIRE_FIELDS) == {*EVERY_FIELD, "logit_bias"}
    # Anthropic's Messages API takes temperature/top_p/top_k and nothing of the rest.
    ok = request_to_anthropic(Request.chat("hi", temperature=0.5, top_p=0.9, top_k=5), model="m")
    assert (ok["temperature"], ok["top_p"], ok["top_k"]) == (0.5, 0.9, 5)
    for name, value in [("logit_bias", {"1": -100}), *EVERY_FIELD.items()]:
        one = request_from_openai({"messages": body["messages"], name: value})
        with pytest.raises(InvalidRequest, match=name):
            request_to_anthropic(one, model="m")


async def test_anthropic_compat_refuses_before_any_connection() -> None:
    b = AnthropicCompat("http://127.0.0.1:9", api_key="unused", max_retries=0)
    try:
        with pytest.raises(InvalidRequest, match="dry_multiplier"):
            async for _ in b.generate(Request.chat("hi", dry_multiplier=0.5)):
                pass
    finally:
        await b.aclose()


# ----------------------------------------------------------------- daemon and bridge


@pytest.fixture(scope="module")
def served(smollm2_path: Path) -> Iterator[tuple[DaemonProc, BridgeProc]]:
    """``inferd serve`` on SmolLM2 (the module backend's settings) and a bridge before it."""
    require_llama_core()
    with short_tmpdir() as d:
        smol = {"type": "llamacpp", "model": str(smollm2_path), "name": "smol"}
        cfg = write_config(d / "c.toml", [{**smol, "n_ctx": 1024, "n_threads": 1, "parallel": 2}])
        daemon = DaemonProc.start(cfg, d / "infer.sock")
        try:
            bridge = BridgeProc.start("--socket", str(daemon.sock))
            try:
                yield daemon, bridge
            finally:
                bridge.stop()
        finally:
            daemon.stop()


def openai_client(bridge: BridgeProc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{bridge.url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False, timeout=300),
    )


async def test_daemon_and_bridge_honour_the_fields(backend, served) -> None:
    """The same settings give the same reply in-process, through the daemon and through
    the bridge (OpenAI's names as arguments, llama-server's in ``extra_body``)."""
    from inferd.serve.client import Client

    daemon, bridge = served
    first = chain_ids(backend, n=1)[0]
    extensions = {"repeat_penalty": 1.2, "dry_multiplier": 0.8, "typical_p": 0.9}
    settings = {"logit_bias": {first: -100}, "frequency_penalty": 0.5, **extensions}
    want = await reply(backend, temperature=0, **settings)
    assert want != await reply(backend, temperature=0)
    client = Client(daemon.sock)
    try:
        assert await reply(client, temperature=0, **settings) == want
    finally:
        await client.aclose()
    async with openai_client(bridge) as c:
        r = await c.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=N,
            temperature=0,
            logit_bias={str(first): -100},
            frequency_penalty=0.5,
            extra_body=extensions,
        )
    assert r.choices[0].message.content == want


async def test_bridge_answers_400_naming_the_field(backend, served) -> None:
    _, bridge = served
    too_far = backend.model.n_vocab + 7
    cases: list[tuple[dict[str, Any], str]] = [
        ({"logit_bias": {str(too_far): -100}}, f"logit_bias: {too_far}"),  # the model says
        ({"logit_bias": {"5": "x"}}, "logit_bias[5]"),
        ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "MAX_LOGIT_BIAS"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repeat_penalty": -1}, "repeat_penalty"),
        ({"dry_sequence_breakers": [""]}, "dry_sequence_breakers"),
        ({"xtc_threshold": 2}, "xtc_threshold"),
    ]
    async with openai_client(bridge) as c:
        for extra, name in cases:
            with pytest.raises(openai.BadRequestError) as info:
                await c.chat.completions.create(
                    model="smol",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=4,
                    extra_body=extra,
                )
            assert info.value.status_code == 400
            assert name in str(info.value), (name, str(info.value))


# ----------------------------------------------------------------- OpenAICompat -> llama-server


@contextlib.asynccontextmanager
async def recording_proxy(upstream: str) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A pass-through HTTP proxy on 127.0.0.1 that keeps every JSON body it forwards.

    A fresh upstream connection per request: llama-server closes idle keep-alive
    connections after a few seconds, and a pooled one it had closed made a forwarded
    request fail with "Server disconnected" whenever a test paused that long."""
    bodies: list[dict[str, Any]] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def forward(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        bodies.append(orjson.loads(raw))
        headers = {"Content-Type": "application/json"}
        async with session.post(upstream + request.path, data=raw, headers=headers) as up:
            kind = up.headers.get("Content-Type", "application/json")
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": kind})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", bodies
    finally:
        await runner.cleanup()
        await session.close()


@pytest.mark.server
async def test_openai_compat_sends_every_field_to_llama_server(backend, llama_server) -> None:  # noqa: F811
    """What llama-server receives carries each field under its own name (``logit_bias``
    keys as strings), and the server honours them: the ban changes its greedy reply."""
    first = chain_ids(backend, n=1)[0]
    ban = {"logit_bias": {first: -100}}
    async with recording_proxy(llama_server) as (url, bodies):
        b = OpenAICompat(url, api_key="", model="smollm2", read_timeout=300, max_retries=0)
        try:
            plain = await reply(b, temperature=0)
            banned = await reply(b, temperature=0, **ban)
            await reply(b, temperature=0, **ban, **EVERY_FIELD)
        finally:
            await b.aclose()
    assert len(bodies) == 3
    assert not set(SAMPLING_WIRE_FIELDS) & set(bodies[0])  # unset fields are not sent
    assert bodies[1]["logit_bias"] == {str(first): -100}
    sent = {k: bodies[2][k] for k in SAMPLING_WIRE_FIELDS}
    assert sent == {**EVERY_FIELD, "logit_bias": {str(first): -100}}
    assert banned != plain


@pytest.mark.server
async def test_llamacpp_replies_as_llama_server_does(backend, llama_server) -> None:  # noqa: F811
    """Same model, same vendored llama.cpp, same settings: LlamaCpp's chain (order, the
    prompt shown to the penalties and DRY, XTC's seed) gives llama-server's reply."""
    first = chain_ids(backend, n=1)[0]
    cases: list[dict[str, Any]] = [
        {"temperature": 0, "logit_bias": {first: -100}},
        {"temperature": 0, "repeat_penalty": 1.5},
        {"temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5},
        {"temperature": 0, "dry_multiplier": 0.8},
        {"temperature": 0, "xtc_probability": 1.0, "xtc_threshold": 0.1, "seed": 3},
        {**REPEATING, "dry_multiplier": 0.8},
    ]
    b = OpenAICompat(llama_server, api_key="", model="smollm2", read_timeout=300, max_retries=0)
    try:
        for kw in cases:
            assert await reply(backend, **kw) == await reply(b, **kw), kw
    finally:
        await b.aclose()
