# cython: language_level=3, embedsignature=True
# distutils: language = c++
"""inferd._fast._llama: a thin, memory-safe Cython binding over libllama (llama.h).

Why a binding of our own rather than ctypes: every call crosses into C without argument
marshalling, the decode loop releases the GIL, and ownership is explicit (each object
frees what it allocated in ``__dealloc__``; ``close()`` frees early and later use raises
:class:`inferd.errors.NotReady` instead of touching freed memory).

Objects:

* :class:`Model` -- a loaded GGUF (weights, vocabulary, metadata, tokenizer).
* :class:`Context` -- a KV cache and compute state over one model. It can hold several
  sequences (``n_seq_max``); a later continuous-batching scheduler feeds many of them in
  one :class:`Batch`. A context must be used by one thread at a time (checked).
* :class:`Batch` -- tokens with positions and sequence ids for one ``decode``.
* :class:`Sampler` -- one sampler chain (per sequence: penalties and grammar keep state).

llama.cpp's log goes to the Python logger ``inferd.llama`` (quiet by default: a
``NullHandler`` is attached, and messages below WARNING are dropped in C without taking
the GIL, because ggml may log from its own threads).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.math cimport sqrt
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libcpp cimport bool as cppbool

from llama cimport *

import array
import collections
import logging
import os
import threading
import weakref

from inferd.errors import ModelLoadError, NotReady

__all__ = [
    "Batch",
    "Context",
    "Model",
    "Sampler",
    "decode_sample",
    "devices",
    "recent_log",
    "seq_cells",
    "set_log_level",
    "supports_gpu_offload",
    "system_info",
]

# --------------------------------------------------------------------------- logging

logger = logging.getLogger("inferd.llama")
logger.addHandler(logging.NullHandler())

cdef int _log_min_level = GGML_LOG_LEVEL_WARN  # below this, drop in C (no GIL)
cdef int _log_last_level = GGML_LOG_LEVEL_INFO  # level a CONT fragment continues
_log_buffer = []
#: Recent warnings/errors from llama.cpp, attached to load errors so messages say why.
_recent = collections.deque(maxlen=16)

_PY_LEVEL = {
    GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    GGML_LOG_LEVEL_INFO: logging.INFO,
    GGML_LOG_LEVEL_WARN: logging.WARNING,
    GGML_LOG_LEVEL_ERROR: logging.ERROR,
}


cdef void _log_emit(int level, const char * text) noexcept:
    try:
        _log_buffer.append((<bytes>text).decode("utf-8", "replace"))
        joined = "".join(_log_buffer)
        if not joined.endswith("\n"):
            return
        _log_buffer.clear()
        for line in joined.splitlines():
            if not line.strip():
                continue
            pylevel = _PY_LEVEL.get(level, logging.INFO)
            if pylevel >= logging.WARNING:
                _recent.append(line.strip())
            logger.log(pylevel, "%s", line)
    except BaseException:
        pass


cdef void _log_cb(ggml_log_level level, const char * text, void * user_data) noexcept nogil:
    global _log_last_level
    cdef int lvl = <int>level
    if lvl == GGML_LOG_LEVEL_CONT:
        lvl = _log_last_level
    else:
        _log_last_level = lvl
    if lvl < _log_min_level or text == NULL:
        return
    with gil:
        _log_emit(lvl, text)


def set_log_level(int level):
    """Forward llama.cpp messages at or above Python logging ``level`` to ``inferd.llama``.

    The default is WARNING. Lower levels cost a GIL round trip per message, so they are
    filtered in C unless asked for (e.g. ``set_log_level(logging.DEBUG)`` when debugging).
    """
    global _log_min_level
    if level <= logging.DEBUG:
        _log_min_level = GGML_LOG_LEVEL_DEBUG
    elif level <= logging.INFO:
        _log_min_level = GGML_LOG_LEVEL_INFO
    elif level <= logging.WARNING:
        _log_min_level = GGML_LOG_LEVEL_WARN
    elif level <= logging.ERROR:
        _log_min_level = GGML_LOG_LEVEL_ERROR
    else:
        _log_min_level = 99


def recent_log():
    """The last few llama.cpp warnings and errors (newest last)."""
    return list(_recent)


def _silence_at_exit():
    # After interpreter teardown begins, a log call from a ggml thread must not take
    # the GIL; raising the threshold makes the callback a pure-C no-op.
    global _log_min_level
    _log_min_level = 99


import atexit  # noqa: E402

atexit.register(_silence_at_exit)

# --------------------------------------------------------------------------- backend init

cdef bint _backend_ready = False
_init_lock = threading.Lock()


cdef void _ensure_backend():
    global _backend_ready
    if _backend_ready:
        return
    with _init_lock:
        if not _backend_ready:
            llama_log_set(_log_cb, NULL)
            llama_backend_init()
            _backend_ready = True


def system_info():
    """llama.cpp's compile-time feature string (SIMD, accelerators)."""
    _ensure_backend()
    return (<bytes>llama_print_system_info()).decode("utf-8", "replace")


def supports_gpu_offload():
    """True when this build has a GPU backend (CUDA, Metal, Vulkan, ...)."""
    _ensure_backend()
    return bool(llama_supports_gpu_offload())


_KIND = {
    GGML_BACKEND_DEVICE_TYPE_CPU: "cpu",
    GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
    GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu",
    GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel",
}


def devices():
    """The ggml backend devices of this build: ``[{"type", "name", "description",
    "memory_total", "memory_free"}]`` (``type`` is cpu, gpu, igpu or accel)."""
    _ensure_backend()
    cdef size_t i, n = ggml_backend_dev_count()
    cdef size_t mfree = 0, mtotal = 0
    cdef ggml_backend_dev_t dev
    out = []
    for i in range(n):
        dev = ggml_backend_dev_get(i)
        if dev == NULL:
            continue
        mfree = 0
        mtotal = 0
        ggml_backend_dev_memory(dev, &mfree, &mtotal)
        name = ggml_backend_dev_name(dev)
        desc = ggml_backend_dev_description(dev)
        out.append({
            "type": _KIND.get(<int>ggml_backend_dev_get_type(dev), "other"),
            "name": (<bytes>name).decode("utf-8", "replace") if name != NULL else "",
            "description": (<bytes>desc).decode("utf-8", "replace") if desc != NULL else "",
            "memory_total": int(mtotal),
            "memory_free": int(mfree),
        })
    return out


# --------------------------------------------------------------------------- model


