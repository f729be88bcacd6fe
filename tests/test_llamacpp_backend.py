"""LlamaCpp end to end on the real SmolLM2-135M-Instruct model."""

from __future__ import annotations

import asyncio
import json

import pytest

from inferd.backends.llamacpp.backend import is_embedding_model, template_thinks
from inferd.backends.llamacpp.options import LlamaCppOptions
from inferd.backends.llamacpp.text_tail import TextTail
from inferd.errors import (
    BackendUnavailable,
    EmbedUnsupported,
    InvalidRequest,
    ModelLoadError,
    NotReady,
)
from inferd.types import Done, EmbedRequest, Message, Request, StopReason, Text

from .conftest import require_llama_core

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def backend(smollm2_path):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_ctx=1024, n_threads=1, embed=True)
    yield b
    b.close()


async def collect(backend, request) -> tuple[str, Done, list]:
    events = [ev async for ev in backend.generate(request)]
    assert isinstance(events[-1], Done)
    assert all(isinstance(e, Text) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1], events


def idle(backend) -> bool:
    """Nothing runs and no running stream holds a KV cell (a finished slot of the default
    split layout may keep its cells for prefix reuse: ``kv_used()`` leaves those out)."""
    return (
        backend._active is None
        and backend._idle.is_set()
        and (backend.model is not None and backend.kv_used() == 0)
    )


# ---------------------------------------------------------------- pure helpers


def _feed_all(tail: TextTail, pieces: list[bytes]) -> list[str]:
    out = []
    for p in pieces:
        out.append(tail.feed(p))
        if tail.stopped:
            break
    return out


def test_text_tail_completes_utf8_split_across_tokens():
    snowman = "☃".encode()  # three bytes, one character
    tail = TextTail()
    assert _feed_all(tail, [b"a", snowman[:1], snowman[1:2], snowman[2:] + b"b"]) == [
        "a",
        "",
        "",
        "☃b",
    ]
    assert tail.finish() == ""
    broken = TextTail()
    assert broken.feed(b"x" + snowman[:2]) == "x"
    assert broken.finish() == "\ufffd"  # a character cut off at the end is replaced


def test_text_tail_holds_back_only_what_can_still_stop():
    tail = TextTail(("STOP",))
    assert tail.feed(b"hello ST") == "hello "  # "ST" may grow into STOP
    assert tail.feed(b"ART now") == "START now"  # it did not: released whole
    assert tail.feed(b" S") == " "
    assert tail.feed(b"TOP and more") == ""  # the stop sequence and all after it go
    assert tail.stopped and tail.finish() == ""
    # the earliest of several stops wins, whichever is listed first
    two = TextTail(("END", "STOP"))
    assert two.feed(b"abc STOP d END") == "abc " and two.stopped
    # a partial stop at the end is text after all
    partial = TextTail(("abcabd",))
    assert partial.feed(b"xabcab") == "x" and partial.finish() == "abcab"
    # a stop spread over three tokens leaks nothing, even partially
    spread = TextTail(("<|im_end|>",))
    assert _feed_all(spread, [b"ok <|", b"im_", b"end|> tail"]) == ["ok ", "", ""]
    assert spread.stopped


def test_text_tail_work_per_token_is_bounded_by_the_stop_length():
    """The held tail never grows past the longest stop sequence (O(1) per token)."""
    tail = TextTail(("<|im_end|>",))
    for _ in range(2000):
        tail.feed(b"<|im_e")
        tail.feed(b"x ")
        assert len(tail._pending) < len("<|im_end|>")


