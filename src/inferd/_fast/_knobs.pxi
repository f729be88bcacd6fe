# Included from _llama.pyx: the context's knobs (flash attention, KV cache types,
# RoPE/YaRN), by name, and what a sequence's KV cells cost
# (docs/adr/0026-grammar-fast-path-and-context-knobs.md).
#
# The Python layer (inferd.backends.llamacpp.options) checks every value first and names
# the setting; here an unknown name still raises ValueError, so a direct caller of
# Context cannot hand libllama an enum it does not have.

#: KV cache element types, as llama-server's --cache-type-k/-v accepts them.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
FLASH_ATTN = {"auto": LLAMA_FLASH_ATTN_TYPE_AUTO, "on": LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": LLAMA_FLASH_ATTN_TYPE_DISABLED}
ROPE_SCALING = {"none": LLAMA_ROPE_SCALING_TYPE_NONE, "linear": LLAMA_ROPE_SCALING_TYPE_LINEAR,
                "yarn": LLAMA_ROPE_SCALING_TYPE_YARN,
                "longrope": LLAMA_ROPE_SCALING_TYPE_LONGROPE}
SPLIT_MODE = {"none": LLAMA_SPLIT_MODE_NONE, "layer": LLAMA_SPLIT_MODE_LAYER,
              "row": LLAMA_SPLIT_MODE_ROW}
_FLOAT_KNOBS = ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor",
                "yarn_beta_fast", "yarn_beta_slow")


cdef ggml_type _kv_type(str knob, object name) except *:
    """The ggml type called ``name`` (one of KV_CACHE_TYPES)."""
    cdef int i
    if name in KV_CACHE_TYPES:
        for i in range(GGML_TYPE_COUNT):
            tn = ggml_type_name(<ggml_type>i)
            if tn != NULL and tn.decode() == name:
                return <ggml_type>i
    raise ValueError(f"{knob} must be one of {', '.join(KV_CACHE_TYPES)}, got {_echo(name)}")


cdef int _set_knobs(llama_context_params * p, dict knobs) except -1:
    """Write the named knobs into ``p``; a knob left out (or None) keeps libllama's
    default. ValueError names an unknown knob or value."""
    for key, value in knobs.items():
        if value is None:
            continue
        if key == "flash_attn":
            if value not in FLASH_ATTN:
                raise ValueError(f"flash_attn must be auto, on or off, got {_echo(value)}")
            p.flash_attn_type = FLASH_ATTN[value]
        elif key == "type_k":
            p.type_k = _kv_type(key, value)
        elif key == "type_v":
            p.type_v = _kv_type(key, value)
        elif key == "offload_kqv":
            p.offload_kqv = bool(value)
        elif key == "rope_scaling":
            if value not in ROPE_SCALING:
                raise ValueError(f"rope_scaling must be one of {', '.join(ROPE_SCALING)}, "
                                 f"got {_echo(value)}")
            p.rope_scaling_type = ROPE_SCALING[value]
        elif key == "yarn_orig_ctx":
            p.yarn_orig_ctx = int(value)
        elif key in _FLOAT_KNOBS:
            setattr_float(p, key, float(value))
        else:
            raise ValueError(f"unknown context setting {_echo(key)}")
    return 0


cdef void setattr_float(llama_context_params * p, str key, float v):
    if key == "rope_freq_base":
        p.rope_freq_base = v
    elif key == "rope_freq_scale":
        p.rope_freq_scale = v
    elif key == "yarn_ext_factor":
        p.yarn_ext_factor = v
    elif key == "yarn_attn_factor":
        p.yarn_attn_factor = v
    elif key == "yarn_beta_fast":
        p.yarn_beta_fast = v
    elif key == "yarn_beta_slow":
        p.yarn_beta_slow = v


def seq_state_bytes(Context ctx, int seq_id):
    """Bytes of sequence ``seq_id``'s state as libllama serialises it: its KV cells in the
    cache's own types, so the figure shows what q8_0 or q4_0 saves per sequence."""
    ctx._check()
    cdef size_t n
    ctx._enter()
    try:
        with nogil:
            n = llama_state_seq_get_size(ctx.ptr, seq_id)
    finally:
        ctx._leave()
    return n