cdef cppbool _progress_cb(float progress, void * user_data) noexcept nogil:
    with gil:
        state = <object>user_data
        try:
            result = state[0](float(progress))
        except BaseException as e:
            state[1] = e
            return False
        if result is None or result:
            return True
        state[1] = "the progress callback returned False"
        return False


cdef inline bytes _utf8(object text):
    if isinstance(text, bytes):
        return <bytes>text
    if isinstance(text, str):
        return (<str>text).encode("utf-8")
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


include "_rpc.pxi"


cdef class Context  # forward declarations: Model frees them on deferred close
cdef class Sampler


cdef class Model:
    """A GGUF model loaded by libllama.

    ``Model(path, n_gpu_layers=0, use_mmap=True, progress=None, vocab_only=False,
    rpc_servers=(), tensor_split=())``.
    ``progress(fraction)`` is called during loading; returning ``False`` (or raising)
    aborts the load. Loading releases the GIL. Raises :class:`ModelLoadError` when
    libllama refuses the file (the message carries llama.cpp's own reason).

    Validate untrusted paths first (``inferd.backends.llamacpp.loader`` checks the
    GGUF magic and header before libllama sees the file).

    ``rpc_servers`` (``"host:port"`` strings) puts the offloaded layers on those ggml
    RPC servers (then this host's GPUs), ``tensor_split`` says what share each device
    gets (_rpc.pxi). ggml aborts the process if a server cannot be reached: probe them
    first (docs/adr/0019-rpc-backend.md).
    """

    cdef llama_model * ptr
    cdef const llama_vocab * vocab
    cdef readonly str path
    cdef readonly int n_gpu_layers
    cdef readonly tuple rpc_servers
    cdef object _children
    cdef list _pending  # children whose close waits for in-flight calls to end
    cdef int _inflight  # GIL-free calls running on this model or its children
    cdef bint _closing
    cdef object __weakref__

    def __cinit__(self, path, int n_gpu_layers=0, bint use_mmap=True, progress=None,
                  bint vocab_only=False, rpc_servers=(), tensor_split=(), split_mode=None,
                  int main_gpu=0, bint use_mlock=False):
        self.ptr = NULL
        self.vocab = NULL
        self._children = weakref.WeakSet()
        self._pending = []
        self._inflight = 0
        self._closing = False
        _ensure_backend()
        self.path = os.fspath(path)
        self.n_gpu_layers = n_gpu_layers
        cdef bytes bpath = os.fsencode(self.path)
        cdef const char * cpath = bpath
        cdef llama_model_params params = llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.load_mode = LLAMA_LOAD_MODE_MMAP if use_mmap else LLAMA_LOAD_MODE_NONE
        if use_mlock:  # keep the weights in RAM (ADR 0026)
            params.load_mode = (LLAMA_LOAD_MODE_MMAP_MLOCK if use_mmap
                                else LLAMA_LOAD_MODE_MLOCK)
        if split_mode is not None:
            if split_mode not in SPLIT_MODE:
                raise ValueError(f"split_mode must be one of {', '.join(SPLIT_MODE)}, "
                                 f"got {_echo(split_mode)}")
            params.split_mode = SPLIT_MODE[split_mode]
        params.main_gpu = main_gpu
        params.vocab_only = vocab_only
        state = [progress, None]
        if progress is not None:
            params.progress_callback = _progress_cb
            params.progress_callback_user_data = <void *>state
        self.rpc_servers = tuple(str(s) for s in rpc_servers)
        cdef ggml_backend_dev_t * devs = NULL
        cdef float * split = NULL
        _recent.clear()
        try:
            if self.rpc_servers:
                devs = _rpc_model_devices(self.rpc_servers)
                params.devices = devs
            if tensor_split:
                split = _tensor_split_array(tuple(tensor_split))
                params.tensor_split = split
            with nogil:
                self.ptr = llama_model_load_from_file(cpath, params)
        finally:
            free(devs)
            free(split)
        if state[1] is not None:
            if self.ptr != NULL:
                llama_model_free(self.ptr)
                self.ptr = NULL
            cause = state[1] if isinstance(state[1], BaseException) else None
            raise ModelLoadError(
                f"loading {self.path} was aborted: {state[1]}"
            ) from cause
        if self.ptr == NULL:
            why = "; ".join(_recent) or "no reason given (see the inferd.llama logger)"
            raise ModelLoadError(f"libllama could not load {self.path}: {why}")
        self.vocab = llama_model_get_vocab(self.ptr)

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_model_free(self.ptr)
            self.ptr = NULL

    cdef inline void _check(self) except *:
        if self.ptr == NULL or self._closing:
            raise NotReady("the llama model is closed; load it again to use it")

    cdef void _adopt(self, object child):
        self._children.add(child)

    # Memory safety across threads: a GIL-free call (decode, sample, tokenize) counts
    # itself in _inflight. close() of the model or of any of its contexts/samplers
    # while such a call runs only marks the object closed; the memory is freed by the
    # last call to leave. The counters change only with the GIL held.

    cdef inline void _enter(self):
        self._inflight += 1

    cdef void _leave(self):
        self._inflight -= 1
        if self._inflight == 0 and (self._pending or self._closing):
            self._flush()

    cdef bint _defer(self, object child):
        """True when ``child``'s memory must wait for in-flight calls (it is queued)."""
        if self._inflight > 0:
            self._pending.append(child)
            return True
        return False

    cdef void _flush(self):
        pending, self._pending = self._pending, []
        for child in pending:
            if isinstance(child, Context):
                (<Context>child)._free()
            elif isinstance(child, Sampler):
                (<Sampler>child)._free()
        if self._closing and self.ptr != NULL:
            llama_model_free(self.ptr)
            self.ptr = NULL
            self.vocab = NULL

    def close(self):
        """Free the weights. Contexts and samplers made from it are closed first; if one
        is computing in another thread, the memory is freed when that call returns."""
        if self.ptr == NULL or self._closing:
            return
        self._closing = True
        for child in list(self._children):
            child.close()
        if self._inflight == 0:
            self._flush()

    @property
    def closed(self):
        return self.ptr == NULL or self._closing

    @property
    def inflight(self):
        """GIL-free calls (decode, sample, tokenize) running now on this model or on a
        context or sampler made from it."""
        return self._inflight

    @property
    def freed(self):
        """True once the weights are released. ``close()`` during an in-flight call
        leaves this False until that call returns (the memory is still in use)."""
        return self.ptr == NULL

    # ---------------------------------------------------------------- metadata

    def meta(self, key):
        """A GGUF metadata value as a string (arrays are not supported), or ``None``."""
        self._check()
        cdef bytes bkey = _utf8(key)
        cdef int32_t n
        cdef char * buf = <char *>malloc(256)
        if buf == NULL:
            raise MemoryError()
        try:
            n = llama_model_meta_val_str(self.ptr, bkey, buf, 256)
            if n < 0:
                return None
            if n >= 256:
                free(buf)
                buf = <char *>malloc(n + 1)
                if buf == NULL:
                    raise MemoryError()
                n = llama_model_meta_val_str(self.ptr, bkey, buf, n + 1)
                if n < 0:
                    return None
            return PyBytes_FromStringAndSize(buf, n).decode("utf-8", "replace")
        finally:
            free(buf)

    def metadata(self):
        """All scalar GGUF metadata as ``{key: value-string}``."""
        self._check()
        cdef int32_t i, n = llama_model_meta_count(self.ptr)
        cdef char kbuf[512]
        cdef int32_t kn
        out = {}
        for i in range(n):
            kn = llama_model_meta_key_by_index(self.ptr, i, kbuf, sizeof(kbuf))
            if kn < 0:
                continue
            key = PyBytes_FromStringAndSize(kbuf, min(kn, <int32_t>sizeof(kbuf) - 1))
            out[key.decode("utf-8", "replace")] = self.meta(key)
        return out

    @property
    def name(self):
        """``general.name`` from the GGUF, or the file name without extension."""
        self._check()
        n = self.meta("general.name")
        return n if n else os.path.splitext(os.path.basename(self.path))[0]

    @property
    def architecture(self):
        self._check()
        return self.meta("general.architecture") or ""

    @property
    def description(self):
        """libllama's one-line description (architecture, size, quantisation)."""
        self._check()
        cdef char buf[256]
        cdef int32_t n = llama_model_desc(self.ptr, buf, sizeof(buf))
        if n < 0:
            return ""
        return PyBytes_FromStringAndSize(buf, min(n, 255)).decode("utf-8", "replace")

    @property
    def chat_template(self):
        """The default Jinja chat template (``tokenizer.chat_template``), or ``None``."""
        self._check()
        cdef const char * t = llama_model_chat_template(self.ptr, NULL)
        if t == NULL:
            return None
        return (<bytes>t).decode("utf-8", "replace")

    @property
    def n_ctx_train(self):
        self._check()
        return llama_model_n_ctx_train(self.ptr)

    @property
    def n_embd(self):
        self._check()
        return llama_model_n_embd(self.ptr)

    @property
    def n_layer(self):
        self._check()
        return llama_model_n_layer(self.ptr)

    @property
    def n_vocab(self):
        self._check()
        return llama_vocab_n_tokens(self.vocab)

    @property
    def size(self):
        """Bytes of weights."""
        self._check()
        return llama_model_size(self.ptr)

    @property
    def n_params(self):
        self._check()
        return llama_model_n_params(self.ptr)

    @property
    def has_encoder(self):
        self._check()
        return bool(llama_model_has_encoder(self.ptr))

    # ---------------------------------------------------------------- vocabulary

    @property
    def bos(self):
        self._check()
        return llama_vocab_bos(self.vocab)

    @property
    def eos(self):
        self._check()
        return llama_vocab_eos(self.vocab)

    @property
    def eot(self):
        self._check()
        return llama_vocab_eot(self.vocab)

    @property
    def add_bos(self):
        """Whether the tokenizer adds BOS itself (``tokenize(add_special=True)``)."""
        self._check()
        return bool(llama_vocab_get_add_bos(self.vocab))

    @property
    def add_eos(self):
        """Whether the tokenizer appends EOS itself (a reranker's pair separator)."""
        self._check()
        return bool(llama_vocab_get_add_eos(self.vocab))

    @property
    def add_sep(self):
        """Whether the tokenizer appends SEP (BERT-style pair inputs)."""
        self._check()
        return bool(llama_vocab_get_add_sep(self.vocab))

    @property
    def sep(self):
        """The SEP token id, or -1."""
        self._check()
        return llama_vocab_sep(self.vocab)

    @property
    def n_cls_out(self):
        """Classifier outputs per sequence under rank pooling (a reranker's scores)."""
        self._check()
        return llama_model_n_cls_out(self.ptr)

    def token_text(self, int token):
        """The vocabulary entry for ``token`` (e.g. ``"<|im_end|>"``)."""
        self._check()
        self._check_token(token)
        cdef const char * t = llama_vocab_get_text(self.vocab, token)
        return (<bytes>t).decode("utf-8", "replace") if t != NULL else ""

    cdef inline void _check_token(self, int token) except *:
        if token < 0 or token >= llama_vocab_n_tokens(self.vocab):
            raise ValueError(
                f"token id {token} is outside the vocabulary (0..{llama_vocab_n_tokens(self.vocab) - 1})"
            )

    def is_eog(self, int token):
        """True for end-of-generation tokens (EOS, EOT, <|im_end|>, ...)."""
        self._check()
        return bool(llama_vocab_is_eog(self.vocab, token))

    def is_control(self, int token):
        self._check()
        return bool(llama_vocab_is_control(self.vocab, token))

    def tokenize(self, text, bint add_special=True, bint parse_special=False):
        """Token ids of ``text`` (str or UTF-8 bytes).

        ``add_special`` adds BOS/EOS where the model asks for them; ``parse_special``
        turns text like ``<|im_start|>`` into its control token (wanted for rendered chat
        templates, unwanted for user text).
        """
        self._check()
        cdef bytes data = _utf8(text)
        cdef Py_ssize_t blen = len(data)
        if blen > 0x7FFFFFF0:
            raise ValueError("text too long to tokenize (over 2 GiB)")
        cdef int32_t cap = <int32_t>blen + 8
        cdef llama_token * buf = <llama_token *>malloc(cap * sizeof(llama_token))
        cdef int32_t n
        cdef const char * cdata = data
        if buf == NULL:
            raise MemoryError()
        self._enter()
        try:
            with nogil:
                n = llama_tokenize(self.vocab, cdata, <int32_t>blen, buf, cap, add_special,
                                   parse_special)
            if n < 0:
                if n == -2147483648:
                    raise ValueError("tokenization overflowed int32")
                cap = -n
                free(buf)
                buf = <llama_token *>malloc(cap * sizeof(llama_token))
                if buf == NULL:
                    raise MemoryError()
                with nogil:
                    n = llama_tokenize(self.vocab, cdata, <int32_t>blen, buf, cap,
                                       add_special, parse_special)
                if n < 0:
                    raise ValueError("tokenization failed")
            return [buf[i] for i in range(n)]
        finally:
            free(buf)
            self._leave()

    def token_to_piece(self, int token, bint special=False):
        """The bytes of one token. May be part of a UTF-8 character: join before decoding."""
        self._check()
        self._check_token(token)
        cdef char small[64]
        cdef int32_t n = llama_token_to_piece(self.vocab, token, small, 64, 0, special)
        cdef char * big
        if n >= 0:
            return PyBytes_FromStringAndSize(small, n)
        big = <char *>malloc(-n)
        if big == NULL:
            raise MemoryError()
        try:
            n = llama_token_to_piece(self.vocab, token, big, -n, 0, special)
            if n < 0:
                raise ValueError(f"token_to_piece failed for token {token}")
            return PyBytes_FromStringAndSize(big, n)
        finally:
            free(big)

    def detokenize(self, tokens, bint special=False):
        """Text of a token list (invalid UTF-8 is replaced)."""
        self._check()
        cdef Py_ssize_t i, nt = len(tokens)
        cdef llama_token * toks = <llama_token *>malloc((nt + 1) * sizeof(llama_token))
        cdef int32_t cap = <int32_t>(nt * 8 + 16), n
        cdef char * buf = NULL
        if toks == NULL:
            raise MemoryError()
        try:
            for i in range(nt):
                self._check_token(tokens[i])
                toks[i] = tokens[i]
            buf = <char *>malloc(cap)
            if buf == NULL:
                raise MemoryError()
            n = llama_detokenize(self.vocab, toks, <int32_t>nt, buf, cap, False, special)
            if n < 0:
                cap = -n
                free(buf)
                buf = <char *>malloc(cap)
                if buf == NULL:
                    raise MemoryError()
                n = llama_detokenize(self.vocab, toks, <int32_t>nt, buf, cap, False, special)
                if n < 0:
                    raise ValueError("detokenize failed")
            return PyBytes_FromStringAndSize(buf, n).decode("utf-8", "replace")
        finally:
            free(toks)
            free(buf)

    def __repr__(self):
        if self.ptr == NULL:
            return f"<Model {self.path!r} closed>"
        return f"<Model {self.name!r} {self.description!r}>"


