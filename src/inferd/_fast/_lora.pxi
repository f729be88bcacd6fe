# Included from _llama.pyx: LoRA adapters (docs/adr/0026-grammar-fast-path-and-context-knobs.md).
#
# An adapter is loaded once per model (llama_adapter_lora_init) and lives as long as
# the model: libllama frees every adapter with its model, so a LoraAdapter never frees
# its own pointer and refuses use once the model is closed. Which adapters a context
# applies, at which scales, is one call (llama_set_adapters_lora) between decodes.

#: Most adapters one context applies at once (each costs a matmul pair per layer).
MAX_LORA_ADAPTERS = 16


# no_gc_clear: the model reference must outlive this object (see Context).
@cython.no_gc_clear
cdef class LoraAdapter:
    """A LoRA adapter GGUF loaded for ``model``. ``LoraAdapter(model, path)`` raises
    :class:`ModelLoadError` naming the file when libllama refuses it (not a LoRA
    adapter, made for another architecture, tensors that do not fit the model)."""

    cdef llama_adapter_lora * ptr
    cdef readonly Model model
    cdef readonly str path

    def __cinit__(self, Model model, path):
        self.ptr = NULL
        model._check()
        self.model = model
        self.path = os.fspath(path)
        cdef bytes bpath = os.fsencode(self.path)
        cdef const char * cpath = bpath
        _recent.clear()
        model._enter()
        try:
            with nogil:
                self.ptr = llama_adapter_lora_init(model.ptr, cpath)
        finally:
            model._leave()
        if self.ptr == NULL:
            why = "; ".join(_recent) or "see the inferd.llama logger"
            raise ModelLoadError(f"libllama could not load the LoRA adapter {self.path}: {why}")

    cdef llama_adapter_lora * _get(self) except NULL:
        self.model._check()
        if self.ptr == NULL:
            raise NotReady("the LoRA adapter is not loaded")
        return self.ptr

    def meta(self, str key):
        """The adapter's GGUF metadata value for ``key`` as a string, or None."""
        cdef char buf[256]
        cdef bytes bkey = _utf8(key)
        if llama_adapter_meta_val_str(self._get(), bkey, buf, sizeof(buf)) < 0:
            return None
        return buf.decode("utf-8", "replace")


def set_lora(Context ctx, adapters, scales):
    """Apply ``adapters`` (LoraAdapter of ctx's model) at ``scales`` to ``ctx``'s next
    decodes; empty lists remove every adapter. libllama changes nothing (and keeps its
    compute graph) when the set and the scales are what it already applies."""
    ctx._check()
    cdef Py_ssize_t i, n = len(adapters)
    if n != len(scales):
        raise ValueError(f"{n} LoRA adapters but {len(scales)} scales")
    if n > MAX_LORA_ADAPTERS:
        raise ValueError(f"{n} LoRA adapters; at most {MAX_LORA_ADAPTERS}")
    cdef llama_adapter_lora * arr[16]
    cdef float sc[16]
    cdef LoraAdapter a
    for i in range(n):
        a = <LoraAdapter?>adapters[i]
        if a.model is not ctx.model:
            raise ValueError("a LoRA adapter and the context belong to different models")
        arr[i] = a._get()
        sc[i] = float(scales[i])
        if not isfinite(sc[i]):
            raise ValueError(f"LoRA scale {i} must be a finite number")
    cdef int32_t rc
    cdef llama_adapter_lora ** parr = NULL
    cdef float * psc = NULL
    if n:
        parr = &arr[0]
        psc = &sc[0]
    ctx._enter()
    try:
        rc = llama_set_adapters_lora(ctx.ptr, parr, n, psc)
    finally:
        ctx._leave()
    if rc != 0:
        raise ValueError(f"libllama refused the LoRA adapters (code {rc})")
