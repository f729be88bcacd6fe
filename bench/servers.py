"""Start the HTTP peers of the batching benchmark with the same settings: llama-server and
``inferd bridge`` serving an in-process ``LlamaCpp``.

Same slots (``-np C`` / ``parallel=C``), same context (``-c C*ctx`` / ``n_ctx=C*ctx``),
same threads (``-t``/``-tb`` / ``n_threads``), same batch (``-b``/``-ub`` 512 /
``n_batch=512``, whose micro-batch is the same), same GPU offload, and the same
flash-attention setting (``bench/fair.py``: ours is libllama's AUTO, llama-server gets
the explicit value AUTO resolves to). llama-server gives each slot its own KV stream
when ``-np`` is given; the bridge's backend is told ``kv_layout`` (``split`` is the
like-for-like layout, ADR 0008).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.fair import server_fa_flag

ROOT = Path(__file__).resolve().parents[1]
#: Logical and physical batch of every peer (our ``n_batch``; llama-server ``-b``/``-ub``).
N_BATCH = 512
#: Seconds a server gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: Seconds the bridge may take to print its listening line (model load included).
BRIDGE_START_TIMEOUT_S = 120.0


@dataclass
class Settings:
    """What every peer of one concurrency level shares."""

    model: str
    conc: int
    ctx_per_slot: int
    threads: int
    gpu_layers: int
    flash_attn: bool


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    base_url: str
    files: list[Path] = field(default_factory=list)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in self.files:
            f.unlink(missing_ok=True)


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def start_llama_server(exe: Path, s: Settings, port: int) -> Server:
    cmd = [
        str(exe),
        *("-m", s.model, "-np", str(s.conc), "-c", str(s.conc * s.ctx_per_slot)),
        *("-t", str(s.threads), "-tb", str(s.threads), "-b", str(N_BATCH), "-ub", str(N_BATCH)),
        *server_fa_flag(s.flash_attn),
        "--no-kv-unified",  # one KV stream per slot: its default with -np, said out loud
        *("--host", "127.0.0.1", "--port", str(port), "--no-webui"),
        *("-ngl", "all" if s.gpu_layers < 0 else str(s.gpu_layers)),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Server("llama-server", proc, f"http://127.0.0.1:{port}")


def bridge_config(s: Settings, kv_layout: str, inline_steps: bool = True) -> str:
    """The ``inferd bridge --config`` TOML: one in-process LlamaCpp with these settings
    (``inline_steps=False``: every step on the scheduler thread, ADR 0034)."""
    return (
        "[[backend]]\n"
        'type = "llamacpp"\n'
        f"model = {json_str(s.model)}\n"
        f"n_ctx = {s.conc * s.ctx_per_slot}\n"
        f"parallel = {s.conc}\n"
        f"n_threads = {s.threads}\n"
        f"n_batch = {N_BATCH}\n"
        f"n_gpu_layers = {s.gpu_layers}\n"
        f'kv_layout = "{kv_layout}"\n' + ("" if inline_steps else "inline_steps = false\n")
    )


def json_str(text: str) -> str:
    """A TOML basic string (JSON's escaping is valid TOML)."""
    import json

    return json.dumps(text)


def start_bridge(s: Settings, kv_layout: str, inline_steps: bool = True, extra: str = "") -> Server:
    """``inferd bridge --config`` on a free port; returns once it listens (model loaded).
    ``extra``: more TOML lines for the backend (a benchmark's own settings)."""
    fd, name = tempfile.mkstemp(prefix="inferd-bench-", suffix=".toml")
    cfg = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(bridge_config(s, kv_layout, inline_steps) + extra)
    log = cfg.with_suffix(".log")  # a file, not a pipe: a full pipe would stall the bridge
    cmd = [sys.executable, "-m", "inferd.serve.bridge", "--config", str(cfg), "--port", "0"]
    with open(log, "wb") as err_f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_f, env=_env())
    label = f"bridge {kv_layout}" + ("" if inline_steps else " thread")
    server = Server(label, proc, "", [cfg, log])
    line = _first_line(proc, BRIDGE_START_TIMEOUT_S)
    if "listening on " not in line:
        err = log.read_text(errors="replace")[-2000:]
        server.stop()
        raise RuntimeError(f"inferd bridge did not start: {line!r} {err}")
    server.base_url = line.rsplit("listening on ", 1)[1].strip()
    return server


def _first_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    if not ready:
        return "(no output before the timeout)"
    return proc.stdout.readline().decode(errors="replace")
