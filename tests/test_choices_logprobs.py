"""``n`` choices and ``logprobs`` on the real SmolLM2-135M-Instruct: through ``LlamaCpp``,
the daemon (in process, over its Unix socket) and the HTTP bridge with openai-python
(docs/adr/0022-n-choices-and-logprobs.md).

Kept small (short prompts, 8-12 new tokens, one compute thread).
"""

from __future__ import annotations

import math
from collections import defaultdict

import openai
import pytest

from inferd.errors import InvalidRequest
from inferd.types import (
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    Done,
    Message,
    Request,
    Response,
    Text,
    TokenLogprob,
    choices_usage,
)

from .conftest import require_llama_core
from .serve_helpers import bridge_in_process, short_tmpdir
from .test_llama_server import llama_server, llama_server_bin  # noqa: F401 (fixtures)

pytestmark = pytest.mark.llama

PROMPT = (Message.user("Write one sentence about the sea."),)
#: Sampled (not greedy) so that different seeds give different choices.
SAMPLED = {"temperature": 0.9, "max_tokens": 10}


@pytest.fixture(scope="module", params=["split", "unified"])
def backend(request, smollm2_path):
    """One backend per KV layout, 4 slots (choices need a slot each)."""
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=2048, n_threads=1, parallel=4, kv_layout=request.param)
    yield b
    b.close()


async def _events(b, request: Request) -> list:
    return [ev async for ev in b.generate(request)]


async def _single(b, **kw) -> Response:
    return Response.collect(await _events(b, Request(PROMPT, **kw)))


def _check_logprobs(lps: tuple[TokenLogprob, ...], top_n: int, greedy: bool) -> None:
    assert lps, "no logprobs came back"
    for lp in lps:
        assert math.isfinite(lp.logprob) and lp.logprob <= 0.0
        assert len(lp.top) == top_n
        values = [t[2] for t in lp.top]
        assert all(math.isfinite(v) and v <= 0.0 for v in values)
        assert values == sorted(values, reverse=True), values
        if top_n:
            assert lp.logprob <= values[0] + 1e-9  # nothing beats the most likely token
            if greedy:  # the chosen token is the most likely one
                assert (lp.token, lp.bytes) == lp.top[0][:2]
                assert lp.logprob == pytest.approx(values[0], abs=1e-9)
            for _tok, raw, v in lp.top:
                if raw == lp.bytes:
                    assert v == pytest.approx(lp.logprob, abs=1e-9)


# ---------------------------------------------------------------- LlamaCpp


async def test_n_choices_are_the_seeded_single_requests(backend):
    events = await _events(backend, Request(PROMPT, n=3, seed=11, **SAMPLED))
    dones = [e for e in events if isinstance(e, Done)]
    assert isinstance(events[-1], Done)
    assert sorted(d.index for d in dones) == [0, 1, 2]
    assert {e.index for e in events} == {0, 1, 2}
    r = Response.collect(events)
    assert len(r.choices) == 3 and r.text == r.choices[0].text
    for i, choice in enumerate(r.choices):
        single = await _single(backend, seed=11 + i, **SAMPLED)
        assert choice.text == single.text, (i, choice.text, single.text)
        assert choice.done.usage.output_tokens == single.done.usage.output_tokens
        assert choice.done.usage.input_tokens == single.done.usage.input_tokens
    assert len({c.text for c in r.choices}) > 1, "three seeds gave one answer"
    total = choices_usage(dones)
    assert total.input_tokens == dones[0].usage.input_tokens
    assert total.output_tokens == sum(c.done.usage.output_tokens for c in r.choices)
    assert r.usage == total
    assert backend.kv_used() == 0


async def test_choices_without_a_seed_are_independent_and_free_their_cells(backend):
    r = Response.collect(
        await _events(backend, Request(PROMPT, n=4, temperature=1.5, max_tokens=8))
    )
    assert len(r.choices) == 4
    assert len({c.text for c in r.choices}) > 1
    assert backend.kv_used() == 0


