"""OpenAI legacy Completions (``/v1/completions``) <-> inferd types, both directions.

A raw completion is a :class:`~inferd.types.Request` with ``prompt`` set and no
messages (:meth:`Request.completion`): the text is fed to the model as it is, without a
chat template (docs/adr/0025-raw-completions-and-reasoning.md). This module maps:

* an incoming body into such a request (:func:`request_from_completions`) and a reply
  back into a ``text_completion`` object (:func:`response_to_completions`) or stream
  (:class:`CompletionStreamWriter`), for the bridge's ``POST /v1/completions``;
* a request out to an upstream's ``/v1/completions`` (:func:`request_to_completions`)
  and that upstream's stream back into events (:class:`CompletionStreamDecoder`), for
  :class:`~inferd.backends.openai_compat.OpenAICompat`.

``n`` choices and the legacy ``logprobs`` (an integer: the alternatives per token) are
served where the backend honours them (``LlamaCpp``; docs/adr/0022-n-choices-and-logprobs.md).
Fields of the legacy API that would change the reply and that inferd does not serve
(``echo``, ``suffix``, ``best_of`` other than ``n``, several prompts, token-id prompts)
are refused with :class:`~inferd.errors.InvalidRequest` naming the field, never
dropped. Pure functions plus two small stateful mappers; no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from inferd.errors import BackendUnavailable, InvalidRequest
from inferd.limits import check_depth, echo
from inferd.openai_wire import (
    SAMPLING_WIRE_FIELDS,
    SSE_DONE,
    finish_reason,
    speculative_in,
    sse_encode,
    timings_to_llama,
    usage_to_openai,
)
from inferd.request_fields import refuse_unhonoured
from inferd.sse import SSEParser
from inferd.toolcalls import ChunkAccumulator
from inferd.types import (
    MAX_TOP_LOGPROBS,
    Done,
    Event,
    Request,
    Response,
    Text,
    TokenLogprob,
    Usage,
    choices_usage,
)

__all__ = [
    "COMPLETIONS_HONOURED",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "CompletionStreamDecoder",
    "CompletionStreamWriter",
    "legacy_logprobs",
    "request_from_completions",
    "request_to_completions",
    "response_to_completions",
]

#: ``max_tokens`` when a ``/v1/completions`` body sets none: OpenAI's documented default
#: for the legacy endpoint (a base model given no limit may run to the end of its context).
DEFAULT_COMPLETION_MAX_TOKENS = 16

#: Request fields read from a body and sent upstream under the same name (OpenAI's, plus
#: the llama-server / vLLM sampling extensions).
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", *SAMPLING_WIRE_FIELDS)

#: Reply-changing Request fields :func:`request_to_completions` sends upstream; any other
#: set field is refused (:func:`inferd.request_fields.refuse_unhonoured`).
COMPLETIONS_HONOURED: frozenset[str] = frozenset({*_SAMPLING, "ignore_eos", "prompt"})


# =========================================================================== request in


def _prompt_in(value: Any) -> str:
    """The one prompt of a body: a string, or a list holding exactly one string."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'prompt' is empty: a completion needs some text")
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str) for p in value):
        raise InvalidRequest(
            f"'prompt' holds {len(value)} prompts; inferd completes one prompt per request "
            "(send a string, or a list of one string)"
        )
    if isinstance(value, list) and value and all(isinstance(p, (int, list)) for p in value):
        raise InvalidRequest("'prompt' as token ids is not supported; send the text")
    raise InvalidRequest(
        f"'prompt' must be a string or a list of one string, got {echo(value)}"
        if value is not None
        else "'prompt' is missing: a completion request needs a prompt string"
    )


def _refuse_legacy(body: Mapping[str, Any]) -> None:
    """The legacy fields that change a reply and that inferd does not serve."""
    if body.get("echo"):
        raise InvalidRequest("'echo' is not supported: the reply never repeats the prompt")
    if body.get("suffix") not in (None, ""):
        raise InvalidRequest("'suffix' (fill-in-the-middle) is not supported")
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise InvalidRequest(
            f"best_of={echo(best_of)} is not supported: inferd returns every choice it "
            "generates (use n, or leave best_of unset)"
        )


def _logprobs_in(value: Any) -> dict[str, Any]:
    """The legacy ``logprobs`` (alternatives per token, 0 for the chosen token only) as
    the Request's ``logprobs`` / ``top_logprobs``."""
    if value is None:
        return {}
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (alternatives per "
            f"token), got {echo(value)}"
        )
    return {"logprobs": True, "top_logprobs": value}


