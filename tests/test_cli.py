"""The inferd command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from .conftest import require_llama_core

SRC = Path(__file__).resolve().parents[1] / "src"


def inferd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "inferd", *args], capture_output=True, text=True, env=e, timeout=300
    )


def test_run_mock_streams_text_and_summary():
    r = inferd("run", "--backend", "mock", "hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "This is the mock backend."
    assert "[mock:" in r.stderr and "end_turn" in r.stderr


def test_run_json_prints_one_event_per_line():
    r = inferd("run", "--backend", "mock", "--json", "hello")
    assert r.returncode == 0, r.stderr
    events = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [e["type"] for e in events] == ["text"] * 5 + ["done"]
    assert events[-1]["backend"] == "mock"


def test_errors_are_one_line_and_nonzero():
    r = inferd("run", "--backend", "mock", "--max-tokens", "0", "x")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("inferd: error: max_tokens=0 is out of range [1, 10000000]")
    assert "Traceback" not in r.stderr
    r = inferd("pull", "definitely-not-a-model")
    assert r.returncode == 1 and r.stderr.startswith("inferd: error: no model named")


def test_run_builds_its_backend_like_the_config_does():
    """``inferd run`` flags become a ``[[backend]]`` spec built by the config's one
    builder: a bad setting is refused by the backend's options, before any model loads,
    on one line."""
    r = inferd("run", "--threads", "0", "--model", "no-such-model", "hi")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "inferd: error: llamacpp backend: InvalidRequest: n_threads=0 must be an integer >= 1"
    ]
    r = inferd("run", "--model", "no-such-model", "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("inferd: error: llamacpp backend: ModelLoadError: unknown model")


def test_run_spec_names_every_flag():
    from inferd.cli import backend_spec, build_parser

    args = build_parser().parse_args(
        ["run", "--model", "m", "--threads", "2", "--n-gpu-layers", "-1", "hi"]
    )
    spec = backend_spec(args)
    assert spec.type == "llamacpp"
    assert spec.options == {
        "model": "m",
        "pull_progress": True,
        "n_threads": 2,
        "n_gpu_layers": -1,
    }
    args = build_parser().parse_args(["run", "--backend", "openai", "--model", "x", "hi"])
    assert backend_spec(args).options == {"model": "x"}


def test_help_documents_every_command():
    r = inferd("--help")
    assert r.returncode == 0
    for cmd in ("run", "pull", "models", "about", "serve", "bridge", "bench"):
        assert cmd in r.stdout
    r = inferd("run", "--help")
    for flag in (
        "--backend",
        "--model",
        "--base-url",
        "--system",
        "--max-tokens",
        "--temperature",
        "--json",
    ):
        assert flag in r.stdout


def test_version_reports_cores(tmp_path):
    r = inferd("--version")
    assert r.returncode == 0 and r.stdout.startswith("inferd ")
    r = inferd("--version", env={"INFERD_NO_EXTENSIONS": "1"})
    assert "cores: py" in r.stdout


def test_models_lists_store(tmp_path):
    r = inferd("models", env={"INFERD_HOME": str(tmp_path)})
    assert r.returncode == 0
    assert "empty" in r.stdout and "smollm2-135m" in r.stdout


def test_serve_and_bridge_take_their_own_options():
    r = inferd("serve", "--help")
    assert r.returncode == 0 and "--config" in r.stdout
    r = inferd("bridge", "--help")
    assert r.returncode == 0 and "--port" in r.stdout
    r = inferd("serve", "--config", "/nonexistent/inferd.toml")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0


@pytest.mark.llama
def test_run_streams_from_the_local_model(smollm2_path):
    """The default backend end to end: the store name is resolved inside LlamaCpp (once)
    and the backend is built through the config's builder."""
    require_llama_core()
    r = inferd("run", "--threads", "1", "--max-tokens", "4", "--temperature", "0", "--json", "Hi")
    assert r.returncode == 0, r.stderr
    events = [orjson.loads(line) for line in r.stdout.splitlines()]
    done = events[-1]
    assert done["type"] == "done" and done["backend"] == "llamacpp"
    assert 1 <= done["usage"]["output_tokens"] <= 4
    assert done["stop_reason"] in ("max_tokens", "end_turn")
