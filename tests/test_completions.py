"""Raw completions (issue 15, docs/adr/0025-raw-completions-and-reasoning.md).

``Request.completion(prompt)`` on real SmolLM2 through ``LlamaCpp`` (its tokens are the
greedy continuation computed directly through the binding, and what llama-server's
``/completion`` gives for the same prompt), through the bridge's ``/v1/completions``
with openai-python's ``client.completions.create`` (streamed and not), sent by
``OpenAICompat`` to an upstream's ``/v1/completions`` (the scripted test upstream and a
real llama-server), refused by ``AnthropicCompat``, and carried by the daemon wire.
"""

from __future__ import annotations

import json
import urllib.request

import aiohttp
import openai
import pytest

from inferd.backends.anthropic_compat import AnthropicCompat
from inferd.backends.mock import Mock
from inferd.backends.openai_compat import OpenAICompat
from inferd.completions_wire import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    request_from_completions,
    request_to_completions,
)
from inferd.errors import InvalidRequest
from inferd.serve import wire
from inferd.types import MAX_PROMPT_CHARS, Done, Message, Request, Response, StopReason, Text

from .serve_helpers import bridge_in_process
from .test_llama_server import llama_server, llama_server_bin  # noqa: F401  (fixtures)
from .upstream import Stream, Upstream, completion_stream

#: A prompt whose greedy continuation is long and unambiguous on SmolLM2.
COUNTING = "1, 2, 3, 4, 5, 6,"
PROSE = "The capital of France is"
N_TOKENS = 12


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from tests.conftest import require_llama_core

    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=1024, n_threads=1, parallel=2)
    yield b
    b.close()


def _direct_greedy(backend, prompt: str, n: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, greedy continuation) computed straight through the binding: the
    prompt tokenized as llama-server does (BOS if the model wants it, special tokens
    parsed), one decode, then argmax steps until ``n`` tokens or end of generation."""
    from inferd._fast import _llama as L

    model = backend.model
    toks = model.tokenize(prompt, add_special=True, parse_special=True)
    ctx = L.Context(model, n_threads=1, n_ctx=256, n_batch=128, n_seq_max=1)
    try:
        batch = L.Batch(128)
        last = batch.add_sequence(toks, 0, 0)
        ctx.decode(batch)
        sampler = L.Sampler(model, temperature=0)
        out = [sampler.sample(ctx, last)]
        pos = len(toks)
        while len(out) < n and not model.is_eog(out[-1]):
            out.append(ctx.step(sampler, out[-1], pos))
            pos += 1
    finally:
        ctx.close()
    return toks, [t for t in out if not model.is_eog(t)]


async def _collect(backend, request: Request) -> Response:
    return Response.collect([ev async for ev in backend.generate(request)])


# --------------------------------------------------------------------------- LlamaCpp


@pytest.mark.parametrize("prompt", [COUNTING, PROSE])
async def test_raw_completion_is_the_direct_greedy_continuation(smol, prompt: str) -> None:
    r = await _collect(smol, Request.completion(prompt, max_tokens=N_TOKENS, temperature=0))
    toks, greedy = _direct_greedy(smol, prompt, N_TOKENS)
    assert r.text == smol.model.detokenize(greedy)
    assert r.text.strip()  # a real continuation, not an empty reply
    assert r.done.usage.input_tokens == len(toks)
    assert r.done.usage.output_tokens == len(greedy)
    if len(greedy) == N_TOKENS:
        assert r.stop_reason is StopReason.MAX_TOKENS


async def test_raw_prompt_bypasses_the_chat_template(smol) -> None:
    """A chat request with the same text renders SmolLM2's template (more tokens, and a
    different reply); the raw one sees exactly the prompt's tokens."""
    raw = await _collect(smol, Request.completion(COUNTING, max_tokens=4, temperature=0))
    chat = await _collect(smol, Request.chat(COUNTING, max_tokens=4, temperature=0))
    assert raw.done.usage.input_tokens == len(smol.tokenize_prompt(COUNTING))
    assert chat.done.usage.input_tokens > raw.done.usage.input_tokens + 5


