# _rpc.pxi: ggml's RPC backend (included from _llama.pyx).
#
# Why here: a model too big for one host is split layer-wise over ggml RPC servers
# (``inferd rpc-worker`` or llama.cpp's own ``rpc-server``); the head sends each
# worker its layers' weights once and a graph per decode step. This file gives Model
# the device list that names those workers (llama.cpp's ``--rpc`` does the same in
# common/arg.cpp) and runs the worker side from our own build, so head and worker
# speak the same RPC_PROTO version by construction (docs/adr/0019-rpc-backend.md).
#
# ggml-rpc aborts the whole process when a worker cannot be reached or its socket
# breaks (GGML_ABORT in the client's dispatcher). Callers must therefore probe every
# worker first (inferd.rpc_worker.probe) and run an RPC-split model in a process that
# may die: inferd.backends.llamacpp.rpc_split does both.

#: Most RPC servers one model may use (ggml-rpc.h's GGML_RPC_MAX_SERVERS).
RPC_MAX_SERVERS = GGML_RPC_MAX_SERVERS
#: (major, minor, patch) of the RPC protocol this build speaks.
RPC_PROTO_VERSION = (RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION)
#: False in a build configured with -DGGML_RPC=OFF (inferd_rpc.h).
RPC_SUPPORTED = bool(INFERD_HAVE_RPC)
_NO_RPC = ("this inferd was built without ggml RPC (GGML_RPC=OFF); rebuild with the default "
           "-DGGML_RPC=ON to split models over workers")


cdef ggml_backend_reg_t _rpc_reg(str endpoint) except NULL:
    """The registry of ``endpoint``'s devices (connects once; ggml caches it)."""
    if not RPC_SUPPORTED:
        raise ModelLoadError(_NO_RPC)
    cdef bytes bep = endpoint.encode("utf-8")
    cdef const char * cep = bep
    cdef ggml_backend_reg_t reg
    with nogil:
        reg = ggml_backend_rpc_add_server(cep)
    if reg == NULL:
        raise ModelLoadError(f"RPC server {endpoint} offers no devices")
    return reg


cdef ggml_backend_dev_t * _rpc_model_devices(tuple servers) except NULL:
    """A NULL-terminated, malloc'd device list for llama_model_params.devices: every
    device of every RPC server in order, then this host's GPUs (iGPUs only when there is
    no GPU), as llama.cpp orders them by default. The CPU is never listed: layers that
    are not offloaded stay on it. The caller frees the array (libllama copies it)."""
    _ensure_backend()
    devs = []
    cdef ggml_backend_reg_t reg
    cdef size_t i, n
    cdef ggml_backend_dev_t dev
    for endpoint in servers:
        reg = _rpc_reg(endpoint)
        for i in range(ggml_backend_reg_dev_count(reg)):
            devs.append(<size_t>ggml_backend_reg_dev_get(reg, i))
    gpus = []
    igpus = []
    n = ggml_backend_dev_count()
    for i in range(n):
        dev = ggml_backend_dev_get(i)
        kind = <int>ggml_backend_dev_get_type(dev)
        if kind == GGML_BACKEND_DEVICE_TYPE_GPU:
            gpus.append(<size_t>dev)
        elif kind == GGML_BACKEND_DEVICE_TYPE_IGPU:
            igpus.append(<size_t>dev)
    devs.extend(gpus or igpus)
    cdef ggml_backend_dev_t * out = <ggml_backend_dev_t *>malloc(
        (len(devs) + 1) * sizeof(ggml_backend_dev_t))
    if out == NULL:
        raise MemoryError()
    for i in range(len(devs)):
        out[i] = <ggml_backend_dev_t><size_t>devs[i]
    out[len(devs)] = NULL
    return out


cdef float * _tensor_split_array(tuple split) except NULL:
    """``split`` as the llama_max_devices() floats libllama reads (zeros after it)."""
    cdef size_t n = llama_max_devices(), i
    if len(split) > n:
        raise ValueError(f"tensor_split has {len(split)} entries; this build takes {n}")
    cdef float * out = <float *>malloc(n * sizeof(float))
    if out == NULL:
        raise MemoryError()
    for i in range(n):
        out[i] = float(split[i]) if i < len(split) else 0.0
    return out


