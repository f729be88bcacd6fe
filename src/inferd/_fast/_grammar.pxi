# Included from _llama.pyx: grammar-constrained sampling at the cost of plain sampling.
#
# Applying a GBNF grammar to the whole vocabulary walks every token's text through the
# grammar's stacks: on SmolLM2 (49k tokens) that is most of a CPU decode step. llama.cpp's
# common_sampler (grammar_first=false, what llama-server runs) samples with the chain
# alone, checks the one chosen token against the grammar, and only when the grammar
# rejects it applies the grammar to the whole vocabulary and samples again. We do the
# same inside the per-sequence Sampler, without the GIL
# (docs/adr/0026-grammar-fast-path-and-context-knobs.md).
#
# Greedy outputs equal the full-grammar order's: the chain's maximum over the whole
# vocabulary, when the grammar allows it, is also the maximum over the allowed tokens
# (ties: the first index, in both). A lazy grammar (tool-call triggers) allows every
# token until triggered, so the check passes and accepting the token drives the trigger.

from libc.math cimport isinf


cdef inline llama_token _argmax_logits(const float * logits, int32_t n_vocab) noexcept nogil:
    """The first index of the largest logit (libllama's greedy pick)."""
    cdef int32_t i, best = 0
    cdef float top = logits[0]
    for i in range(1, n_vocab):
        if logits[i] > top:
            top = logits[i]
            best = i
    return best


cdef inline bint _grammar_allows(llama_sampler * gram, llama_token tok) noexcept nogil:
    """Whether the grammar, in its current state, accepts ``tok`` next (a one-candidate
    array, as common_sampler_sample tests it)."""
    cdef llama_token_data one
    cdef llama_token_data_array arr
    one.id = tok
    one.logit = 1.0
    one.p = 0.0
    arr.data = &one
    arr.size = 1
    arr.selected = -1
    arr.sorted = False
    llama_sampler_apply(gram, &arr)
    return not (isinf(arr.data[0].logit) and arr.data[0].logit < 0)


cdef llama_token _pick(llama_sampler * chain, llama_sampler * gram, llama_token_data * cur,
                       const float * logits, int32_t n_vocab) noexcept nogil:
    """Apply ``gram`` (when not NULL) then ``chain`` to the whole vocabulary; the token
    the chain selected (nothing is accepted here)."""
    cdef int32_t i
    cdef llama_token_data_array arr
    for i in range(n_vocab):
        cur[i].id = i
        cur[i].logit = logits[i]
        cur[i].p = 0.0
    arr.data = cur
    arr.size = n_vocab
    arr.selected = -1
    arr.sorted = False
    if gram != NULL:
        llama_sampler_apply(gram, &arr)
    llama_sampler_apply(chain, &arr)
    if arr.selected < 0 or <size_t>arr.selected >= arr.size:
        return -1
    return arr.data[arr.selected].id


cdef llama_token _draw_grammar(llama_sampler * chain, llama_sampler * gram,
                               llama_token_data * cur, bint argmax, int32_t n_vocab,
                               llama_context * ctx, int32_t idx) noexcept nogil:
    """The next token under ``gram``: the chain's pick when the grammar allows it, else
    a draw with the grammar applied to every token; the grammar and the chain accept it.

    ``argmax``: the chain is plain greedy, so its pick is the maximum raw logit and
    costs no candidate array at all (and greedy keeps no state to accept into)."""
    cdef const float * logits = llama_get_logits_ith(ctx, idx)
    cdef llama_token tok
    if logits == NULL or n_vocab <= 0:
        return -1
    if argmax:
        tok = _argmax_logits(logits, n_vocab)
    else:
        tok = _pick(chain, NULL, cur, logits, n_vocab)
    if tok < 0 or not _grammar_allows(gram, tok):
        tok = _pick(chain, gram, cur, logits, n_vocab)
    if tok < 0:
        return -1
    llama_sampler_accept(gram, tok)
    if not argmax:
        llama_sampler_accept(chain, tok)
    return tok