def request_from_completions(body: Mapping[str, Any]) -> Request:
    """Read a legacy Completions body into a raw-completion :class:`Request`.

    ``prompt`` is a string or a list of one string; ``max_tokens`` defaults to
    :data:`DEFAULT_COMPLETION_MAX_TOKENS`; ``stop`` is a string or a list; sampling
    fields (with llama-server's extensions) map by name. Fields that do not change the
    reply (``stream``, ``stream_options``, ``user``, ...) are ignored; every problem is
    an :class:`InvalidRequest` naming the field.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequest("a Completions request must be a JSON object")
    check_depth(body)
    prompt = _prompt_in(body.get("prompt"))
    _refuse_legacy(body)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = (stop,)
    elif stop is not None and not isinstance(stop, list):
        raise InvalidRequest("'stop' must be a string or a list of strings")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    max_tokens = body.get("max_tokens")
    n = body.get("n")
    try:
        return Request.completion(
            prompt,
            max_tokens=DEFAULT_COMPLETION_MAX_TOKENS if max_tokens is None else max_tokens,
            stop=tuple(stop or ()),
            ignore_eos=body.get("ignore_eos", False),
            speculative=speculative_in(body),
            model=model or None,
            n=1 if n is None else n,
            **_logprobs_in(body.get("logprobs")),
            **{name: body.get(name) for name in _SAMPLING},
        )
    except InvalidRequest:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a reader missed a check
        raise InvalidRequest(f"malformed Completions request ({type(e).__name__})") from None


# =========================================================================== reply out


def legacy_logprobs(lps: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
    """Token logprobs in the legacy shape: ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (one ``{token: logprob}`` per token) and ``text_offset`` (each
    token's character offset in the returned text, from ``offset``; a character split
    across tokens counts in each piece's replacement text). ``None`` when there are none."""
    if not lps:
        return None
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{tok: value for tok, _, value in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _choice(
    text: str, finish: str | None, index: int = 0, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}


def response_to_completions(
    response: Response, *, model: str, id: str, created: int | None = None
) -> dict[str, Any]:
    """A whole reply as a non-streaming ``text_completion`` object: one entry in
    ``choices`` per choice (``n``), usage summed over them (the prompt once)."""
    choices = response.choices or (response,)
    return {
        "id": id,
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            _choice(c.text, finish_reason(c.stop_reason), i, legacy_logprobs(c.logprobs))
            for i, c in enumerate(choices)
        ],
        "usage": usage_to_openai(response.usage),
        "timings": timings_to_llama([c.done for c in choices]),
    }


class CompletionStreamWriter:
    """Events -> SSE bytes of ``text_completion`` chunks, for one streamed reply.

    Each :class:`Text` is one chunk (``choices[0].index`` its choice, ``logprobs`` in the
    legacy shape when asked); each choice's :class:`Done` is a chunk with its
    ``finish_reason``; after the ``n``-th, a ``choices: []`` chunk with the usage (when
    ``include_usage``) and ``[DONE]``. A raw completion yields nothing else (no
    template, so no reasoning or tool syntax is parsed); anything else is skipped.
    Nothing is written after the last ``Done`` (the bridge's ``StreamWriter`` protocol).
    """

    __slots__ = ("_base", "_dones", "_finished", "_offsets", "include_usage", "n")

    def __init__(
        self,
        model: str,
        id: str,
        *,
        created: int | None = None,
        include_usage: bool = False,
        n: int = 1,
    ) -> None:
        self.include_usage = include_usage
        self.n = n
        self._dones: list[Done] = []
        self._offsets: dict[int, int] = {}  # choice -> characters written (text_offset)
        self._finished = False
        self._base = {
            "id": id,
            "object": "text_completion",
            "created": int(time.time()) if created is None else created,
            "model": model,
        }

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self) -> bytes:
        return b""

    def _chunk(
        self, text: str, finish: str | None, index: int, lps: dict[str, Any] | None = None
    ) -> bytes:
        return sse_encode(self._chunk_dict(text, finish, index, lps))

    def _chunk_dict(
        self, text: str, finish: str | None, index: int, lps: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {**self._base, "choices": [_choice(text, finish, index, lps)]}

    def write(self, event: Event) -> bytes:
        if self._finished:
            raise InvalidRequest("CompletionStreamWriter: an event arrived after Done")
        if isinstance(event, Text):
            if not event.text and not event.logprobs:
                return b""
            at = self._offsets.get(event.index, 0)
            self._offsets[event.index] = at + len(event.text)
            return self._chunk(event.text, None, event.index, legacy_logprobs(event.logprobs, at))
        if not isinstance(event, Done):
            return b""
        self._dones.append(event)
        finish = finish_reason(event.stop_reason)
        if len(self._dones) < self.n:
            return self._chunk("", finish, event.index)
        self._finished = True
        last = self._chunk_dict("", finish, event.index)
        timings = {"timings": timings_to_llama(self._dones)}  # last chunk, as llama-server
        if not self.include_usage:
            return sse_encode(last | timings) + SSE_DONE
        usage = usage_to_openai(choices_usage(self._dones))
        tail = {**self._base, "choices": [], "usage": usage} | timings
        return sse_encode(last) + sse_encode(tail) + SSE_DONE


# =========================================================================== upstream


def request_to_completions(request: Request, *, model: str | None = None) -> dict[str, Any]:
    """A raw-completion ``request`` as a ``/v1/completions`` body (``stream`` is the
    caller's business). Unset fields are omitted so the upstream's defaults apply."""
    if request.prompt is None:
        raise InvalidRequest("request_to_completions needs a raw completion (prompt=...)")
    refuse_unhonoured(request, "openai-compatible upstream (/v1/completions)", COMPLETIONS_HONOURED)
    body: dict[str, Any] = {}
    name = model if model is not None else request.model
    if name is not None:
        body["model"] = name
    body["prompt"] = request.prompt
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = list(request.stop)
    for key in _SAMPLING:
        v = getattr(request, key)
        if v is None:
            continue
        if key == "logit_bias":
            v = {str(k): b for k, b in v.items()}
        elif key == "dry_sequence_breakers":
            v = list(v)
        body[key] = v
    if request.ignore_eos:
        body["ignore_eos"] = True
    return body


def _as_chat_chunk(obj: dict[str, Any]) -> dict[str, Any]:
    """A ``text_completion`` chunk in the ``chat.completion.chunk`` shape the shared
    accumulator reads (choice 0's ``text`` becomes ``delta.content``)."""
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return obj  # an error or usage-only chunk reads the same in both shapes
    out: list[Any] = []
    for c in choices:
        if isinstance(c, Mapping):
            text = c.get("text")
            delta = {"content": text} if isinstance(text, str) and text else {}
            out.append({"index": c.get("index", 0), "delta": delta, **_finish_of(c)})
    return {**obj, "choices": out}


def _finish_of(choice: Mapping[str, Any]) -> dict[str, Any]:
    fr = choice.get("finish_reason")
    return {"finish_reason": fr} if fr is not None else {}


class CompletionStreamDecoder:
    """Raw ``text/event-stream`` bytes of a ``/v1/completions`` stream in, events out.

    The same face as :class:`inferd.toolcalls.ChatStreamDecoder` (``feed``, ``close``,
    ``finished``, ``finish_reason``, ``usage``) so ``OpenAICompat``'s body reader and its
    limits serve both: SSE framing by :class:`inferd.sse.SSEParser` (bounded events),
    each chunk mapped by :func:`_as_chat_chunk` into the shared accumulator, which owns
    finish reasons, usage, upstream error chunks and the one ``Done``.
    """

    __slots__ = ("_acc", "_finished", "_sse")

    def __init__(self, max_event_bytes: int) -> None:
        self._sse = SSEParser(max_event_bytes)
        self._acc = ChunkAccumulator()
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def finish_reason(self) -> str | None:
        return self._acc.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._acc.usage

    def feed(self, data: bytes) -> list[Event]:
        if self._finished:
            return []
        out: list[Event] = []
        for ev in self._sse.feed(bytes(data)):
            out += self._event(ev.event, ev.data)
            if self._finished:
                break
        return out

    def _event(self, kind: str, data: str) -> list[Event]:
        if kind == "error":
            self._finished = True
            raise BackendUnavailable(f"the upstream sent an error event: {echo(data)}")
        if kind != "message":
            return []
        if data.startswith("[DONE]"):
            self._finished = True
            return self._acc.finalize()
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return []  # a keep-alive or a broken chunk: the chat decoder skips them too
        return self._acc.ingest(_as_chat_chunk(obj)) if isinstance(obj, dict) else []

    def close(self) -> list[Event]:
        """End of body: finish if ``[DONE]`` never came (``Done(ERROR)`` without a
        finish reason, which the adapter reports as a cut stream)."""
        if self._finished:
            return []
        self._sse.close()
        self._finished = True
        return self._acc.finalize()
