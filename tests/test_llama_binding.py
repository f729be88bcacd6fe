"""The compiled llama.cpp binding (inferd._fast._llama) against the real SmolLM2 model."""

from __future__ import annotations

import threading
import time

import pytest

from inferd.errors import ModelLoadError, NotReady

from .conftest import missing

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def L():
    try:
        from inferd._fast import _llama
    except ImportError as e:
        missing(f"the compiled llama.cpp core inferd._fast._llama ({e})")
    return _llama


@pytest.fixture(scope="module")
def model(L, smollm2_path):
    m = L.Model(str(smollm2_path))
    yield m
    m.close()


@pytest.fixture
def ctx(L, model):
    c = L.Context(model, n_threads=1, n_ctx=512, n_batch=128, n_seq_max=4)
    yield c
    c.close()


def _prompt(model, text="Hello"):
    return model.tokenize(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
        add_special=False,
        parse_special=True,
    )


def test_devices_and_system_info(L):
    devs = L.devices()
    assert any(d["type"] == "cpu" for d in devs)
    assert all(
        {"type", "name", "description", "memory_total", "memory_free"} <= d.keys() for d in devs
    )
    assert "CPU" in L.system_info() or "AVX" in L.system_info()


def test_metadata(model):
    assert model.architecture == "llama"
    assert model.n_ctx_train == 8192
    assert model.n_embd == 576
    assert model.n_vocab == 49152
    assert "SmolLM2" in model.name or "Smollm2" in model.name
    assert "<|im_start|>" in model.chat_template
    assert model.meta("general.architecture") == "llama"
    assert model.meta("no.such.key") is None
    meta = model.metadata()
    assert meta["general.architecture"] == "llama"
    assert model.is_eog(model.eos)
    assert model.token_text(model.eos) in ("<|im_end|>", "<|endoftext|>")


def test_progress_callback_and_abort(L, smollm2_path):
    seen: list[float] = []
    m = L.Model(str(smollm2_path), progress=seen.append)
    m.close()
    assert seen and seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)
    with pytest.raises(ModelLoadError, match="aborted"):
        L.Model(str(smollm2_path), progress=lambda p: False)

    def boom(p):
        raise RuntimeError("stop loading")

    with pytest.raises(ModelLoadError, match="stop loading"):
        L.Model(str(smollm2_path), progress=boom)


def test_tokenize_roundtrip_unicode(model):
    text = "Héllo, 日本語 🙂 world"
    toks = model.tokenize(text, add_special=False)
    assert model.detokenize(toks) == text
    raw = b"".join(model.token_to_piece(t) for t in toks)
    assert raw.decode("utf-8") == text
    # some pieces are parts of one UTF-8 character: why the backend joins bytes first
    assert any(_incomplete(model.token_to_piece(t)) for t in toks)


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_special_tokens_parse_only_when_asked(model):
    plain = model.tokenize("<|im_end|>", add_special=False, parse_special=False)
    special = model.tokenize("<|im_end|>", add_special=False, parse_special=True)
    assert len(special) == 1 and model.is_eog(special[0])
    assert len(plain) > 1
    assert model.token_to_piece(special[0]) == b""
    assert model.token_to_piece(special[0], special=True) == b"<|im_end|>"


