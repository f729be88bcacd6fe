"""Shared fixtures: the real SmolLM2 model, the twin parametrisation, CI strictness."""

from __future__ import annotations

import os
from pathlib import Path

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