# --------------------------------------------------------------------------- batch


cdef class Batch:
    """Room for ``capacity`` tokens, each tagged with up to ``n_seq_max`` sequence ids.

    One batch can carry tokens of several sequences at once (prompt chunks of one, the
    next token of others); that is what continuous batching decodes in a single call.
    """

    cdef llama_batch b
    cdef readonly int capacity
    cdef readonly int n_seq_max

    def __cinit__(self, int capacity, int n_seq_max=1):
        if capacity < 1:
            raise ValueError(f"batch capacity must be >= 1, got {capacity}")
        if n_seq_max < 1:
            raise ValueError(f"n_seq_max must be >= 1, got {n_seq_max}")
        self.b = llama_batch_init(capacity, 0, n_seq_max)
        if self.b.token == NULL:
            raise MemoryError()
        self.b.n_tokens = 0
        self.capacity = capacity
        self.n_seq_max = n_seq_max

    def __dealloc__(self):
        if self.b.token != NULL:
            llama_batch_free(self.b)
            self.b.token = NULL

    @property
    def n_tokens(self):
        return self.b.n_tokens

    def __len__(self):
        return self.b.n_tokens

    def clear(self):
        self.b.n_tokens = 0

    cdef inline int _add(self, llama_token token, llama_pos pos, llama_seq_id seq,
                         bint logits) except -1:
        cdef int i = self.b.n_tokens
        if i >= self.capacity:
            raise OverflowError(f"batch is full ({self.capacity} tokens)")
        self.b.token[i] = token
        self.b.pos[i] = pos
        self.b.n_seq_id[i] = 1
        self.b.seq_id[i][0] = seq
        self.b.logits[i] = logits
        self.b.n_tokens = i + 1
        return i

    def add(self, int token, int pos, seq_ids, bint logits=False):
        """Append one token at ``pos`` for ``seq_ids`` (an int or a sequence of ints).

        Returns the token's index in the batch (the ``idx`` to sample from when
        ``logits`` is true).
        """
        cdef int i, k, n
        if isinstance(seq_ids, int):
            return self._add(token, pos, seq_ids, logits)
        ids = list(seq_ids)
        n = len(ids)
        if n < 1 or n > self.n_seq_max:
            raise ValueError(f"a token needs 1..{self.n_seq_max} sequence ids, got {n}")
        i = self._add(token, pos, ids[0], logits)
        for k in range(n):
            self.b.seq_id[i][k] = ids[k]
        self.b.n_seq_id[i] = n
        return i

    def add_sequence(self, tokens, int pos0, int seq_id, bint logits_last=True):
        """Append ``tokens`` at positions ``pos0, pos0+1, ...`` for one sequence.

        Returns the index of the last token (where its logits are, if requested).
        """
        cdef Py_ssize_t k, n = len(tokens)
        if n == 0:
            raise ValueError("add_sequence needs at least one token")
        if self.b.n_tokens + n > self.capacity:
            raise OverflowError(
                f"{n} tokens do not fit: the batch holds {self.b.n_tokens} of {self.capacity}"
            )
        cdef int last = -1
        for k in range(n):
            last = self._add(tokens[k], pos0 + k, seq_id, logits_last and k == n - 1)
        return last


