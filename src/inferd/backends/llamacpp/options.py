"""``LlamaCppOptions``: every setting of a :class:`~.backend.LlamaCpp`, checked in one place.

``LlamaCpp(model, **kwargs)``, ``LlamaCpp(model, options)``, the TOML config's
``[[backend]]`` table and ``inferd run`` all end here (the last two through
:func:`inferd.serve.config.build_backend`), so a setting means the same and is refused
with the same message whichever way it came in. Bad values raise ``InvalidRequest``
naming the setting (the error rule of ``docs/architecture.md``), before any model is
loaded; an unknown setting raises ``TypeError`` as any unknown keyword does.

Defaults that depend on the machine or the model (``parallel``, lock-step pacing) are
resolved here too, so the backend, the scheduler and ``repr`` agree on one value.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from inferd.backends.llamacpp.media_cache import DEFAULT_MEDIA_CACHE_MIB, check_media_cache_mib
from inferd.backends.llamacpp.output import ParserFactory
from inferd.backends.llamacpp.prompt_ram import DEFAULT_CACHE_RAM_MIB, check_cache_ram_mib
from inferd.backends.llamacpp.scheduler import (
    DEFAULT_ADMIT_GATHER_S,
    DEFAULT_KV_LAYOUT,
    DEFAULT_MAX_QUEUED,
    DEFAULT_PREFIX_CACHE,
    DEFAULT_STEP_TOKENS,
    check_settings,
)
from inferd.errors import InvalidRequest
from inferd.limits import echo
from inferd.media_limits import MAX_AUDIO_SECONDS, MAX_IMAGE_PIXELS, MAX_MEDIA_BYTES, MediaLimits

#: Default ``parallel`` on CPU: at most this many sequences, and one per this many
#: context tokens (a CPU step gets slower with every sequence; a GPU one barely does).
CPU_MAX_PARALLEL = 8
GPU_MAX_PARALLEL = 32
CTX_PER_SLOT = 512
#: Smallest context worth creating (a chat template alone takes a few tokens).
MIN_N_CTX = 16

#: Integer settings and their least value (``None`` allowed where the default is None).
_INT_LEAST: dict[str, int] = {
    "n_ctx": MIN_N_CTX,
    "n_batch": 1,
    "n_gpu_layers": -1,
    "n_threads": 1,
    "embed_n_ctx": 1,
    "n_ctx_seq": 1,
    "n_ubatch": 1,
    "main_gpu": 0,
    "yarn_orig_ctx": 0,
}
_FLOATS = ("repeat_penalty", "frequency_penalty", "presence_penalty")
#: Most ``tensor_split`` entries (libllama's llama_max_devices()).
MAX_TENSOR_SPLIT = 16
#: Default ``rpc_read_timeout_s`` (a long prompt on a big split takes minutes at worst).
DEFAULT_RPC_READ_TIMEOUT_S = 300.0
#: The context's knobs (docs/adr/0026-grammar-fast-path-and-context-knobs.md): names as
#: llama.cpp's (``--flash-attn``, ``--cache-type-k/-v``, ``--split-mode``, ``--rope-scaling``).
FLASH_ATTN_MODES = ("auto", "on", "off")
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
#: The cache types that are quantised (a V cache of one needs flash attention).
QUANTISED_KV_TYPES = frozenset(KV_CACHE_TYPES) - {"f32", "f16", "bf16"}
SPLIT_MODES = ("none", "layer", "row")
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
#: RoPE/YaRN floats handed to libllama as they are (None: the model's own value).
ROPE_FLOATS = (
    "rope_freq_base",
    "rope_freq_scale",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
)
#: Most LoRA adapters one model loads (the binding's MAX_LORA_ADAPTERS).
MAX_LORA_ADAPTERS = 16
#: Largest absolute LoRA scale (a scale multiplies the adapter's delta; 100 is far past
#: any useful one and keeps a typo from producing garbage silently).
MAX_LORA_SCALE = 100.0


@dataclass(frozen=True, kw_only=True)
class LlamaCppOptions:
    """Settings of one ``LlamaCpp`` (see its docstring for what each one does)."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_gpu_layers: int = 0
    n_threads: int | None = None
    sha256: str | None = None
    chat_template: str | None = None
    use_mmap: bool = True
    output_parser: ParserFactory | None = None
    tool_format: str | None = None
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    embed_n_ctx: int | None = None
    #: ``None``: derived from the model (an embedding model has a pooling type).
    embed: bool | None = None
    #: embeddings pooling (none, mean, cls, last, rank); ``None``: the model's own
    pooling: str | None = None
    #: Matryoshka sizes the model was trained for (``True``: any), so ``dimensions``
    #: may truncate; ``None`` refuses ``dimensions`` (docs/adr/0018-embeddings-rerank-tokens.md)
    matryoshka_dims: tuple[int, ...] | bool | None = None
    progress: Callable[[float], Any] | None = None
    #: print the model store's download progress when ``model`` is a name to pull
    pull_progress: bool = False
    name: str | None = None
    overlap: bool | None = None
    #: under lock-step, let the consumers' event loop run the steps while it alone is
    #: served (ADR 0034); False keeps every step on the scheduler thread
    inline_steps: bool = True
    parallel: int | None = None
    n_ctx_seq: int | None = None
    max_queued: int = DEFAULT_MAX_QUEUED
    step_tokens: int = DEFAULT_STEP_TOKENS
    prefix_cache: int = DEFAULT_PREFIX_CACHE
    kv_layout: str = DEFAULT_KV_LAYOUT
    #: seconds an idle scheduler waits for more requests arriving together, so they
    #: share the first prefill (ADR 0029); 0 turns it off
    admit_gather_s: float = DEFAULT_ADMIT_GATHER_S
    #: MiB of host memory for split slots' states once another request takes the slot,
    #: restored when their prompt comes back (ADR 0030); 0 turns it off
    cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB
    #: ggml RPC workers (``"host:port"``) the offloaded layers live on; a list or a
    #: comma-separated string (docs/adr/0019-rpc-backend.md)
    rpc_servers: tuple[str, ...] = ()
    #: share of the offloaded layers per device (RPC workers first, then local GPUs)
    tensor_split: tuple[float, ...] = ()
    #: load an RPC split in this process (a dead worker then aborts it); by default a
    #: supervised child process holds it
    rpc_in_process: bool = False
    #: seconds a split model's stream may go without an event before its child is
    #: stopped and the stream ends with BackendUnavailable (a worker host that vanished
    #: without closing its socket)
    rpc_read_timeout_s: float = DEFAULT_RPC_READ_TIMEOUT_S
    #: multimodal projector (an mmproj GGUF path, or a store name whose entry has one)
    #: for images and audio through libmtmd (docs/adr/0028-media-through-libmtmd.md)
    mmproj: str | None = None
    #: media limits (inferd.media_limits): pixels an image header may claim, seconds of
    #: decoded audio, bytes of one encoded file
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    max_media_bytes: int = MAX_MEDIA_BYTES
    #: MiB of host memory for encoded images and audio, reused when the same file comes
    #: back behind different text (ADR 0032); 0 turns it off
    media_cache_mib: int = DEFAULT_MEDIA_CACHE_MIB
    # The context's knobs (docs/adr/0026-grammar-fast-path-and-context-knobs.md); None
    # keeps libllama's default.
    #: physical batch (tokens per compute graph); None: ``n_batch``
    n_ubatch: int | None = None
    flash_attn: str = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    #: keep the KV cache and attention on the GPU with the offloaded layers
    offload_kqv: bool = True
    split_mode: str = "layer"
    main_gpu: int = 0
    use_mlock: bool = False
    rope_scaling: str | None = None
    rope_freq_base: float | None = None
    rope_freq_scale: float | None = None
    yarn_ext_factor: float | None = None
    yarn_attn_factor: float | None = None
    yarn_beta_fast: float | None = None
    yarn_beta_slow: float | None = None
    yarn_orig_ctx: int | None = None
    #: LoRA adapters loaded at start: ``(path, scale)`` pairs (a bare path: scale 1.0)
    lora: tuple[tuple[str, float], ...] = ()
    #: speculative decoding: ``"ngram"``, ``NgramDraft(...)``, ``DraftModel(path, ...)`` or
    #: a table (docs/adr/0027-speculative-decoding-batched.md); None: off
    draft: Any = None

    def __post_init__(self) -> None:
        self._check_rpc()
        self.media_limits()
        if self.mmproj is not None:
            if not isinstance(self.mmproj, (str, os.PathLike)) or not os.fspath(self.mmproj):
                raise InvalidRequest(f"mmproj={echo(self.mmproj)} must be a path or a model name")
            object.__setattr__(self, "mmproj", os.fspath(self.mmproj))
        self._check_knobs()
        for key, least in _INT_LEAST.items():
            value = getattr(self, key)
            if value is None and key not in ("n_ctx", "n_batch", "n_gpu_layers", "main_gpu"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidRequest(f"{key}={echo(value)} must be an integer >= {least}")
        for key in _FLOATS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"{key}={echo(value)} must be a number")
        check_settings(
            parallel=self.resolved_parallel,
            max_queued=self.max_queued,
            step_tokens=self.step_tokens,
            prefix_cache=self.prefix_cache,
            kv_layout=self.kv_layout,
            admit_gather_s=self.admit_gather_s,
        )
        check_cache_ram_mib(self.cache_ram_mib)
        check_media_cache_mib(self.media_cache_mib)
        from inferd.backends.llamacpp.embedding import check_options

        check_options(self.pooling, self.matryoshka_dims)
        if self.tool_format is not None:
            from inferd.chat import parser_class

            parser_class(self.tool_format)  # an unknown name fails here, not per request
        from inferd.backends.llamacpp.speculative import parse_draft

        object.__setattr__(self, "draft", parse_draft(self.draft))  # ADR 0027

    def _check_knobs(self) -> None:
        """The context's knobs: names llama.cpp knows, and the combinations it refuses
        caught here with the setting named (ADR 0026)."""
        for key, allowed in (
            ("flash_attn", FLASH_ATTN_MODES),
            ("type_k", KV_CACHE_TYPES),
            ("type_v", KV_CACHE_TYPES),
            ("split_mode", SPLIT_MODES),
        ):
            if getattr(self, key) not in allowed:
                raise InvalidRequest(
                    f"{key}={echo(getattr(self, key))} must be one of {', '.join(allowed)}"
                )
        if self.type_v in QUANTISED_KV_TYPES and self.flash_attn == "off":
            raise InvalidRequest(
                f"type_v={self.type_v} (a quantised V cache) needs flash attention: "
                "set flash_attn to auto or on, or type_v to f16"
            )
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALING_TYPES:
            raise InvalidRequest(
                f"rope_scaling={echo(self.rope_scaling)} must be one of "
                f"{', '.join(ROPE_SCALING_TYPES)}"
            )
        for key in ROPE_FLOATS:
            v = getattr(self, key)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                raise InvalidRequest(f"{key}={echo(v)} must be a finite number")
        for key in ("rope_freq_base", "rope_freq_scale"):
            if (getattr(self, key) or 0) < 0:
                raise InvalidRequest(f"{key} must be >= 0 (0: the model's own)")
        for key in ("offload_kqv", "use_mlock", "inline_steps"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidRequest(f"{key}={echo(getattr(self, key))} must be true or false")
        if self.n_ubatch is not None and self.n_ubatch > self.n_batch:
            raise InvalidRequest(f"n_ubatch={self.n_ubatch} must not exceed n_batch={self.n_batch}")
        object.__setattr__(self, "lora", _lora_pairs(self.lora))

    def context_knobs(self) -> dict[str, Any]:
        """The knobs ``L.Context`` takes, libllama's defaults left out."""
        knobs: dict[str, Any] = {"flash_attn": self.flash_attn}
        if self.type_k != "f16":
            knobs["type_k"] = self.type_k
        if self.type_v != "f16":
            knobs["type_v"] = self.type_v
        if not self.offload_kqv:
            knobs["offload_kqv"] = False
        for key in ("rope_scaling", *ROPE_FLOATS, "yarn_orig_ctx"):
            if getattr(self, key) is not None:
                knobs[key] = getattr(self, key)
        return knobs

    def _check_rpc(self) -> None:
        """Normalise and check ``rpc_servers`` and ``tensor_split`` (frozen: set once)."""
        from inferd.backends.llamacpp.rpc_probe import check_servers

        object.__setattr__(self, "rpc_servers", check_servers(self.rpc_servers))
        split = self.tensor_split
        if isinstance(split, str):
            split = tuple(x for x in split.split(",") if x.strip())
        try:
            values = tuple(float(x) for x in split)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"tensor_split={echo(self.tensor_split)} must be a list of numbers"
            ) from None
        if len(values) > MAX_TENSOR_SPLIT or any(not 0 <= v < float("inf") for v in values):
            raise InvalidRequest(
                f"tensor_split={echo(self.tensor_split)}: at most {MAX_TENSOR_SPLIT} "
                "finite shares >= 0"
            )
        if values and sum(values) <= 0:
            raise InvalidRequest("tensor_split: the shares must not all be 0")
        t = self.rpc_read_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise InvalidRequest(f"rpc_read_timeout_s={echo(t)} must be a number of seconds > 0")
        object.__setattr__(self, "tensor_split", values)

    def media_limits(self) -> MediaLimits:
        """The media limits as one checked object (``InvalidRequest`` names a bad one)."""
        return MediaLimits(self.max_image_pixels, self.max_audio_seconds, self.max_media_bytes)

    @classmethod
    def from_kwargs(
        cls, base: LlamaCppOptions | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> LlamaCppOptions:
        """``base`` (default: all defaults) with ``kwargs`` replaced; ``TypeError`` names
        an unknown setting and lists the known ones."""
        kwargs = dict(kwargs or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"LlamaCpp got unknown setting(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(known))}"
            )
        if base is None:
            return cls(**kwargs)
        return dataclasses.replace(base, **kwargs) if kwargs else base

    @property
    def resolved_parallel(self) -> int:
        """``parallel``, or its default: ``min(8, n_ctx // 512)`` on CPU, 32 with GPU
        layers (ADR 0008), at least 1."""
        if self.parallel is not None:
            return self.parallel
        cap = GPU_MAX_PARALLEL if self.n_gpu_layers != 0 else CPU_MAX_PARALLEL
        return max(1, min(cap, self.n_ctx // CTX_PER_SLOT))

    @property
    def split(self) -> bool:
        return self.kv_layout == "split"

    def lockstep(self) -> bool:
        """Pace decoding by the consumers when the compute threads take every CPU this
        process may use (see :mod:`.backend`), unless ``overlap`` says otherwise."""
        if self.overlap is not None:
            return not self.overlap
        cpus = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
        return (self.n_threads or cpus) >= cpus


def _lora_pairs(value: Any) -> tuple[tuple[str, float], ...]:
    """``lora`` as ``((path, scale), ...)``: a list of pairs, bare paths (scale 1.0), or
    a ``{path: scale}`` mapping; the files themselves are checked when they load."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    items = list(value.items()) if isinstance(value, Mapping) else list(value or ())
    if len(items) > MAX_LORA_ADAPTERS:
        raise InvalidRequest(f"lora: {len(items)} adapters; at most {MAX_LORA_ADAPTERS}")
    out = []
    for item in items:
        pair = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidRequest(f"lora entries are (path, scale) pairs, got {echo(item)}")
        path, scale = pair
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise InvalidRequest(f"lora: {echo(path)} is not an adapter file path")
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or abs(scale) > MAX_LORA_SCALE
        ):
            raise InvalidRequest(
                f"lora scale for {os.fspath(path)} must be a number within "
                f"+-{MAX_LORA_SCALE} (MAX_LORA_SCALE), got {echo(scale)}"
            )
        out.append((os.fspath(path), float(scale)))
    return tuple(out)
