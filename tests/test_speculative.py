"""Speculative decoding under continuous batching on the real SmolLM2-135M-Instruct
(docs/adr/0027-speculative-decoding-batched.md): n-gram drafting and a draft model
(the target itself, so greedy drafts are always right), greedy and seeded output equal
to the non-speculative path token for token, drafts verified in the batch with other
streams, and no KV cells left behind by rejected drafts.

Token ids come straight from the scheduler (one compute thread, small prompts).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterator

import pytest

from inferd.backends.llamacpp.speculative import (
    MAX_N_DRAFT,
    MAX_NGRAM_REST,
    DraftModel,
    NgramDraft,
    NgramDrafter,
    _NgramState,
    check_vocab,
    parse_draft,
)
from inferd.errors import InvalidRequest, ModelLoadError
from inferd.types import Message, Request, Response

from .conftest import require_llama_core

pytestmark = pytest.mark.llama

#: A short "edit" prompt: the reply repeats code the prompt holds, so n-grams match.
CODE = "\n".join(f"def f{i}(x):\n    return x * {i} + {i + 1}" for i in range(8))
EDIT = "Here is some Python code:\n\n" + CODE + "\n\nRepeat the code exactly, changing nothing."
CHAT = "Write two sentences about the sea."


def _backend(path, **kw):
    require_llama_core()
    from inferd.backends.llamacpp import LlamaCpp

    # prefix_cache=0: a reused prefix was prefilled in other chunks, and its float sums
    # (not speculation) can move a close greedy pick; each reply starts from scratch
    return LlamaCpp(path, n_ctx=4096, n_threads=1, parallel=4, prefix_cache=0, **kw)


@pytest.fixture(scope="module")
def ngram(smollm2_path):
    b = _backend(smollm2_path, draft="ngram")
    yield b
    b.close()


@pytest.fixture(scope="module")
def selfdraft(smollm2_path):
    b = _backend(smollm2_path, draft=DraftModel(smollm2_path, n_draft=4, p_min=0.0))
    yield b
    b.close()


def _prompt(b, text: str) -> list[int]:
    req = Request((Message.user(text),))
    return b.tokenize_prompt(b.render(req, b.plan(req)))


async def _tokens(
    b, text: str, *, speculative: bool, n: int = 48, cells: list | None = None, **smp
) -> list[int]:
    """Token ids of one reply through the scheduler (greedy unless ``smp`` says);
    ``cells`` collects (cells held, tokens with cells) of the stream after every step."""
    from inferd._fast import _llama as L

    sampler = L.Sampler(b.model, **({"temperature": 0.0} | smp))
    (s,) = b._scheduler().submit_choices(
        _prompt(b, text), [sampler], max_tokens=n, speculative=speculative
    )
    out = []
    while True:
        item = await s.get()
        if item[0] != "tok":
            break
        out.append(item[1])
        if cells is not None:
            sched = b._scheduler()
            with sched._ctx_lock:  # between two steps: the cache and s.kv agree
                lo, hi = sched._cells()[s.seq]
                if not s.done:  # a finished stream's cells are gone (prefix_cache=0)
                    cells.append((hi - lo + 1 if hi >= 0 else 0, len(s.kv)))
        if len(out) == s.max_tokens or item[2]:
            break
    await s.freed()
    return out


#: Rows per decode of the multi-row replay (a verification's shape).
REPLAY_ROWS = 4


def _replay(b, prompt: list[int], reply: list[int], rows: int) -> Iterator[list[float]]:
    """The target's logits at each position of ``reply`` (its prefix fed), the reply
    replayed ``rows`` tokens per decode in a context of the test's own."""
    from inferd._fast import _llama as L

    ctx = L.Context(
        b.model, n_ctx=len(prompt) + len(reply) + 8, n_batch=len(prompt) + 8, n_threads=1
    )
    try:
        batch = L.Batch(len(prompt))
        idxs = [batch.add_sequence(prompt, 0, 0)]
        ctx.decode(batch)
        for at in range(0, len(reply), rows):
            yield from (ctx.logits(i) for i in idxs)
            chunk = reply[at : at + rows]
            batch = L.Batch(len(chunk))
            idxs = [batch.add(t, len(prompt) + at + j, [0], True) for j, t in enumerate(chunk)]
            ctx.decode(batch)
        yield from (ctx.logits(i) for i in idxs)
    finally:
        ctx.close()


