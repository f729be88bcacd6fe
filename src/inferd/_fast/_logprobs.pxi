# Included from _llama.pyx: per-token log-probabilities for ``logprobs``/``top_logprobs``
# (docs/adr/0022-n-choices-and-logprobs.md).
#
# Computed from the raw logits of the last decode (the model's own distribution, before
# any sampler stage: penalties, grammar, top-k/p, temperature), as llama-server does by
# default (``post_sampling_probs`` false). One call per decode step for every sequence
# that asked, the whole computation with the GIL released; nothing runs for a step in
# which no sequence asked, so plain generation pays nothing.

cimport libc.math as cmath

#: Most alternatives one token may report (OpenAI's ``top_logprobs`` limit).
MAX_TOP_LOGPROBS_C = 20


cdef void _logprob_one(const float * logits, int32_t n_vocab, llama_token chosen, int k,
                       double * out_chosen, int32_t * top_ids, double * top_lps) noexcept nogil:
    """log-softmax of ``chosen`` and the ``k`` largest entries (descending, ties by id).

    Two passes over the vocabulary: the maximum, then the sum of exponentials (in double,
    shifted by the maximum so nothing overflows) while keeping the top ``k`` by insertion
    into a short sorted array: O(V) plus O(k) for the rare value that enters it.
    """
    cdef int32_t i
    cdef int j, filled = 0
    cdef float mx = logits[0]
    cdef float v
    cdef double total = 0.0, lz
    for i in range(1, n_vocab):
        if logits[i] > mx:
            mx = logits[i]
    for i in range(n_vocab):
        v = logits[i]
        total += cmath.exp(<double>v - mx)
        if k > 0 and (filled < k or v > top_lps[filled - 1]):
            j = filled if filled < k else k - 1
            while j > 0 and top_lps[j - 1] < v:
                top_lps[j] = top_lps[j - 1]
                top_ids[j] = top_ids[j - 1]
                j -= 1
            top_lps[j] = v
            top_ids[j] = i
            if filled < k:
                filled += 1
    lz = <double>mx + cmath.log(total)
    out_chosen[0] = <double>logits[chosen] - lz
    for j in range(filled):
        top_lps[j] = top_lps[j] - lz


def token_logprobs(Context ctx, idxs, tokens, int top_n):
    """Logprobs of ``tokens[i]`` from the logits at batch index ``idxs[i]`` of the last
    decode, and the ``top_n`` (0..20) most likely tokens there.

    Returns ``[(logprob, [(token id, logprob), ...]), ...]`` in the order given, top
    entries by descending logprob. Call it right after the decode (the next decode
    overwrites the logits), from the thread that decodes.
    """
    ctx._check()
    cdef Py_ssize_t n = len(idxs), a
    if len(tokens) != n:
        raise ValueError(f"{n} batch indices but {len(tokens)} tokens")
    if top_n < 0 or top_n > MAX_TOP_LOGPROBS_C:
        raise ValueError(f"top_n must be within 0..{MAX_TOP_LOGPROBS_C}, got {top_n}")
    cdef int32_t n_vocab = llama_vocab_n_tokens(ctx.model.vocab)
    cdef int k = top_n if top_n < n_vocab else n_vocab
    cdef int32_t * cidx = <int32_t *>malloc((n + 1) * sizeof(int32_t))
    cdef llama_token * ctok = <llama_token *>malloc((n + 1) * sizeof(llama_token))
    cdef double * chosen = <double *>malloc((n + 1) * sizeof(double))
    cdef int32_t * ids = <int32_t *>malloc((n * k + 1) * sizeof(int32_t))
    cdef double * lps = <double *>malloc((n * k + 1) * sizeof(double))
    cdef const float ** rows = <const float **>malloc((n + 1) * sizeof(float *))
    cdef int j
    try:
        if cidx == NULL or ctok == NULL or chosen == NULL or ids == NULL or lps == NULL \
                or rows == NULL:
            raise MemoryError()
        for a in range(n):
            cidx[a] = idxs[a]
            ctok[a] = tokens[a]
            if ctok[a] < 0 or ctok[a] >= n_vocab:
                raise ValueError(f"token {ctok[a]} is not an id of this model")
            rows[a] = llama_get_logits_ith(ctx.ptr, cidx[a])
            if rows[a] == NULL:
                raise ValueError(f"batch index {cidx[a]} has no logits")
        ctx._enter()
        try:
            with nogil:
                for a in range(n):
                    _logprob_one(rows[a], n_vocab, ctok[a], k, &chosen[a], &ids[a * k],
                                 &lps[a * k])
        finally:
            ctx._leave()
        return [(chosen[a], [(ids[a * k + j], lps[a * k + j]) for j in range(k)])
                for a in range(n)]
    finally:
        free(cidx)
        free(ctok)
        free(chosen)
        free(ids)
        free(lps)
        free(rows)