def test_capability_derivation_helpers():
    assert template_thinks("{% if enable_thinking %}<think>{% endif %}")
    assert template_thinks("{{ message.reasoning_content }}")
    assert not template_thinks("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_thinks(None)

    class Meta:
        architecture = "bert"

        def __init__(self, pooling: str | None) -> None:
            self.pooling = pooling

        def meta(self, key: str) -> str | None:
            return self.pooling if key == "bert.pooling_type" else None

    assert is_embedding_model(Meta("1")) and is_embedding_model(Meta("2"))
    assert not is_embedding_model(Meta(None))  # a chat model
    assert not is_embedding_model(Meta("4"))  # a reranker's scores are not embeddings


def test_options_are_checked_before_any_model_loads():
    """One place validates settings, whichever way they come (keywords, TOML, CLI)."""
    for bad, match in (
        ({"n_ctx": 8}, r"n_ctx=8 must be an integer >= 16"),
        ({"n_ctx": "4096"}, r"n_ctx='4096' must be an integer"),
        ({"n_batch": 0}, r"n_batch=0"),
        ({"n_threads": 0}, r"n_threads=0"),
        ({"parallel": 0}, r"parallel=0 must be an integer >= 1"),
        ({"max_queued": -1}, r"max_queued=-1"),
        ({"step_tokens": 0}, r"step_tokens=0"),
        ({"prefix_cache": -1}, r"prefix_cache=-1"),
        ({"kv_layout": "paged"}, r"kv_layout='paged' is not a KV cache layout"),
        ({"tool_format": "nope"}, r"unknown tool format 'nope'"),
        ({"repeat_penalty": "high"}, r"repeat_penalty='high' must be a number"),
    ):
        with pytest.raises(InvalidRequest, match=match):
            LlamaCppOptions(**bad)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) n_cxt; known: .*n_ctx"):
        LlamaCppOptions.from_kwargs(None, {"n_cxt": 1})
    base = LlamaCppOptions(n_ctx=2048, parallel=2)
    merged = LlamaCppOptions.from_kwargs(base, {"parallel": 4})
    assert (merged.n_ctx, merged.parallel, base.parallel) == (2048, 4, 2)
    assert LlamaCppOptions(n_ctx=1024).resolved_parallel == 2  # min(8, n_ctx // 512)
    assert LlamaCppOptions(n_ctx=1024, n_gpu_layers=-1).resolved_parallel == 2
    assert LlamaCppOptions(n_ctx=65536, n_gpu_layers=-1).resolved_parallel == 32
    assert LlamaCppOptions(n_ctx=100).resolved_parallel == 1


# ---------------------------------------------------------------- generation


async def test_chat_answers(backend):
    text, done, _ = await collect(
        backend,
        Request.chat(
            "What is the capital of France? Answer in one word.", temperature=0, max_tokens=32
        ),
    )
    assert "Paris" in text
    assert done.stop_reason is StopReason.END_TURN
    assert done.backend == "llamacpp"
    assert done.usage.input_tokens > 10 and done.usage.output_tokens >= 1
    assert done.timings.ttft_s is not None and done.timings.total_s >= done.timings.ttft_s
    assert idle(backend)


async def test_greedy_is_deterministic(backend):
    r = Request.chat("Write one sentence about the moon.", temperature=0, max_tokens=40)
    a, _, _ = await collect(backend, r)
    b, _, _ = await collect(backend, r)
    assert a == b and a


async def test_seeded_sampling_is_reproducible(backend):
    r = Request.chat("Invent a name for a cat.", temperature=1.0, seed=1234, max_tokens=20)
    a, _, _ = await collect(backend, r)
    b, _, _ = await collect(backend, r)
    assert a == b


async def test_max_tokens_is_exact(backend):
    _, done, _ = await collect(
        backend,
        Request.chat("Tell me a long story.", temperature=0, max_tokens=17, ignore_eos=True),
    )
    assert done.stop_reason is StopReason.MAX_TOKENS
    assert done.usage.output_tokens == 17


async def test_ignore_eos_runs_past_end_of_turn(backend):
    _, done, _ = await collect(
        backend, Request.chat("Say hi.", temperature=0, max_tokens=60, ignore_eos=True)
    )
    assert done.usage.output_tokens == 60 and done.stop_reason is StopReason.MAX_TOKENS


async def test_stop_sequence_is_cut_and_held_back(backend):
    r = Request.chat("Count from 1 to 20, one number per line.", temperature=0, max_tokens=120)
    full, _, _ = await collect(backend, r)
    assert "7" in full
    text, done, _events = await collect(
        backend,
        Request.chat(
            "Count from 1 to 20, one number per line.", temperature=0, max_tokens=120, stop=("7",)
        ),
    )
    assert done.stop_reason is StopReason.STOP_SEQUENCE
    assert "7" not in text
    assert full.startswith(text)
    # a multi-token stop sequence: nothing of it leaks, even partially
    stop = full[full.index("5") : full.index("5") + 3]
    text2, done2, _events2 = await collect(
        backend,
        Request.chat(
            "Count from 1 to 20, one number per line.", temperature=0, max_tokens=120, stop=(stop,)
        ),
    )
    assert done2.stop_reason is StopReason.STOP_SEQUENCE
    assert stop not in text2 and full.startswith(text2)
    assert idle(backend)


async def test_utf8_split_across_tokens_is_never_mangled(backend):
    target = "日本語 🙂 ñ"
    schema = {"type": "object", "properties": {"w": {"enum": [target]}}}
    text, _done, events = await collect(
        backend,
        Request.chat(
            "Give me the word.",
            temperature=0,
            max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"schema": schema}},
        ),
    )
    assert json.loads(text) == {"w": target}
    assert all("\ufffd" not in e.text for e in events[:-1])
    # the emoji really was split across tokens, and was held until complete
    pieces = [
        backend.model.token_to_piece(t) for t in backend.model.tokenize("🙂", add_special=False)
    ]
    assert len(pieces) > 1


