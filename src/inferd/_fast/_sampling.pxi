# Included from _llama.pyx: the per-request sampler chain.
#
# Which libllama samplers a request's settings add, and in which order: llama.cpp's own
# (common/sampling.cpp, which llama-server uses): logit bias, penalties, DRY, then
# top-k, typical, top-p, min-p, XTC, temperature and the seeded draw. Each sequence
# gets its own chain, so two concurrent streams never share a setting or a state
# (docs/adr/0021-per-request-sampling-chain.md).

from libc.math cimport INFINITY, isfinite, isnan

#: llama.cpp's default DRY sequence breakers (``common_params_sampling``).
DEFAULT_DRY_SEQUENCE_BREAKERS = ("\n", ":", "\"", "*")
#: Prepared DRY samplers kept per model, keyed by their settings. Preparing one walks
#: the whole vocabulary once per breaker (llama.cpp finds every token that contains or
#: starts a breaker); a clone of a prepared one copies that table instead.
DRY_CACHE_SIZE = 8
#: A bias at or below this bans the token (-inf): OpenAI documents -100 as a ban.
LOGIT_BIAS_BAN = -100.0
#: Most tokens a penalty or DRY sampler may look back over. Each allocates a ring of
#: this many tokens per sequence, so an unchecked value is a memory request.
MAX_SAMPLER_HISTORY = 1 << 20
#: Most entries of ``logit_bias`` and of ``dry_sequence_breakers`` the binding takes.
MAX_BINDING_LOGIT_BIAS = 1 << 16
MAX_BINDING_DRY_BREAKERS = 64

#: Model -> OrderedDict[settings, _DryProto]; an entry goes with its model.
_dry_protos = weakref.WeakKeyDictionary()


cdef class _DryProto:
    """A prepared DRY sampler that never sees a token: the template clones copy."""

    cdef llama_sampler * ptr

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_sampler_free(self.ptr)
            self.ptr = NULL


cdef inline int _add(llama_sampler * chain, llama_sampler * smpl) except -1:
    if smpl == NULL:
        raise MemoryError()
    llama_sampler_chain_add(chain, smpl)
    return 0


cdef uint32_t _seed32(object seed):
    if seed is None:
        return 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: libllama draws a random seed
    return <uint32_t>(int(seed) & 0xFFFFFFFF)


def _check_sampling(float temperature, float top_p, float min_p, float typical_p,
                    float repeat_penalty, float frequency_penalty, float presence_penalty,
                    int penalty_last_n, float dry_multiplier, float dry_base,
                    int dry_allowed_length, int dry_penalty_last_n,
                    float xtc_probability, float xtc_threshold):
    """ValueError naming the first setting libllama cannot take."""
    if not (temperature >= 0.0):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not (0.0 <= top_p <= 1.0) or not (0.0 <= min_p <= 1.0):
        raise ValueError("top_p and min_p must be within [0, 1]")
    if not (0.0 <= typical_p <= 1.0):
        raise ValueError(f"typical_p must be within [0, 1] (1 disables it), got {typical_p}")
    if not (repeat_penalty > 0.0) or not isfinite(repeat_penalty):
        raise ValueError(f"repeat_penalty must be > 0 (1.0 disables it), got {repeat_penalty}")
    for name, v in (("frequency_penalty", frequency_penalty),
                    ("presence_penalty", presence_penalty),
                    ("dry_multiplier", dry_multiplier), ("dry_base", dry_base)):
        if not isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")
    if dry_multiplier < 0.0:
        raise ValueError(f"dry_multiplier must be >= 0 (0 disables DRY), got {dry_multiplier}")
    for name, n in (("repeat_last_n", penalty_last_n), ("dry_penalty_last_n", dry_penalty_last_n),
                    ("dry_allowed_length", dry_allowed_length)):
        if not (0 <= n <= MAX_SAMPLER_HISTORY):
            raise ValueError(f"{name} must be within [0, {MAX_SAMPLER_HISTORY}] "
                             f"(MAX_SAMPLER_HISTORY), got {n}")
    if not (0.0 <= xtc_probability <= 1.0) or not (0.0 <= xtc_threshold <= 1.0):
        raise ValueError("xtc_probability and xtc_threshold must be within [0, 1]")


