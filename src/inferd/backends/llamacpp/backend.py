"""``LlamaCpp``: a :class:`~inferd.backend.Backend` that runs GGUF models in-process.

How a request flows:

1. (event loop) validate, render the model's chat template, tokenize, build a sampler;
   problems here raise from the first ``__anext__`` (pre-stream).
2. (scheduler thread, :mod:`.scheduler`) the sequence waits in a bounded FCFS queue
   for one of ``parallel`` sequence slots, then shares every decode step with the
   other running sequences: one batch holds each one's next token plus prompt chunks
   of new ones, one ``llama_decode`` (GIL released), one draw per sequence from its
   own sampler chain. Tokens reach the event loop through a bounded hand-off: a
   consumer that falls :data:`.scheduler.PIPELINE_DEPTH` tokens behind pauses its
   sequence only.
   A prompt prefix already in the KV cache (a running or recently finished sequence)
   is copied, not recomputed; with ``kv_layout="split"`` only a prefix still held by
   the slot the request gets (one KV stream per slot, ADR 0008). Pacing: when the
   compute threads take every CPU the scheduler waits briefly for consumers before the
   next decode (*lock-step*), because an event-loop thread preempting a compute thread
   mid-graph makes ggml's barriers stall the whole step (measured on 2 cores: 45 tok/s
   overlapped vs 110 tok/s raw).
3. (event loop) bytes -> text with an incremental UTF-8 decoder (a character split
   across tokens is held until complete), stop sequences held back until they can no
   longer match, the per-model output parser, then events and one ``Done``.

One scheduler thread owns the libllama context (ADR 0008); cancelling a stream frees
its sequence and KV cells at the next step, and the consumer waits for that before it
returns, so nothing outlives its stream.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from inferd.backend import Backend
from inferd.backends.llamacpp import loader
from inferd.backends.llamacpp.chat_template import ChatTemplate, from_model
from inferd.backends.llamacpp.output import OutputParser, ParserFactory
from inferd.backends.llamacpp.scheduler import (
    DEFAULT_MAX_QUEUED,
    DEFAULT_PREFIX_CACHE,
    DEFAULT_STEP_TOKENS,
    Scheduler,
    SeqStream,
    check_kv_layout,
)
from inferd.chat import parser_class
from inferd.chat.plan import ChatPlan, plan_chat
from inferd.errors import (
    BackendUnavailable,
    InferdError,
    InvalidRequest,
    ModelLoadError,
    NotReady,
)
from inferd.types import (
    AcceleratorInfo,
    Capabilities,
    Done,
    EmbedRequest,
    EmbedResult,
    Event,
    Request,
    StopReason,
    Timings,
    Usage,
)

#: Default ``parallel`` on CPU: at most this many sequences, and one per this many
#: context tokens (a CPU step gets slower with every sequence; a GPU one barely does).
CPU_MAX_PARALLEL = 8
GPU_MAX_PARALLEL = 32
CTX_PER_SLOT = 512
#: Sampling defaults when a request leaves a field unset (llama-server's defaults).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05


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


def _earliest_stop(buf: str, stops: tuple[str, ...]) -> tuple[int, str]:
    best, which = -1, ""
    for s in stops:
        i = buf.find(s)
        if i >= 0 and (best < 0 or i < best):
            best, which = i, s
    return best, which


def _holdback(buf: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``buf`` that could still grow into a stop sequence."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(buf)), n, -1):
            if buf.endswith(s[:k]):
                n = k
                break
    return n


class LlamaCpp(Backend):
    """Run a GGUF model in this process through libllama.

    ``model`` is a path to a ``.gguf`` file or a model-store name (``"smollm2-135m"``,
    resolved with :func:`inferd.models.resolve`). Loading happens in the constructor
    (use ``await LlamaCpp.open(...)`` to load off the event loop).

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
    :param overlap: let decoding run ahead of the consumer (default: only when a CPU is
        left over beyond ``n_threads``; see the module docstring).
    :param parallel: streams decoded together on one context (default:
        ``min(8, n_ctx // 512)`` on CPU, ``min(32, n_ctx // 512)`` with GPU layers).
    :param n_ctx_seq: most tokens one stream (prompt + reply) may hold (default
        ``n_ctx // parallel``); larger values oversubscribe the cache, and a stream
        then waits in the queue until the cache can hold its worst case.
    :param max_queued: streams that may wait for a slot; beyond, ``QueueFull``.
    :param step_tokens: tokens per decode step (running streams + prompt chunks).
    :param prefix_cache: finished streams kept in the KV cache for prefix reuse
        (unified layout; with the split layout any value above 0 turns on in-slot reuse).
    :param kv_layout: ``"unified"`` (default): one KV cache shared by every stream,
        requests may oversubscribe it; ``"split"``: each of the ``parallel`` slots owns
        ``n_ctx // parallel`` cells (llama-server's ``-np`` slots), so a stream's
        attention never spans the others', a prompt must fit one slot (a larger
        ``max_tokens`` is shortened to what the slot has left), and prefix reuse stays
        in a slot (ADR 0008). libllama rounds a slot up to a multiple of 256 cells,
        which can make ``n_ctx`` larger than asked.
    """

    name = "llamacpp"

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        sha256: str | None = None,
        chat_template: str | None = None,
        use_mmap: bool = True,
        output_parser: ParserFactory | None = None,
        tool_format: str | None = None,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        embed_n_ctx: int | None = None,
        progress: Callable[[float], Any] | None = None,
        name: str | None = None,
        overlap: bool | None = None,
        parallel: int | None = None,
        n_ctx_seq: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        prefix_cache: int = DEFAULT_PREFIX_CACHE,
        kv_layout: str = "unified",
    ) -> None:
        if n_ctx < 16:
            raise InvalidRequest(f"n_ctx={n_ctx} is too small (at least 16 tokens)")
        if n_batch < 1:
            raise InvalidRequest(f"n_batch={n_batch} must be >= 1")
        if parallel is None:
            cap = GPU_MAX_PARALLEL if n_gpu_layers != 0 else CPU_MAX_PARALLEL
            parallel = max(1, min(cap, n_ctx // CTX_PER_SLOT))
        if parallel < 1:
            raise InvalidRequest(f"parallel={parallel} must be >= 1")
        if max_queued < 0 or step_tokens < 1 or prefix_cache < 0:
            raise InvalidRequest(
                f"max_queued={max_queued} and prefix_cache={prefix_cache} must be >= 0, "
                f"step_tokens={step_tokens} >= 1"
            )
        split = check_kv_layout(kv_layout)
        if name:
            self.name = name
        if tool_format is not None:
            parser_class(tool_format)  # an unknown name fails here, not per request
        self._tool_format = tool_format
        L = _llama()
        self._closed = False
        self._mf: loader.ModelFile | None = None
        self._model: Any = None
        self._ctx: Any = None
        self._ectx: Any = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._sched: Scheduler | None = None
        path = self._resolve(model)
        self._mf = loader.prepare(path, sha256=sha256)
        try:
            self._model = L.Model(
                str(self._mf.path), n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, progress=progress
            )
            # Unified KV cache: sequences share cells (prefix reuse is free) and every
            # step decodes as one micro-batch; spare ids hold cached prefixes. Split: one
            # stream of cells per slot and no spare ids, each would cost a whole stream
            # (ADR 0008).
            self._ctx = L.Context(
                self._model,
                n_ctx=n_ctx,
                n_batch=max(n_batch, parallel + 1),
                n_seq_max=parallel if split else parallel + prefix_cache,
                n_threads=n_threads,
                kv_unified=not split,
            )
        except BaseException:
            self._release()
            raise
        self._n_ctx = int(self._ctx.n_ctx)
        self._n_batch = int(self._ctx.n_batch)
        self._n_threads = n_threads
        cpus = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
        threads = n_threads or cpus
        #: lock-step pacing when the compute threads use every CPU (see module docstring)
        self._lockstep = (threads >= cpus) if overlap is None else not overlap
        self._n_gpu_layers = n_gpu_layers
        self._embed_n_ctx = embed_n_ctx
        self._penalties = (repeat_penalty, frequency_penalty, presence_penalty)
        self._template_override = chat_template
        self._template: ChatTemplate | None = None
        self._parser_factory: ParserFactory | None = output_parser
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inferd-llama"
        )
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        try:
            self._sched = Scheduler(
                self._ctx,
                self._model,
                L.Batch,
                parallel=parallel,
                n_ctx_seq=n_ctx_seq or self._n_ctx // parallel,
                step_tokens=step_tokens,
                max_queued=max_queued,
                prefix_cache=prefix_cache,
                lockstep=self._lockstep,
                decode_sample=L.decode_sample,
                name=self.name,
                kv_layout=kv_layout,
            )
        except BaseException:
            self._release()
            raise
        self._idle = self._sched.idle
        self.model_name: str = self._model.name
        self.model_path: Path = self._mf.source

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _resolve(model: str | os.PathLike[str]) -> Path:
        text = os.fspath(model)
        if Path(text).expanduser().exists():
            return loader.check_path(text)
        try:
            from inferd.models import resolve
        except ImportError:  # pragma: no cover - the store ships with inferd
            return loader.check_path(text)
        return Path(resolve(text, pull=True, progress=False))

    @classmethod
    async def open(cls, model: str | os.PathLike[str], **kwargs: Any) -> LlamaCpp:
        """Construct (load the model) in a worker thread so the event loop stays free."""
        return await asyncio.to_thread(cls, model, **kwargs)

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

    def kv_used(self) -> int:
        """KV cells held by running streams: 0 once every stream has ended."""
        return self._scheduler().kv_used()

    def kv_cells(self) -> list[tuple[int, int]]:
        """``(pos_min, pos_max)`` of every sequence id of the context (``(-1, -1)``:
        empty); slots first, then the prefix cache."""
        return self._scheduler().kv_cells()

    def clear_prefix_cache(self) -> None:
        """Forget cached prefixes: afterwards the KV cache is empty when idle."""
        self._scheduler().clear_prefix_cache()

    def batching_stats(self) -> dict[str, int]:
        """Scheduler counters: steps, tokens, admitted, cached_tokens, paused, ..."""
        s = self._sched
        return dict(s.stats) if s is not None else {}

    def capabilities(self) -> Capabilities:
        return Capabilities(
            v2=True,
            tools=True,
            vision=False,
            audio=False,
            thinking=True,
            embed=True,
            accelerator=self.accelerator(),
        )

    def accelerator(self) -> AcceleratorInfo:
        """Where this model computes, from ggml's backend device list."""
        L = _llama()
        devs = L.devices()
        gpus = [d for d in devs if d["type"] in ("gpu", "igpu")]
        if gpus and self._n_gpu_layers != 0:
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
            layers = self._n_gpu_layers
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
                override=self._template_override,
            )
        return self._template

    def plan(self, request: Request) -> ChatPlan:
        """Tool format, prompt inputs and grammar for ``request`` (``inferd.chat.plan``)."""
        return plan_chat(self._template_source(), request, tool_format=self._tool_format)

    def render(self, request: Request, plan: ChatPlan | None = None) -> str:
        """The prompt text the model sees for ``request``."""
        plan = plan or self.plan(request)
        return self.chat_template().render(
            plan.messages, tools=plan.tools, add_generation_prompt=True, **plan.template_kwargs
        )

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Prompt tokens: special tokens in the text are parsed (the template wrote them);
        BOS is added when the model wants one and the template did not write it."""
        m = self._model
        toks: list[int] = m.tokenize(prompt, add_special=False, parse_special=True)
        if m.add_bos and m.bos >= 0 and (not toks or toks[0] != m.bos):
            toks.insert(0, m.bos)
        return toks

    def _sampler(self, request: Request, plan: ChatPlan | None = None) -> Any:
        L = _llama()
        rep, freq, pres = self._penalties
        try:
            return L.Sampler(
                self._model,
                temperature=DEFAULT_TEMPERATURE
                if request.temperature is None
                else float(request.temperature),
                top_k=DEFAULT_TOP_K if request.top_k is None else int(request.top_k),
                top_p=DEFAULT_TOP_P if request.top_p is None else float(request.top_p),
                min_p=DEFAULT_MIN_P if request.min_p is None else float(request.min_p),
                repeat_penalty=rep,
                frequency_penalty=freq,
                presence_penalty=pres,
                seed=request.seed,
                **self._grammar_args(plan or self.plan(request)),
            )
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

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

    async def generate(self, request: Request) -> AsyncIterator[Event]:  # type: ignore[override]
        start = time.perf_counter()
        self._check_open()
        if not isinstance(request, Request):
            raise InvalidRequest(f"generate() needs a Request, got {type(request).__name__}")
        reason = self.capabilities().covers(request)
        if reason is not None:
            raise InvalidRequest(f"backend {self.name!r} cannot serve this request: {reason}")
        plan = self.plan(request)
        prompt = self.render(request, plan)
        tokens = self.tokenize_prompt(prompt)
        n_prompt = len(tokens)
        sched = self._scheduler()
        sched.check_prompt(n_prompt)
        room = sched.n_ctx_seq - n_prompt
        max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
        sampler = self._sampler(request, plan)
        parser: OutputParser = (
            self._parser_factory(self._template_source(), prompt, request)
            if self._parser_factory is not None
            else plan.parser(prompt)
        )
        # Tool-call and thinking sentinels are often control tokens: render them.
        special = plan.format != "plain"
        stops = request.stop

        # Pre-stream: QueueFull / InvalidRequest (can never fit) raise from here.
        stream: SeqStream = sched.submit(
            tokens, sampler, max_tokens=max_tokens, ignore_eos=request.ignore_eos
        )

        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        model = self._model
        pending = ""
        produced = 0
        first: float | None = None
        stop_reason: StopReason | None = None
        started = False
        try:
            while stop_reason is None:
                item = await stream.get()
                kind = item[0]
                if self._closed:  # tokens still queued when close() ran
                    raise BackendUnavailable(f"backend {self.name!r} was closed during generation")
                if kind == "tok":
                    tok, eog = item[1], item[2]
                    if eog and not request.ignore_eos:
                        stop_reason = StopReason.END_TURN
                        break
                    produced += 1
                    pending += decoder.decode(model.token_to_piece(tok, special))
                    if stops:
                        at, _s = _earliest_stop(pending, stops)
                        if at >= 0:
                            out, pending = pending[:at], ""
                            stop_reason = StopReason.STOP_SEQUENCE
                        else:
                            keep = _holdback(pending, stops)
                            cut = len(pending) - keep
                            out, pending = pending[:cut], pending[cut:]
                    else:
                        out, pending = pending, ""
                    if out:
                        for ev in parser.feed(out):
                            if first is None:
                                first = time.perf_counter()
                            started = True
                            yield ev
                    if stop_reason is None and produced >= max_tokens:
                        stop_reason = StopReason.MAX_TOKENS
                elif kind == "full":
                    stop_reason = StopReason.MAX_TOKENS
                elif kind == "error":
                    err = item[1]
                    if isinstance(err, InferdError) and not started:
                        raise err
                    raise BackendUnavailable(
                        f"llama.cpp failed {'during' if started else 'before'} generation: "
                        f"{type(err).__name__}: {err}"
                    ) from err
                else:  # "end": the worker stopped without a reason (closed under us)
                    raise BackendUnavailable(f"backend {self.name!r} was closed during generation")
            if stop_reason is not StopReason.STOP_SEQUENCE:
                pending += decoder.decode(b"", final=True)
                if pending:
                    for ev in parser.feed(pending):
                        first = first or time.perf_counter()
                        yield ev
            for ev in parser.finish():
                first = first or time.perf_counter()
                yield ev
            end = time.perf_counter()
            yield Done(
                stop_reason,
                Usage(n_prompt, produced, stream.cached_tokens),
                Timings.measure(start, first, end, produced),
                self.name,
            )
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
            if not stream.done:
                # Left early (break, aclose, cancellation) or stopped on a stop sequence:
                # the sequence ends at the next step. Waiting for that (at most one step)
                # means a caller who breaks and generates again finds the cells free.
                stream.cancel(keep=stop_reason is not None)
            await stream.freed()

    def _template_source(self) -> str | None:
        return self._template_override or (self._model.chat_template if self._model else None)

    # ------------------------------------------------------------------ embeddings

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Mean-pooled, L2-normalised embeddings, truncated to ``request.dimensions``."""
        self._check_open()
        if not isinstance(request, EmbedRequest):
            raise InvalidRequest(f"embed() needs an EmbedRequest, got {type(request).__name__}")
        lock = self._get_lock()
        await lock.acquire()
        loop = asyncio.get_running_loop()
        try:
            self._check_open()
            fut = loop.run_in_executor(self._executor, self._embed_work, request)
        except BaseException:
            lock.release()
            raise
        fut.add_done_callback(lambda _f: lock.release())
        vectors, n_tokens = await asyncio.shield(fut)
        dims = len(vectors[0]) if vectors else 0
        return EmbedResult(
            tuple(tuple(v) for v in vectors), dims, self.model_name, Usage(n_tokens, 0, 0)
        )

    def _embed_work(self, request: EmbedRequest) -> tuple[list[list[float]], int]:
        L = _llama()
        if self._ectx is None:
            n = self._embed_n_ctx or min(int(self._model.n_ctx_train) or 2048, 2048)
            # Pooled embeddings need the whole input in one micro-batch.
            self._ectx = L.Context(
                self._model,
                n_ctx=n,
                n_batch=n,
                n_ubatch=n,
                n_threads=self._n_threads,
                embeddings=True,
                pooling="mean",
            )
            self._ebatch = L.Batch(n, 1)
        ctx, batch = self._ectx, self._ebatch
        out: list[list[float]] = []
        total = 0
        for i, text in enumerate(request.input):
            toks = self._model.tokenize(text, add_special=True, parse_special=False)
            if not toks:
                raise InvalidRequest(f"input[{i}] is empty after tokenization")
            if len(toks) > batch.capacity:
                raise InvalidRequest(
                    f"input[{i}] is {len(toks)} tokens; embeddings take at most "
                    f"{batch.capacity} (pass embed_n_ctx= to LlamaCpp for more)"
                )
            total += len(toks)
            ctx.clear()
            batch.clear()
            batch.add_sequence(toks, 0, 0, True)
            ctx.decode(batch)
            out.append(ctx.embedding(0, dimensions=request.dimensions, normalize=True))
        ctx.clear()
        return out, total

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
        for obj in (self._ectx, self._ctx, self._model):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self._ectx = self._ctx = self._model = None
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