def _greedy_picks(b, prompt: list[int], reply: list[int], rows: int) -> list[int]:
    """The target's greedy pick at each position of ``reply`` (see :func:`_replay`)."""
    return [_argmax(row) for row in _replay(b, prompt, reply, rows)][: len(reply)]


def _argmax(row) -> int:
    return row.index(max(row))


#: How far (in logits) a pick may trail the best one in a replay and still be the
#: target's own pick in a batch: a row decoded among other sequences' rows can round
#: apart from a lone row, and measured greedy picks flipped at top-two margins of
#: 0.02-0.21 logits that way (AVX-512, one thread; ADR 0027, "Exactness"). A draft
#: accepted where the target did not pick it trails by far more.
TIE_LOGITS = 1.0


def _near_greedy(b, text: str, reply: list[int]) -> tuple[list[int], list[float]]:
    """Positions of ``reply`` whose token trails a one-row replay's best by more than
    :data:`TIE_LOGITS`, and the replay's top-two margin at every position, the one
    after the reply's last token included (where it stopped, or would go on)."""
    far, margins = [], []
    for i, row in enumerate(_replay(b, _prompt(b, text), reply, 1)):
        first, second = heapq.nlargest(2, row)
        margins.append(first - second)
        if i < len(reply) and row[reply[i]] < first - TIE_LOGITS:
            far.append(i)
    return far, margins


def _every_pick_is_greedy(b, text: str, spec: list[int], plain: list[int]) -> None:
    """Assert that every token of ``spec`` is the target's greedy pick for its prefix,
    with its logits computed one row per decode (the plain path's shape) or several rows
    per decode (a verification's), and that ``spec == plain``. The two shapes round a
    row apart only with flash attention split across threads or turned off (ADR 0027,
    "Exactness"); these backends decode with one thread and flash attention on, so here
    they agree bit for bit and the replies must be equal token for token."""
    prompt = _prompt(b, text)
    one = _greedy_picks(b, prompt, spec, 1)
    many = _greedy_picks(b, prompt, spec, REPLAY_ROWS)
    off = [(i, t, one[i], many[i]) for i, t in enumerate(spec) if t not in (one[i], many[i])]
    assert not off, f"(position, token, one-row pick, multi-row pick): {off}"
    assert one == many, "one thread: the two shapes should agree"
    assert spec == plain


