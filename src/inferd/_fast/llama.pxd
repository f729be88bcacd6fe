# cython: language_level=3
# Declarations of the part of llama.h / ggml-backend.h that inferd._fast._llama uses.
#
# Only the fields and functions we touch are declared: Cython emits code against the
# real header, so a partial struct declaration stays correct when llama.cpp appends
# fields. llama.h declares plain `struct llama_model_params {...}` (no typedef), hence
# `cdef struct` below; llama_batch and llama_sampler_chain_params are typedefs.

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libcpp cimport bool as cppbool


cdef extern from "ggml.h" nogil:
    cdef enum ggml_log_level:
        GGML_LOG_LEVEL_NONE
        GGML_LOG_LEVEL_DEBUG
        GGML_LOG_LEVEL_INFO
        GGML_LOG_LEVEL_WARN
        GGML_LOG_LEVEL_ERROR
        GGML_LOG_LEVEL_CONT

    cdef enum ggml_type:
        GGML_TYPE_F32
        GGML_TYPE_COUNT
    const char * ggml_type_name(ggml_type type)
    bint ggml_is_quantized(ggml_type type)

    ctypedef void (*ggml_log_callback)(ggml_log_level level, const char * text,
                                       void * user_data) noexcept


cdef extern from "ggml-backend.h" nogil:
    cdef struct ggml_backend_device:
        pass
    ctypedef ggml_backend_device * ggml_backend_dev_t

    # The enum and the function share a name in C (separate namespaces); Cython
    # needs distinct names, so the enum gets a Cython alias.
    cdef enum ggml_backend_dev_kind "ggml_backend_dev_type":
        GGML_BACKEND_DEVICE_TYPE_CPU
        GGML_BACKEND_DEVICE_TYPE_GPU
        GGML_BACKEND_DEVICE_TYPE_IGPU
        GGML_BACKEND_DEVICE_TYPE_ACCEL

    size_t ggml_backend_dev_count()
    ggml_backend_dev_t ggml_backend_dev_get(size_t index)
    const char * ggml_backend_dev_name(ggml_backend_dev_t device)
    const char * ggml_backend_dev_description(ggml_backend_dev_t device)
    void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total)
    ggml_backend_dev_kind ggml_backend_dev_get_type "ggml_backend_dev_type"(ggml_backend_dev_t device)


