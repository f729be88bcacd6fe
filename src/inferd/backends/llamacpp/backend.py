"""``LlamaCpp``: a :class:`~inferd.backend.Backend` that runs GGUF models in-process.

How a request flows:

1. (event loop) validate, render the model's chat template, tokenize, build a sampler;
   problems here raise from the first ``__anext__`` (pre-stream).
2. (worker thread) decode the prompt in ``n_batch`` chunks, then one
   ``Context.step`` per token (decode + sample with the GIL released). Each token goes
   to the event loop through a bounded hand-off: the worker waits when the consumer
   has not taken the last :data:`PIPELINE_DEPTH` tokens (backpressure) and checks the
   cancel flag between decode steps (cancellation within one step).
3. (event loop) bytes -> text with an incremental UTF-8 decoder (a character split
   across tokens is held until complete), stop sequences held back until they can no
   longer match, the per-model output parser, then events and one ``Done``.

One worker thread owns the libllama context; an asyncio lock serialises requests (a
later issue adds continuous batching: many sequences of one context in one decode).
The lock is released by the worker's completion, not by the consumer, so a cancelled
consumer can never let a second request touch the context while the first is still
inside ``llama_decode``. The sequence's KV cells are removed when its worker ends.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from inferd.backend import Backend
from inferd.backends.llamacpp import loader
from inferd.backends.llamacpp.chat_template import ChatTemplate, from_model
from inferd.backends.llamacpp.output import OutputParser, ParserFactory
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

#: Tokens the worker may run ahead of a slow consumer before it waits.
PIPELINE_DEPTH = 8
#: Sampling defaults when a request leaves a field unset (llama-server's defaults).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
_SEQ = 0  # the sequence id single-stream generation uses


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


class _Job:
    """One generation's hand-off between the worker thread and the event loop."""

    __slots__ = ("cancelled", "loop", "queue", "room")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.room = threading.Semaphore(PIPELINE_DEPTH)
        self.cancelled = False

    def put(self, item: tuple[Any, ...], *, wait: bool = True) -> bool:
        """Send ``item`` to the consumer; False when the consumer is gone."""
        if wait:
            while not self.room.acquire(timeout=0.05):
                if self.cancelled:
                    return False
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self.cancelled = True
            return False
        return True


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
    ) -> None:
        if n_ctx < 16:
            raise InvalidRequest(f"n_ctx={n_ctx} is too small (at least 16 tokens)")
        if n_batch < 1:
            raise InvalidRequest(f"n_batch={n_batch} must be >= 1")
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
        path = self._resolve(model)
        self._mf = loader.prepare(path, sha256=sha256)
        try:
            self._model = L.Model(str(self._mf.path), n_gpu_layers=n_gpu_layers,
                                  use_mmap=use_mmap, progress=progress)
            self._ctx = L.Context(self._model, n_ctx=n_ctx, n_batch=n_batch,
                                  n_threads=n_threads)
        except BaseException:
            self._release()
            raise
        self._n_ctx = int(self._ctx.n_ctx)
        self._n_batch = int(self._ctx.n_batch)
        self._n_threads = n_threads
        self._n_gpu_layers = n_gpu_layers
        self._embed_n_ctx = embed_n_ctx
        self._batch = L.Batch(self._n_batch, 1)
        self._penalties = (repeat_penalty, frequency_penalty, presence_penalty)
        self._template_override = chat_template
        self._template: ChatTemplate | None = None
        self._parser_factory: ParserFactory | None = output_parser
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inferd-llama")
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._active: _Job | None = None
        self._idle = threading.Event()
        self._idle.set()
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

    def capabilities(self) -> Capabilities:
        return Capabilities(v2=True, tools=True, vision=False, audio=False,
                            thinking=True, embed=True, accelerator=self.accelerator())

    def accelerator(self) -> AcceleratorInfo:
        """Where this model computes, from ggml's backend device list."""
        L = _llama()
        devs = L.devices()
        gpus = [d for d in devs if d["type"] in ("gpu", "igpu")]
        if gpus and self._n_gpu_layers != 0:
            d = gpus[0]
            label = f"{d['name']} {d['description']}".lower()
            kind = ("cuda" if "cuda" in label else "metal" if "metal" in label
                    else "vulkan" if "vulkan" in label else "rocm" if "rocm" in label
                    or "hip" in label else "cuda")
            layers = self._n_gpu_layers
            if layers < 0 and self._model is not None and not self._closed:
                layers = int(self._model.n_layer) + 1
            return AcceleratorInfo(kind, layers, d["description"] or d["name"],
                                   int(d["memory_total"]))
        cpu = next((d for d in devs if d["type"] == "cpu"), None)
        return AcceleratorInfo("cpu", 0, cpu["description"] if cpu else "CPU", 0)

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            if self._lock is not None and self._lock.locked():
                raise BackendUnavailable(
                    f"backend {self.name!r} is busy serving another event loop")
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
            self._template = from_model(m.chat_template, model_name=m.name, bos_token=bos,
                                        eos_token=eos, override=self._template_override)
        return self._template

    def plan(self, request: Request) -> ChatPlan:
        """Tool format, prompt inputs and grammar for ``request`` (``inferd.chat.plan``)."""
        return plan_chat(self._template_source(), request, tool_format=self._tool_format)

    def render(self, request: Request, plan: ChatPlan | None = None) -> str:
        """The prompt text the model sees for ``request``."""
        plan = plan or self.plan(request)
        return self.chat_template().render(plan.messages, tools=plan.tools,
                                           add_generation_prompt=True,
                                           **plan.template_kwargs)

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
                temperature=DEFAULT_TEMPERATURE if request.temperature is None
                else float(request.temperature),
                top_k=DEFAULT_TOP_K if request.top_k is None else int(request.top_k),
                top_p=DEFAULT_TOP_P if request.top_p is None else float(request.top_p),
                min_p=DEFAULT_MIN_P if request.min_p is None else float(request.min_p),
                repeat_penalty=rep, frequency_penalty=freq, presence_penalty=pres,
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
        return {"grammar": g.text, "grammar_root": g.root,
                "grammar_trigger_patterns": list(g.trigger_patterns),
                "grammar_trigger_tokens": tokens}

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
        if n_prompt >= self._n_ctx:
            raise InvalidRequest(
                f"the prompt is {n_prompt} tokens but the context holds {self._n_ctx}; "
                "shorten the conversation or create LlamaCpp with a larger n_ctx")
        room = self._n_ctx - n_prompt
        max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
        sampler = self._sampler(request, plan)
        parser: OutputParser = (
            self._parser_factory(self._template_source(), prompt, request)
            if self._parser_factory is not None else plan.parser(prompt))
        # Tool-call and thinking sentinels are often control tokens: render them.
        special = plan.format != "plain"
        stops = request.stop

        lock = self._get_lock()
        await lock.acquire()
        loop = asyncio.get_running_loop()
        job = _Job(loop)
        try:
            self._check_open()
            fut = loop.run_in_executor(self._executor, self._work, job, tokens, sampler,
                                       max_tokens, request.ignore_eos)
        except BaseException:
            lock.release()
            raise
        # The worker's end (not ours) frees the lock: see the module docstring.
        fut.add_done_callback(lambda _f: lock.release())
        self._active = job

        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        model = self._model
        pending = ""
        produced = 0
        first: float | None = None
        stop_reason: StopReason | None = None
        started = False
        try:
            while stop_reason is None:
                item = await job.queue.get()
                kind = item[0]
                if kind == "tok":
                    job.room.release()
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
                        f"{type(err).__name__}: {err}") from err
                else:  # "end": the worker stopped without a reason (closed under us)
                    raise BackendUnavailable(
                        f"backend {self.name!r} was closed during generation")
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
            yield Done(stop_reason, Usage(n_prompt, produced, 0),
                       Timings.measure(start, first, end, produced), self.name)
        except (InferdError, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as e:
            # A bug after the first event (e.g. in an output parser) must still end the
            # stream as the contract says: BackendUnavailable, never a silent truncation.
            if not started:
                raise
            raise BackendUnavailable(
                f"generation failed mid-stream: {type(e).__name__}: {e}") from e
        finally:
            job.cancelled = True
            job.room.release(PIPELINE_DEPTH)  # wake a worker waiting for room, now
            if self._active is job:
                self._active = None
            if not fut.done():
                # Wait (at most one decode step) so that a caller who breaks and then
                # generates again finds the context free; a second cancellation while
                # waiting is honoured -- the lock is still released by the worker.
                await asyncio.shield(fut)

    def _template_source(self) -> str | None:
        return self._template_override or (self._model.chat_template if self._model else None)

    def _work(self, job: _Job, tokens: list[int], sampler: Any, max_tokens: int,
              ignore_eos: bool) -> None:
        """Worker thread: prompt, then decode/sample until told to stop."""
        self._idle.clear()
        ctx, model, batch = self._ctx, self._model, self._batch
        try:
            if ctx is None or ctx.closed:
                return
            ctx.seq_rm(_SEQ)
            n, nb = len(tokens), self._n_batch
            last = 0
            for i in range(0, n, nb):
                if job.cancelled:
                    return
                batch.clear()
                last = batch.add_sequence(tokens[i:i + nb], i, _SEQ, i + nb >= n)
                ctx.decode(batch)
            tok = sampler.sample(ctx, last)
            pos, produced = n, 0
            while True:
                eog = model.is_eog(tok)
                if not job.put(("tok", tok, eog)):
                    return
                produced += 1
                if (eog and not ignore_eos) or produced >= max_tokens or job.cancelled:
                    return
                if pos >= self._n_ctx:
                    job.put(("full",), wait=False)
                    return
                tok = ctx.step(sampler, tok, pos, _SEQ)
                pos += 1
        except BaseException as e:  # handed to the consumer, which raises it
            job.put(("error", e), wait=False)
        finally:
            try:
                if ctx is not None and not ctx.closed:
                    ctx.seq_rm(_SEQ)
            except Exception:
                pass
            self._idle.set()

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
        return EmbedResult(tuple(tuple(v) for v in vectors), dims, self.model_name,
                           Usage(n_tokens, 0, 0))

    def _embed_work(self, request: EmbedRequest) -> tuple[list[list[float]], int]:
        L = _llama()
        if self._ectx is None:
            n = self._embed_n_ctx or min(int(self._model.n_ctx_train) or 2048, 2048)
            # Pooled embeddings need the whole input in one micro-batch.
            self._ectx = L.Context(self._model, n_ctx=n, n_batch=n, n_ubatch=n,
                                   n_threads=self._n_threads, embeddings=True, pooling="mean")
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
                    f"{batch.capacity} (pass embed_n_ctx= to LlamaCpp for more)")
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
        job = self._active
        if job is not None:
            job.cancelled = True
            job.room.release(PIPELINE_DEPTH)
        self._idle.wait(timeout=30.0)
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
        job = self._active
        if job is not None:
            job.cancelled = True
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