async def test_ngram_greedy_equals_plain_and_accepts(ngram):
    before = ngram.speculative_stats()
    plain = await _tokens(ngram, EDIT, speculative=False)
    spec = await _tokens(ngram, EDIT, speculative=True)
    after = ngram.speculative_stats()
    _every_pick_is_greedy(ngram, EDIT, spec, plain)
    drafted = after["draft_tokens"] - before["draft_tokens"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    assert drafted > 0 and accepted > 0, after


async def test_speculative_false_drafts_nothing(ngram):
    before = ngram.speculative_stats()["draft_tokens"]
    await _tokens(ngram, EDIT, speculative=False, n=16)
    assert ngram.speculative_stats()["draft_tokens"] == before


def test_speculative_body_field_reads_as_a_bool_or_is_refused():
    from inferd.completions_wire import request_from_completions
    from inferd.openai_wire import request_from_openai

    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert request_from_openai(chat).speculative is True
    assert request_from_openai({**chat, "speculative": None}).speculative is True
    assert request_from_openai({**chat, "speculative": False}).speculative is False
    assert request_from_completions({"prompt": "x", "speculative": False}).speculative is False
    with pytest.raises(InvalidRequest, match="speculative"):
        request_from_openai({**chat, "speculative": "no"})
    with pytest.raises(InvalidRequest, match="speculative"):
        request_from_completions({"prompt": "x", "speculative": 0})


async def test_bridge_body_speculative_false_drafts_nothing(ngram):
    """`"speculative": false` in a Chat Completions or Completions body turns drafting
    off for that request through the bridge (ADR 0027); without it the same request
    drafts."""
    from aiohttp.test_utils import TestClient, TestServer

    from inferd.serve.bridge import make_app

    chat = {"messages": [{"role": "user", "content": EDIT}], "max_tokens": 24}
    raw = CODE + "\n\n# the same again\n" + CODE[:40]  # a raw prompt whose text repeats
    async with TestClient(TestServer(make_app(ngram))) as tc:
        for path, body in (
            ("/v1/chat/completions", {**chat, "temperature": 0}),
            ("/v1/completions", {"prompt": raw, "max_tokens": 24, "temperature": 0}),
        ):
            for spec in (False, True):
                before = ngram.speculative_stats()["draft_tokens"]
                resp = await tc.post(path, json={**body, "speculative": spec})
                assert resp.status == 200, await resp.text()
                reply = await resp.json()
                choice = reply["choices"][0]
                assert choice.get("message", {}).get("content") or choice.get("text")
                drafted = ngram.speculative_stats()["draft_tokens"] - before
                assert (drafted > 0) is spec, (path, spec, drafted)
                # llama-server's per-reply counts, present only when it drafted
                assert reply["timings"].get("draft_n") == (drafted if spec else None)
                assert reply["timings"]["predicted_n"] == reply["usage"]["completion_tokens"]


async def test_seeded_sampling_equals_plain(ngram):
    """The target samples every position with its own chain (llama.cpp's rule), so a
    seeded sampled reply is the non-speculative one."""
    kw = {"temperature": 0.8, "seed": 1234}
    plain = await _tokens(ngram, EDIT, speculative=False, **kw)
    spec = await _tokens(ngram, EDIT, speculative=True, **kw)
    assert spec == plain


async def test_batched_streams_verify_drafts_in_one_decode(ngram):
    """Four streams at once: drafts are verified in the same decode as the other
    streams' tokens, and every token is the target's own pick. Which rows share a step
    depends on timing, and a row decoded among other sequences' rows can round apart
    from a lone one (ADR 0027, "Exactness"), so a pick may flip where two logits are
    within :data:`TIE_LOGITS`. So each reply must be its plain single-stream reply token
    for token or part from it at such a close call, and no token may trail the best by
    more.
    (The single-stream tests above compare whole replies.)"""
    texts = [EDIT, CHAT, EDIT.replace("Python", "this"), CHAT.replace("sea", "sky")]
    plain = [await _tokens(ngram, t, speculative=False, n=32) for t in texts]
    before = dict(ngram.batching_stats())
    spec = await asyncio.gather(*(_tokens(ngram, t, speculative=True, n=32) for t in texts))
    after = ngram.batching_stats()
    compared = 0
    for text, s, p in zip(texts, spec, plain, strict=True):
        far, margins = _near_greedy(ngram, text, p)
        assert not far, f"plain reply, positions far from the greedy pick: {far}"
        if s != p:  # an equal reply was checked just above
            far, _ = _near_greedy(ngram, text, s)
            assert not far, f"speculative reply, positions far from the greedy pick: {far}"
        # where they part: a different token, or one reply ends (end of turn) there
        both = min(len(s), len(p))
        same = next((i for i in range(both) if s[i] != p[i]), both)
        if (same, same) != (len(s), len(p)):  # only at a close call of the plain prefix
            assert margins[same] <= TIE_LOGITS, (text, same, margins[same])
        compared += same
    assert compared >= 32, "the replies part too early: the check proves little"
    assert after.get("spec_batched_steps", 0) > before.get("spec_batched_steps", 0)
    assert after.get("spec_accepted", 0) > before.get("spec_accepted", 0)


async def test_rejected_drafts_leave_no_cells(ngram):
    """Between steps every speculating stream holds exactly the cells of its accepted
    tokens (``seq_cells``): nothing past them from a rejected draft; none after."""
    seen: list[list] = [[], []]
    before = ngram.speculative_stats()
    await asyncio.gather(
        *(
            _tokens(ngram, t, speculative=True, n=40, cells=c)
            for t, c in zip((EDIT, CHAT), seen, strict=True)
        )
    )
    after = ngram.speculative_stats()
    assert (
        after["draft_tokens"] - before["draft_tokens"]
        > after["accepted_tokens"] - before["accepted_tokens"]
    ), "no draft was rejected: the check proves nothing"
    for c in seen:
        assert c and all(held == kv for held, kv in c), c
    assert all(hi < 0 for _, hi in ngram.kv_cells())


async def test_draft_model_self_greedy_exact_and_accepts_all(selfdraft):
    plain = await _tokens(selfdraft, CHAT, speculative=False, n=32)
    spec = await _tokens(selfdraft, CHAT, speculative=True, n=32)
    _every_pick_is_greedy(selfdraft, CHAT, spec, plain)
    st = selfdraft.speculative_stats()
    assert st["draft_tokens"] > 0
    assert st["acceptance_rate"] >= 0.9, st  # the draft is the target
    assert st["tokens_per_decode"] > 1.0, st


async def test_draft_model_batched_streams(selfdraft):
    """The draft context holds one sequence per slot and drafts for both streams."""
    before = selfdraft.speculative_stats()
    spec = await asyncio.gather(
        *(_tokens(selfdraft, t, speculative=True, n=24) for t in (CHAT, EDIT))
    )
    after = selfdraft.speculative_stats()
    assert all(spec)
    assert after["accepted_tokens"] - before["accepted_tokens"] >= 2 * 4  # both drafted
    assert selfdraft.batching_stats().get("spec_batched_steps", 0) > 0


async def test_generate_with_speculative_flag(ngram):
    """Request.speculative reaches the scheduler through generate(): drafts with it on,
    none with it off (the replies' tokens are compared in the tests above)."""
    before = ngram.speculative_stats()["draft_tokens"]
    off = Response.collect([ev async for ev in ngram.generate(_req(False))])
    mid = ngram.speculative_stats()
    on = Response.collect([ev async for ev in ngram.generate(_req(True))])
    after = ngram.speculative_stats()
    assert off.text and on.text
    assert mid["draft_tokens"] == before and after["draft_tokens"] > mid["draft_tokens"]
    # the reply's own counts (llama-server's draft_n / draft_n_accepted): one stream ran
    assert off.done.timings.draft_tokens is None and off.done.timings.draft_accepted is None
    assert on.done.timings.draft_tokens == after["draft_tokens"] - mid["draft_tokens"]
    assert on.done.timings.draft_accepted == after["accepted_tokens"] - mid["accepted_tokens"]


def _req(spec: bool) -> Request:
    return Request((Message.user(EDIT),), temperature=0.0, max_tokens=24, speculative=spec)


def test_parse_draft_validates():
    assert parse_draft(None) is None
    assert parse_draft("ngram") == NgramDraft()
    assert parse_draft({"type": "ngram", "n": 4}) == NgramDraft(n=4)
    assert parse_draft({"path": "d.gguf", "p_min": 0.2}) == DraftModel("d.gguf", p_min=0.2)
    for bad, word in (
        ("eagle", "draft="),
        ({"type": "ngram", "n": 0}, "n="),
        ({"type": "ngram", "n_draft": MAX_N_DRAFT + 1}, "n_draft"),
        ({"path": "d.gguf", "p_min": 1.5}, "p_min"),
        ({"type": "ngram", "bogus": 1}, "bogus"),
    ):
        with pytest.raises(InvalidRequest, match=word):
            parse_draft(bad)


def test_llamacpp_refuses_bad_draft_before_loading(smollm2_path):
    with pytest.raises(InvalidRequest, match="draft"):
        _backend(smollm2_path, draft="medusa")


def test_request_speculative_field():
    r = Request((Message.user("hi"),), speculative=False)
    assert Request.from_dict(r.to_dict()).speculative is False
    assert Request.from_dict(Request((Message.user("hi"),)).to_dict()).speculative is True
    with pytest.raises(InvalidRequest, match="speculative"):
        Request((Message.user("hi"),), speculative="no")


class _Vocab:
    def __init__(self, texts: list[str], bos: int = 1, eos: int = 2) -> None:
        self.texts, self.bos, self.eos, self.n_vocab = texts, bos, eos, len(texts)

    def token_text(self, t: int) -> str:
        return self.texts[t]


def test_check_vocab_names_both_models():
    base = ["a", "b", "c", "d"]
    check_vocab(_Vocab(base), _Vocab(list(base)), "target.gguf", "draft.gguf")
    for other in (_Vocab(base[:3]), _Vocab(["a", "b", "x", "d"]), _Vocab(base, eos=3)):
        with pytest.raises(ModelLoadError, match=r"draft\.gguf.*target\.gguf"):
            check_vocab(_Vocab(base), other, "target.gguf", "draft.gguf")


def test_real_draft_with_other_vocabulary_is_refused(smollm2_path, tmp_path):
    """A draft whose vocabulary differs is refused at load, naming both files."""
    require_llama_core()
    from inferd._fast import _llama as L

    target = L.Model(str(smollm2_path))
    try:
        fake = _Vocab([target.token_text(t) for t in range(int(target.n_vocab) - 1)])
        with pytest.raises(ModelLoadError, match=r"other\.gguf"):
            check_vocab(target, fake, str(smollm2_path), "other.gguf")
    finally:
        target.close()


def test_ngram_lookup_drafts_what_followed():
    st = _NgramState(8)
    hist = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3]
    assert st.draft(hist, 3, 8) == [4, 5, 6, 9, 1, 2, 3]
    assert st.draft([*hist, 7], 3, 8) == []  # "2 3 7" never occurred
    st.width = 2
    assert st.draft([*hist, 7, 1, 2, 3], 3, 8) == [7, 1]