# --------------------------------------------------------------------------- sampler


#: The Sampler accepts ``grammar_trigger_patterns`` / ``grammar_trigger_tokens`` (lazy
#: grammars: inactive until the output matches a pattern or produces a trigger token;
#: inferd.chat uses them for ``tool_choice="auto"``).
LAZY_GRAMMAR = True


cdef llama_sampler * _lazy_grammar(Model model, bytes grammar, bytes root, patterns,
                                   tokens) except? NULL:
    cdef list keep = [_utf8(p) for p in patterns]
    cdef Py_ssize_t i, np_ = len(keep), nt = len(tokens)
    cdef const char ** cpat = <const char **>malloc((np_ + 1) * sizeof(char *))
    cdef llama_token * ctok = <llama_token *>malloc((nt + 1) * sizeof(llama_token))
    cdef llama_sampler * g
    cdef bytes b
    if cpat == NULL or ctok == NULL:
        free(cpat)
        free(ctok)
        raise MemoryError()
    try:
        for i in range(np_):
            b = keep[i]
            cpat[i] = b
        for i in range(nt):
            ctok[i] = <llama_token>int(tokens[i])
        g = llama_sampler_init_grammar_lazy_patterns(model.vocab, grammar, root, cpat, np_,
                                                     ctok, nt)
    finally:
        free(cpat)
        free(ctok)
    return g