cdef extern from "llama.h" nogil:
    ctypedef int32_t llama_token
    ctypedef int32_t llama_pos
    ctypedef int32_t llama_seq_id

    cdef struct llama_model:
        pass
    cdef struct llama_context:
        pass
    cdef struct llama_vocab:
        pass
    cdef struct llama_sampler:
        pass
    cdef struct llama_memory_i:
        pass
    ctypedef llama_memory_i * llama_memory_t

    ctypedef cppbool (*llama_progress_callback)(float progress, void * user_data) noexcept

    cdef enum llama_load_mode:
        LLAMA_LOAD_MODE_AUTO
        LLAMA_LOAD_MODE_NONE
        LLAMA_LOAD_MODE_MMAP
        LLAMA_LOAD_MODE_MLOCK
        LLAMA_LOAD_MODE_MMAP_MLOCK

    cdef enum llama_pooling_kind "llama_pooling_type":
        LLAMA_POOLING_TYPE_UNSPECIFIED
        LLAMA_POOLING_TYPE_NONE
        LLAMA_POOLING_TYPE_MEAN
        LLAMA_POOLING_TYPE_CLS
        LLAMA_POOLING_TYPE_LAST
        LLAMA_POOLING_TYPE_RANK

    cdef enum llama_split_mode:
        LLAMA_SPLIT_MODE_NONE
        LLAMA_SPLIT_MODE_LAYER
        LLAMA_SPLIT_MODE_ROW

    cdef enum llama_flash_attn_type:
        LLAMA_FLASH_ATTN_TYPE_AUTO
        LLAMA_FLASH_ATTN_TYPE_DISABLED
        LLAMA_FLASH_ATTN_TYPE_ENABLED

    cdef enum llama_rope_scaling_type:
        LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
        LLAMA_ROPE_SCALING_TYPE_NONE
        LLAMA_ROPE_SCALING_TYPE_LINEAR
        LLAMA_ROPE_SCALING_TYPE_YARN
        LLAMA_ROPE_SCALING_TYPE_LONGROPE

    cdef struct llama_model_params:
        ggml_backend_dev_t * devices  # NULL-terminated; set for RPC splits (_rpc.pxi)
        const float * tensor_split  # llama_max_devices() floats, or NULL
        int32_t n_gpu_layers
        llama_split_mode split_mode  # (ADR 0026)
        int32_t main_gpu
        llama_load_mode load_mode
        llama_progress_callback progress_callback
        void * progress_callback_user_data
        bint vocab_only

    cdef struct llama_context_params:
        uint32_t n_ctx
        uint32_t n_batch
        uint32_t n_ubatch
        uint32_t n_seq_max
        int32_t n_threads
        int32_t n_threads_batch
        llama_pooling_kind pooling_type
        bint embeddings
        bint no_perf
        bint kv_unified
        # the context's knobs (docs/adr/0026-grammar-fast-path-and-context-knobs.md)
        llama_rope_scaling_type rope_scaling_type
        llama_flash_attn_type flash_attn_type
        float rope_freq_base
        float rope_freq_scale
        float yarn_ext_factor
        float yarn_attn_factor
        float yarn_beta_fast
        float yarn_beta_slow
        uint32_t yarn_orig_ctx
        ggml_type type_k
        ggml_type type_v
        bint offload_kqv

    ctypedef struct llama_batch:
        int32_t n_tokens
        llama_token * token
        float * embd
        llama_pos * pos
        int32_t * n_seq_id
        llama_seq_id ** seq_id
        int8_t * logits

    ctypedef struct llama_sampler_chain_params:
        bint no_perf

    ctypedef struct llama_logit_bias:
        llama_token token
        float bias

    # the grammar fast path (_grammar.pxi, ADR 0026)
    ctypedef struct llama_token_data:
        llama_token id
        float logit
        float p

    ctypedef struct llama_token_data_array:
        llama_token_data * data
        size_t size
        int64_t selected
        bint sorted

    # LoRA adapters (_lora.pxi, ADR 0026)
    cdef struct llama_adapter_lora:
        pass

    const char * llama_print_system_info()
    void llama_backend_init()
    void llama_log_set(ggml_log_callback log_callback, void * user_data)
    bint llama_supports_gpu_offload()
    bint llama_supports_mmap()
    size_t llama_max_parallel_sequences()
    size_t llama_max_devices()

    llama_model_params llama_model_default_params()
    llama_context_params llama_context_default_params()
    llama_sampler_chain_params llama_sampler_chain_default_params()

    llama_model * llama_model_load_from_file(const char * path_model, llama_model_params params)
    void llama_model_free(llama_model * model)
    llama_context * llama_init_from_model(llama_model * model, llama_context_params params)
    void llama_free(llama_context * ctx)

    uint32_t llama_n_ctx(const llama_context * ctx)
    uint32_t llama_n_batch(const llama_context * ctx)
    uint32_t llama_n_seq_max(const llama_context * ctx)
    llama_memory_t llama_get_memory(const llama_context * ctx)
    llama_pooling_kind llama_get_pooling_type "llama_pooling_type"(const llama_context * ctx)

    const llama_vocab * llama_model_get_vocab(const llama_model * model)
    int32_t llama_model_n_ctx_train(const llama_model * model)
    int32_t llama_model_n_embd(const llama_model * model)
    int32_t llama_model_n_layer(const llama_model * model)
    uint32_t llama_model_n_cls_out(const llama_model * model)
    uint64_t llama_model_size(const llama_model * model)
    uint64_t llama_model_n_params(const llama_model * model)
    bint llama_model_has_encoder(const llama_model * model)
    bint llama_model_has_decoder(const llama_model * model)
    int32_t llama_model_desc(const llama_model * model, char * buf, size_t buf_size)
    int32_t llama_model_meta_val_str(const llama_model * model, const char * key, char * buf,
                                     size_t buf_size)
    int32_t llama_model_meta_count(const llama_model * model)
    int32_t llama_model_meta_key_by_index(const llama_model * model, int32_t i, char * buf,
                                          size_t buf_size)
    int32_t llama_model_meta_val_str_by_index(const llama_model * model, int32_t i, char * buf,
                                              size_t buf_size)
    const char * llama_model_chat_template(const llama_model * model, const char * name)

    int32_t llama_vocab_n_tokens(const llama_vocab * vocab)
    bint llama_vocab_is_eog(const llama_vocab * vocab, llama_token token)
    bint llama_vocab_is_control(const llama_vocab * vocab, llama_token token)
    llama_token llama_vocab_bos(const llama_vocab * vocab)
    llama_token llama_vocab_eos(const llama_vocab * vocab)
    llama_token llama_vocab_eot(const llama_vocab * vocab)
    bint llama_vocab_get_add_bos(const llama_vocab * vocab)
    bint llama_vocab_get_add_eos(const llama_vocab * vocab)
    bint llama_vocab_get_add_sep(const llama_vocab * vocab)
    llama_token llama_vocab_sep(const llama_vocab * vocab)
    const char * llama_vocab_get_text(const llama_vocab * vocab, llama_token token)

    int32_t llama_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len,
                           llama_token * tokens, int32_t n_tokens_max, bint add_special,
                           bint parse_special)
    int32_t llama_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf,
                                 int32_t length, int32_t lstrip, bint special)
    int32_t llama_detokenize(const llama_vocab * vocab, const llama_token * tokens,
                             int32_t n_tokens, char * text, int32_t text_len_max,
                             bint remove_special, bint unparse_special)

    bint llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1)
    void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id src, llama_seq_id dst,
                             llama_pos p0, llama_pos p1)
    void llama_memory_clear(llama_memory_t mem, bint data)
    llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id)
    llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id)

    llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max)
    void llama_batch_free(llama_batch batch)
    int32_t llama_decode(llama_context * ctx, llama_batch batch)
    int32_t llama_encode(llama_context * ctx, llama_batch batch)
    void llama_set_n_threads(llama_context * ctx, int32_t n_threads, int32_t n_threads_batch)
    void llama_set_embeddings(llama_context * ctx, bint embeddings)
    void llama_synchronize(llama_context * ctx)
    float * llama_get_logits_ith(llama_context * ctx, int32_t i)
    float * llama_get_embeddings_ith(llama_context * ctx, int32_t i)
    float * llama_get_embeddings_seq(llama_context * ctx, llama_seq_id seq_id)

    llama_sampler * llama_sampler_chain_init(llama_sampler_chain_params params)
    void llama_sampler_chain_add(llama_sampler * chain, llama_sampler * smpl)
    int32_t llama_sampler_chain_n(const llama_sampler * chain)
    llama_sampler * llama_sampler_chain_get(llama_sampler * chain, int32_t i)
    void llama_sampler_free(llama_sampler * smpl)
    void llama_sampler_reset(llama_sampler * smpl)
    void llama_sampler_accept(llama_sampler * smpl, llama_token token)
    llama_token llama_sampler_sample(llama_sampler * smpl, llama_context * ctx, int32_t idx)
    void llama_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p)
    llama_adapter_lora * llama_adapter_lora_init(llama_model * model, const char * path_lora)
    int32_t llama_set_adapters_lora(llama_context * ctx, llama_adapter_lora ** adapters,
                                    size_t n_adapters, float * scales)
    int32_t llama_adapter_meta_val_str(const llama_adapter_lora * adapter, const char * key,
                                       char * buf, size_t buf_size)
    size_t llama_state_get_size(llama_context * ctx)
    size_t llama_state_seq_get_size(llama_context * ctx, llama_seq_id seq_id)
    # the host-RAM prompt cache (src/inferd/_fast/_state.pxi, ADR 0030)
    size_t llama_state_seq_get_size_ext(llama_context * ctx, llama_seq_id seq_id,
                                        uint32_t flags)
    size_t llama_state_seq_get_data_ext(llama_context * ctx, uint8_t * dst, size_t size,
                                        llama_seq_id seq_id, uint32_t flags)
    size_t llama_state_seq_set_data_ext(llama_context * ctx, const uint8_t * src,
                                        size_t size, llama_seq_id dest_seq_id,
                                        uint32_t flags)
    llama_sampler * llama_sampler_init_greedy()
    llama_sampler * llama_sampler_init_dist(uint32_t seed)
    llama_sampler * llama_sampler_init_top_k(int32_t k)
    llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep)
    llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep)
    llama_sampler * llama_sampler_init_temp(float t)
    llama_sampler * llama_sampler_init_penalties(int32_t n_vocab, int32_t penalty_last_n,
                                                 float penalty_repeat, float penalty_freq,
                                                 float penalty_present)
    # the per-request chain (src/inferd/_fast/_sampling.pxi, ADR 0021)
    llama_sampler * llama_sampler_clone(const llama_sampler * smpl)
    llama_sampler * llama_sampler_init_typical(float p, size_t min_keep)
    llama_sampler * llama_sampler_init_xtc(float p, float t, size_t min_keep, uint32_t seed)
    llama_sampler * llama_sampler_init_dry(const llama_vocab * vocab, float dry_multiplier,
                                           float dry_base, int32_t dry_allowed_length,
                                           int32_t dry_penalty_last_n,
                                           const char ** seq_breakers, size_t num_breakers)
    llama_sampler * llama_sampler_init_logit_bias(int32_t n_vocab, int32_t n_logit_bias,
                                                  const llama_logit_bias * logit_bias)
    llama_sampler * llama_sampler_init_grammar(const llama_vocab * vocab,
                                               const char * grammar_str,
                                               const char * grammar_root)
    llama_sampler * llama_sampler_init_grammar_lazy_patterns(
        const llama_vocab * vocab, const char * grammar_str, const char * grammar_root,
        const char ** trigger_patterns, size_t num_trigger_patterns,
        const llama_token * trigger_tokens, size_t num_trigger_tokens)