cdef int _add_logit_bias(llama_sampler * chain, Model model, object logit_bias) except -1:
    """Add ``{token id: bias}`` (or ``(id, bias)`` pairs); ids must be this model's."""
    if not logit_bias:
        return 0
    items = list(logit_bias.items() if hasattr(logit_bias, "items") else logit_bias)
    if len(items) > MAX_BINDING_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(items)} entries; at most {MAX_BINDING_LOGIT_BIAS}")
    cdef int32_t n_vocab = llama_vocab_n_tokens(model.vocab)
    cdef llama_logit_bias * arr = <llama_logit_bias *>malloc(
        len(items) * sizeof(llama_logit_bias))
    if arr == NULL:
        raise MemoryError()
    cdef Py_ssize_t i
    cdef double bias
    try:
        for i, pair in enumerate(items):
            tok, value = pair
            if isinstance(tok, bool) or not isinstance(tok, int) or not (0 <= tok < n_vocab):
                raise ValueError(f"logit_bias: {_echo(tok)} is not a token id of this model "
                                 f"(ids are 0..{n_vocab - 1})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or isnan(value):
                raise ValueError(f"logit_bias[{tok}] must be a number, got {_echo(value)}")
            bias = value
            arr[i].token = tok
            arr[i].bias = -INFINITY if bias <= LOGIT_BIAS_BAN else <float>bias
        _add(chain, llama_sampler_init_logit_bias(n_vocab, <int32_t>len(items), arr))
    finally:
        free(arr)
    return 0


cdef _DryProto _dry_proto(Model model, key):
    """A prepared DRY sampler for these settings (cached per model, DRY_CACHE_SIZE)."""
    per = _dry_protos.get(model)
    if per is None:
        per = _dry_protos[model] = collections.OrderedDict()
    proto = per.get(key)
    if proto is not None:
        per.move_to_end(key)
        return proto
    cdef float mult = key[0], base = key[1]
    cdef int32_t allowed = key[2], last_n = key[3]
    words = [_utf8(w) for w in key[4]]
    cdef size_t n = len(words), i
    cdef const char ** cw = <const char **>malloc((n or 1) * sizeof(char *))
    if cw == NULL:
        raise MemoryError()
    cdef _DryProto made = _DryProto.__new__(_DryProto)
    try:
        for i in range(n):
            cw[i] = <const char *>(<bytes>words[i])
        model._enter()  # the vocabulary is read without the GIL
        try:
            with nogil:
                made.ptr = llama_sampler_init_dry(model.vocab, mult, base, allowed, last_n, cw, n)
        finally:
            model._leave()
    finally:
        free(cw)
    if made.ptr == NULL:
        raise MemoryError()
    per[key] = made
    while len(per) > DRY_CACHE_SIZE:
        per.popitem(last=False)
    return made


cdef int _add_dry(llama_sampler * chain, Model model, float multiplier, float base,
                  int allowed, int last_n, object breakers) except -1:
    """DRY as llama.cpp adds it (1 when added); disabled (nothing added, 0) when
    multiplier or last_n is 0 or base < 1, as libllama itself decides."""
    if multiplier == 0.0 or base < 1.0 or last_n == 0:
        return 0
    words = DEFAULT_DRY_SEQUENCE_BREAKERS if breakers is None else tuple(breakers)
    if len(words) > MAX_BINDING_DRY_BREAKERS:
        raise ValueError(f"dry_sequence_breakers has {len(words)} entries; at most "
                         f"{MAX_BINDING_DRY_BREAKERS}")
    for w in words:
        if not isinstance(w, str) or not w or "\0" in w:
            raise ValueError("dry_sequence_breakers must be non-empty strings without NUL, "
                             f"got {_echo(w)}")
    cdef _DryProto proto = _dry_proto(model, (multiplier, base, allowed, last_n, words))
    _add(chain, llama_sampler_clone(proto.ptr))
    return 1


cdef int _add_filters(llama_sampler * chain, bint greedy, int top_k, float typical_p,
                      float top_p, float min_p, float xtc_probability, float xtc_threshold,
                      uint32_t seed) except -1:
    """top-k, typical, top-p, min-p, XTC in llama.cpp's order. A greedy chain needs them
    only when one can drop the most likely token (typical and XTC can; the others
    always keep it), and then gets all of them, as llama-server runs them at t = 0."""
    cdef bint typical = typical_p < 1.0
    cdef bint xtc = xtc_probability > 0.0 and xtc_threshold <= 0.5
    if greedy and not (typical or xtc):
        return 0
    if top_k > 0:
        _add(chain, llama_sampler_init_top_k(top_k))
    if typical:
        _add(chain, llama_sampler_init_typical(typical_p, 1))
    if top_p < 1.0:
        _add(chain, llama_sampler_init_top_p(top_p, 1))
    if min_p > 0.0:
        _add(chain, llama_sampler_init_min_p(min_p, 1))
    if xtc:
        _add(chain, llama_sampler_init_xtc(xtc_probability, xtc_threshold, 1, seed))
    return 0


cdef object _echo(object value):
    from inferd.limits import echo
    return echo(value)