include "_grammar.pxi"


cdef llama_token _draw(llama_sampler * chain, llama_sampler * gram, llama_token_data * cur,
                       bint argmax, int32_t n_vocab, llama_context * ctx,
                       int32_t idx) noexcept nogil:
    """The next token from the logits at batch index ``idx``.

    Why the shortcut: a plain greedy chain costs libllama a copy of the whole vocabulary
    into a candidate array before it takes the maximum (59 us against 25 us for this
    loop over 49k logits on a 2-core EPYC box). On a GPU a decode step of a 1.7B model
    is under 2 ms, and every microsecond between two decodes is a microsecond the GPU
    waits. With nothing before the greedy stage (no grammar, no penalties) the maximum
    over the raw logits is the same token: the first index of the largest logit, as
    libllama's greedy sampler picks it. A ``gram`` (a grammar kept out of the chain)
    takes the fast path of _grammar.pxi (ADR 0026).
    """
    cdef float * logits
    cdef int32_t i, best
    cdef float top
    if gram != NULL:
        return _draw_grammar(chain, gram, cur, argmax, n_vocab, ctx, idx)
    if argmax:
        logits = llama_get_logits_ith(ctx, idx)
        if logits != NULL and n_vocab > 0:
            best = 0
            top = logits[0]
            for i in range(1, n_vocab):
                if logits[i] > top:
                    top = logits[i]
                    best = i
            return best
    return llama_sampler_sample(chain, ctx, idx)


include "_sampling.pxi"
include "_knobs.pxi"
include "_lora.pxi"
include "_state.pxi"


# no_gc_clear: the model reference must survive until __dealloc__ has freed
# this object (a GC cycle must never free the model first).
@cython.no_gc_clear
cdef class Sampler:
    """One sampler chain, in llama.cpp's order: grammar, logit bias, penalties, DRY,
    top-k, typical, top-p, min-p, XTC, temperature, then a seeded draw; or greedy
    (argmax) when ``temperature == 0`` (docs/adr/0021-per-request-sampling-chain.md).

    Keep one per sequence: penalties, DRY and grammar remember what that sequence
    produced. ``seed=None`` draws a random seed (the draw and XTC share the seed, as in
    llama.cpp). ``logit_bias`` maps token ids of this model to a bias (``<= -100``
    bans). ``dry_sequence_breakers=None`` takes llama.cpp's defaults. A setting libllama
    cannot take raises ``ValueError`` naming it.

    A grammar is checked after the draw and applied to the whole vocabulary only when
    it rejects the drawn token (llama.cpp's common_sampler; _grammar.pxi, ADR 0026);
    ``grammar_first=True`` keeps the old order (the grammar first in the chain, every
    draw), which greedy output equals.
    """

    cdef llama_sampler * ptr
    cdef Model model
    cdef bint _closing
    cdef object __weakref__
    cdef readonly bint greedy
    cdef readonly bint argmax  # greedy with nothing before it: _draw skips the chain
    cdef int32_t n_vocab
    # the grammar, kept out of the chain and checked after the draw (_grammar.pxi,
    # ADR 0026), and its candidate buffer for a redraw; NULL with grammar_first=True
    cdef llama_sampler * gram
    cdef llama_token_data * cur
    cdef readonly bint grammar_first
    cdef bint _plain  # the chain is plain greedy (argmax, or the grammar's fast check)
    # chain indices [_hist_lo, _hist_hi) of the penalties and DRY, and how many of the
    # prompt's last tokens they look back over (accept_prompt)
    cdef int32_t _hist_lo, _hist_hi, _hist_n

    def __cinit__(self, Model model, *, float temperature=0.8, int top_k=40,
                  float top_p=0.95, float min_p=0.05, float typical_p=1.0,
                  float repeat_penalty=1.0, float frequency_penalty=0.0,
                  float presence_penalty=0.0, int penalty_last_n=64,
                  float dry_multiplier=0.0, float dry_base=1.75, int dry_allowed_length=2,
                  int dry_penalty_last_n=64, dry_sequence_breakers=None,
                  float xtc_probability=0.0, float xtc_threshold=0.1, logit_bias=None,
                  seed=None, grammar=None, str grammar_root="root",
                  grammar_trigger_patterns=None, grammar_trigger_tokens=None,
                  bint grammar_first=False):
        self.ptr = NULL
        self.gram = NULL
        self.cur = NULL
        self.grammar_first = grammar_first
        model._check()
        _check_sampling(temperature, top_p, min_p, typical_p, repeat_penalty,
                        frequency_penalty, presence_penalty, penalty_last_n, dry_multiplier,
                        dry_base, dry_allowed_length, dry_penalty_last_n, xtc_probability,
                        xtc_threshold)
        self.model = model
        cdef llama_sampler_chain_params cp = llama_sampler_chain_default_params()
        cp.no_perf = True
        self.ptr = llama_sampler_chain_init(cp)
        if self.ptr == NULL:
            raise MemoryError()
        cdef llama_sampler * g
        cdef bytes bgrammar, broot
        if grammar:
            bgrammar = _utf8(grammar)
            broot = _utf8(grammar_root)
            _recent.clear()
            if grammar_trigger_patterns or grammar_trigger_tokens:
                g = _lazy_grammar(model, bgrammar, broot, grammar_trigger_patterns or (),
                                  grammar_trigger_tokens or ())
            else:
                g = llama_sampler_init_grammar(model.vocab, bgrammar, broot)
            if g == NULL:
                why = "; ".join(_recent) or "parse error"
                raise ValueError(f"invalid GBNF grammar: {why}")
            if grammar_first:  # the full-grammar order: every draw walks the vocabulary
                llama_sampler_chain_add(self.ptr, g)
            else:
                self.gram = g
                self.cur = <llama_token_data *>malloc(
                    llama_vocab_n_tokens(model.vocab) * sizeof(llama_token_data))
                if self.cur == NULL:
                    raise MemoryError()
        _add_logit_bias(self.ptr, model, logit_bias)
        self._hist_lo = llama_sampler_chain_n(self.ptr)
        self._hist_n = 0
        if repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0:
            _add(self.ptr, llama_sampler_init_penalties(
                llama_vocab_n_tokens(model.vocab), penalty_last_n, repeat_penalty,
                frequency_penalty, presence_penalty))
            self._hist_n = penalty_last_n
        if _add_dry(self.ptr, model, dry_multiplier, dry_base, dry_allowed_length,
                    dry_penalty_last_n, dry_sequence_breakers):
            self._hist_n = max(self._hist_n, dry_penalty_last_n)
        self._hist_hi = llama_sampler_chain_n(self.ptr)
        self.greedy = temperature == 0.0
        cdef uint32_t cseed = _seed32(seed)
        _add_filters(self.ptr, self.greedy, top_k, typical_p, top_p, min_p, xtc_probability,
                     xtc_threshold, cseed)
        self._plain = self.greedy and llama_sampler_chain_n(self.ptr) == 0
        self.argmax = self._plain and self.gram == NULL
        self.n_vocab = llama_vocab_n_tokens(model.vocab)
        if self.greedy:
            _add(self.ptr, llama_sampler_init_greedy())
        else:
            _add(self.ptr, llama_sampler_init_temp(temperature))
            _add(self.ptr, llama_sampler_init_dist(cseed))
        model._adopt(self)

    def __dealloc__(self):
        self._free()

    cdef inline void _check(self) except *:
        if self.ptr == NULL or self._closing:
            raise NotReady("the sampler is closed (its model was closed or it was freed)")

    cdef void _free(self):
        if self.ptr != NULL:
            llama_sampler_free(self.ptr)
            self.ptr = NULL
        if self.gram != NULL:
            llama_sampler_free(self.gram)
            self.gram = NULL
        free(self.cur)
        self.cur = NULL

    def close(self):
        """Free the chain (deferred while a call of its model computes elsewhere)."""
        if self.ptr == NULL or self._closing:
            return
        self._closing = True
        if self.model is None or not self.model._defer(self):
            self._free()

    def sample(self, Context ctx, int idx=-1):
        """Draw the next token from the logits at batch index ``idx`` and accept it."""
        self._check()
        ctx._check()
        if self.model is not ctx.model:
            raise ValueError("the sampler and the context belong to different models")
        cdef llama_token tok
        ctx._enter()
        try:
            with nogil:
                tok = _draw(self.ptr, self.gram, self.cur, self._plain, self.n_vocab,
                            ctx.ptr, idx)
        finally:
            ctx._leave()
        return tok

    def accept_prompt(self, tokens):
        """Show the penalties and DRY the prompt's last tokens (never the grammar), as
        llama-server does before a slot's first draw: a repeat penalty then also weighs
        what the prompt said (docs/adr/0021-per-request-sampling-chain.md)."""
        self._check()
        if self._hist_n <= 0 or self._hist_hi <= self._hist_lo:
            return
        cdef llama_token tok
        cdef int32_t i
        for t in tokens[max(0, len(tokens) - self._hist_n):]:
            tok = t
            for i in range(self._hist_lo, self._hist_hi):
                llama_sampler_accept(llama_sampler_chain_get(self.ptr, i), tok)

    def accept(self, int token):
        """Tell the chain about a token chosen elsewhere (e.g. prompt tokens for penalties)."""
        self._check()
        if self.gram != NULL:
            llama_sampler_accept(self.gram, token)
        llama_sampler_accept(self.ptr, token)

    def reset(self):
        self._check()
        if self.gram != NULL:
            llama_sampler_reset(self.gram)
        llama_sampler_reset(self.ptr)