async def test_stop_sequence_and_max_tokens(smol) -> None:
    full = await _collect(smol, Request.completion(COUNTING, max_tokens=N_TOKENS, temperature=0))
    assert " 9" in full.text  # the counting continues: ' 7, 8, 9, ...'
    cut = full.text.index(" 9")
    stopped = await _collect(
        smol, Request.completion(COUNTING, max_tokens=N_TOKENS, temperature=0, stop=[" 9"])
    )
    assert stopped.text == full.text[:cut]
    assert stopped.stop_reason is StopReason.STOP_SEQUENCE
    short = await _collect(smol, Request.completion(COUNTING, max_tokens=3, temperature=0))
    assert short.stop_reason is StopReason.MAX_TOKENS
    assert short.done.usage.output_tokens == 3
    assert full.text.startswith(short.text)


async def test_raw_completion_matches_llama_server(smol, llama_server) -> None:  # noqa: F811
    """The differential peer: llama-server's native ``/completion``, same prompt, greedy."""
    body = {"prompt": PROSE, "n_predict": N_TOKENS, "temperature": 0, "cache_prompt": False}
    req = urllib.request.Request(
        f"{llama_server}/completion",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:  # loopback only
        peer = json.loads(resp.read())
    ours = await _collect(smol, Request.completion(PROSE, max_tokens=N_TOKENS, temperature=0))
    assert ours.text == peer["content"]
    assert ours.done.usage.input_tokens == peer["tokens_evaluated"]


async def test_openai_compat_against_llama_server_v1_completions(smol, llama_server) -> None:  # noqa: F811
    up = OpenAICompat(llama_server, api_key="", model="smollm2", read_timeout=300, max_retries=0)
    try:
        theirs = await _collect(
            up, Request.completion(COUNTING, max_tokens=N_TOKENS, temperature=0)
        )
    finally:
        await up.aclose()
    ours = await _collect(smol, Request.completion(COUNTING, max_tokens=N_TOKENS, temperature=0))
    assert theirs.text == ours.text
    assert theirs.done.usage.output_tokens == ours.done.usage.output_tokens
    assert theirs.stop_reason is StopReason.MAX_TOKENS


# --------------------------------------------------------------------------- bridge


async def test_bridge_completions_create_non_streamed(smol) -> None:
    async with bridge_in_process(smol) as (url, _, _):
        r = await _client(url).completions.create(
            model="smol", prompt=COUNTING, max_tokens=N_TOKENS, temperature=0
        )
    _, greedy = _direct_greedy(smol, COUNTING, N_TOKENS)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "smol"
    assert r.choices[0].text == smol.model.detokenize(greedy)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(smol.tokenize_prompt(COUNTING))
    assert r.usage.completion_tokens == N_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


async def test_bridge_completions_create_streamed_with_stop_and_usage(smol) -> None:
    full = await _collect(smol, Request.completion(COUNTING, max_tokens=N_TOKENS, temperature=0))
    async with bridge_in_process(smol) as (url, _, _):
        stream = await _client(url).completions.create(
            model="smol",
            prompt=[COUNTING],
            max_tokens=N_TOKENS,
            temperature=0,
            stop=" 9",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.text[: full.text.index(" 9")]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == len(smol.tokenize_prompt(COUNTING))
    assert 0 < usage.completion_tokens < N_TOKENS


async def test_bridge_stream_ends_with_done_marker() -> None:
    async with bridge_in_process(Mock(["Hel", "lo"])) as (url, _, _):
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "Hi", "stream": True, "max_tokens": 5}
            async with http.post(f"{url}/v1/completions", json=body) as r:
                raw = (await r.read()).decode()
    assert r.status == 200 and r.content_type == "text/event-stream"
    assert raw.endswith("data: [DONE]\n\n")
    datas = [json.loads(ln[6:]) for ln in raw.split("\n\n") if ln.startswith("data: {")]
    assert "".join(d["choices"][0]["text"] for d in datas) == "Hello"
    assert datas[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": 5}, "'prompt'"),
        ({"prompt": ["one", "two"]}, "'prompt' holds 2 prompts"),
        ({"prompt": [1, 2, 3]}, "'prompt' as token ids"),
        ({"prompt": ""}, "'prompt' is empty"),
        ({}, "'prompt' is missing"),
        ({"prompt": "hi", "echo": True}, "'echo'"),
        ({"prompt": "hi", "suffix": "end"}, "'suffix'"),
        ({"prompt": "hi", "logprobs": 21}, "'logprobs' must be an integer from 0 to 20"),
        ({"prompt": "hi", "logprobs": True}, "'logprobs' must be an integer"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "n": 99}, "MAX_CHOICES"),
        ({"prompt": "hi", "stop": 7}, "'stop'"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(body: dict, needle: str) -> None:
    mock = Mock(["x"])
    async with bridge_in_process(mock) as (url, _, _):
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/completions", json=body) as r:
                err = await r.json()
    assert r.status == 400
    assert err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]
    assert mock.requests == []  # refused before any backend saw it


async def test_openai_client_gets_400_for_echo_and_several_prompts() -> None:
    async with bridge_in_process(Mock(["x"])) as (url, _, _):
        client = _client(url)
        with pytest.raises(openai.BadRequestError, match="echo"):
            await client.completions.create(model="m", prompt="hi", echo=True)
        with pytest.raises(openai.BadRequestError, match="prompt"):
            await client.completions.create(model="m", prompt=["a", "b"])


def test_body_mapping_defaults_and_fields() -> None:
    req = request_from_completions(
        {"prompt": ["Once"], "stop": "\n", "seed": 3, "top_k": 5, "logit_bias": {"7": -100}}
    )
    assert req.prompt == "Once" and req.messages == ()
    assert req.max_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    assert req.stop == ("\n",) and req.seed == 3 and req.top_k == 5
    assert dict(req.logit_bias or {}) == {7: -100.0}
    body = request_to_completions(req, model="m")
    assert body == {
        "model": "m",
        "prompt": "Once",
        "max_tokens": DEFAULT_COMPLETION_MAX_TOKENS,
        "stop": ["\n"],
        "seed": 3,
        "top_k": 5,
        "logit_bias": {"7": -100.0},
    }


async def test_bridge_n_choices_and_legacy_logprobs(smol) -> None:
    """``n`` choices share the prompt (usage counts it once) and the legacy ``logprobs``
    give each token's logprob and its alternatives; greedy, so every choice is the
    direct greedy text and each chosen token is its own best alternative."""
    _, greedy = _direct_greedy(smol, COUNTING, N_TOKENS)
    want = smol.model.detokenize(greedy)
    async with bridge_in_process(smol) as (url, _, _):
        client = _client(url)
        r = await client.completions.create(
            model="smol", prompt=COUNTING, max_tokens=N_TOKENS, temperature=0, n=2, logprobs=3
        )
        stream = await client.completions.create(
            model="smol",
            prompt=COUNTING,
            max_tokens=N_TOKENS,
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [want, want]
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(smol.tokenize_prompt(COUNTING))
    assert r.usage.completion_tokens == 2 * N_TOKENS
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == want
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == N_TOKENS
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen is not None and chosen <= 0.0 and len(top) == 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    by_index: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + ch.text
    assert by_index == {0: want, 1: want}
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["length", "length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2 * N_TOKENS


# --------------------------------------------------------------------------- Request


def test_request_completion_validation_and_wire_round_trip() -> None:
    req = Request.completion("Once upon a time", max_tokens=8, stop=["."], seed=1)
    assert req.messages == () and req.prompt == "Once upon a time"
    assert Request.from_dict(req.to_dict()) == req
    frame = wire.parse_client_frame(wire.encode({"type": "generate", "id": 1, **req.to_dict()}))
    assert frame.request == req
    for kw, needle in [
        ({"thinking": True}, "thinking"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ]:
        with pytest.raises(InvalidRequest, match=needle):
            Request.completion("hi", **kw)
    with pytest.raises(InvalidRequest, match="messages"):
        Request((Message.user("x"),), prompt="hi")
    with pytest.raises(InvalidRequest, match="prompt"):
        Request.completion("")
    with pytest.raises(InvalidRequest, match="prompt"):
        Request((), prompt=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="MAX_PROMPT_CHARS"):
        Request.completion("x" * (MAX_PROMPT_CHARS + 1))
    with pytest.raises(InvalidRequest, match="messages is empty"):
        Request(())


# --------------------------------------------------------------------------- upstreams


@pytest.fixture
async def up():
    u = await Upstream().start()
    yield u
    await u.stop()


async def test_openai_compat_sends_raw_prompts_to_v1_completions(up) -> None:
    base = up.script("cmpl", Stream(completion_stream(["Hello", " world"], usage=(4, 2))))
    b = OpenAICompat(base, api_key="", model="base-model", max_retries=0)
    try:
        req = Request.completion("Say:", max_tokens=9, stop=["\n"], temperature=0.5)
        events = [ev async for ev in b.generate(req)]
    finally:
        await b.aclose()
    assert [e.text for e in events if isinstance(e, Text)] == ["Hello", " world"]
    done = events[-1]
    assert isinstance(done, Done) and done.stop_reason is StopReason.END_TURN
    assert (done.usage.input_tokens, done.usage.output_tokens) == (4, 2)
    got = up.requests("cmpl")[-1]
    assert got.path.endswith("/v1/completions")
    assert got.body["prompt"] == "Say:" and "messages" not in got.body
    assert got.body["max_tokens"] == 9 and got.body["stop"] == ["\n"]
    assert got.body["temperature"] == 0.5 and got.body["stream"] is True


async def test_openai_compat_reads_length_and_a_cut_stream(up) -> None:
    from inferd.errors import BackendUnavailable

    whole = completion_stream(["a", "b"], finish="length")
    cut = completion_stream(["a"])[:1]  # a text chunk, then the body ends
    base = up.script("cut", Stream(whole), Stream(cut))
    b = OpenAICompat(base, api_key="", max_retries=0)
    try:
        r = await _collect(b, Request.completion("x"))
        assert r.text == "ab" and r.stop_reason is StopReason.MAX_TOKENS
        with pytest.raises(BackendUnavailable, match="ended before"):
            await _collect(b, Request.completion("x"))
    finally:
        await b.aclose()


async def test_anthropic_compat_refuses_a_raw_prompt() -> None:
    b = AnthropicCompat(api_key="k-test")
    try:
        with pytest.raises(InvalidRequest, match="prompt"):
            await anext(aiter(b.generate(Request.completion("hi"))))
    finally:
        await b.aclose()


async def test_openai_chat_mapping_refuses_a_raw_prompt() -> None:
    with pytest.raises(InvalidRequest, match="prompt"):
        Request.completion("hi").to_openai()


# --------------------------------------------------------------------------- daemon


async def test_bridge_over_the_daemon_counts_raw_completions(smol, smollm2_path) -> None:
    """``inferd bridge --socket`` before ``inferd serve`` on SmolLM2: the raw prompt crosses
    the daemon wire, goes through its admission and counters like a chat request, and
    gives the same greedy text as the in-process backend."""
    from inferd.serve.client import admin_status

    from .conftest import require_llama_core
    from .serve_helpers import BridgeProc, DaemonProc, short_tmpdir, write_config

    require_llama_core()
    want = await _collect(smol, Request.completion(PROSE, max_tokens=N_TOKENS, temperature=0))
    with short_tmpdir() as d:
        smol_cfg = {"type": "llamacpp", "model": str(smollm2_path), "name": "smol"}
        cfg = write_config(d / "c.toml", [{**smol_cfg, "n_ctx": 1024, "n_threads": 1}])
        daemon = DaemonProc.start(cfg, d / "infer.sock")
        try:
            bridge = BridgeProc.start("--socket", str(daemon.sock))
            try:
                before = (await admin_status(daemon.sock))["counters"]
                client = openai.AsyncOpenAI(
                    base_url=f"{bridge.url}/v1",
                    api_key="unused",
                    max_retries=0,
                    http_client=openai.DefaultAsyncHttpxClient(trust_env=False, timeout=300),
                )
                async with client:
                    r = await client.completions.create(
                        model="smol", prompt=PROSE, max_tokens=N_TOKENS, temperature=0
                    )
                after = (await admin_status(daemon.sock))["counters"]
            finally:
                bridge.stop()
        finally:
            daemon.stop()
    assert r.choices[0].text == want.text
    assert r.usage is not None and r.usage.completion_tokens == want.done.usage.output_tokens
    assert after["requests"] == before["requests"] + 1
    assert after["tokens"] == before["tokens"] + want.done.usage.output_tokens
