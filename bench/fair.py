"""Peer settings that make a ratio compare the same work (shared by the llama.cpp benchmarks).

Why a module: issue 12 ("Honest benchmarks") found ratios that compared different work.
Two settings must match across every peer and are easy to get wrong:

* **Flash attention.** ``inferd._fast._llama.Context`` takes no flash-attention
  argument, so our contexts run libllama's default, ``AUTO``: libllama probes the
  device at context creation and enables it where supported (on a CPU, always).
  llama-cpp-python's ``Llama(flash_attn=False)`` default turns it *off*, while
  llama-server and llama-bench default to ``auto``. :func:`our_flash_attn` creates a
  small context the way ours are created and reads libllama's own log line saying what
  ``AUTO`` resolved to; every peer then gets that explicit setting
  (:func:`server_fa_flag`, ``Llama(flash_attn=...)``).
* **End-of-generation ban.** llama-server's ``ignore_eos`` adds a ``-inf`` logit bias
  for every end-of-generation token to its C sampler chain; ours bans them in C too.
  llama-cpp-python has no ``ignore_eos``, and its ``logit_bias`` argument runs a Python
  logits processor on every token. :func:`eog_banned_llama` puts the same ``-inf`` bias
  into llama-cpp-python's C sampler chain (``llama_sampler_init_logit_bias``) and
  counts the tokens its sampler draws, so its count includes the last sampled token
  (``Llama.n_tokens`` does not: the last token is never decoded).

See ``bench/README.md`` ("Same work, same settings").
"""

from __future__ import annotations

import logging
from typing import Any

#: Context size of the probe context that reads the flash-attention resolution.
PROBE_N_CTX = 256
#: libllama's log line when AUTO resolved flash attention on or off.
_FA_ON = "Flash Attention enabled"
_FA_OFF = "Flash Attention not supported"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def our_flash_attn(model_path: str, n_gpu_layers: int = 0) -> bool:
    """What libllama's ``AUTO`` resolves to for our contexts on this model and device.

    Reads libllama's own log (``resolve_fused_ops: Flash Attention enabled`` or
    ``... not supported, set to disabled``) from a probe context built like ours.
    Raises if neither line appears: a silent guess would make the ratios unfair again.
    """
    from inferd._fast import _llama as L

    log = logging.getLogger("inferd.llama")
    handler, old_level = _Lines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    L.set_log_level(logging.INFO)
    try:
        model = L.Model(model_path, n_gpu_layers=n_gpu_layers)
        ctx = L.Context(model, n_ctx=PROBE_N_CTX, n_threads=1)
        ctx.close()
        model.close()
    finally:
        L.set_log_level(logging.WARNING)
        log.removeHandler(handler)
        log.setLevel(old_level)
    text = "\n".join(handler.lines)
    if _FA_ON in text:
        return True
    if _FA_OFF in text:
        return False
    raise RuntimeError("libllama did not log how flash attention resolved; cannot match peers")


def server_fa_flag(flash_attn: bool) -> list[str]:
    """The explicit ``-fa`` flag for llama-server and llama-bench (their default is auto)."""
    return ["-fa", "on" if flash_attn else "off"]


def eog_banned_llama(model_path: str, **kwargs: Any) -> Any:
    """A llama-cpp-python ``Llama`` whose sampler chain bans end-of-generation in C.

    ``kwargs`` go to ``Llama`` (pass ``flash_attn`` explicitly). The returned object
    has ``sampled``: tokens drawn since it was last set to 0.
    """
    import llama_cpp

    class EogBannedLlama(llama_cpp.Llama):  # type: ignore[misc]
        sampled = 0

        def _init_sampler(self, *args: Any, **kw: Any) -> Any:
            chain = super()._init_sampler(*args, **kw)
            if chain.custom_samplers:  # their chain indices would move
                raise ValueError("pass no logits_processor: the EOG ban replaces it")
            # libllama's chain has no insert: take its samplers out, put the ban first.
            moved = [
                llama_cpp.llama_sampler_chain_remove(chain.sampler, 0)
                for _ in range(llama_cpp.llama_sampler_chain_n(chain.sampler))
            ]
            llama_cpp.llama_sampler_chain_add(chain.sampler, self._eog_ban())
            for s in moved:
                llama_cpp.llama_sampler_chain_add(chain.sampler, s)
            return chain

        def _eog_ban(self) -> Any:
            vocab = llama_cpp.llama_model_get_vocab(self.model)
            eog = [t for t in range(self.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
            arr = (llama_cpp.llama_logit_bias * len(eog))()
            for slot, tok in zip(arr, eog, strict=True):
                slot.token, slot.bias = tok, -float("inf")
            # libllama copies the array; it need not outlive this call
            return llama_cpp.llama_sampler_init_logit_bias(self.n_vocab(), len(eog), arr)

        def sample(self, *args: Any, **kw: Any) -> int:
            self.sampled += 1
            return int(super().sample(*args, **kw))

    return EogBannedLlama(model_path, **kwargs)