async def test_json_object_response_format(backend):
    text, done, _ = await collect(
        backend,
        Request.chat(
            "Describe a dog as JSON with keys name and age.",
            temperature=0,
            max_tokens=80,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "schema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    }
                },
            },
        ),
    )
    if done.stop_reason is StopReason.END_TURN:
        obj = json.loads(text)
        assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    else:
        assert text.startswith('{"name"') or text.lstrip().startswith("{")


async def test_multi_turn_and_system(backend):
    r = Request(
        (
            Message.system("You only answer with numbers."),
            Message.user("2+2?"),
            Message.assistant("4"),
            Message.user("3+3?"),
        ),
        temperature=0,
        max_tokens=10,
    )
    prompt = backend.render(r)
    assert prompt.count("<|im_start|>") == 5 and prompt.endswith("<|im_start|>assistant\n")
    text, _, _ = await collect(backend, r)
    assert text


async def test_prompt_too_long_is_pre_stream(backend):
    gen = backend.generate(Request.chat("word " * 3000))
    with pytest.raises(InvalidRequest, match="larger n_ctx"):
        await gen.__anext__()


async def test_unsupported_content_is_pre_stream(backend):
    from inferd.types import ImageBlock

    gen = backend.generate(Request((Message.user([ImageBlock(url="http://x/y.png")]),)))
    with pytest.raises(InvalidRequest, match="vision"):
        await gen.__anext__()


# ---------------------------------------------------------------- leaving early


async def test_aclose_stops_within_a_step_and_frees_the_sequence(backend):
    gen = backend.generate(
        Request.chat("Write a very long essay.", max_tokens=900, ignore_eos=True)
    )
    n = 0
    async for _ in gen:
        n += 1
        if n == 3:
            break
    await gen.aclose()
    assert idle(backend)
    # and the backend serves again right away
    _, done, _ = await collect(backend, Request.chat("Hi", temperature=0, max_tokens=4))
    assert isinstance(done, Done)


async def test_task_cancellation_frees_the_sequence(backend):
    started = asyncio.Event()

    async def consume():
        async for _ in backend.generate(
            Request.chat("Write a long essay.", max_tokens=900, ignore_eos=True)
        ):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        if idle(backend):
            break
        await asyncio.sleep(0.01)
    assert idle(backend)


async def test_concurrent_requests_are_batched(backend):
    """Concurrent streams share decode steps (tests/test_llamacpp_batching.py has the
    rest): all three are submitted in one event-loop turn and each needs 24 steps, so
    some decode step carries more than one sequence."""
    before = backend.batching_stats().get("batched_steps", 0)
    r = Request.chat("Say hello.", temperature=0, max_tokens=24, ignore_eos=True)
    results = await asyncio.gather(*(collect(backend, r) for _ in range(3)))
    assert all(t and d.usage.output_tokens == 24 for t, d, _ in results)
    stats = backend.batching_stats()
    assert stats["batched_steps"] > before, stats
    assert stats["max_seqs"] >= 2, stats
    assert idle(backend)


async def test_event_loop_is_not_blocked(backend):
    ticks = 0
    stop = False

    async def ticker():
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0.005)

    t = asyncio.create_task(ticker())
    _, _done, _ = await collect(
        backend, Request.chat("Tell me a story.", max_tokens=40, ignore_eos=True, temperature=0)
    )
    stop = True
    await t
    assert ticks >= 3


async def test_parser_failure_mid_stream_is_backend_unavailable(smollm2_path):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.backends.llamacpp.output import PlainText

    class Flaky(PlainText):
        n = 0

        def feed(self, text):
            Flaky.n += 1
            if Flaky.n > 2:
                raise RuntimeError("parser bug")
            return super().feed(text)

    b = LlamaCpp(smollm2_path, n_threads=1, n_ctx=256, output_parser=lambda *a: Flaky())
    seen = []
    with pytest.raises(BackendUnavailable, match="parser bug"):
        async for ev in b.generate(Request.chat("Tell a story", max_tokens=50, ignore_eos=True)):
            seen.append(ev)
    assert seen and not any(isinstance(e, Done) for e in seen)
    await b.aclose()


# ---------------------------------------------------------------- templates


