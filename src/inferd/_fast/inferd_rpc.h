/* inferd_rpc.h: ggml's RPC API, or stand-ins when ggml was built without it.
 *
 * vendor/llama.cmake builds ggml with GGML_RPC=ON by default; -DGGML_RPC=OFF (through
 * CMAKE_ARGS) saves about 100 KB and defines INFERD_NO_RPC, and then these stand-ins
 * keep _rpc.pxi linking: INFERD_HAVE_RPC is 0 and the binding refuses RPC with a clear
 * error instead of an undefined symbol at import (docs/adr/0019-rpc-backend.md). */
#pragma once

#include "ggml-rpc.h"

#ifdef INFERD_NO_RPC
#define INFERD_HAVE_RPC 0
static inline ggml_backend_reg_t inferd_rpc_add_server(const char * endpoint) {
    (void) endpoint;
    return NULL;
}
static inline void inferd_rpc_get_device_memory(const char * endpoint, uint32_t device,
                                                size_t * free, size_t * total) {
    (void) endpoint;
    (void) device;
    *free = 0;
    *total = 0;
}
static inline void inferd_rpc_start_server(const char * endpoint, const char * cache_dir,
                                           size_t n_threads, size_t n_devices,
                                           ggml_backend_dev_t * devices) {
    (void) endpoint;
    (void) cache_dir;
    (void) n_threads;
    (void) n_devices;
    (void) devices;
}
#else
#define INFERD_HAVE_RPC 1
#define inferd_rpc_add_server ggml_backend_rpc_add_server
#define inferd_rpc_get_device_memory ggml_backend_rpc_get_device_memory
#define inferd_rpc_start_server ggml_backend_rpc_start_server
#endif
