"""``LlamaCpp``: a :class:`~inferd.backend.Backend` that runs GGUF models in-process.

How a request flows:

1. (event loop) validate, render the model's chat template, tokenize, build a sampler;
   problems here raise from the first ``__anext__`` (pre-stream).
2. (scheduler thread, :mod:`.scheduler`) the sequence waits in a bounded FCFS queue
   for one of ``parallel`` sequence slots, then shares every decode step with the
   other running sequences: one batch holds each one's next token plus prompt chunks
   of new ones, one ``llama_decode`` (GIL released), one draw per sequence from its
   own sampler chain. Tokens (with their bytes, detokenized in that thread) reach the
   event loop in one callback per step through a bounded hand-off: a consumer that
   falls :data:`.scheduler.PIPELINE_DEPTH` tokens behind pauses its sequence only.
   A prompt prefix already in the KV cache (a running or recently finished sequence)
   is copied, not recomputed; with ``kv_layout="split"`` only a prefix still held by
   the slot the request gets (one KV stream per slot, ADR 0008). Pacing: when the
   compute threads take every CPU the scheduler waits briefly for the event loop to
   run the consumers of the last step before the next decode (*lock-step*), because an
   event-loop thread preempting a compute thread mid-graph makes ggml's barriers stall
   the whole step (measured on 2 cores: 45 tok/s overlapped vs 110 tok/s raw). In
   lock-step, while every sequence is read on one event loop, the thread lends the
   steps to that loop, which runs each one itself after its consumers' turn: no
   thread hand-off per token (ADR 0034).
3. (event loop) bytes -> text (:class:`.text_tail.TextTail`: a character split across
   tokens is held until complete, stop sequences held back until they can no longer
   match), the per-model output parser, then events and one ``Done``.

One scheduler thread owns the libllama context (ADR 0008); cancelling a stream frees
its sequence and KV cells at the next step, and the consumer waits for that before it
returns, so nothing outlives its stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from inferd.backend import Backend
from inferd.backends.llamacpp import (
    embedding,
    loader,
    lora_groups,
    media,
    media_cache,
    prompt_ram,
)
from inferd.backends.llamacpp.chat_template import ChatTemplate, from_model, reasoning_kwargs
from inferd.backends.llamacpp.choices import ChoiceReader, choice_seed, merged
from inferd.backends.llamacpp.options import LlamaCppOptions
from inferd.backends.llamacpp.output import CallStops
from inferd.backends.llamacpp.sampling import (  # noqa: F401 (DEFAULT_*: public names)
    DEFAULT_MIN_P,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    SAMPLING_FIELDS,
    sampler_kwargs,
)
from inferd.backends.llamacpp.scheduler import Scheduler, SeqStream
from inferd.chat._stream import OutputParser
from inferd.chat.plan import ChatPlan, plan_chat
from inferd.errors import (
    BackendUnavailable,
    EmbedUnsupported,
    InferdError,
    InvalidRequest,
    ModelLoadError,
    NotReady,
)
from inferd.limits import echo
from inferd.request_fields import refuse_unhonoured
from inferd.types import (
    AcceleratorInfo,
    Capabilities,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    RerankRequest,
    RerankResult,
    StopReason,
    Usage,
)

#: Reply-changing Request fields LlamaCpp honours; any other set field is refused by
#: the one rule in inferd.request_fields (docs/adr/0021-per-request-sampling-chain.md).
LLAMACPP_HONOURED: frozenset[str] = SAMPLING_FIELDS | frozenset(
    {"temperature", "top_p", "top_k", "min_p", "seed", "response_format", "ignore_eos"}
)
#: ``reasoning_effort`` reaches the chat template (chat_template.reasoning_kwargs), and a raw
#: ``prompt`` is fed without one (``_prepare_raw``; ADR 0025).
LLAMACPP_HONOURED |= {"reasoning_effort", "prompt"}
#: ``n`` choices share one prefill; ``logprobs`` come from the scheduler (ADR 0022).
LLAMACPP_HONOURED |= {"n", "logprobs", "top_logprobs"}
#: Tool grammars allow one call or several (docs/adr/0023-tool-call-streaming-and-stop-reasons.md).
LLAMACPP_HONOURED |= {"parallel_tool_calls"}
#: ``lora``: the request's adapter scales; streams of different scale sets take turns in
#: the scheduler's steps (lora_groups; docs/adr/0026-grammar-fast-path-and-context-knobs.md).
LLAMACPP_HONOURED |= {"lora"}
#: A chat template that mentions one of these can put the model into a reasoning block.
_THINKING_MARKERS = re.compile(r"think|reasoning", re.IGNORECASE)
#: ``<arch>.pooling_type`` values of embedding models (llama.cpp's mean, cls, last).
_POOLED = frozenset({"1", "2", "3"})


def _llama() -> Any:
    """The compiled binding, or a ModelLoadError that says how to get it."""
    try:
        from inferd._fast import _llama as mod
    except ImportError as e:
        raise ModelLoadError(
            "inferd was built without its llama.cpp core (inferd._fast._llama is missing: "
            f"{e}). Reinstall with INFERD_WITH_LLAMA=ON (the default) and a C++ compiler."
        ) from None
    return mod


def is_embedding_model(model: Any) -> bool:
    """True when the GGUF declares a pooling type (``<arch>.pooling_type`` mean, cls or
    last): the model was trained to produce sentence embeddings. A chat model has none
    (a reranker's ``rank`` pooling gives scores, not embeddings)."""
    return model.meta(f"{model.architecture}.pooling_type") in _POOLED


def template_thinks(template: str | None) -> bool:
    """True when a chat template can open a reasoning block (it mentions thinking or
    reasoning: ``<think>``, ``enable_thinking``, ``reasoning_content``)."""
    return bool(template and _THINKING_MARKERS.search(template))


class LlamaCpp(Backend):
    """Run a GGUF model in this process through libllama.

    ``model`` is a path to a ``.gguf`` file or a model-store name (``"smollm2-135m"``,
    resolved once with :func:`inferd.models.resolve`, pulled when absent). Loading
    happens in the constructor (use ``await LlamaCpp.open(...)`` to load off the event
    loop). Settings come as keywords or as a :class:`.options.LlamaCppOptions` (keywords
    then override it); bad values raise ``InvalidRequest`` before the model loads.

    :param n_ctx: context length in tokens shared by prompt and reply.
    :param n_gpu_layers: layers to offload to a GPU build (-1 = all).
    :param n_threads: CPU threads (default: the CPUs this process may use).
    :param sha256: verify the file and load from a private verified copy.
    :param chat_template: Jinja source to use instead of the model's own.
    :param output_parser: factory of the per-model output parser (default: the
        ``inferd.chat`` parser of the model's tool format, which also reads thinking).
    :param tool_format: tool-call format (``hermes``, ``llama3``, ``mistral``,
        ``gemma4``, ``plain``); ``None`` detects it from the chat template.
    :param repeat_penalty, frequency_penalty, presence_penalty: sampler penalties.
    :param embed: serve :meth:`embed` (default: only an embedding model, one whose GGUF
        declares a pooling type; ``True`` mean-pools any model's hidden states).
    :param pull_progress: print download progress when ``model`` is pulled.
    :param overlap: let decoding run ahead of the consumer (default: only when a CPU is
        left over beyond ``n_threads``; see the module docstring).
    :param inline_steps: under lock-step, the event loop that reads every stream runs
        the decode steps itself, with no thread hand-off per token (default ``True``,
        ADR 0034); ``False`` keeps the loop free during steps, at that cost.
    :param parallel: streams decoded together on one context (default:
        ``min(8, n_ctx // 512)`` on CPU, ``min(32, n_ctx // 512)`` with GPU layers).
    :param n_ctx_seq: most tokens one stream (prompt + reply) may hold (default
        ``n_ctx // parallel``); with ``kv_layout="unified"`` larger values oversubscribe
        the cache, and a stream then waits in the queue until the cache can hold its
        worst case.
    :param max_queued: streams that may wait for a slot; beyond, ``QueueFull``.
    :param step_tokens: tokens per decode step (running streams + prompt chunks).
    :param admit_gather_s: how long an idle scheduler waits for further requests
        arriving together, while slots would stay free, so they share the first prefill
        (default 3 ms, at most 25 ms in all; 0 turns it off; ADR 0029).
    :param prefix_cache: finished streams kept in the KV cache for prefix reuse
        (unified layout; with the split layout any value above 0 turns on in-slot reuse).
    :param cache_ram_mib: host memory (MiB, default 2048) for the host-RAM prompt cache
        of the split layout: a slot's cells are saved there before another request
        overwrites them, and restored into a slot when a prompt sharing a longer prefix
        comes back (llama-server's ``--cache-ram``; 0 turns it off; ADR 0030).
    :param media_cache_mib: host memory (MiB, default 512) for encoded images and audio:
        the same file behind different text is not encoded again (0 turns it off;
        ADR 0032).
    :param kv_layout: ``"split"`` (the default): each of the ``parallel`` slots owns
        ``n_ctx // parallel`` cells (llama-server's ``-np`` slots), so a stream's
        attention never spans the others' and batched greedy output equals the
        single-stream output; a prompt must fit one slot (a larger ``max_tokens`` is
        shortened to what the slot has left), and prefix reuse stays in a slot. libllama
        rounds a slot up to a multiple of 256 cells, which can make ``n_ctx`` larger
        than asked. ``"unified"``: one KV cache shared by every stream; requests may
        oversubscribe it, a shared prefix is stored once, but batched greedy output
        depends on what else runs (float sums over the shared cells; ADR 0008).
    :param rpc_servers: ``"host:port"`` ggml RPC workers (``inferd rpc-worker``) to split
        the model's layers over; the constructor then returns an
        :class:`inferd.serve.rpc_split.RpcSplit` holding the split in a supervised child
        process (ADR 0019). ``tensor_split``: each device's share (workers first).
    :param rpc_in_process: load the split in this process instead (a lost worker then
        aborts it); ``rpc_read_timeout_s``: longest silence of a split's stream.
    :param draft: speculative decoding: ``"ngram"`` / ``NgramDraft(n, n_draft)`` (prompt
        lookup) or ``DraftModel(path, n_draft=, p_min=)`` (a draft GGUF with the same
        vocabulary); drafts are verified in the batch's decode, ``Request.speculative``
        turns it off per request (docs/adr/0027-speculative-decoding-batched.md).
    :param flash_attn: ``"auto"`` (default), ``"on"`` or ``"off"``; ``type_k`` /
        ``type_v``: KV cache types (``f16``, ``q8_0``, ``q4_0``, ...; a quantised V cache
        needs flash attention); ``n_ubatch``, ``offload_kqv``, ``split_mode`` /
        ``main_gpu``, ``use_mlock``, ``rope_scaling`` / ``rope_freq_*`` / ``yarn_*``:
        libllama's context and model settings of the same names
        (docs/adr/0026-grammar-fast-path-and-context-knobs.md).
    :param lora: ``[(path, scale), ...]`` LoRA adapters loaded at start; these scales
        apply to every request without ``lora``. A request's ``lora`` (llama-server's
        ``[{"id", "scale"}]`` or ``{index or path: scale}``; adapters it does not name are
        off) sets its own scales: streams of different scale sets never share a decode
        but take turns, step by step, and reuse only prefixes computed with their own
        scales (:mod:`.lora_groups`, ADR 0026).
    """

    name = "llamacpp"

    def __new__(
        cls,
        model: str | os.PathLike[str],
        options: LlamaCppOptions | None = None,
        *,
        mmproj: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """With ``rpc_servers`` (and not ``rpc_in_process``) the model is split over ggml
        RPC workers inside a supervised child process, and this returns the
        :class:`inferd.serve.rpc_split.RpcSplit` that fronts it: ggml aborts a process
        whose worker dies, and that must not be the caller's (ADR 0019)."""
        if mmproj is not None:
            kwargs["mmproj"] = mmproj
        opts = LlamaCppOptions.from_kwargs(options, kwargs)
        if opts.rpc_servers and not opts.rpc_in_process:
            from inferd.serve.rpc_split import RpcSplit

            return RpcSplit(model, opts)
        return super().__new__(cls)

    def __init__(
        self,
        model: str | os.PathLike[str],
        options: LlamaCppOptions | None = None,
        *,
        mmproj: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if mmproj is not None:  # images and audio through this projector (ADR 0028)
            kwargs["mmproj"] = mmproj
        opts = self.options = LlamaCppOptions.from_kwargs(options, kwargs)
        if opts.name:
            self.name = opts.name
        L = _llama()
        self._closed = False
        self._mf: loader.ModelFile | None = None
        self._model: Any = None
        self._ctx: Any = None
        self._ectx: Any = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._sched: Scheduler | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._template: ChatTemplate | None = None
        self._mtmd: Any = None  # the projector (images/audio, ADR 0028)
        self._media_cache: media_cache.MediaCache | None = None  # its encodes (ADR 0032)
        self._spec: Any = None  # speculative.Speculator (ADR 0027)
        try:
            self._mf = loader.prepare(self._resolve(model, opts), sha256=opts.sha256)
            self._model = loader.load_model(L, self._mf.path, opts)
            if opts.mmproj is not None:
                self._mtmd = media.open_projector(L, self._model, opts)
                self._media_cache = media_cache.make(opts.media_cache_mib)
            self._ctx, self._sched = self._start(L, opts)
        except BaseException:
            self._release()
            raise
        self._n_ctx = int(self._ctx.n_ctx)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inferd-llama"
        )
        self._idle = self._sched.idle
        self.model_name: str = self._model.name
        self.model_path: Path = self._mf.source
        self._caps = self._derive_capabilities()

    def _start(self, L: Any, opts: LlamaCppOptions) -> tuple[Any, Scheduler]:
        """The generation context and the scheduler thread that owns it.

        Unified KV cache: sequences share cells (prefix reuse is free) and every step
        decodes as one micro-batch; spare ids hold cached prefixes. Split: one stream of
        cells per slot and no spare ids, each would cost a whole stream (ADR 0008).
        """
        parallel = opts.resolved_parallel
        ctx = L.Context(
            self._model,
            n_ctx=opts.n_ctx,
            n_batch=max(opts.n_batch, parallel + 1),
            n_seq_max=parallel if opts.split else parallel + opts.prefix_cache,
            n_threads=opts.n_threads,
            kv_unified=not opts.split,
            n_ubatch=min(opts.n_ubatch or 0, max(opts.n_batch, parallel + 1)),
            **opts.context_knobs(),  # ADR 0026
        )
        self._ctx = ctx  # freed by _release if the scheduler fails to start
        self._lora = loader.load_lora(L, self._model, ctx, opts)
        sched = Scheduler(
            ctx,
            self._model,
            L.Batch,
            parallel=parallel,
            n_ctx_seq=opts.n_ctx_seq or int(ctx.n_ctx) // parallel,
            step_tokens=opts.step_tokens,
            max_queued=opts.max_queued,
            prefix_cache=opts.prefix_cache,
            lockstep=opts.lockstep(),
            inline=opts.inline_steps,
            decode_sample=L.decode_sample,
            name=self.name,
            kv_layout=opts.kv_layout,
            speculator=self._speculator(L, opts, int(ctx.n_ctx), parallel),
            admit_gather_s=opts.admit_gather_s,
            lora_groups=lora_groups.make(L.set_lora, ctx, self._lora, opts.lora),
            prompt_ram=prompt_ram.make(opts.cache_ram_mib),
        )
        return ctx, sched

    def _speculator(self, L: Any, opts: LlamaCppOptions, n_ctx: int, parallel: int) -> Any:
        """The draft side of speculative decoding, or None (ADR 0027)."""
        from inferd.backends.llamacpp.speculative import make_speculator

        self._spec = make_speculator(
            L, opts.draft, self._model, n_ctx=n_ctx, parallel=parallel, n_threads=opts.n_threads
        )
        return self._spec

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _resolve(model: str | os.PathLike[str], opts: LlamaCppOptions) -> Path:
        """The model's file: a path as it is, a store name through the store (the one
        resolution on every path, ``inferd run`` included)."""
        from inferd.models import resolve

        return Path(resolve(model, pull=True, progress=opts.pull_progress))

    @classmethod
    async def open(
        cls, model: str | os.PathLike[str], options: LlamaCppOptions | None = None, **kwargs: Any
    ) -> LlamaCpp:
        """Construct (load the model) in a worker thread so the event loop stays free."""
        return await asyncio.to_thread(cls, model, options, **kwargs)

    # ------------------------------------------------------------------ state

    def ready(self) -> bool:
        return not self._closed and self._model is not None

    def _check_open(self) -> None:
        if self._closed:
            raise NotReady(f"backend {self.name!r} is closed; create a new LlamaCpp to use it")

    @property
    def model(self) -> Any:
        """The underlying :class:`inferd._fast._llama.Model` (for metadata and tokenizing)."""
        self._check_open()
        return self._model

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def _scheduler(self) -> Scheduler:
        self._check_open()
        assert self._sched is not None
        return self._sched

    @property
    def parallel(self) -> int:
        """Streams decoded together (the rest wait in the admission queue)."""
        return self._scheduler().parallel

    @property
    def kv_layout(self) -> str:
        """``"unified"`` or ``"split"`` (see the class docstring)."""
        return "split" if self._scheduler().split else "unified"

    @property
    def n_ctx_seq(self) -> int:
        """Most tokens (prompt + reply) one stream may hold."""
        return self._scheduler().n_ctx_seq

    @property
    def _active(self) -> SeqStream | None:
        """A running stream, or None when none runs (tests check idleness with it)."""
        s = self._sched
        if s is None:
            return None
        active = s._active
        return active[0] if active else None

    def speculative_stats(self) -> dict[str, float]:
        """Draft tokens, accepted tokens, acceptance rate and tokens per target decode
        since start (ADR 0027)."""
        from inferd.backends.llamacpp.speculative import speculative_stats

        s = self._sched
        return speculative_stats(s.stats if s is not None else {})

    def kv_used(self) -> int:
        """KV cells held by running streams: 0 once every stream has ended."""
        return self._scheduler().kv_used()

    def kv_cells(self) -> list[tuple[int, int]]:
        """``(pos_min, pos_max)`` of every sequence id of the context (``(-1, -1)``:
        empty); slots first, then the prefix cache."""
        return self._scheduler().kv_cells()

    def clear_prefix_cache(self) -> None:
        """Forget cached prefixes: afterwards the KV cache is empty when idle, and no
        image or audio encode is kept (ADR 0032)."""
        self._scheduler().clear_prefix_cache(self._media_cache)

    def batching_stats(self) -> dict[str, int]:
        """Scheduler counters: steps, tokens, admitted, cached_tokens, paused, ..."""
        s = self._sched
        if s is None:
            return {}
        stats = dict(s.stats)
        if s.prompt_ram is not None:  # ADR 0030
            stats.update(s.prompt_ram.counters())
        if self._media_cache is not None:  # ADR 0032
            stats.update(self._media_cache.stats)
        return stats

    def capabilities(self) -> Capabilities:
        """What this model can serve, derived once at load (a Router trusts it):
        ``embed`` for an embedding model (or ``embed=True``), ``thinking`` when the chat
        template can open a reasoning block."""
        return self._caps

    def _derive_capabilities(self) -> Capabilities:
        o = self.options
        pooling = embedding.resolve_pooling(self._model, o.pooling, o.embed)
        embed = pooling in embedding.SENTENCE_POOLING if o.embed is None else o.embed
        return Capabilities(
            v2=True,
            tools=True,
            vision=bool(self._mtmd is not None and self._mtmd.vision),
            audio=bool(self._mtmd is not None and self._mtmd.audio),
            thinking=template_thinks(self._template_source()),
            embed=embed,
            accelerator=self.accelerator(),
            tokenize=True,
            rerank=pooling == "rank",
        )

    def accelerator(self) -> AcceleratorInfo:
        """Where this model computes, from ggml's backend device list."""
        L = _llama()
        if self.options.rpc_servers and self._model is not None:  # ADR 0019
            remote = loader.rpc_devices(L, self.options.rpc_servers)
            return AcceleratorInfo(
                "remote",
                self.options.n_gpu_layers or int(self._model.n_layer) + 1,
                "ggml RPC: " + ", ".join(self.options.rpc_servers),
                sum(d.memory_total for d in remote),
                remote,
            )
        devs = L.devices()
        gpus = [d for d in devs if d["type"] in ("gpu", "igpu")]
        n_gpu_layers = self.options.n_gpu_layers
        if gpus and n_gpu_layers != 0:
            d = gpus[0]
            label = f"{d['name']} {d['description']}".lower()
            kind = (
                "cuda"
                if "cuda" in label
                else "metal"
                if "metal" in label
                else "vulkan"
                if "vulkan" in label
                else "rocm"
                if "rocm" in label or "hip" in label
                else "cuda"
            )
            layers = n_gpu_layers
            if layers < 0 and self._model is not None and not self._closed:
                layers = int(self._model.n_layer) + 1
            return AcceleratorInfo(
                kind, layers, d["description"] or d["name"], int(d["memory_total"])
            )
        cpu = next((d for d in devs if d["type"] == "cpu"), None)
        return AcceleratorInfo("cpu", 0, cpu["description"] if cpu else "CPU", 0)

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            if self._lock is not None and self._lock.locked():
                raise BackendUnavailable(
                    f"backend {self.name!r} is busy serving another event loop"
                )
            self._lock = asyncio.Lock()
            self._lock_loop = loop
        return self._lock

    # ------------------------------------------------------------------ prompt

    def chat_template(self) -> ChatTemplate:
        """The compiled chat template (the override, else the model's own)."""
        self._check_open()
        if self._template is None:
            m = self._model
            bos = m.token_text(m.bos) if m.bos >= 0 else ""
            eos = m.token_text(m.eos) if m.eos >= 0 else ""
            self._template = from_model(
                m.chat_template,
                model_name=m.name,
                bos_token=bos,
                eos_token=eos,
                override=self.options.chat_template,
            )
        return self._template

    def plan(self, request: Request) -> ChatPlan:
        """Tool format, prompt inputs and grammar for ``request`` (``inferd.chat.plan``)."""
        return plan_chat(self._template_source(), request, tool_format=self.options.tool_format)

    def render(self, request: Request, plan: ChatPlan | None = None) -> str:
        """The prompt text the model sees for ``request``."""
        plan = plan or self.plan(request)
        template = self.chat_template()
        kwargs = {**plan.template_kwargs, **reasoning_kwargs(template.source, request)}
        return template.render(
            plan.messages, tools=plan.tools, add_generation_prompt=True, **kwargs
        )

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Prompt tokens: special tokens in the text are parsed (the template wrote them);
        BOS is added when the model wants one and the template did not write it."""
        m = self._model
        toks: list[int] = m.tokenize(prompt, add_special=False, parse_special=True)
        if m.add_bos and m.bos >= 0 and (not toks or toks[0] != m.bos):
            toks.insert(0, m.bos)
        return toks

    def _sampler(
        self, request: Request, plan: ChatPlan | None = None, prompt: list[int] | None = None
    ) -> Any:
        """This sequence's own chain (ADR 0021); ``prompt`` tokens are shown to its
        penalties and DRY first, as llama-server does."""
        L = _llama()
        o = self.options
        try:
            sampler = L.Sampler(
                self._model,
                **sampler_kwargs(
                    request,
                    repeat_penalty=o.repeat_penalty,
                    frequency_penalty=o.frequency_penalty,
                    presence_penalty=o.presence_penalty,
                    n_ctx_seq=self.n_ctx_seq,
                ),
                **self._grammar_args(plan or self.plan(request)),
            )
        except ValueError as e:  # e.g. a logit_bias id outside this model's vocabulary
            raise InvalidRequest(str(e)) from None
        if prompt:
            sampler.accept_prompt(prompt)
        return sampler

    def _grammar_args(self, plan: ChatPlan) -> dict[str, Any]:
        g = plan.grammar
        if g is None:
            return {}
        if not g.lazy:
            return {"grammar": g.text, "grammar_root": g.root}
        if not getattr(_llama(), "LAZY_GRAMMAR", False):
            return {}  # binding without lazy grammars: "auto" calls stay unconstrained
        m = self._model
        tokens = []
        for word in g.trigger_tokens:
            toks = m.tokenize(word, add_special=False, parse_special=True)
            if len(toks) == 1:
                tokens.append(toks[0])
        return {
            "grammar": g.text,
            "grammar_root": g.root,
            "grammar_trigger_patterns": list(g.trigger_patterns),
            "grammar_trigger_tokens": tokens,
        }

    # ------------------------------------------------------------------ generation

    async def _prepare_off_loop(
        self, request: Request
    ) -> tuple[list[int], list[Any], list[OutputParser], bool]:
        """``_prepare_choices``, off the event loop where it is slow: preparing a DRY
        sampler walks the vocabulary (up to ~100 ms for new settings), and media are
        decoded and resized (tens of ms per image, GIL released), so one client's
        request never stalls others."""
        if request.dry_multiplier or media.has_media(request):
            return await asyncio.to_thread(self._prepare_choices, request)
        return self._prepare_choices(request)

    async def generate(self, request: Request) -> AsyncIterator[Event]:  # type: ignore[override]
        start = time.perf_counter()
        tokens, samplers, parsers, special = await self._prepare_off_loop(request)
        top = (request.top_logprobs or 0) if request.logprobs else None
        # Pre-stream: InvalidRequest (never fits) / QueueFull raise from here; the
        # scheduler fits max_tokens to the sequence (stream.max_tokens).
        streams = self._scheduler().submit_choices(
            tokens,
            samplers,
            max_tokens=request.max_tokens,
            ignore_eos=request.ignore_eos,
            special=special,
            top_logprobs=top,
            media=getattr(tokens, "media", None),
            speculative=request.speculative,
            lora=loader.request_lora_scales(request.lora, self.options),
        )
        readers = [
            ChoiceReader(i, s, p, request.stop)
            for i, (s, p) in enumerate(zip(streams, parsers, strict=True))
        ]
        started, stops = False, CallStops(request)
        try:
            async for ev in merged(
                readers,
                ignore_eos=request.ignore_eos,
                end_item=self._end_item,
                check_open=self._check_generating,
                n_prompt=len(tokens),
                start=start,
                backend=self.name,
            ):
                started = True
                yield stops.see(ev)
        except (InferdError, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as e:
            # A bug after the first event (e.g. in an output parser) must still end the
            # stream as the contract says: BackendUnavailable, never a silent truncation.
            if not started:
                raise
            raise BackendUnavailable(
                f"generation failed mid-stream: {type(e).__name__}: {e}"
            ) from e
        finally:
            for r in readers:
                if not r.stream.done:
                    # Left early (break, aclose, cancellation) or stopped on a stop
                    # sequence: the sequence ends at the next step. Waiting for that (at
                    # most one step) means a caller who breaks and generates again finds
                    # the cells free.
                    r.stream.cancel(keep=r.stop_reason is not None)
            for r in readers:
                await r.stream.freed()

    def _check_generating(self) -> None:
        if self._closed:  # tokens still queued when close() ran
            raise BackendUnavailable(f"backend {self.name!r} was closed during generation")

    def _prepare_choices(
        self, request: Request
    ) -> tuple[list[int], list[Any], list[OutputParser], bool]:
        """(pre-stream) :meth:`_prepare` once per choice (``Request.n``): choice ``i``
        samples with ``seed + i`` (or its own random seed) and parses on its own; they
        share the prompt tokens, prefilled once (docs/adr/0022-n-choices-and-logprobs.md)."""
        tokens, sampler, parser, special = self._prepare(request)
        samplers, parsers = [sampler], [parser]
        for i in range(1, request.n):
            seed = choice_seed(request.seed, i)
            _, smp, par, _ = self._prepare(dataclasses.replace(request, seed=seed))
            samplers.append(smp)
            parsers.append(par)
        return tokens, samplers, parsers, special

    def _prepare(self, request: Request) -> tuple[list[int], Any, OutputParser, bool]:
        """(pre-stream) Prompt tokens, sampler, output parser and whether control tokens
        are rendered as text, for a request this backend can serve."""
        self._check_open()
        if not isinstance(request, Request):
            raise InvalidRequest(f"generate() needs a Request, got {type(request).__name__}")
        reason = self.capabilities().covers(request)
        if reason is not None:
            raise InvalidRequest(f"backend {self.name!r} cannot serve this request: {reason}")
        refuse_unhonoured(request, self.name, LLAMACPP_HONOURED)
        loader.request_lora_check(request.lora, self.options)
        if request.prompt is not None:
            return self._prepare_raw(request)
        if media.has_media(request):
            return self._prepare_media(request)
        plan = self.plan(request)
        prompt = self.render(request, plan)
        factory = self.options.output_parser
        parser: OutputParser = (
            factory(self._template_source(), prompt, request)
            if factory is not None
            else plan.parser(prompt, stream_arguments=request.stream_tool_arguments)
        )
        # Tool-call and thinking sentinels are often control tokens: render them.
        special = plan.format != "plain"
        tokens = self.tokenize_prompt(prompt)
        return tokens, self._sampler(request, plan, tokens), parser, special

    def _prepare_media(self, request: Request) -> tuple[list[int], Any, OutputParser, bool]:
        """A chat request with images or audio: each block becomes libmtmd's marker in the
        rendered prompt, which the projector splits into text and media chunks; the
        tokens carry placeholders for the media cells (:mod:`.media`, ADR 0028)."""
        if self._mtmd is None:
            raise InvalidRequest(
                f"backend {self.name!r} has no projector: create it with mmproj= to send "
                "images or audio"
            )
        text_request, items = media.split_media(request, self._mtmd.marker)
        plan = self.plan(text_request)
        prompt = self.render(text_request, plan)
        factory = self.options.output_parser
        parser: OutputParser = (
            factory(self._template_source(), prompt, text_request)
            if factory is not None
            else plan.parser(prompt, stream_arguments=request.stream_tool_arguments)
        )
        toks, mp = media.tokenize(
            self._mtmd,
            self._model,
            prompt,
            items,
            self.options.media_limits(),
            self._media_cache,
        )
        tokens = media.MediaTokens(toks, mp)
        sampler = self._sampler(text_request, plan, [t for t in toks if t >= 0])
        return tokens, sampler, parser, plan.format != "plain"

    def _prepare_raw(self, request: Request) -> tuple[list[int], Any, OutputParser, bool]:
        """A raw completion: the prompt tokenized as it is (BOS when the model wants one,
        special tokens written in it parsed, as llama-server's ``/completion``), no
        template, and a plain parser: no tool or reasoning syntax is read from the text
        (docs/adr/0025-raw-completions-and-reasoning.md)."""
        plan = plan_chat(None, request, tool_format="plain")
        tokens = self.tokenize_prompt(request.prompt or "")
        sampler = self._sampler(request, plan, tokens)
        return tokens, sampler, plan.parser(request.prompt or ""), False

    def _end_item(self, item: tuple[Any, ...], started: bool) -> StopReason:
        """The stop reason of a non-token item, or the error it carries."""
        kind = item[0]
        if kind == "full":
            return StopReason.MAX_TOKENS
        if kind == "error":
            err = item[1]
            if isinstance(err, InferdError) and not started:
                raise err
            raise BackendUnavailable(
                f"llama.cpp failed {'during' if started else 'before'} generation: "
                f"{type(err).__name__}: {err}"
            ) from err
        # "end": the worker stopped without a reason (closed under us)
        raise BackendUnavailable(f"backend {self.name!r} was closed during generation")

    def _template_source(self) -> str | None:
        override = self.options.chat_template
        return override or (self._model.chat_template if self._model else None)

    # ------------------------------------------------------------------ embeddings

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """L2-normalised embeddings, pooled as the model was trained to (or as
        ``pooling=`` says), many inputs per decode; ``dimensions`` only for a Matryoshka
        model (:mod:`.embedding`); ``EmbedUnsupported`` when ``capabilities().embed``
        is false."""
        self._check_open()
        if not isinstance(request, EmbedRequest):
            raise InvalidRequest(f"embed() needs an EmbedRequest, got {type(request).__name__}")
        if not self._caps.embed:
            raise EmbedUnsupported(
                f"backend {self.name!r}: model {self.model_name!r} is not an embedding model "
                "(its GGUF declares no pooling type); create LlamaCpp with embed=True to "
                "mean-pool its hidden states anyway"
            )
        vectors, n_tokens = await self._in_worker("embed", request.input, request.dimensions)
        dims = len(vectors[0]) if vectors else 0
        return EmbedResult(
            tuple(tuple(v) for v in vectors), dims, self.model_name, Usage(n_tokens, 0, 0)
        )

    async def embed_tokens(self, text: str) -> list[list[float]]:
        """One vector per token of ``text`` (a model opened with ``pooling="none"``)."""
        self._check_open()
        if not isinstance(text, str):
            raise InvalidRequest(f"embed_tokens() needs a string, got {type(text).__name__}")
        return await self._in_worker("embed_tokens", text)  # type: ignore[no-any-return]

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """Relevance scores of ``request.documents`` for the query from a reranker GGUF
        (rank pooling), batched like :meth:`embed`; raw classifier outputs, as
        llama-server's ``/v1/rerank`` gives them (docs/adr/0018-embeddings-rerank-tokens.md)."""
        self._check_open()
        if not isinstance(request, RerankRequest):
            raise InvalidRequest(f"rerank() needs a RerankRequest, got {type(request).__name__}")
        if not self._caps.rerank:
            raise EmbedUnsupported(
                f"backend {self.name!r}: model {self.model_name!r} is not a reranker (its "
                "GGUF declares no rank pooling; open it with pooling='rank' if it has a "
                "classifier head)"
            )
        scores, n = await self._in_worker("rerank", request.query, request.documents)
        return RerankResult(tuple(scores), self.model_name, Usage(n, 0, 0))

    async def _in_worker(self, method: str, *args: Any) -> Any:
        """Run ``Embedder.<method>`` in the worker thread, one call at a time."""
        lock = self._get_lock()
        await lock.acquire()
        loop = asyncio.get_running_loop()
        try:
            self._check_open()
            fut = loop.run_in_executor(self._executor, self._embedder_call, method, args)
        except BaseException:
            lock.release()
            raise
        fut.add_done_callback(lambda _f: lock.release())
        return await asyncio.shield(fut)

    def _embedder_call(self, method: str, args: tuple[Any, ...]) -> Any:
        if self._ectx is None:
            o = self.options
            pooling = embedding.resolve_pooling(self._model, o.pooling, o.embed) or "mean"
            self._ectx = embedding.Embedder(
                _llama(),
                self._model,
                pooling=pooling,
                n_ctx=o.embed_n_ctx,
                n_threads=o.n_threads,
                matryoshka_dims=o.matryoshka_dims,
            )
        return getattr(self._ectx, method)(*args)

    # ------------------------------------------------------------------ tokens

    async def tokenize(
        self,
        content: str | list[str | int],
        *,
        add_special: bool = False,
        parse_special: bool = True,
    ) -> list[int]:
        """Token ids as llama-server's ``/tokenize`` gives them: a list mixes text and ids,
        and ``add_special`` applies to its first item only. Runs in a thread (a body may
        hold megabytes of text; the vocabulary is read-only, safe beside decoding)."""
        self._check_open()
        return await asyncio.to_thread(self._tokenize_mixed, content, add_special, parse_special)

    def _tokenize_mixed(
        self, content: str | list[str | int], add_special: bool, parse_special: bool
    ) -> list[int]:
        m = self._model
        items = [content] if isinstance(content, str) else content
        out: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                out += m.tokenize(
                    item, add_special=add_special and i == 0, parse_special=parse_special
                )
            else:
                out.append(self._token_id(item))
        return out

    def _token_id(self, token: Any) -> int:
        n = int(self._model.n_vocab)
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < n:
            raise InvalidRequest(f"token {echo(token)} is not an id of this model (0..{n - 1})")
        return token

    async def token_pieces(self, tokens: list[int]) -> list[bytes]:
        """The bytes of each token, control tokens rendered (llama-server's pieces)."""
        self._check_open()
        m = self._model

        def pieces() -> list[bytes]:
            return [m.token_to_piece(self._token_id(t), special=True) for t in tokens]

        return await asyncio.to_thread(pieces)

    async def detokenize(self, tokens: list[int]) -> str:
        """The pieces of ``tokens`` joined (llama-server's ``/detokenize``)."""
        pieces = await self.token_pieces(tokens)
        return b"".join(pieces).decode("utf-8", "replace")

    async def apply_template(self, request: Request) -> str:
        """The prompt :meth:`generate` would feed the model for ``request``."""
        self._check_open()
        return self.render(request)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Free context and model now; running generation stops within one step."""
        if self._closed:
            return
        self._closed = True
        if self._sched is not None:
            self._sched.close()  # open streams end with BackendUnavailable
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._release()

    def _release(self) -> None:
        if self._spec is not None:
            self._spec.close()
            self._spec = None
        for obj in (self._ectx, self._ctx, self._model):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self._ectx = self._ctx = self._model = None
        if self._media_cache is not None:  # its floats go with the model
            self._media_cache.clear()
        if self._mf is not None:
            self._mf.cleanup()
            self._mf = None

    stop = close

    async def aclose(self) -> None:
        """Stop generation, then free context and model (in a thread: may wait a step)."""
        if self._closed:
            return
        await asyncio.to_thread(self.close)

    def __del__(self) -> None:
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"model={getattr(self, 'model_name', '?')!r}"
        return f"<LlamaCpp {state} n_ctx={getattr(self, '_n_ctx', '?')}>"