def test_bad_token_ids_are_errors_not_crashes(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.token_to_piece(10**6)
    with pytest.raises(ValueError):
        model.detokenize([-1])
    with pytest.raises(TypeError):
        model.tokenize(123)


def test_greedy_decode_is_deterministic(L, model, ctx):
    def run() -> list[int]:
        ctx.seq_rm(0)
        toks = _prompt(model, "Name three colours.")
        b = L.Batch(128)
        last = b.add_sequence(toks, 0, 0)
        ctx.decode(b)
        s = L.Sampler(model, temperature=0)
        out = [s.sample(ctx, last)]
        pos = len(toks)
        for _ in range(15):
            out.append(ctx.step(s, out[-1], pos))
            pos += 1
        return out

    assert run() == run()


def _first_argmax(xs) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def test_plain_greedy_takes_the_argmax_shortcut(L, model, ctx):
    """A plain greedy draw skips libllama's candidate copy; it must pick what the chain
    picks: the first index of the largest logit."""
    assert L.Sampler(model, temperature=0).argmax
    assert not L.Sampler(model, temperature=0.7).argmax
    assert not L.Sampler(model, temperature=0, repeat_penalty=1.1).argmax
    assert not L.Sampler(model, temperature=0, grammar='root ::= "a"').argmax

    def run(sampler, *, check_logits: bool) -> list[int]:
        ctx.seq_rm(0)
        toks = _prompt(model, "Count from one to ten in words.")
        b = L.Batch(128)
        last = b.add_sequence(toks, 0, 0)
        ctx.decode(b)
        out = [sampler.sample(ctx, last)]
        pos = len(toks)
        one = L.Batch(1)
        for _ in range(24):
            one.clear()
            one.add(out[-1], pos, 0, True)
            ctx.decode(one)
            logits = ctx.logits(0)
            assert len(logits) == model.n_vocab
            out.append(sampler.sample(ctx, 0))
            if check_logits:
                assert out[-1] == _first_argmax(logits)
            pos += 1
        return out

    fast = run(L.Sampler(model, temperature=0), check_logits=True)
    # penalty_last_n=0: a penalties stage that changes nothing, so the draw goes through
    # libllama's own chain and greedy sampler
    chain = L.Sampler(model, temperature=0, repeat_penalty=1.1, penalty_last_n=0)
    assert not chain.argmax
    assert run(chain, check_logits=False) == fast


def test_logits_of_a_token_without_logits_is_an_error(L, model, ctx):
    ctx.seq_rm(0)
    b = L.Batch(64)
    b.add_sequence(_prompt(model), 0, 0)  # logits for the last token only
    ctx.decode(b)
    with pytest.raises(ValueError, match="no logits"):
        ctx.logits(0)


def test_seeded_sampling_repeats(L, model, ctx):
    def run(seed: int) -> list[int]:
        ctx.seq_rm(0)
        toks = _prompt(model, "Tell me a word.")
        b = L.Batch(128)
        last = b.add_sequence(toks, 0, 0)
        ctx.decode(b)
        s = L.Sampler(
            model,
            temperature=1.0,
            top_k=100,
            top_p=1.0,
            min_p=0.0,
            seed=seed,
            repeat_penalty=1.1,
            frequency_penalty=0.1,
            presence_penalty=0.1,
        )
        out = [s.sample(ctx, last)]
        for i in range(10):
            out.append(ctx.step(s, out[-1], len(toks) + i))
        return out

    assert run(7) == run(7)


def test_batch_holds_several_sequences(L, model, ctx):
    a = _prompt(model, "Hi")
    b = _prompt(model, "Tell me about the sea")
    batch = L.Batch(256, n_seq_max=2)
    ia = batch.add_sequence(a, 0, 0)
    ib = batch.add_sequence(b, 0, 1)
    assert len(batch) == len(a) + len(b)
    ctx.decode(batch)
    assert ctx.seq_pos_max(0) == len(a) - 1
    assert ctx.seq_pos_max(1) == len(b) - 1
    s0, s1 = L.Sampler(model, temperature=0), L.Sampler(model, temperature=0)
    t0, t1 = s0.sample(ctx, ia), s1.sample(ctx, ib)
    # next tokens of both sequences in one decode
    batch.clear()
    j0 = batch.add(t0, len(a), 0, logits=True)
    j1 = batch.add(t1, len(b), [1], logits=True)
    ctx.decode(batch)
    assert s0.sample(ctx, j0) >= 0 and s1.sample(ctx, j1) >= 0
    # a shared prefix: copy sequence 0 into 2
    ctx.seq_cp(0, 2)
    assert ctx.seq_pos_max(2) == len(a)
    assert ctx.seq_rm(1)
    assert ctx.seq_pos_max(1) == -1
    assert ctx.seq_pos_max(0) == len(a)
    ctx.clear()
    assert ctx.seq_pos_max(0) == -1 and ctx.seq_pos_max(2) == -1


def test_batch_limits(L):
    b = L.Batch(2, n_seq_max=2)
    b.add(1, 0, 0)
    b.add(1, 1, [0, 1])
    with pytest.raises(OverflowError):
        b.add(1, 2, 0)
    b.clear()
    with pytest.raises(OverflowError):
        b.add_sequence([1, 2, 3], 0, 0)
    with pytest.raises(ValueError):
        b.add(1, 0, [0, 1, 2])
    with pytest.raises(ValueError):
        L.Batch(0)


def test_a_batch_over_n_batch_is_an_error_not_an_abort(L, model, ctx):
    """libllama aborts the process on a batch larger than n_batch; the binding refuses it
    first, for decode and decode_sample, and the context stays usable."""
    big = L.Batch(ctx.n_batch + 1)
    big.add_sequence([100 + i for i in range(ctx.n_batch + 1)], 0, 0)
    with pytest.raises(ValueError, match=f"n_batch={ctx.n_batch}"):
        ctx.decode(big)
    sampler = L.Sampler(model, temperature=0.0)
    with pytest.raises(ValueError, match="n_batch"):
        L.decode_sample(ctx, big, [sampler], [ctx.n_batch])
    ok = L.Batch(4)
    ok.add_sequence([100, 101, 102, 103], 0, 0)
    ctx.decode(ok)


def test_context_full_is_an_error(L, model):
    c = L.Context(model, n_threads=1, n_ctx=256, n_batch=256)
    n = c.n_ctx  # libllama may round the size up
    c.close()
    c = L.Context(model, n_threads=1, n_ctx=n, n_batch=n)
    b = L.Batch(n)
    b.add_sequence([100 + i % 1000 for i in range(n)], 0, 0)
    c.decode(b)
    b.clear()
    b.add(11, n, 0, logits=True)
    with pytest.raises((RuntimeError, ValueError)):
        c.decode(b)
    c.close()


def test_grammar_constrains_output(L, model, ctx):
    ctx.seq_rm(0)
    toks = _prompt(model, "Say anything.")
    b = L.Batch(128)
    last = b.add_sequence(toks, 0, 0)
    ctx.decode(b)
    s = L.Sampler(model, temperature=0, grammar='root ::= "yes" | "no"')
    out = [s.sample(ctx, last)]
    pos = len(toks)
    while not model.is_eog(out[-1]) and len(out) < 10:
        out.append(ctx.step(s, out[-1], pos))
        pos += 1
    assert model.detokenize(out) in ("yes", "no")
    with pytest.raises(ValueError, match="grammar"):
        L.Sampler(model, grammar="root ::= (")


def test_sampler_rejects_bad_values(L, model):
    with pytest.raises(ValueError):
        L.Sampler(model, temperature=-1)
    with pytest.raises(ValueError):
        L.Sampler(model, top_p=2.0)
    with pytest.raises(ValueError):
        L.Sampler(model, repeat_penalty=0.0)


def test_embeddings_pooled_truncated_normalised(L, model):
    c = L.Context(model, n_threads=1, n_ctx=256, n_batch=256, embeddings=True, pooling="mean")
    b = L.Batch(256)

    def emb(text, dims=None):
        c.clear()
        b.clear()
        b.add_sequence(model.tokenize(text), 0, 0)
        c.decode(b)
        return c.embedding(0, dimensions=dims)

    full = emb("a cat sat on the mat")
    assert len(full) == model.n_embd
    assert sum(x * x for x in full) == pytest.approx(1.0, abs=1e-5)
    short = emb("a cat sat on the mat", 32)
    assert len(short) == 32
    assert sum(x * x for x in short) == pytest.approx(1.0, abs=1e-5)
    assert emb("a cat sat on the mat") == pytest.approx(full, abs=1e-5)
    assert emb("quantum chromodynamics") != pytest.approx(full, abs=1e-3)
    with pytest.raises(ValueError):
        c.embedding(0, dimensions=0)
    c.close()
    plain = L.Context(model, n_threads=1, n_ctx=64)
    with pytest.raises(RuntimeError, match="embeddings=True"):
        plain.embedding(0)
    plain.close()


def test_decode_releases_the_gil(L, model):
    c = L.Context(model, n_ctx=512, n_batch=256, n_threads=1)
    b = L.Batch(256)
    b.add_sequence(list(range(100, 228)), 0, 0)
    ticks = 0
    done = threading.Event()

    def work():
        for _ in range(2):
            c.seq_rm(0)
            c.decode(b)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    c.close()
    assert ticks > 5  # the main thread kept running while libllama computed


def test_use_after_close_is_a_clear_error(L, smollm2_path):
    m = L.Model(str(smollm2_path))
    c = L.Context(m, n_threads=1, n_ctx=64)
    s = L.Sampler(m, temperature=0)
    m.close()
    m.close()  # idempotent
    assert m.closed and c.closed
    for call in (
        lambda: m.tokenize("x"),
        lambda: m.name,
        lambda: c.n_ctx,
        lambda: c.seq_rm(0),
        lambda: s.accept(1),
        lambda: L.Context(m),
        lambda: L.Sampler(m),
    ):
        with pytest.raises(NotReady, match="closed"):
            call()
    assert "closed" in repr(m)


def test_log_routing_is_quiet_and_capturable(L, smollm2_path, capfd, caplog):
    import logging

    L.set_log_level(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="inferd.llama"):
            L.Model(str(smollm2_path)).close()
    finally:
        L.set_log_level(logging.WARNING)
    assert any(r.name == "inferd.llama" for r in caplog.records)
    L.Model(str(smollm2_path)).close()
    _out, err = capfd.readouterr()
    assert "llama_model_loader" not in err  # nothing leaks to stderr by default


def test_close_while_another_thread_decodes_is_deferred(L, smollm2_path):
    """Closing the model under a running decode must not free memory libllama is using.

    Proof that the close happened during the decode: the decode thread is seen inside
    its GIL-free call (``inflight``) and, right after ``close()``, the weights are not
    yet freed (a close with nothing in flight frees at once). The decode of 512 tokens
    takes far longer than the few bytecodes between the check and the close; should the
    scheduler still let it finish in between, the attempt is repeated (never passed).
    """
    deferred = 0
    for _attempt in range(5):
        m = L.Model(str(smollm2_path))
        c = L.Context(m, n_threads=1, n_ctx=1024, n_batch=512)
        s = L.Sampler(m, temperature=0)
        b = L.Batch(512)
        last = b.add_sequence([100 + i for i in range(512)], 0, 0)
        errors: list[BaseException] = []

        def work(c=c, s=s, b=b, last=last, errors=errors):
            try:
                c.decode(b)
                s.sample(c, last)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=work)
        t.start()
        while m.inflight == 0 and t.is_alive():
            time.sleep(0)  # let the worker reach its GIL-free decode
        m.close()
        in_decode = not m.freed  # freeing waits for the running decode
        assert m.closed and c.closed
        t.join()
        assert m.freed  # the last call to leave freed the weights
        assert all(isinstance(x, NotReady) for x in errors), errors
        if in_decode:
            deferred += 1
            break
    assert deferred == 1, "close() never landed while a decode ran"
    with pytest.raises(NotReady):
        c.decode(b)


