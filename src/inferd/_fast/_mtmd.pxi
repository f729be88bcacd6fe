# _mtmd.pxi: images and audio through llama.cpp's libmtmd (tools/mtmd), included from
# _llama.pyx so it shares the Model/Context internals (in-flight counting, deferred free).
#
# Why libmtmd's own pieces (docs/adr/0028-media-through-libmtmd.md): the projector
# (mmproj GGUF), its preprocessing, stb_image / miniaudio decoding and the M-RoPE /
# non-causal rules per model family are llama.cpp's; re-implementing any of them would
# drift from llama-server. We own the scheduling: a media chunk is encoded and decoded
# into any sequence at any position, GIL released, one call at a time per Mtmd.

from libc.string cimport memcpy


cdef extern from "mtmd.h" nogil:
    cdef struct mtmd_context:
        pass
    cdef struct mtmd_bitmap:
        pass
    cdef struct mtmd_input_chunk:
        pass
    cdef struct mtmd_input_chunks:
        pass
    cdef struct mtmd_image_tokens:
        pass
    cdef enum mtmd_input_chunk_type:
        MTMD_INPUT_CHUNK_TYPE_TEXT
        MTMD_INPUT_CHUNK_TYPE_IMAGE
        MTMD_INPUT_CHUNK_TYPE_AUDIO
    cdef struct mtmd_input_text:
        const char * text
        size_t text_len
        cppbool add_special
        cppbool parse_special
    cdef struct mtmd_context_params:
        cppbool use_gpu
        cppbool print_timings
        int n_threads
        const char * media_marker
        cppbool warmup

    const char * mtmd_default_marker()
    mtmd_context_params mtmd_context_params_default()
    mtmd_context * mtmd_init_from_file(const char * mmproj_fname,
                                       const llama_model * text_model,
                                       const mtmd_context_params ctx_params)
    void mtmd_free(mtmd_context * ctx)
    cppbool mtmd_support_vision(const mtmd_context * ctx)
    cppbool mtmd_support_audio(const mtmd_context * ctx)
    int mtmd_get_audio_sample_rate(const mtmd_context * ctx)
    cppbool mtmd_decode_use_mrope(const mtmd_context * ctx)
    const char * mtmd_get_marker(const mtmd_context * ctx)

    uint32_t mtmd_bitmap_get_nx(const mtmd_bitmap * bitmap)
    uint32_t mtmd_bitmap_get_ny(const mtmd_bitmap * bitmap)
    size_t mtmd_bitmap_get_n_bytes(const mtmd_bitmap * bitmap)
    cppbool mtmd_bitmap_is_audio(const mtmd_bitmap * bitmap)
    const char * mtmd_bitmap_get_id(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_free(mtmd_bitmap * bitmap)

    mtmd_input_chunks * mtmd_input_chunks_init()
    size_t mtmd_input_chunks_size(const mtmd_input_chunks * chunks)
    const mtmd_input_chunk * mtmd_input_chunks_get(const mtmd_input_chunks * chunks, size_t idx)
    void mtmd_input_chunks_free(mtmd_input_chunks * chunks)
    mtmd_input_chunk_type mtmd_input_chunk_get_type(const mtmd_input_chunk * chunk)
    const llama_token * mtmd_input_chunk_get_tokens_text(const mtmd_input_chunk * chunk,
                                                         size_t * n_tokens_output)
    size_t mtmd_input_chunk_get_n_tokens(const mtmd_input_chunk * chunk)
    const char * mtmd_input_chunk_get_id(const mtmd_input_chunk * chunk)
    llama_pos mtmd_input_chunk_get_n_pos(const mtmd_input_chunk * chunk)

    int32_t mtmd_tokenize(const mtmd_context * ctx, mtmd_input_chunks * output,
                          const mtmd_input_text * text, const mtmd_bitmap * const * bitmaps,
                          size_t n_bitmaps)
    cdef struct mtmd_decoder_pos:
        uint32_t t
        uint32_t x
        uint32_t y
        uint32_t z
    const mtmd_image_tokens * mtmd_input_chunk_get_tokens_image(const mtmd_input_chunk * chunk)
    mtmd_decoder_pos mtmd_image_tokens_get_decoder_pos(const mtmd_image_tokens * image_tokens,
                                                       llama_pos pos_0, size_t i)
    int32_t mtmd_encode_chunk(mtmd_context * ctx, const mtmd_input_chunk * chunk)
    float * mtmd_get_output_embd(mtmd_context * ctx)
    cppbool mtmd_decode_use_non_causal(const mtmd_context * ctx, const mtmd_input_chunk * chunk)


cdef extern from "llama.h" nogil:
    int32_t llama_model_n_embd_inp(const llama_model * model)
    void llama_set_causal_attn(llama_context * ctx, cppbool causal_attn)


cdef extern from "mtmd-helper.h" nogil:
    cdef struct mtmd_helper_init_opt:
        pass
    cdef struct mtmd_helper_bitmap_wrapper:
        mtmd_bitmap * bitmap
        void * video_ctx
    ctypedef int32_t (*mtmd_helper_post_decode_callback)(const void * batch, void * user_data)
    mtmd_helper_init_opt mtmd_helper_init_opt_default()
    void mtmd_helper_log_set(ggml_log_callback log_callback, void * user_data)
    mtmd_helper_bitmap_wrapper mtmd_helper_bitmap_init_from_buf(
        const mtmd_context * ctx, const unsigned char * buf, size_t length,
        cppbool placeholder, mtmd_helper_init_opt opt)
    int32_t mtmd_helper_decode_image_chunk(
        mtmd_context * ctx, llama_context * lctx, const mtmd_input_chunk * chunk,
        float * encoded_embd, llama_pos n_past, llama_seq_id seq_id, int32_t n_batch,
        llama_pos * new_n_past, mtmd_helper_post_decode_callback callback, void * user_data)


cdef bint _mtmd_log_ready = False


def mtmd_default_media_marker():
    """libmtmd's default media marker (``<__media__>``): where a chat template puts it, a
    bitmap goes."""
    return (<bytes>mtmd_default_marker()).decode("utf-8")


cdef class Bitmap:
    """A decoded image (RGB) or audio clip (mono PCM at the projector's rate).

    Made by :meth:`Mtmd.bitmap`; its ``id`` is the SHA-256 of the file's bytes, which
    mtmd copies to the chunk, so equal media key equal KV cells (prefix reuse).
    """

    cdef mtmd_bitmap * ptr

    def __cinit__(self):
        self.ptr = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            mtmd_bitmap_free(self.ptr)
            self.ptr = NULL

    def __init__(self):
        raise TypeError("Bitmap objects come from Mtmd.bitmap")

    @property
    def nx(self):
        return mtmd_bitmap_get_nx(self.ptr)

    @property
    def ny(self):
        return mtmd_bitmap_get_ny(self.ptr)

    @property
    def is_audio(self):
        return mtmd_bitmap_is_audio(self.ptr)

    @property
    def n_bytes(self):
        return mtmd_bitmap_get_n_bytes(self.ptr)

    @property
    def id(self):
        cdef const char * s = mtmd_bitmap_get_id(self.ptr)
        return None if s == NULL else (<bytes>s).decode("ascii", "replace")


_CHUNK_KIND = {
    MTMD_INPUT_CHUNK_TYPE_TEXT: "text",
    MTMD_INPUT_CHUNK_TYPE_IMAGE: "image",
    MTMD_INPUT_CHUNK_TYPE_AUDIO: "audio",
}


cdef class Chunks:
    """The prompt split by :meth:`Mtmd.tokenize`: text runs and media chunks in order.

    ``kind(i)`` is ``"text"``, ``"image"`` or ``"audio"``; ``tokens(i)`` a text chunk's
    token ids; ``n_tokens(i)`` the KV cells a chunk takes, ``n_pos(i)`` the positions
    it advances (fewer than ``n_tokens`` under M-RoPE); ``id(i)`` a media chunk's hash.
    """

    cdef mtmd_input_chunks * ptr
    cdef readonly Mtmd owner

    def __init__(self):
        raise TypeError("Chunks objects come from Mtmd.tokenize")

    def __dealloc__(self):
        if self.ptr != NULL:
            mtmd_input_chunks_free(self.ptr)
            self.ptr = NULL

    def __len__(self):
        return mtmd_input_chunks_size(self.ptr)

    cdef const mtmd_input_chunk * _get(self, Py_ssize_t i) except NULL:
        cdef Py_ssize_t n = mtmd_input_chunks_size(self.ptr)
        if not 0 <= i < n:
            raise IndexError(f"chunk {i} out of range ({n} chunks)")
        return mtmd_input_chunks_get(self.ptr, <size_t>i)

    def kind(self, i):
        return _CHUNK_KIND[mtmd_input_chunk_get_type(self._get(i))]

    def tokens(self, i):
        cdef size_t n = 0
        cdef const llama_token * toks = mtmd_input_chunk_get_tokens_text(self._get(i), &n)
        if toks == NULL:
            return []
        return [toks[j] for j in range(n)]

    def n_tokens(self, i):
        return mtmd_input_chunk_get_n_tokens(self._get(i))

    def n_pos(self, i):
        return mtmd_input_chunk_get_n_pos(self._get(i))

    def id(self, i):
        cdef const char * s = mtmd_input_chunk_get_id(self._get(i))
        return None if s == NULL else (<bytes>s).decode("ascii", "replace")


cdef class _FloatBuf:
    """Owner of one malloc'd float array: the embeddings copies of one media chunk
    share it (:meth:`Embeddings.bound`), so a cached encode costs its floats once."""

    cdef float * data

    def __dealloc__(self):
        free(self.data)
        self.data = NULL


cdef class Embeddings:
    """One media chunk's encoded embeddings (``n_tokens`` x ``n_embd`` floats), copied out
    of the projector so its next encode cannot overwrite them: the scheduler decodes
    them into a sequence a piece per step (:func:`decode_embeddings`). The floats are
    shared, read-only, by every :meth:`bound` copy (the media cache, ADR 0032)."""

    cdef float * data
    cdef _FloatBuf buf
    cdef readonly int n_tokens
    cdef readonly int n_embd
    #: the model family attends to a media chunk bidirectionally (decode it whole)
    cdef readonly bint non_causal
    #: the text model uses M-RoPE: 4 position components per embedding (Qwen2-VL family)
    cdef readonly bint mrope
    #: positions the chunk advances (fewer than ``n_tokens`` for an M-RoPE image)
    cdef readonly int n_pos
    #: an image chunk (its M-RoPE positions come from the chunk's grid)
    cdef readonly bint is_image
    # the chunk (kept alive: mtmd lays out an image's M-RoPE positions from it); None
    # for a detached copy, which only :meth:`bound` may turn back into a usable one
    cdef Chunks chunks
    cdef int idx

    def __init__(self):
        raise TypeError("Embeddings objects come from Mtmd.encode")

    @property
    def nbytes(self):
        """Bytes of the floats (shared by every copy)."""
        return <size_t>self.n_tokens * self.n_embd * sizeof(float)

    @property
    def attached(self):
        """Whether the embeddings know their chunk (a detached copy cannot be decoded)."""
        return self.chunks is not None

    cdef Embeddings _copy(self, Chunks chunks, int idx):
        cdef Embeddings e = Embeddings.__new__(Embeddings)
        e.buf = self.buf
        e.data = self.data
        e.n_tokens = self.n_tokens
        e.n_embd = self.n_embd
        e.non_causal = self.non_causal
        e.mrope = self.mrope
        e.n_pos = self.n_pos
        e.is_image = self.is_image
        e.chunks = chunks
        e.idx = idx
        return e

    def detached(self):
        """A copy sharing the floats that keeps no chunk (and so no prompt) alive: what
        the media cache holds (ADR 0032)."""
        return self._copy(None, -1)

    def bound(self, Chunks chunks, int i):
        """The same floats for media chunk ``i`` of ``chunks``: another prompt's copy of
        the same media (same id, kind, token and position counts), as the media cache
        hands it out. ``ValueError`` when chunk ``i`` is not such a copy."""
        cdef const mtmd_input_chunk * ch = chunks._get(i)
        cdef int kind = mtmd_input_chunk_get_type(ch)
        if (kind == MTMD_INPUT_CHUNK_TYPE_TEXT
                or (kind == MTMD_INPUT_CHUNK_TYPE_IMAGE) != self.is_image
                or <int>mtmd_input_chunk_get_n_tokens(ch) != self.n_tokens
                or <int>mtmd_input_chunk_get_n_pos(ch) != self.n_pos):
            raise ValueError(f"chunk {i} is not a copy of these embeddings' media")
        return self._copy(chunks, i)


cdef int _mrope_positions(Embeddings emb, llama_pos * pos, int start, int count,
                          int pos0) except -1:
    """mtmd's M-RoPE layout of embeddings ``[start, start + count)`` of a chunk whose
    first embedding sits at ``pos0``, section-major as mtmd's helper writes it
    (``t``, then ``y``, ``x``, ``z``): an image's cells share ``t`` and spread over its
    grid (``mtmd_image_tokens_get_decoder_pos``); audio advances all four together."""
    cdef const mtmd_image_tokens * img = NULL
    if emb.is_image:
        img = mtmd_input_chunk_get_tokens_image(emb.chunks._get(emb.idx))
    cdef mtmd_decoder_pos p
    cdef int j
    for j in range(count):
        if img != NULL:
            p = mtmd_image_tokens_get_decoder_pos(img, pos0, <size_t>(start + j))
        else:
            p.t = p.x = p.y = p.z = pos0 + start + j
        pos[j] = p.t
        pos[j + count] = p.y
        pos[j + 2 * count] = p.x
        pos[j + 3 * count] = p.z
    return 0


def decode_embeddings(Context ctx, Embeddings emb, int start, int count, int pos0,
                      int seq_id):
    """Decode embeddings ``[start, start + count)`` of ``emb`` into ``seq_id`` (no logits),
    GIL released, where ``pos0`` is the position of the chunk's *first* embedding (mtmd's
    ``pos_0``): embedding ``j`` goes to ``pos0 + j``, or under M-RoPE to mtmd's
    4-component layout of the chunk (an image's cells share one temporal position, so a
    piece decoded later still sits inside its image). Non-causal attention around it
    when the model wants it."""
    ctx._check()
    if emb.chunks is None:
        raise ValueError("detached embeddings: bind them to a chunk first (Embeddings.bound)")
    if start < 0 or count < 1 or start + count > emb.n_tokens or pos0 < 0 or seq_id < 0:
        raise ValueError(f"bad piece [{start}, {start + count}) of {emb.n_tokens} embeddings")
    if emb.n_embd != llama_model_n_embd_inp(ctx.model.ptr):
        raise ValueError("these embeddings are not of this context's model width")
    if count > <int>llama_n_batch(ctx.ptr):
        raise ValueError(f"count={count} exceeds the context's n_batch")
    cdef llama_batch b = llama_batch_init(count, emb.n_embd, 1)
    cdef int j
    cdef int32_t rc
    memcpy(b.embd, emb.data + <size_t>start * emb.n_embd,
           <size_t>count * emb.n_embd * sizeof(float))
    if emb.mrope:  # 4 positions per embedding (llama_batch_free frees this buffer)
        free(b.pos)
        b.pos = <llama_pos *>malloc(4 * <size_t>count * sizeof(llama_pos))
        try:
            if b.pos == NULL:
                raise MemoryError()
            _mrope_positions(emb, b.pos, start, count, pos0)
        except BaseException:
            llama_batch_free(b)
            raise
    for j in range(count):
        if not emb.mrope:
            b.pos[j] = pos0 + start + j
        b.n_seq_id[j] = 1
        b.seq_id[j][0] = seq_id
        b.logits[j] = 0
    b.n_tokens = count
    ctx._enter()
    try:
        with nogil:
            if emb.non_causal:
                llama_set_causal_attn(ctx.ptr, False)
            rc = llama_decode(ctx.ptr, b)
            if emb.non_causal:
                llama_set_causal_attn(ctx.ptr, True)
    finally:
        ctx._leave()
        llama_batch_free(b)
    if rc != 0:
        raise RuntimeError(f"decoding media embeddings failed (llama_decode returned {rc})")


# no_gc_clear: the model must outlive this object's __dealloc__ (mtmd keeps its pointer).
@cython.no_gc_clear
cdef class Mtmd:
    """A multimodal projector (mmproj GGUF) over a loaded :class:`Model`.

    ``Mtmd(model, path, use_gpu=False, n_threads=1, media_marker=None, warmup=False)``.
    Raises :class:`ModelLoadError` when libmtmd refuses the file, including a projector
    whose embedding width does not match the model (mtmd checks it before any compute).
    Closed with its model; ``close()`` during an encode in another thread is deferred
    until that call returns. ``eval_chunk`` runs one at a time; ``bitmap`` and
    ``tokenize`` only read the projector and may run beside it (another thread).
    """

    cdef mtmd_context * ptr
    cdef readonly Model model
    cdef readonly str path
    cdef bint _busy  # eval_chunk running (one at a time: it writes the output buffer)
    cdef int _readers  # bitmap/tokenize running (read-only on the context)
    cdef bint _close_pending
    cdef object __weakref__

    def __cinit__(self, Model model, path, *, bint use_gpu=False, int n_threads=1,
                  media_marker=None, bint warmup=False):
        global _mtmd_log_ready
        self.ptr = NULL
        model._check()
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        self.model = model
        self.path = os.fspath(path)
        if not _mtmd_log_ready:
            mtmd_helper_log_set(_log_cb, NULL)  # mtmd's and its helpers' messages
            _mtmd_log_ready = True
        cdef bytes bpath = os.fsencode(self.path)
        cdef bytes bmarker = _utf8(media_marker) if media_marker is not None else b""
        cdef const char * cpath = bpath
        cdef mtmd_context_params p = mtmd_context_params_default()
        p.use_gpu = use_gpu
        p.n_threads = n_threads
        p.print_timings = False
        p.warmup = warmup
        if media_marker is not None:
            if not bmarker:
                raise ValueError("media_marker must not be empty")
            p.media_marker = bmarker
        _recent.clear()
        model._enter()
        try:
            with nogil:
                self.ptr = mtmd_init_from_file(cpath, model.ptr, p)
        finally:
            model._leave()
        if self.ptr == NULL:
            why = "; ".join(_recent) or "no reason given (see the inferd.llama logger)"
            raise ModelLoadError(f"libmtmd could not load the projector {self.path}: {why}")
        model._adopt(self)

    def __dealloc__(self):
        if self.ptr != NULL:
            mtmd_free(self.ptr)
            self.ptr = NULL

    cdef inline void _check(self) except *:
        if self.ptr == NULL or self._close_pending:
            raise NotReady("the projector is closed; load the model again to use it")

    cdef void _enter(self) except *:
        if self._busy:
            raise RuntimeError("this projector is in use by another thread")
        self._busy = True
        self.model._enter()

    cdef void _leave(self):
        self._busy = False
        self._free_if_closed()
        self.model._leave()

    # bitmap and tokenize only read the context (llama-server calls them from its HTTP
    # threads while its main loop encodes): they may run beside eval_chunk, and count
    # themselves so that close() waits for them too.
    cdef void _enter_reader(self):
        self._readers += 1
        self.model._enter()

    cdef void _leave_reader(self):
        self._readers -= 1
        self._free_if_closed()
        self.model._leave()

    cdef void _free_if_closed(self):
        if self._close_pending and not self._busy and self._readers == 0 and self.ptr != NULL:
            mtmd_free(self.ptr)
            self.ptr = NULL

    def close(self):
        """Free the projector (deferred while one of its calls runs in another thread)."""
        if self.ptr == NULL or self._close_pending:
            return
        self._close_pending = True
        self._free_if_closed()

    @property
    def closed(self):
        return self.ptr == NULL or self._close_pending

    @property
    def vision(self):
        self._check()
        return mtmd_support_vision(self.ptr)

    @property
    def audio(self):
        self._check()
        return mtmd_support_audio(self.ptr)

    @property
    def audio_sample_rate(self):
        """Hz the audio encoder wants (files are resampled to it), or ``None``."""
        self._check()
        cdef int rate = mtmd_get_audio_sample_rate(self.ptr)
        return rate if rate > 0 else None

    @property
    def mrope(self):
        self._check()
        return mtmd_decode_use_mrope(self.ptr)

    @property
    def marker(self):
        self._check()
        return (<bytes>mtmd_get_marker(self.ptr)).decode("utf-8")

    def bitmap(self, data):
        """Decode an image (stb_image: JPEG, PNG, BMP, GIF, ...) or audio file (miniaudio:
        WAV, MP3, FLAC; detected by magic bytes) from ``data``. Raises ``ValueError``
        when mtmd cannot decode it. Callers bound the size first (media_limits)."""
        self._check()
        cdef bytes buf = bytes(data)
        cdef const unsigned char * cbuf = <const unsigned char *><const char *>buf
        cdef size_t n = len(buf)
        if n == 0:
            raise ValueError("empty media file")
        cdef mtmd_helper_bitmap_wrapper w
        cdef mtmd_helper_init_opt opt = mtmd_helper_init_opt_default()
        _recent.clear()
        self._enter_reader()
        try:
            with nogil:
                w = mtmd_helper_bitmap_init_from_buf(self.ptr, cbuf, n, False, opt)
        finally:
            self._leave_reader()
        if w.bitmap == NULL:
            why = "; ".join(_recent) or "unsupported or corrupt file"
            raise ValueError(f"libmtmd could not decode the media: {why}")
        cdef Bitmap b = Bitmap.__new__(Bitmap)
        b.ptr = w.bitmap
        return b

    def tokenize(self, text, bitmaps=(), *, bint add_special=True, bint parse_special=True):
        """Split ``text`` at each media marker into text and media chunks; there must be
        exactly one marker per bitmap (``ValueError`` otherwise)."""
        self._check()
        cdef list bms = list(bitmaps)
        cdef bytes data = _utf8(text)
        cdef mtmd_input_text t
        t.text = data
        t.text_len = len(data)
        t.add_special = add_special
        t.parse_special = parse_special
        cdef const mtmd_bitmap ** arr = <const mtmd_bitmap **>malloc(
            (len(bms) + 1) * sizeof(mtmd_bitmap *))
        if arr == NULL:
            raise MemoryError()
        cdef Chunks out = Chunks.__new__(Chunks)
        cdef int32_t rc
        cdef size_t nb = len(bms)
        cdef Py_ssize_t k
        try:
            for k in range(len(bms)):
                b = bms[k]
                if not isinstance(b, Bitmap) or (<Bitmap>b).ptr == NULL:
                    raise TypeError("bitmaps must be Bitmap objects from Mtmd.bitmap")
                arr[k] = (<Bitmap>b).ptr
            out.ptr = mtmd_input_chunks_init()
            out.owner = self
            _recent.clear()
            self._enter_reader()
            try:
                with nogil:
                    rc = mtmd_tokenize(self.ptr, out.ptr, &t, arr, nb)
            finally:
                self._leave_reader()
        finally:
            free(arr)
        if rc != 0:
            why = "; ".join(_recent) or f"code {rc}"
            raise ValueError(f"libmtmd could not tokenize the prompt: {why}")
        return out

    def encode(self, Chunks chunks, int i):
        """Encode media chunk ``i`` (GIL released) into :class:`Embeddings` of its own."""
        self._check()
        if chunks.owner is not self:
            raise ValueError("these chunks come from another projector")
        cdef const mtmd_input_chunk * ch = chunks._get(i)
        if mtmd_input_chunk_get_type(ch) == MTMD_INPUT_CHUNK_TYPE_TEXT:
            raise ValueError(f"chunk {i} is text; decode its tokens with a Batch")
        cdef int n = <int>mtmd_input_chunk_get_n_tokens(ch)
        cdef int n_embd = llama_model_n_embd_inp(self.model.ptr)
        cdef Embeddings emb = Embeddings.__new__(Embeddings)
        emb.buf = _FloatBuf.__new__(_FloatBuf)
        emb.buf.data = <float *>malloc(<size_t>n * n_embd * sizeof(float))
        if emb.buf.data == NULL:
            raise MemoryError()
        emb.data = emb.buf.data
        emb.n_tokens = n
        emb.n_embd = n_embd
        emb.non_causal = mtmd_decode_use_non_causal(self.ptr, ch)
        emb.mrope = mtmd_decode_use_mrope(self.ptr)
        emb.n_pos = mtmd_input_chunk_get_n_pos(ch)
        emb.idx = i
        emb.is_image = mtmd_input_chunk_get_type(ch) == MTMD_INPUT_CHUNK_TYPE_IMAGE
        emb.chunks = chunks
        cdef int32_t rc
        _recent.clear()
        self._enter()
        try:
            with nogil:
                rc = mtmd_encode_chunk(self.ptr, ch)
                if rc == 0:
                    memcpy(emb.data, mtmd_get_output_embd(self.ptr),
                           <size_t>n * n_embd * sizeof(float))
        finally:
            self._leave()
        if rc != 0:
            why = "; ".join(_recent) or f"code {rc}"
            raise RuntimeError(f"libmtmd could not encode the media: {why}")
        return emb

    def eval_chunk(self, Context ctx, Chunks chunks, int i, int n_past, int seq_id,
                   int n_batch):
        """Encode media chunk ``i`` and decode its embeddings into ``seq_id`` of ``ctx``
        from position ``n_past``, in ``n_batch`` pieces (mtmd's helper toggles
        non-causal attention and lays out M-RoPE positions). GIL released. Returns the
        next position. Raises ``RuntimeError`` when encoding or decoding fails (a full
        KV cache included); the sequence's cells from ``n_past`` are then undefined."""
        self._check()
        ctx._check()
        if chunks.owner is not self:
            raise ValueError("these chunks come from another projector")
        if n_batch < 1 or n_past < 0 or seq_id < 0:
            raise ValueError("n_batch must be >= 1, n_past and seq_id >= 0")
        cdef const mtmd_input_chunk * ch = chunks._get(i)
        if mtmd_input_chunk_get_type(ch) == MTMD_INPUT_CHUNK_TYPE_TEXT:
            raise ValueError(f"chunk {i} is text; decode its tokens with a Batch")
        cdef int32_t rc_enc = 0, rc_dec = 0
        cdef llama_pos new_past = n_past
        _recent.clear()
        self._enter()
        try:
            ctx._enter()
            try:
                with nogil:
                    rc_enc = mtmd_encode_chunk(self.ptr, ch)
                    if rc_enc == 0:
                        rc_dec = mtmd_helper_decode_image_chunk(
                            self.ptr, ctx.ptr, ch, mtmd_get_output_embd(self.ptr),
                            n_past, seq_id, n_batch, &new_past, NULL, NULL)
            finally:
                ctx._leave()
        finally:
            self._leave()
        if rc_enc != 0:
            why = "; ".join(_recent) or f"code {rc_enc}"
            raise RuntimeError(f"libmtmd could not encode the media: {why}")
        if rc_dec != 0:
            why = "; ".join(_recent) or f"code {rc_dec}"
            raise RuntimeError(f"decoding the media embeddings failed: {why}")
        return new_past
