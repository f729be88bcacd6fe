# Included from _llama.pyx: one sequence's state as bytes in host memory, for the
# host-RAM prompt cache (docs/adr/0030-host-ram-prompt-cache.md).
#
# libllama serialises a sequence's KV cells (positions, sequence ids, K and V rows in
# the cache's own types) and restores them into any sequence id of a context made with
# the same model and cache types. Both copies run with the GIL released.


def seq_state_get(Context ctx, int seq_id):
    """``seq_id``'s state as bytes (its cells in the cache's own types); ``b""`` when
    the sequence holds no cells."""
    ctx._check()
    cdef size_t n, got
    cdef bytes out
    cdef uint8_t * dst
    ctx._enter()
    try:
        with nogil:
            n = llama_state_seq_get_size_ext(ctx.ptr, seq_id, 0)
        out = PyBytes_FromStringAndSize(NULL, n)
        dst = <uint8_t *> PyBytes_AS_STRING(out)
        with nogil:
            got = llama_state_seq_get_data_ext(ctx.ptr, dst, n, seq_id, 0)
    finally:
        ctx._leave()
    if got != n:
        raise RuntimeError(f"llama_state_seq_get_data wrote {got} of {n} bytes")
    return out


def seq_state_set(Context ctx, bytes data, int seq_id):
    """Restore ``data`` (from :func:`seq_state_get`) into ``seq_id``, replacing its
    cells. Returns False when libllama refuses it (no room for the cells, another
    model's or cache type's state); the caller then clears the sequence."""
    ctx._check()
    cdef size_t n = len(data)
    cdef size_t used
    cdef const uint8_t * src = <const uint8_t *> PyBytes_AS_STRING(data)
    ctx._enter()
    try:
        with nogil:
            used = llama_state_seq_set_data_ext(ctx.ptr, src, n, seq_id, 0)
    finally:
        ctx._leave()
    return used > 0