# --------------------------------------------------------------------------- context

_POOLING = {
    None: LLAMA_POOLING_TYPE_UNSPECIFIED,
    "none": LLAMA_POOLING_TYPE_NONE,
    "mean": LLAMA_POOLING_TYPE_MEAN,
    "cls": LLAMA_POOLING_TYPE_CLS,
    "last": LLAMA_POOLING_TYPE_LAST,
    "rank": LLAMA_POOLING_TYPE_RANK,
}
_POOLING_NAME = {v: k for k, v in _POOLING.items() if k}


# no_gc_clear: the model reference must survive until __dealloc__ has freed
# this object (a GC cycle must never free the model first).
@cython.no_gc_clear
cdef class Context:
    """KV cache + compute state over a :class:`Model`.

    ``Context(model, n_ctx=4096, n_batch=512, n_ubatch=0, n_seq_max=1, n_threads=None,
    n_threads_batch=None, embeddings=False, pooling=None)``. ``n_threads=None`` uses the
    CPUs this process may run on. With ``embeddings=True`` decode produces pooled
    embeddings (``pooling``: mean, cls, last, rank, none; ``None`` = the model's own).
    ``kv_unified=True`` keeps every sequence in one KV buffer of ``n_ctx`` cells (a
    shared prefix is shared cells and ``seq_cp`` is free); otherwise each of the
    ``n_seq_max`` sequences gets its own ``n_ctx / n_seq_max`` cells.

    One thread at a time: a second concurrent ``decode`` raises instead of corrupting
    state; ``close()`` during a decode in another thread is deferred until it returns.
    """

    cdef llama_context * ptr
    cdef llama_memory_t mem
    cdef readonly Model model
    cdef Batch _one
    cdef bint _busy
    cdef bint _close_pending
    cdef readonly bint embeddings
    cdef object __weakref__

    def __cinit__(self, Model model, *, int n_ctx=4096, int n_batch=512, int n_ubatch=0,
                  int n_seq_max=1, n_threads=None, n_threads_batch=None,
                  bint embeddings=False, pooling=None, bint kv_unified=False, **knobs):
        self.ptr = NULL
        model._check()
        if n_ctx < 0 or n_batch < 1 or n_seq_max < 1:
            raise ValueError("n_ctx must be >= 0 and n_batch, n_seq_max >= 1")
        if n_seq_max > <int>llama_max_parallel_sequences():
            raise ValueError(
                f"n_seq_max={n_seq_max} exceeds libllama's limit "
                f"{llama_max_parallel_sequences()}"
            )
        if pooling not in _POOLING:
            raise ValueError(f"pooling must be one of {sorted(k for k in _POOLING if k)} or None")
        self.model = model
        cdef int cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        cdef llama_context_params p = llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch if n_ubatch > 0 else n_batch
        p.n_seq_max = n_seq_max
        p.n_threads = n_threads if n_threads is not None else cpus
        p.n_threads_batch = n_threads_batch if n_threads_batch is not None else p.n_threads
        p.embeddings = embeddings
        p.pooling_type = _POOLING[pooling]
        p.kv_unified = kv_unified
        p.no_perf = True
        _set_knobs(&p, knobs)  # flash attention, KV types, RoPE/YaRN (_knobs.pxi, ADR 0026)
        _recent.clear()
        with nogil:
            self.ptr = llama_init_from_model(model.ptr, p)
        if self.ptr == NULL:
            why = "; ".join(_recent) or "see the inferd.llama logger"
            raise MemoryError(f"libllama could not create a context (n_ctx={n_ctx}"
                              f"{''.join(f', {k}={v!r}' for k, v in knobs.items())}): {why}")
        self.mem = llama_get_memory(self.ptr)
        self.embeddings = embeddings
        self._one = Batch(1, 1)
        model._adopt(self)

    def __dealloc__(self):
        if self.ptr != NULL:
            llama_free(self.ptr)
            self.ptr = NULL

    cdef inline void _check(self) except *:
        if self.ptr == NULL or self._close_pending:
            raise NotReady("the llama context is closed")

    cdef inline void _enter(self) except *:
        if self._busy:
            raise RuntimeError("this llama context is in use by another thread; "
                               "a context serves one decode at a time")
        self._busy = True
        self.model._enter()

    cdef inline void _leave(self):
        self._busy = False
        self.model._leave()

    cdef void _free(self):
        if self.ptr != NULL:
            llama_free(self.ptr)
            self.ptr = NULL
            self.mem = NULL

    def close(self):
        """Free the KV cache (deferred while a call of its model computes elsewhere)."""
        if self.ptr == NULL or self._close_pending:
            return
        self._close_pending = True
        if self.model is None or not self.model._defer(self):
            self._free()

    @property
    def closed(self):
        return self.ptr == NULL or self._close_pending

    @property
    def n_ctx(self):
        self._check()
        return llama_n_ctx(self.ptr)

    @property
    def n_batch(self):
        self._check()
        return llama_n_batch(self.ptr)

    @property
    def n_seq_max(self):
        self._check()
        return llama_n_seq_max(self.ptr)

    def set_n_threads(self, int n_threads, int n_threads_batch=0):
        self._check()
        llama_set_n_threads(self.ptr, n_threads, n_threads_batch or n_threads)

    # ---------------------------------------------------------------- decode

    def decode(self, Batch batch):
        """Run the model over ``batch`` with the GIL released.

        Raises ``RuntimeError`` when no KV slot is free (context full) or on any other
        libllama failure; the KV state is then as libllama documents for that code.
        """
        self._check()
        _check_batch(self, batch)
        cdef int32_t rc
        self._enter()
        try:
            with nogil:
                rc = llama_decode(self.ptr, batch.b)
        finally:
            self._leave()
        if rc != 0:
            _raise_decode(rc)
        return None

    def logits(self, int idx=-1):
        """A copy of the logits at batch index ``idx`` of the last decode, one float per
        vocabulary entry (``array('f')``); for inspection and tests, not the hot path."""
        self._check()
        cdef float * p = llama_get_logits_ith(self.ptr, idx)
        if p == NULL:
            raise ValueError(f"batch index {idx} has no logits (ask for them when adding "
                             "the token, and decode first)")
        cdef Py_ssize_t n = llama_vocab_n_tokens(self.model.vocab)
        out = array.array("f")
        out.frombytes(PyBytes_FromStringAndSize(<char *>p, n * sizeof(float)))
        return out

    def step(self, Sampler sampler, int token, int pos, int seq_id=0):
        """Decode one token of one sequence and sample the next: the hot loop of
        single-stream generation in one GIL-free call."""
        self._check()
        sampler._check()
        if sampler.model is not self.model:
            raise ValueError("the sampler and the context belong to different models")
        cdef llama_batch * b = &self._one.b
        b.token[0] = token
        b.pos[0] = pos
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = seq_id
        b.logits[0] = True
        b.n_tokens = 1
        cdef int32_t rc
        cdef llama_token nxt = -1
        self._enter()
        try:
            with nogil:
                rc = llama_decode(self.ptr, b[0])
                if rc == 0:
                    nxt = _draw(sampler.ptr, sampler.gram, sampler.cur, sampler._plain,
                                sampler.n_vocab, self.ptr, 0)
        finally:
            self._leave()
        if rc != 0:
            _raise_decode(rc)
        return nxt

    # ---------------------------------------------------------------- memory

    def seq_rm(self, int seq_id, int p0=-1, int p1=-1):
        """Drop cells of ``seq_id`` at positions ``[p0, p1)`` (-1: open end); ``seq_id``
        -1 matches every sequence. Returns False when a partial removal is impossible."""
        self._check()
        return bool(llama_memory_seq_rm(self.mem, seq_id, p0, p1))

    def seq_cp(self, int src, int dst, int p0=-1, int p1=-1):
        """Share ``src``'s cells in ``[p0, p1)`` with ``dst`` (prefix reuse)."""
        self._check()
        llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_pos_max(self, int seq_id):
        """Largest position cached for ``seq_id``, or -1 when it holds nothing."""
        self._check()
        return llama_memory_seq_pos_max(self.mem, seq_id)

    def seq_pos_min(self, int seq_id):
        self._check()
        return llama_memory_seq_pos_min(self.mem, seq_id)

    def clear(self):
        """Empty the whole KV cache."""
        self._check()
        llama_memory_clear(self.mem, True)

    # ---------------------------------------------------------------- embeddings

    @property
    def pooling(self):
        """The pooling this context applies (``"none"``, ``"mean"``, ``"cls"``, ``"last"``,
        ``"rank"``): the one asked for, else the one the model declares."""
        self._check()
        return _POOLING_NAME.get(llama_get_pooling_type(self.ptr), "none")

    def scores(self, int seq_id=0):
        """The classifier outputs of ``seq_id`` after a decode under rank pooling (a
        reranker's relevance score is the first), raw: no normalisation."""
        self._check()
        if llama_get_pooling_type(self.ptr) != LLAMA_POOLING_TYPE_RANK:
            raise RuntimeError("scores() needs a context with pooling='rank'")
        cdef float * v = llama_get_embeddings_seq(self.ptr, seq_id)
        if v == NULL:
            raise RuntimeError(f"no scores for sequence {seq_id}: decode it first")
        cdef int n = max(<int>llama_model_n_cls_out(self.model.ptr), 1)
        return [v[i] for i in range(n)]

    def token_embedding(self, int idx, bint normalize=True):
        """The hidden state of the token at batch index ``idx`` of the last decode
        (pooling ``"none"``: one vector per token), L2-normalised when asked."""
        self._check()
        if not self.embeddings:
            raise RuntimeError("this context was created without embeddings=True")
        cdef float * v = llama_get_embeddings_ith(self.ptr, idx)
        if v == NULL:
            raise RuntimeError(f"no embedding at batch index {idx}")
        cdef int n = llama_model_n_embd(self.model.ptr)
        cdef double norm = 0.0
        cdef int i
        if normalize:
            for i in range(n):
                norm += <double>v[i] * v[i]
            norm = sqrt(norm)
        if norm <= 0.0:
            norm = 1.0
        return [v[i] / norm for i in range(n)]

    def embedding(self, int seq_id=0, dimensions=None, bint normalize=True):
        """The pooled embedding of ``seq_id`` after a decode (``embeddings=True``),
        truncated to ``dimensions`` then L2-normalised."""
        self._check()
        if not self.embeddings:
            raise RuntimeError("this context was created without embeddings=True")
        if llama_get_pooling_type(self.ptr) == LLAMA_POOLING_TYPE_RANK:
            raise RuntimeError("a rank-pooled context gives scores(), not embeddings")
        cdef int n = llama_model_n_embd(self.model.ptr)
        cdef float * v = NULL
        if llama_get_pooling_type(self.ptr) == LLAMA_POOLING_TYPE_NONE:
            v = llama_get_embeddings_ith(self.ptr, -1)
        else:
            v = llama_get_embeddings_seq(self.ptr, seq_id)
        if v == NULL:
            raise RuntimeError(f"no embedding for sequence {seq_id}: decode it first")
        cdef int d = n
        if dimensions is not None:
            if dimensions < 1:
                raise ValueError(f"dimensions must be >= 1, got {dimensions}")
            d = min(<int>dimensions, n)
        cdef double norm = 0.0
        cdef int i
        if normalize:
            for i in range(d):
                norm += <double>v[i] * v[i]
            norm = sqrt(norm)
        if norm <= 0.0:
            norm = 1.0
        return [v[i] / norm for i in range(d)]