# ggml's RPC backend (docs/adr/0019-rpc-backend.md); used by _rpc.pxi.
cdef extern from "ggml-backend.h" nogil:
    cdef struct ggml_backend_reg:
        pass
    ctypedef ggml_backend_reg * ggml_backend_reg_t
    size_t ggml_backend_reg_dev_count(ggml_backend_reg_t reg)
    ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index)
    ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device)
    const char * ggml_backend_reg_name(ggml_backend_reg_t reg)
    ggml_backend_dev_t ggml_backend_dev_by_name(const char * name)


# inferd_rpc.h: the ggml-rpc.h API, or stand-ins in a build with GGML_RPC=OFF.
cdef extern from "inferd_rpc.h" nogil:
    enum:
        RPC_PROTO_MAJOR_VERSION
        RPC_PROTO_MINOR_VERSION
        RPC_PROTO_PATCH_VERSION
        GGML_RPC_MAX_SERVERS
        INFERD_HAVE_RPC
    ggml_backend_reg_t ggml_backend_rpc_add_server "inferd_rpc_add_server"(
        const char * endpoint)
    void ggml_backend_rpc_get_device_memory "inferd_rpc_get_device_memory"(
        const char * endpoint, uint32_t device, size_t * free, size_t * total)
    void ggml_backend_rpc_start_server "inferd_rpc_start_server"(
        const char * endpoint, const char * cache_dir, size_t n_threads, size_t n_devices,
        ggml_backend_dev_t * devices)
