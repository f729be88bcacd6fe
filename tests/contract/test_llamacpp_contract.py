"""LlamaCpp (real SmolLM2-135M, real compiled core) against the shared stream contract."""

from __future__ import annotations

import pytest

from inferd.errors import InvalidRequest, NotReady
from inferd.types import ImageBlock, Message, Request

from ..conftest import missing
from .suite import BackendContract, call_requests

pytestmark = pytest.mark.llama


def _make(path, **kw):
    try:
        from inferd._fast import _llama  # noqa: F401
    except ImportError as e:
        missing(f"the compiled llama.cpp core inferd._fast._llama ({e})")
    from inferd.backends.llamacpp import LlamaCpp

    return LlamaCpp(path, n_ctx=512, n_threads=1, **kw)


class _FailsAfterTwo:
    """An output parser with a bug that shows after two pieces (a mid-stream failure)."""

    def __init__(self) -> None:
        self.n = 0

    def feed(self, text):
        from inferd.types import Text

        self.n += 1
        if self.n > 2:
            raise RuntimeError("output parser bug")
        return [Text(text)] if text else []

    def finish(self):
        return []


class TestLlamaCppContract(BackendContract):
    kv_layout = "unified"

    def _new(self, path, **kw):
        return _make(path, kv_layout=self.kv_layout, **kw)

    @pytest.fixture
    async def backend(self, smollm2_path):
        b = self._new(smollm2_path)
        yield b
        await b.aclose()

    @pytest.fixture(params=["closed", "too_long", "image"])
    async def pre_stream_failure(self, request, smollm2_path):
        b = self._new(smollm2_path)
        kind = request.param
        if kind == "closed":
            await b.aclose()
            yield b, Request.chat("hi"), NotReady
        elif kind == "too_long":
            yield b, Request.chat("word " * 2000), InvalidRequest
        else:
            yield b, Request((Message.user([ImageBlock(url="http://h/x.png")]),)), InvalidRequest
        await b.aclose()

    @pytest.fixture
    async def mid_stream_failure(self, smollm2_path):
        b = self._new(smollm2_path, output_parser=lambda *a: _FailsAfterTwo())
        yield b, Request.chat("Tell me a story.", max_tokens=40, ignore_eos=True)
        await b.aclose()

    @pytest.fixture
    async def long_stream(self, smollm2_path):
        b = self._new(smollm2_path)
        yield (
            b,
            Request.chat(
                "Write a long story about the sea.", max_tokens=240, ignore_eos=True, temperature=0
            ),
        )
        await b.aclose()

    @pytest.fixture
    async def call_reply(self, smollm2_path):
        # SmolLM2 makes Hermes calls; the grammar forces one (a small model left to
        # choose may not call, and with parallel calls may call until max_tokens).
        b = self._new(smollm2_path)
        kw = {"max_tokens": 96, "temperature": 0.0, "parallel_tool_calls": False}
        yield b, call_requests("required", "tool", **kw)
        await b.aclose()

    async def released(self, backend) -> bool:
        if not backend.ready():
            return True
        return (
            backend._active is None
            and backend._idle.is_set()
            and backend.model is not None
            and backend._ctx.seq_pos_max(0) == -1
        )


class TestLlamaCppSplitContract(TestLlamaCppContract):
    """The same contract with one KV stream per slot (``kv_layout="split"``)."""

    kv_layout = "split"

    async def released(self, backend) -> bool:
        if not backend.ready():
            return True
        # a finished slot may keep its cells for prefix reuse (kv_used() leaves those
        # out); a cancelled stream's slot must be empty
        return (
            backend._active is None
            and backend._idle.is_set()
            and backend.kv_layout == "split"
            and backend.kv_used() == 0
        )
