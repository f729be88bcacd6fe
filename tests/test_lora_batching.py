"""Per-request LoRA scales under continuous batching
(docs/adr/0026-grammar-fast-path-and-context-knobs.md, ``backends/llamacpp/lora_groups.py``).

Real SmolLM2 with the synthetic adapter of bench/synth_lora.py: streams of different
scale sets decode in steps of their own, so under the split layout each produces the
very tokens it produces alone; scale 0.0 is the base model; the steps alternate between
the sets; prefix reuse never takes cells computed with other scales. The round robin
itself is checked on plain objects, where every step's choice is known."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from types import SimpleNamespace

import pytest

from inferd.backends.llamacpp.lora_groups import LoraGroups, make
from inferd.errors import InvalidRequest
from inferd.types import Done, Request, Text

from .conftest import missing, require_llama_core

#: Scales of the model's own set (strong enough to change SmolLM2's greedy reply) and
#: of the requests' overrides.
START, OTHER = 8.0, 3.0


@pytest.fixture(scope="module")
def adapter(smollm2_path, tmp_path_factory) -> Path:
    try:
        from bench.synth_lora import write_lora
    except ImportError as e:
        missing(f"bench/synth_lora.py and llama.cpp's gguf-py ({e})")
    return write_lora(smollm2_path, tmp_path_factory.mktemp("lora") / "lora.gguf")


def _open(path, **kw):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    return LlamaCpp(path, n_ctx=1024, n_threads=1, parallel=2, **kw)


@pytest.fixture(scope="module", params=["split", "unified"])
def backend(request, smollm2_path, adapter):
    """Two slots, the adapter loaded at scale START."""
    b = _open(smollm2_path, kv_layout=request.param, lora=[(str(adapter), START)])
    yield b
    b.close()


@pytest.fixture(scope="module")
def base(smollm2_path):
    """The same model and slots without any adapter."""
    b = _open(smollm2_path, kv_layout="split")
    yield b
    b.close()


split_only = pytest.mark.parametrize("backend", ["split"], indirect=True)


def _req(prompt: str, **kw) -> Request:
    return Request.chat(prompt, max_tokens=16, ignore_eos=True, temperature=0.0, **kw)


async def _run(b, request: Request) -> tuple[str, Done]:
    events = [e async for e in b.generate(request)]
    assert sum(isinstance(e, Done) for e in events) == 1 and isinstance(events[-1], Done)
    return "".join(e.text for e in events if isinstance(e, Text)), events[-1]


async def _alone(b, request: Request) -> str:
    b.clear_prefix_cache()
    text, done = await _run(b, request)
    assert done.usage.output_tokens == 16
    return text


@split_only
@pytest.mark.llama
async def test_streams_of_different_scales_batch_as_they_run_alone(backend):
    a = _req("Write a short poem about the sea.")  # the model's own scales
    b = _req("Tell me about mountains.", lora={0: OTHER})
    alone = [await _alone(backend, r) for r in (a, b)]
    # the scales matter: b's prompt under the model's scales is another reply
    assert await _alone(backend, _req("Tell me about mountains.")) != alone[1]
    backend.clear_prefix_cache()
    before = backend.batching_stats()
    got = await asyncio.gather(_run(backend, a), _run(backend, b))
    after = backend.batching_stats()
    assert [t for t, _ in got] == alone
    assert all(d.usage.output_tokens == 16 for _, d in got)
    # b arrives while a still has tokens to make (a's consumer takes none before b is
    # submitted, and a may run PIPELINE_DEPTH ahead at most): b's set, then a's again
    assert after.get("lora_switches", 0) - before.get("lora_switches", 0) >= 2


@split_only
@pytest.mark.llama
async def test_scale_zero_is_the_base_model_alone_and_batched(backend, base):
    r = _req("Name three colours.")
    want = await _alone(base, r)
    off = _req("Name three colours.", lora={0: 0.0})
    assert await _alone(backend, off) == want
    assert await _alone(backend, r) != want  # START changes this reply
    backend.clear_prefix_cache()
    got = await asyncio.gather(_run(backend, _req("Count to ten.")), _run(backend, off))
    assert got[1][0] == want


@pytest.mark.llama
async def test_prefix_reuse_only_takes_cells_of_the_same_scales(backend):
    backend.clear_prefix_cache()
    r = _req("Describe a quiet morning in a small village by the river.")
    off = _req("Describe a quiet morning in a small village by the river.", lora={0: 0.0})
    _, d1 = await _run(backend, r)
    assert d1.usage.cached_tokens == 0
    t2, d2 = await _run(backend, off)
    assert d2.usage.cached_tokens == 0  # the same prompt, other adapters: nothing shared
    t3, d3 = await _run(backend, off)
    assert d3.usage.cached_tokens == d1.usage.input_tokens - 1
    _, d4 = await _run(backend, r)  # the first set's cells are still there
    assert d4.usage.cached_tokens == d1.usage.input_tokens - 1
    if backend.kv_layout == "split":
        assert t2 == t3


@pytest.mark.llama
async def test_request_scales_are_validated(backend, base):
    with pytest.raises(InvalidRequest, match="lora: no adapter"):
        await _run(backend, _req("Hi.", lora={1: 1.0}))
    with pytest.raises(InvalidRequest, match="lora: no adapter"):
        await _run(backend, _req("Hi.", lora={"other.gguf": 1.0}))
    with pytest.raises(InvalidRequest, match="lora"):
        await _run(base, _req("Hi.", lora={0: 0.0}))
    with pytest.raises(InvalidRequest, match="lora"):  # MAX_LORA_SCALE
        _req("Hi.", lora={0: 1000.0})
    by_path = backend.options.lora[0][0]
    text, _ = await _run(backend, _req("Hi.", lora={by_path: 0.0}))
    assert text == (await _run(backend, _req("Hi.", lora=[{"id": 0, "scale": 0.0}])))[0]


# ------------------------------------------------------------ the round robin, by hand


def _stream(lora, **kw):
    d = dict(lora=lora, cancelled=False, lead=None, n_past=1, prompt=[1], media=None)
    d.update(followers=[], seq=-1, ready=True)
    d.update(kw)
    return SimpleNamespace(**d)


def _sched(streams):
    return SimpleNamespace(
        _active=streams, _runnable=lambda s: s.ready, stats=collections.Counter()
    )


def _groups(calls):
    return LoraGroups(lambda ctx, ad, sc: calls.append(tuple(sc)), "ctx", ["a0"], (1.0,))


def test_one_set_costs_no_adapter_call():
    calls: list[tuple[float, ...]] = []
    g = _groups(calls)
    sched = _sched([_stream((1.0,)), _stream((1.0,))])
    for _ in range(5):
        assert g.select(sched) is sched._active
    assert calls == [] and sched.stats["lora_switches"] == 0
    sched._active[:] = [_stream((0.5,))]
    for _ in range(3):
        g.select(sched)
    assert calls == [(0.5,)] and sched.stats["lora_switches"] == 1
    assert make(None, "ctx", [], ()) is None  # no adapters: no groups, no per-step work


def test_sets_take_turns_oldest_first_and_none_starves():
    calls: list[tuple[float, ...]] = []
    g = _groups(calls)
    x, y, z = (2.0,), (3.0,), (4.0,)
    streams = [_stream(y), _stream(x), _stream(y), _stream(z)]
    sched = _sched(streams)
    picked = [g.select(sched)[0].lora for _ in range(6)]
    assert picked == [y, x, z, y, x, z]  # in order of each set's oldest stream
    assert [s.lora for s in g.select(sched)] == [y, y]  # a step feeds one set only
    assert len(calls) == 7 and sched.stats["lora_mixed_steps"] == 7
    streams[1].ready = False  # x paused: the others alternate, x comes back in turn
    assert [g.select(sched)[0].lora for _ in range(2)] == [z, y]
    streams[1].ready = True
    assert g.select(sched)[0].lora == x
    streams[0].cancelled = streams[2].cancelled = True  # y's streams leave
    assert {g.select(sched)[0].lora for _ in range(4)} == {x, z}


def test_cells_remember_their_set_and_media_waits_for_its_turn():
    g = _groups([])
    lead = _stream((2.0,), seq=0, followers=[_stream((2.0,), seq=1)])
    g.admitted(lead)
    g.copied(0, 5)
    assert g.owner == {0: (2.0,), 1: (2.0,), 5: (2.0,)}
    g.copied(7, 6)  # unknown: the model's own set
    assert g.owner[6] == (1.0,)
    span = SimpleNamespace(span_at=lambda n: (0, 0, 4))
    m = _stream((3.0,), media=span, n_past=0, prompt=[1, 2])
    t = _stream((2.0,))
    sched = _sched([m, t])
    assert g.media_ok(sched, sched._active)
    assert not g.media_ok(sched, [t]) and g.media_ok(sched, [m])