async def test_leaving_a_stream_of_choices_frees_every_sequence(backend):
    gen = backend.generate(Request(PROMPT, n=3, seed=1, temperature=0.9, max_tokens=64))
    seen = set()
    async for ev in gen:
        seen.add(ev.index)
        if len(seen) == 3:
            break
    await gen.aclose()
    assert seen == {0, 1, 2}
    assert backend.kv_used() == 0


async def test_greedy_logprobs_are_the_top_token_and_spell_the_text(backend):
    r = await _single(backend, temperature=0, max_tokens=12, logprobs=True, top_logprobs=5)
    _check_logprobs(r.logprobs, 5, greedy=True)
    assert b"".join(bytes(lp.bytes) for lp in r.logprobs).decode() == r.text
    assert len(r.logprobs) == r.done.usage.output_tokens


async def test_sampled_logprobs_and_logprobs_without_alternatives(backend):
    r = await _single(backend, seed=5, logprobs=True, top_logprobs=3, **SAMPLED)
    _check_logprobs(r.logprobs, 3, greedy=False)
    plain = await _single(backend, seed=5, **SAMPLED)
    assert plain.text == r.text  # asking for logprobs does not change the reply
    bare = await _single(backend, seed=5, logprobs=True, **SAMPLED)
    _check_logprobs(bare.logprobs, 0, greedy=False)
    assert [lp.logprob for lp in bare.logprobs] == [lp.logprob for lp in r.logprobs]


async def test_logprobs_cost_nothing_when_not_asked(backend):
    events = await _events(backend, Request(PROMPT, temperature=0, max_tokens=6))
    assert all(not e.logprobs for e in events if isinstance(e, Text))
    assert all("logprobs" not in e.to_dict() for e in events)


async def test_choices_with_logprobs(backend):
    r = Response.collect(
        await _events(
            backend, Request(PROMPT, n=2, seed=3, logprobs=True, top_logprobs=2, **SAMPLED)
        )
    )
    for c in r.choices:
        _check_logprobs(c.logprobs, 2, greedy=False)
        assert b"".join(bytes(lp.bytes) for lp in c.logprobs).decode() == c.text


async def test_bad_choices_and_logprobs_name_the_field(backend):
    with pytest.raises(InvalidRequest, match=r"\bn="):
        Request(PROMPT, n=MAX_CHOICES + 1)
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        Request(PROMPT, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS + 1)
    with pytest.raises(InvalidRequest, match="top_logprobs"):
        Request(PROMPT, top_logprobs=2)
    with pytest.raises(InvalidRequest, match=r"n=5 .*parallel=4"):
        await _events(backend, Request(PROMPT, n=5))
    assert backend.kv_used() == 0


def test_choice_seeds_wrap_and_none_stays_none():
    from inferd.backends.llamacpp.choices import choice_seed

    assert choice_seed(None, 3) is None
    assert choice_seed(7, 2) == 9
    assert choice_seed(2**64 - 1, 1) == 0


# ---------------------------------------------------------------- bridge


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(trust_env=False, timeout=120),
    )


