"""Shared fixtures: the real SmolLM2 model, the twin parametrisation, CI strictness."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

#: In CI a missing peer (compiled core, model, llama-server) is a failure, never a skip.
IN_CI = bool(os.environ.get("CI"))


def missing(what: str) -> None:
    """Skip locally, fail in CI: a test that needs a peer the CI builds must not hide."""
    if IN_CI:
        pytest.fail(f"{what} is missing, and CI must provide it", pytrace=False)
    pytest.skip(f"{what} is missing (CI would fail here)")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1, resolved through the model store."""
    from inferd import models

    try:
        return models.resolve("smollm2-135m", pull=True, progress=False)
    except Exception as e:  # reported as a skip locally, a failure in CI
        missing(f"the smollm2-135m model ({e})")
        raise


def twin_core(core: str, kind: str) -> ModuleType:
    """One twin (``"c"`` or ``"py"``) of a fast core; a missing compiled one is ``missing``."""
    from inferd._fast import load_twin

    try:
        return load_twin(core, kind)
    except ImportError as e:
        missing(f"the compiled core inferd._fast._{core}_{kind} ({e})")
        raise


@pytest.fixture(params=["c", "py"])
def sse(request: pytest.FixtureRequest) -> ModuleType:
    """The SSE core, once per twin."""
    return twin_core("sse", request.param)


@pytest.fixture(params=["c", "py"])
def chunks(request: pytest.FixtureRequest) -> ModuleType:
    """The chat-chunk core (accumulator, fused decoder), once per twin."""
    return twin_core("chunks", request.param)


def require_llama_core() -> None:
    """The compiled llama.cpp binding, or ``missing`` (a failure in CI)."""
    try:
        from inferd._fast import _llama  # noqa: F401
    except ImportError as e:
        missing(f"the compiled llama.cpp core inferd._fast._llama ({e})")


def require_mtmd_core() -> Any:
    """The compiled binding with libmtmd (``_llama.Mtmd``), or ``missing``."""
    require_llama_core()
    from inferd._fast import _llama

    if not hasattr(_llama, "Mtmd"):
        missing("libmtmd in the compiled core (inferd._fast._llama.Mtmd)")
    return _llama


#: Where the synthetic vision/audio pair (bench/synth_vision.py) is kept between runs
#: (15 MB, a few seconds to write).
SYNTH_VISION_CACHE = Path(
    os.environ.get("INFERD_TEST_CACHE") or Path.home() / ".cache" / "inferd" / "test"
)


@pytest.fixture(scope="session")
def synth_vision(smollm2_path: Path):
    """The synthetic text model + projector (LLaVA MLP vision, Ultravox audio) of
    ``bench/synth_vision.py``, written once and cached (issue 16)."""
    try:
        from bench.synth_vision import ensure
    except ImportError as e:
        missing(f"bench/synth_vision.py and llama.cpp's gguf-py ({e})")
        raise
    return ensure(smollm2_path, SYNTH_VISION_CACHE)


@pytest.fixture(scope="session")
def llama_mtmd_cli_bin() -> Path:
    """llama.cpp's own ``llama-mtmd-cli``, built from the vendored tree (bench/peers.py)."""
    try:
        from bench.peers import ensure_peer

        return Path(ensure_peer("llama-mtmd-cli"))
    except Exception as e:  # a skip locally, a failure in CI
        missing(f"llama-mtmd-cli built from the vendored llama.cpp ({e})")
        raise


def tokenizer_only_gguf(path: Path) -> Path:
    """A GGUF holding a 300-token vocabulary alone: enough for the synthetic writers, in
    milliseconds (the vision pair's file tests)."""
    from bench.synth_model import _gguf

    gguf = _gguf()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(300)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