def test_ngram_run_goes_on_copying_from_its_own_source():
    """ADR 0027: once a draft's tokens are taken, the next draft continues the copy at
    its source, where the latest occurrence of the tail n-gram (here an earlier line
    of the reply) would propose the wrong continuation."""
    source = [5, 1, 2, 3, 6, 1, 2, 4]  # "1 2" opens two lines of the source
    st = _NgramState(4)
    assert st.draft([*source, 5, 1], 2, 8) == [2, 3, 6, 1]
    hist = [*source, 5, 1, 2, 3, 6, 1, 2]  # all four taken, then the bonus token 2
    assert st.draft(hist, 2, 8) == [4, 5, 1, 2]  # the source's next line
    assert _NgramState(4).draft(hist, 2, 8) == [3, 6, 1, 2]  # lookup alone: the reply's
    assert st.draft([*hist, 9, 9], 2, 8) == []  # left the source, and "9 9" is new
    assert st.src == -1


def test_ngram_width_follows_what_drafts_earn_and_rests_after_misses():
    """ADR 0027: full acceptance doubles the width, a partial one cuts it to the run
    taken plus one, a first-token miss halves it, and width-1 misses rest the stream
    for 1, 2, 4, ... steps (capped) while its index keeps up with the history."""
    from types import SimpleNamespace

    drafter = NgramDrafter(NgramDraft(n=2, n_draft=16))
    st = _NgramState(4)
    s = SimpleNamespace(spec_state=st)
    drafter.feedback(s, 4, 4)
    assert st.width == 8
    drafter.feedback(s, 8, 3)
    assert st.width == 4
    drafter.feedback(s, 4, 0)
    drafter.feedback(s, 2, 0)
    assert (st.width, st.rest) == (1, 0)
    rests = []
    for _ in range(7):
        drafter.feedback(s, 1, 0)
        rests.append(st.rest)
    assert rests == [1, 2, 4, 8, MAX_NGRAM_REST, MAX_NGRAM_REST, MAX_NGRAM_REST]
    hist = [5, 6, 7, 5, 6]
    skipped = [st.draft(hist, 2, 8) for _ in range(MAX_NGRAM_REST)]
    assert skipped == [[]] * MAX_NGRAM_REST  # resting, though "5 6" occurred before
    assert st.index[(5, 6)] == 2  # the index kept up with the history meanwhile
    assert st.draft(hist, 2, 8) == [7]  # rested enough: what followed "5 6" at width 1
    drafter.feedback(s, 1, 1)  # a hit ends the backoff
    assert (st.width, st.backoff) == (2, 0)
    drafter.feedback(s, 0, 0)  # nothing drafted: nothing learnt
    assert (st.width, st.rest) == (2, 0)