async def test_bridge_choices_and_logprobs_with_openai_python(backend):
    direct = Response.collect(
        await _events(
            backend, Request(PROMPT, n=3, seed=31, logprobs=True, top_logprobs=2, **SAMPLED)
        )
    )
    async with bridge_in_process(backend) as (url, _app, _runner):
        c = _client(url)
        msgs = [{"role": "user", "content": PROMPT[0].content[0].text}]
        kw = {"seed": 31, "temperature": 0.9, "max_tokens": 10}
        done = await c.chat.completions.create(
            model="m", messages=msgs, n=3, logprobs=True, top_logprobs=2, **kw
        )
        assert [ch.index for ch in done.choices] == [0, 1, 2]
        assert [ch.message.content for ch in done.choices] == [x.text for x in direct.choices]
        for ch, want in zip(done.choices, direct.choices, strict=True):
            toks = ch.logprobs.content
            assert [t.token for t in toks] == [lp.token for lp in want.logprobs]
            assert [t.bytes for t in toks] == [list(lp.bytes) for lp in want.logprobs]
            assert all(len(t.top_logprobs) == 2 for t in toks)
        assert done.usage.completion_tokens == direct.usage.output_tokens

        stream = await c.chat.completions.create(
            model="m",
            messages=msgs,
            n=2,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        )
        texts, tokens, finish = defaultdict(str), defaultdict(list), {}
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
                if ch.logprobs and ch.logprobs.content:
                    tokens[ch.index] += [t.token for t in ch.logprobs.content]
                if ch.finish_reason:
                    finish[ch.index] = ch.finish_reason
        assert [texts[0], texts[1]] == [x.text for x in direct.choices[:2]]
        assert set(finish) == {0, 1}
        for i in (0, 1):
            assert "".join(tokens[i]) == texts[i]
        assert usage is not None and usage.completion_tokens == sum(
            x.done.usage.output_tokens for x in direct.choices[:2]
        )

        for bad, field in (
            ({"n": 17}, "n"),
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ):
            with pytest.raises(openai.BadRequestError) as e:
                await c.chat.completions.create(model="m", messages=msgs, **bad)
            assert e.value.status_code == 400
            assert field in e.value.body["message"]
        await c.close()


# ---------------------------------------------------------------- other backends


@pytest.mark.server
@pytest.mark.slow
async def test_openai_compat_reads_choices_and_logprobs_from_llama_server(
    llama_server,  # noqa: F811 (the fixture imported above)
    backend,
):
    """llama-server (the peer) computes logprobs from the raw logits too: its greedy
    tokens and logprobs agree with ours while the two greedy replies agree."""
    from inferd.backends.openai_compat import OpenAICompat

    up = OpenAICompat(llama_server, api_key="", model="smollm2", read_timeout=300, max_retries=0)
    try:
        events = [e async for e in up.generate(Request(PROMPT, n=2, seed=41, **SAMPLED))]
        assert sorted(e.index for e in events if isinstance(e, Done)) == [0, 1]
        r = Response.collect(events)
        assert len(r.choices) == 2 and all(c.text for c in r.choices)
        assert r.usage.output_tokens == sum(c.done.usage.output_tokens for c in r.choices)
        greedy = Request(PROMPT, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
        theirs = Response.collect([e async for e in up.generate(greedy)])
    finally:
        await up.aclose()
    _check_logprobs(theirs.logprobs, 3, greedy=True)
    assert b"".join(bytes(lp.bytes) for lp in theirs.logprobs).decode() == theirs.text
    ours = await _single(backend, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    assert ours.logprobs[0].token == theirs.logprobs[0].token
    for a, b in zip(ours.logprobs, theirs.logprobs, strict=False):
        if a.token != b.token:
            break
        assert a.logprob == pytest.approx(b.logprob, abs=0.05)


def test_anthropic_refuses_choices_and_logprobs():
    from inferd.anthropic_wire import request_to_anthropic

    for kw, field in (({"n": 2}, r"\bn=2"), ({"logprobs": True}, "logprobs")):
        with pytest.raises(InvalidRequest, match=field):
            request_to_anthropic(Request(PROMPT, max_tokens=8, **kw), model="claude")


# ---------------------------------------------------------------- daemon


async def test_daemon_carries_choices_and_logprobs(backend):
    """Last in the file: the daemon closes the backend it serves when it stops."""
    from inferd.serve.client import Client
    from inferd.serve.daemon import Daemon

    request = Request(PROMPT, n=2, seed=21, logprobs=True, top_logprobs=2, **SAMPLED)
    direct = Response.collect(await _events(backend, request))
    with short_tmpdir() as d:
        daemon = Daemon(backend, d / "infer.sock")
        await daemon.start()
        client = Client(d / "infer.sock")
        try:
            events = [e async for e in client.generate(request)]
        finally:
            await client.aclose()
            await daemon.close()
    assert sum(isinstance(e, Done) for e in events) == 2
    got = Response.collect(events)
    assert [c.text for c in got.choices] == [c.text for c in direct.choices]
    assert [c.logprobs for c in got.choices] == [c.logprobs for c in direct.choices]