# ---------------------------------------------------------------- KV layouts (ADR 0008)


def _greedy_next_to(L, model, c, neighbour: list[int] | None, steps: int = 12) -> list:
    """Sequence 0's logits (as bytes) over ``steps`` greedy steps; ``neighbour`` (seq 1)
    decodes in the same batches, so its cells interleave with sequence 0's."""
    head = model.tokenize("<|im_start|>system\nYou are SmolLM.<|im_end|>\n", False, True)
    a = head + model.tokenize(
        "<|im_start|>user\nRepeat this word three times: elephant<|im_end|>\n"
        "<|im_start|>assistant\n",
        False,
        True,
    )
    for s in range(2):
        c.seq_rm(s)
    b = L.Batch(256, 2)
    a_last = b.add_sequence(a, 0, 0, True)
    b_pos = 0
    if neighbour is not None:
        b_last = b.add_sequence(head + neighbour, 0, 1, True)
        b_pos = len(head) + len(neighbour)
    rows, a_pos = [], len(a)
    for _ in range(steps):
        c.decode(b)
        la = c.logits(a_last)
        rows.append(la.tobytes())
        nxt = max(range(len(la)), key=la.__getitem__)
        b_tok = 0
        if neighbour is not None:
            lb = c.logits(b_last)
            b_tok = max(range(len(lb)), key=lb.__getitem__)
        b.clear()
        a_last = b.add_sequence([nxt], a_pos, 0, True)
        a_pos += 1
        if neighbour is not None:
            b_last = b.add_sequence([b_tok], b_pos, 1, True)
            b_pos += 1
    return rows


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "split"])
def test_a_neighbours_content_never_reaches_a_sequence(L, model, unified):
    """Cross-talk would make a sequence's logits depend on what its neighbour holds.
    They never do, bit for bit, under either layout (same lengths, so the same cell
    layout). Under the split layout they also equal the single-stream logits bit for
    bit; under the unified one they may not (the shared cells change float sums: the
    numerics behind ADR 0008's default), and that is all that differs."""
    c = L.Context(model, n_threads=1, n_ctx=1024, n_batch=256, n_seq_max=2, kv_unified=unified)
    try:
        poem = model.tokenize("Write a poem about the sea and the stars tonight.", False)
        primes = model.tokenize("List three prime numbers and say why each is prime.", False)
        n = min(len(poem), len(primes))
        with_poem = _greedy_next_to(L, model, c, poem[:n])
        with_primes = _greedy_next_to(L, model, c, primes[:n])
        assert poem[:n] != primes[:n]
        assert with_poem == with_primes  # the neighbour's content: no effect at all
        alone = _greedy_next_to(L, model, c, None)
        assert alone == _greedy_next_to(L, model, c, None)  # deterministic
        if not unified:
            assert with_poem == alone  # split: batched == single stream, bit for bit
    finally:
        c.close()