def rpc_devices(str endpoint):
    """The devices an RPC server offers, with their memory from the server
    (``ggml_backend_rpc_get_device_memory``): ``[{"endpoint", "index", "name",
    "description", "memory_free", "memory_total"}]``. Connects (and caches the
    connection) like a model load; probe the endpoint first, a refused connection
    aborts the process."""
    _ensure_backend()
    cdef ggml_backend_reg_t reg = _rpc_reg(endpoint)
    cdef bytes bep = endpoint.encode("utf-8")
    cdef const char * cep = bep
    cdef size_t i, mfree = 0, mtotal = 0
    cdef ggml_backend_dev_t dev
    out = []
    for i in range(ggml_backend_reg_dev_count(reg)):
        dev = ggml_backend_reg_dev_get(reg, i)
        with nogil:
            ggml_backend_rpc_get_device_memory(cep, <uint32_t>i, &mfree, &mtotal)
        name = ggml_backend_dev_name(dev)
        desc = ggml_backend_dev_description(dev)
        out.append({
            "endpoint": endpoint,
            "index": int(i),
            "name": (<bytes>name).decode("utf-8", "replace") if name != NULL else "",
            "description": (<bytes>desc).decode("utf-8", "replace") if desc != NULL else "",
            "memory_free": int(mfree),
            "memory_total": int(mtotal),
        })
    return out


def rpc_serve(str endpoint, cache_dir=None, size_t n_threads=1, device_names=None):
    """Serve this host's devices to RPC clients on ``endpoint`` (``host:port``); blocks
    for good with the GIL released, one client at a time (ggml's accept loop).

    ``device_names`` picks ggml devices by name (``ggml_backend_dev_by_name``);
    default: every GPU/iGPU, else the CPU (llama.cpp's rpc-server rule). Returns only
    when ggml gives up (e.g. the port is taken): raises ``OSError`` then. Run it in a
    process of its own: nothing stops ggml's loop but the end of the process."""
    if not RPC_SUPPORTED:
        raise OSError(_NO_RPC)
    _ensure_backend()
    devs = []
    cdef ggml_backend_dev_t dev
    cdef size_t i
    cdef bytes bname
    if device_names:
        for name in device_names:
            bname = str(name).encode("utf-8")
            dev = ggml_backend_dev_by_name(bname)
            if dev == NULL:
                raise ValueError(f"no ggml device named {name!r}; see inferd doctor")
            devs.append(<size_t>dev)
    else:
        for i in range(ggml_backend_dev_count()):
            dev = ggml_backend_dev_get(i)
            kind = <int>ggml_backend_dev_get_type(dev)
            if kind != GGML_BACKEND_DEVICE_TYPE_CPU and kind != GGML_BACKEND_DEVICE_TYPE_ACCEL:
                devs.append(<size_t>dev)
        if not devs:
            for i in range(ggml_backend_dev_count()):
                dev = ggml_backend_dev_get(i)
                if <int>ggml_backend_dev_get_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU:
                    devs.append(<size_t>dev)
                    break
    if not devs:
        raise OSError("no ggml device to serve")
    cdef size_t ndev = len(devs)
    cdef ggml_backend_dev_t * arr = <ggml_backend_dev_t *>malloc(ndev * sizeof(ggml_backend_dev_t))
    if arr == NULL:
        raise MemoryError()
    for i in range(ndev):
        arr[i] = <ggml_backend_dev_t><size_t>devs[i]
    cdef bytes bep = endpoint.encode("utf-8")
    cdef const char * cep = bep
    cdef bytes bcache = os.fsencode(cache_dir) if cache_dir is not None else b""
    cdef const char * ccache = NULL
    if cache_dir is not None:
        ccache = bcache
    try:
        with nogil:
            ggml_backend_rpc_start_server(cep, ccache, n_threads, ndev, arr)
    finally:
        free(arr)
    raise OSError(f"the RPC server on {endpoint} stopped (is the port taken? see stderr)")