cdef _check_batch(Context ctx, Batch batch):
    """A batch libllama takes: not empty, and no more tokens than the context's
    ``n_batch`` (libllama aborts the process on a larger one; the scheduler splits
    prompts into chunks of that size)."""
    if batch.b.n_tokens == 0:
        raise ValueError("decode needs a non-empty batch")
    cdef uint32_t limit = llama_n_batch(ctx.ptr)
    if <uint32_t>batch.b.n_tokens > limit:
        raise ValueError(f"a batch of {batch.b.n_tokens} tokens is more than the context's "
                         f"n_batch={limit}; split it")


def _raise_decode(int rc):
    if rc == 1:
        raise RuntimeError("llama_decode: no free KV slot (the context is full; "
                           "use a larger n_ctx or shorter input)")
    if rc == 2:
        raise RuntimeError("llama_decode: aborted")
    if rc == -1:
        raise ValueError("llama_decode: invalid batch (token ids or positions out of range)")
    why = "; ".join(_recent) or "see the inferd.llama logger"
    raise RuntimeError(f"llama_decode failed with code {rc}: {why}")


# --------------------------------------------------------------------------- batching
# Continuous batching support (inferd.backends.llamacpp.scheduler). Kept apart from the
# single-stream API above: one call decodes a mixed batch and samples every sequence
# that asked for logits, all without the GIL, so a step costs one GIL round trip
# whatever the number of streams.