def _next_logits(L, model, prompt: list[int], rows: int, threads: int, fa: str) -> list[bytes]:
    """Logits (as bytes) of the last four tokens of ``prompt`` after its head was
    prefilled, decoded ``rows`` rows per step; ``threads`` threads decode one-row steps
    (libllama's ``n_threads``; steps of several rows use ``n_threads_batch``, 2 here)."""
    n = len(prompt) + 8
    c = L.Context(model, n_threads=threads, n_threads_batch=2, n_ctx=n, n_batch=n, flash_attn=fa)
    try:
        head, tail = prompt[:-4], prompt[-4:]
        b = L.Batch(len(head))
        b.add_sequence(head, 0, 0, False)
        c.decode(b)
        out = []
        for at in range(0, len(tail), rows):
            b = L.Batch(rows)
            chunk = tail[at : at + rows]
            idx = [b.add(t, len(head) + at + j, [0], True) for j, t in enumerate(chunk)]
            c.decode(b)
            out += [c.logits(i).tobytes() for i in idx]
        return out
    finally:
        c.close()


def test_what_makes_a_lone_row_round_differently(L, model):
    """The numerics the README and ADRs 0008 and 0027 describe. With flash attention and
    more than one thread, ggml decodes a lone row whose KV view spans 512 cells or more
    by splitting that range across the threads: its logits then differ from the same
    row decoded among others. With one thread they are bit-identical, and with flash
    attention off the thread count leaves a lone row's logits as they are."""
    prompt = _prompt(model, " ".join(f"word{i}" for i in range(160)))
    assert 520 < len(prompt) < 1024, len(prompt)
    among = _next_logits(L, model, prompt, 4, 2, "on")
    assert _next_logits(L, model, prompt, 1, 1, "on") == among
    assert _next_logits(L, model, prompt, 1, 2, "on") != among
    assert _next_logits(L, model, prompt, 1, 1, "off") == _next_logits(
        L, model, prompt, 1, 2, "off"
    )