async def test_chat_template_override_and_errors(smollm2_path):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(
        smollm2_path,
        n_threads=1,
        n_ctx=256,
        chat_template="{% for m in messages %}[{{ m.role }}] {{ m.content }}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    )
    assert b.render(Request.chat("hi")) == "[user] hi\n[assistant] "
    await b.aclose()
    b = LlamaCpp(
        smollm2_path,
        n_threads=1,
        n_ctx=256,
        chat_template="{{ raise_exception('no system messages please') }}",
    )
    gen = b.generate(Request.chat("hi"))
    with pytest.raises(InvalidRequest, match="no system messages please"):
        await gen.__anext__()
    await b.aclose()
    b = LlamaCpp(smollm2_path, n_threads=1, n_ctx=256, chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(InvalidRequest, match="unsafe"):
        b.render(Request.chat("hi"))
    b.close()
    b = LlamaCpp(smollm2_path, n_threads=1, n_ctx=256, chat_template="{% if %}")
    with pytest.raises(InvalidRequest, match="does not parse"):
        b.render(Request.chat("hi"))
    b.close()
    b = LlamaCpp(smollm2_path, n_threads=1, n_ctx=256, chat_template="")
    with pytest.raises(InvalidRequest, match="no chat template"):
        b.render(Request.chat("hi"))
    b.close()


def test_template_sees_tools_and_tojson():
    from inferd.backends.llamacpp.chat_template import ChatTemplate
    from inferd.types import Tool, ToolUseBlock

    t = ChatTemplate(
        "{% for t in tools %}{{ t.function.name }}:{{ t | tojson }}{% endfor %}"
        "|{% for m in messages %}{{ m.role }}={{ m.content }}"
        "{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments | tojson }}"
        "{% endif %};{% endfor %}{{ bos_token }}{{ eos_token }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    out = t.render(
        (
            Message.user("héllo"),
            Message.assistant([ToolUseBlock("c1", "f", {"x": "é"})]),
            Message.tool("c1", "42"),
        ),
        tools=(Tool("f", "does f"),),
    )
    assert out.startswith('f:{"type": "function"')
    assert 'user=héllo;assistant={"x": "é"};tool=42;<s></s>' in out


# ---------------------------------------------------------------- embeddings


async def test_embeddings(backend):
    res = await backend.embed(EmbedRequest(["a cat", "a cat", "stock market crash"]))
    assert res.dimensions == backend.model.n_embd and len(res.embeddings) == 3
    for v in res.embeddings:
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4)
    assert res.embeddings[0] == pytest.approx(res.embeddings[1], abs=1e-5)
    assert res.usage.input_tokens > 0
    # SmolLM2 is not Matryoshka-trained: dimensions is refused (tests/test_embeddings.py
    # covers truncation for a model opened with matryoshka_dims=)
    with pytest.raises(InvalidRequest, match="dimensions"):
        await backend.embed(EmbedRequest("a cat", dimensions=64))
    with pytest.raises(InvalidRequest, match="at most"):
        await backend.embed(EmbedRequest("word " * 5000))


# ---------------------------------------------------------------- lifecycle


async def test_capabilities(backend):
    caps = backend.capabilities()
    assert caps.embed and not caps.vision  # the fixture asked for embed=True
    assert caps.accelerator is not None and caps.accelerator.kind == "cpu"
    assert backend.ready()


async def test_capabilities_are_derived_from_the_model(smollm2_path):
    """SmolLM2 is a chat model (no pooling type, no reasoning in its template): it does
    not claim embeddings or thinking, so a Router never sends it embeddings."""
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.router import Router

    b = LlamaCpp(smollm2_path, n_ctx=256, n_threads=1)
    try:
        caps = b.capabilities()
        assert caps.tools and not caps.embed and not caps.thinking
        with pytest.raises(EmbedUnsupported, match=r"not an embedding model.*embed=True"):
            await b.embed(EmbedRequest("a cat"))
        with pytest.raises(EmbedUnsupported, match="no embeddings"):
            await Router([b]).embed(EmbedRequest("a cat"))
    finally:
        b.close()
    thinking = "{% for m in messages %}<think>{{ m.content }}</think>{% endfor %}"
    t = LlamaCpp(smollm2_path, n_ctx=256, n_threads=1, chat_template=thinking)
    try:
        assert t.capabilities().thinking
    finally:
        t.close()


async def test_model_store_name_and_bad_paths(tmp_path):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = await LlamaCpp.open("smollm2-135m", n_ctx=128, n_threads=1)
    assert b.ready() and "mollm" in b.model_name.lower()
    await b.aclose()
    with pytest.raises(ModelLoadError):
        LlamaCpp(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="directory"):
        LlamaCpp(tmp_path)


async def test_use_after_close(smollm2_path):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    b = LlamaCpp(smollm2_path, n_threads=1, n_ctx=256)
    gen = b.generate(Request.chat("Write a long essay", max_tokens=500, ignore_eos=True))
    await gen.__anext__()
    await b.aclose()  # closes under a running stream: it ends, it does not hang or crash
    with pytest.raises(BackendUnavailable, match="closed"):
        async for _ in gen:
            pass
    await b.aclose()
    assert not b.ready()
    with pytest.raises(NotReady, match="closed"):
        await b.generate(Request.chat("hi")).__anext__()
    with pytest.raises(NotReady, match="closed"):
        await b.embed(EmbedRequest("hi"))
    with pytest.raises(NotReady):
        _ = b.model
    assert "closed" in repr(b)