def decode_sample(Context ctx, Batch batch, samplers, idxs):
    """Decode ``batch`` once, then draw one token per ``(samplers[i], idxs[i])``.

    ``idxs[i]`` is the batch index whose logits ``samplers[i]`` samples (each sampler is
    one sequence's chain, so penalties and grammars stay per sequence). Returns the
    tokens in the same order. Decode and every draw run with the GIL released.
    Raises like :meth:`Context.decode`; when decoding fails nothing is sampled.
    """
    ctx._check()
    _check_batch(ctx, batch)
    cdef Py_ssize_t k, n = len(samplers)
    if len(idxs) != n:
        raise ValueError(f"{n} samplers but {len(idxs)} batch indices")
    cdef llama_sampler ** ptrs = <llama_sampler **>malloc((n + 1) * sizeof(llama_sampler *))
    cdef llama_sampler ** grams = <llama_sampler **>malloc((n + 1) * sizeof(llama_sampler *))
    cdef llama_token_data ** curs = <llama_token_data **>malloc(
        (n + 1) * sizeof(llama_token_data *))
    cdef int32_t * cidx = <int32_t *>malloc((n + 1) * sizeof(int32_t))
    cdef char * fast = <char *>malloc(n + 1)
    cdef int32_t n_vocab = llama_vocab_n_tokens(ctx.model.vocab)
    cdef llama_token * out = <llama_token *>malloc((n + 1) * sizeof(llama_token))
    cdef Sampler smp
    cdef int32_t rc = 0
    cdef int32_t i
    try:
        if (ptrs == NULL or cidx == NULL or out == NULL or fast == NULL or grams == NULL
                or curs == NULL):
            raise MemoryError()
        for k in range(n):
            smp = <Sampler?>samplers[k]
            smp._check()
            if smp.model is not ctx.model:
                raise ValueError("a sampler and the context belong to different models")
            i = idxs[k]
            if i < 0 or i >= batch.b.n_tokens or not batch.b.logits[i]:
                raise ValueError(f"batch index {i} has no logits requested")
            ptrs[k] = smp.ptr
            grams[k] = smp.gram
            curs[k] = smp.cur
            fast[k] = smp._plain
            cidx[k] = i
        ctx._enter()
        try:
            with nogil:
                rc = llama_decode(ctx.ptr, batch.b)
                if rc == 0:
                    for k in range(n):
                        out[k] = _draw(ptrs[k], grams[k], curs[k], fast[k], n_vocab,
                                       ctx.ptr, cidx[k])
        finally:
            ctx._leave()
        if rc != 0:
            _raise_decode(rc)
        return [out[k] for k in range(n)]
    finally:
        free(ptrs)
        free(grams)
        free(curs)
        free(cidx)
        free(out)
        free(fast)


def seq_cells(Context ctx, int n_seq):
    """``[(pos_min, pos_max), ...]`` for sequences ``0..n_seq-1`` (``(-1, -1)``: empty).

    Lets a scheduler (and tests) prove that no sequence still holds KV cells.
    """
    ctx._check()
    return [(llama_memory_seq_pos_min(ctx.mem, s), llama_memory_seq_pos_max(ctx.mem, s))
            for s in range(n_seq)]


# --------------------------------------------------------------------------- logprobs

include "_logprobs.pxi"


include "_mtmd.pxi"
