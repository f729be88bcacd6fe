"""bench/synth_model.py: the larger benchmark model keeps the real tokenizer and template.

The GPU benchmark runs a model written by this script (random weights, a real family's
shapes). Its figures only mean something if the file loads in libllama with the shapes
asked for, tokenizes exactly as the model it copied the tokenizer from, renders the same
chat template, and generates exactly the tokens asked for when end-of-generation is
ignored. This test proves that on the ``tiny`` shape.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import missing

pytestmark = pytest.mark.llama


def _synth():
    from bench import synth_model as mod

    try:
        mod._gguf()
    except ImportError as e:  # the vendored gguf-py (or numpy/PyYAML) is absent
        missing(f"llama.cpp's gguf-py for bench/synth_model.py ({e})")
    return mod


@pytest.fixture(scope="module")
def written(smollm2_path, tmp_path_factory) -> tuple[Path, Path]:
    synth = _synth()
    d = tmp_path_factory.mktemp("synth")
    skel, tiny = d / "skel.gguf", d / "tiny.gguf"
    synth.main(["--from", str(smollm2_path), "--tokenizer-only", str(skel)])
    synth.main(["--from", str(skel), "--shape", "tiny", str(tiny)])
    return skel, tiny


def test_tokenizer_only_file_is_small_and_has_no_tensors(written, smollm2_path):
    skel, _ = written
    gguf = _synth()._gguf()
    reader = gguf.GGUFReader(str(skel))
    assert len(reader.tensors) == 0
    assert skel.stat().st_size < smollm2_path.stat().st_size / 10
    assert "tokenizer.chat_template" in reader.fields


def test_synthetic_model_has_the_shape_and_the_tokenizer(written, smollm2_path):
    from inferd._fast import _llama as L

    synth = _synth()
    shape = synth.SHAPES["tiny"]
    _, tiny = written
    real, fake = L.Model(str(smollm2_path)), L.Model(str(tiny))
    try:
        assert fake.n_layer == shape.layers
        assert fake.n_embd == shape.hidden
        assert fake.n_vocab == real.n_vocab
        assert fake.chat_template == real.chat_template
        text = "<|im_start|>user\nÜber 3 naïve cafés, 12% off!<|im_end|>"
        assert fake.tokenize(text, parse_special=True) == real.tokenize(text, parse_special=True)
        assert abs(fake.n_params - shape.params(fake.n_vocab)) <= shape.params(fake.n_vocab) // 100
    finally:
        fake.close()
        real.close()


def test_synthetic_model_generates_exactly_what_is_asked(written):
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.types import Done, Request

    _, tiny = written

    async def run() -> Done:
        b = LlamaCpp(str(tiny), n_ctx=512, n_threads=1, parallel=1)
        try:
            req = Request.chat("hello", temperature=0, max_tokens=40, ignore_eos=True)
            done = None
            async for ev in b.generate(req):
                if isinstance(ev, Done):
                    done = ev
            return done
        finally:
            await b.aclose()

    done = asyncio.run(run())
    assert done is not None and done.usage.output_tokens == 40
