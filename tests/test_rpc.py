"""A model split over ggml RPC workers (issue 21, docs/adr/0019-rpc-backend.md).

Real processes on 127.0.0.1: ``inferd rpc-worker`` (and llama.cpp's own ``rpc-server``
built from the vendored tree) as workers, SmolLM2 as the model, the head in this
process fronting its supervised child. A missing core, model or peer skips locally and
fails in CI (``conftest.missing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferd.backends.llamacpp.options import LlamaCppOptions
from inferd.backends.llamacpp.rpc_probe import (
    MAX_DEVICES_PER_SERVER,
    MAX_RPC_SERVERS,
    RPC_PROTO_MAJOR,
    RPC_PROTO_MINOR,
    check_bind_host,
    probe,
)
from inferd.errors import BackendUnavailable, InvalidRequest, ModelLoadError
from inferd.types import AcceleratorInfo, Capabilities, Request, Text

from .conftest import missing, require_llama_core

#: Seconds a worker may take to start listening (a loaded 2-core box).
WORKER_START_S = 60.0
#: Bound on how long a stream may take to end after its worker is killed: generous,
#: what is asserted is that it ends (BackendUnavailable), not how fast.
KILLED_STREAM_END_S = 60.0
PROMPTS = ("Name three colors.", "What is 2+2? Answer briefly.")
GREEDY_TOKENS = 24
HEAD = {"n_ctx": 512, "n_threads": 1, "parallel": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_worker(endpoint: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WORKER_START_S
    while True:
        try:
            probe(endpoint, timeout_s=5.0)
            return
        except ModelLoadError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def _worker(cmd: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_worker(f"127.0.0.1:{port}", proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _inferd_worker_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "inferd", "rpc-worker", "--port", str(port), "--threads", "1"]


@contextlib.contextmanager
def _inferd_workers(n: int = 2) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    with contextlib.ExitStack() as stack:
        out = []
        for _ in range(n):
            port = _free_port()
            proc = stack.enter_context(_worker(_inferd_worker_cmd(port), port))
            out.append((f"127.0.0.1:{port}", proc))
        yield out


@pytest.fixture(scope="module")
def core() -> None:
    require_llama_core()
    from inferd._fast import _llama

    if not _llama.RPC_SUPPORTED:
        missing("a compiled core with ggml RPC (the default -DGGML_RPC=ON)")


@pytest.fixture(scope="module")
def local_greedy(core: None, smollm2_path: Path) -> list[str]:
    from inferd.backends.llamacpp import LlamaCpp

    async def run() -> list[str]:
        async with LlamaCpp(smollm2_path, **HEAD) as b:
            return [await _greedy(b, p) for p in PROMPTS]

    return asyncio.run(run())


async def _greedy(backend: object, prompt: str) -> str:
    req = Request.chat(prompt, max_tokens=GREEDY_TOKENS, temperature=0)
    out = [e.text async for e in backend.generate(req) if isinstance(e, Text)]  # type: ignore[attr-defined]
    return "".join(out)


async def _split_greedy(model: Path, servers: list[str]) -> tuple[list[str], Capabilities]:
    from inferd.backends.llamacpp import LlamaCpp

    async with LlamaCpp(model, rpc_servers=servers, **HEAD) as b:
        return [await _greedy(b, p) for p in PROMPTS], b.capabilities()


# --------------------------------------------------------------------------- settings


def test_compiled_core_agrees_with_the_python_constants(core: None) -> None:
    from inferd._fast import _llama

    assert _llama.RPC_MAX_SERVERS == MAX_RPC_SERVERS
    assert _llama.RPC_PROTO_VERSION[:2] == (RPC_PROTO_MAJOR, RPC_PROTO_MINOR)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (["no-port"], "host:port"),
        (["h:0"], "host:port"),
        (["h:70000"], "host:port"),
        (["::1:5"], "host:port"),
        (["a b:1"], "host:port"),
        (["h;rm:1"], "host:port"),
        (["user@h:1"], "host:port"),
        (["a:1", "a:1"], "listed twice"),
        ([f"h:{i + 1}" for i in range(MAX_RPC_SERVERS + 1)], "at most 16"),
        ([5], "host:port"),
    ],
)
def test_bad_rpc_servers_are_refused_naming_the_setting(value: object, needle: str) -> None:
    with pytest.raises(InvalidRequest, match="rpc_servers") as e:
        LlamaCppOptions(rpc_servers=value)  # type: ignore[arg-type]
    assert needle in str(e.value)


def test_rpc_servers_accept_a_list_or_a_comma_string() -> None:
    a = LlamaCppOptions(rpc_servers="127.0.0.1:5000, gpu-2.internal:50052")
    b = LlamaCppOptions(rpc_servers=["127.0.0.1:5000", "gpu-2.internal:50052"])
    assert a.rpc_servers == b.rpc_servers == ("127.0.0.1:5000", "gpu-2.internal:50052")


@pytest.mark.parametrize("split", [[-1.0], [0, 0], ["x"], [1.0] * 17, [float("inf")]])
def test_bad_tensor_split_is_refused(split: list[object]) -> None:
    with pytest.raises(InvalidRequest, match="tensor_split"):
        LlamaCppOptions(tensor_split=split)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "192.168.0.7"])
def test_worker_refuses_a_reachable_address_without_allow_remote(host: str) -> None:
    with pytest.raises(InvalidRequest, match="--allow-remote"):
        check_bind_host(host, allow_remote=False)
    assert check_bind_host(host, allow_remote=True) == host


@pytest.mark.parametrize("host", ["::", "localhost", "not an address"])
def test_worker_refuses_what_ggml_cannot_bind(host: str) -> None:
    with pytest.raises(InvalidRequest, match="IPv4"):
        check_bind_host(host, allow_remote=True)


def test_rpc_worker_command_refuses_0000_and_starts_nothing() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "inferd", "rpc-worker", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert "--allow-remote" in p.stderr and "authentication" in p.stderr


def test_rpc_worker_reports_an_unknown_device_and_a_taken_port(core: None) -> None:
    worker = [sys.executable, "-m", "inferd", "rpc-worker", "--threads", "1"]
    p = subprocess.run(
        [*worker, "--port", str(_free_port()), "--device", "NOPE"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "NOPE" in p.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        p = subprocess.run(
            [*worker, "--port", str(port)], capture_output=True, text=True, timeout=120
        )
    assert p.returncode == 1 and f"127.0.0.1:{port}" in p.stderr


def test_accelerator_rpc_devices_cross_the_wire() -> None:
    from inferd.types import RpcDevice

    acc = AcceleratorInfo("remote", 31, "ggml RPC", 2, (RpcDevice("h:1", "RPC0", 2, 1),))
    back = Capabilities.from_dict(Capabilities(accelerator=acc).to_dict()).accelerator
    assert back == acc
    assert AcceleratorInfo.from_dict({"rpc_devices": "junk"}).rpc_devices == ()


def test_toml_config_and_run_flag_reach_the_same_checks(
    core: None, smollm2_path: Path, tmp_path: Path
) -> None:
    from inferd.serve.config import ConfigError, build_backend, load_config

    dead = f"127.0.0.1:{_free_port()}"
    cfg_file = tmp_path / "inferd.toml"
    cfg_file.write_text(
        f"[[backend]]\ntype = 'llamacpp'\nmodel = {str(smollm2_path)!r}\n"
        f"rpc_servers = [{dead!r}]\ntensor_split = [1, 3]\nn_ctx = 512\n"
    )
    spec = load_config(cfg_file).backends[0]
    with pytest.raises(ConfigError, match=f"{dead}.*unreachable"):
        build_backend(spec)
    spec.options["rpc_servers"] = ["nope"]
    with pytest.raises(ConfigError, match="rpc_servers"):
        build_backend(spec)
    p = subprocess.run(
        [sys.executable, "-m", "inferd", "run", "--model", str(smollm2_path), "--rpc", dead, "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1
    assert dead in p.stderr and "unreachable" in p.stderr
    cfg_file.write_text(f"[[backend]]\ntype = 'llamacpp'\nmodel = {str(smollm2_path)!r}\n")
    serve = [sys.executable, "-m", "inferd", "serve", "--config", str(cfg_file)]
    p = subprocess.run(
        [*serve, "--socket", str(tmp_path / "s.sock"), "--rpc", dead],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1
    assert dead in p.stderr and "unreachable" in p.stderr


# --------------------------------------------------------------------------- load faults


def test_unreachable_worker_gives_model_load_error_naming_it(
    core: None, smollm2_path: Path
) -> None:
    from inferd.backends.llamacpp import LlamaCpp

    dead = f"127.0.0.1:{_free_port()}"
    for in_process in (False, True):
        with pytest.raises(ModelLoadError, match=dead.replace(".", r"\.")) as e:
            LlamaCpp(smollm2_path, rpc_servers=[dead], rpc_in_process=in_process, **HEAD)
        assert "unreachable" in str(e.value)


@contextlib.contextmanager
def _fake_worker(major: int, minor: int, devices: int = 1) -> Iterator[str]:
    """A server that answers the real HELLO with the given protocol version, then the
    device count with ``devices``."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(30)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = srv.accept()
            with conn:
                cmd, size = struct.unpack("<BQ", conn.recv(9, socket.MSG_WAITALL))
                conn.recv(size, socket.MSG_WAITALL)
                assert cmd == 14
                conn.sendall(struct.pack("<Q", 28) + bytes([major, minor, 0, 0]) + bytes(24))
                head = conn.recv(9, socket.MSG_WAITALL)
                if len(head) < 9:
                    return  # the head refused our version and hung up
                cmd, size = struct.unpack("<BQ", head)
                assert cmd == 15 and size == 0
                conn.sendall(struct.pack("<QI", 4, devices))
                conn.recv(1)  # wait for the head to hang up

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()
        t.join(30)


@pytest.mark.parametrize(("major", "minor"), [(RPC_PROTO_MAJOR - 1, 0), (RPC_PROTO_MAJOR + 1, 0)])
def test_worker_of_another_protocol_version_is_refused_clearly(
    core: None, smollm2_path: Path, major: int, minor: int
) -> None:
    from inferd.backends.llamacpp import LlamaCpp

    with _fake_worker(major, minor) as endpoint:
        with pytest.raises(ModelLoadError, match=f"speaks protocol {major}.{minor}.0") as e:
            LlamaCpp(smollm2_path, rpc_servers=[endpoint], **HEAD)
    assert endpoint in str(e.value) and "same inferd" in str(e.value)


def test_worker_refuses_an_old_client_hello_and_keeps_serving(core: None) -> None:
    """An older head's HELLO (no payload) is refused by our worker (it hangs up and
    says the client needs upgrading), and the worker then serves the next head."""
    port = _free_port()
    with _worker(_inferd_worker_cmd(port), port) as proc:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(struct.pack("<BQ", 14, 0))
            assert s.recv(64) == b""  # closed without a reply
        info = probe(f"127.0.0.1:{port}")
        assert info.version[:2] == (RPC_PROTO_MAJOR, RPC_PROTO_MINOR)
        assert info.devices and info.devices[0].memory_total > 0
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert b"client needs upgrade" in err
    assert proc.returncode == 0  # SIGTERM is a clean stop


# --------------------------------------------------------------------------- split == local


def test_split_over_two_inferd_workers_matches_local_greedy(
    smollm2_path: Path, local_greedy: list[str]
) -> None:
    with _inferd_workers(2) as workers:
        servers = [w for w, _ in workers]
        texts, caps = asyncio.run(_split_greedy(smollm2_path, servers))
    assert texts == local_greedy
    acc = caps.accelerator
    assert acc is not None and acc.kind == "remote"
    assert [d.endpoint for d in acc.rpc_devices] == servers
    assert all(d.memory_total > 0 for d in acc.rpc_devices)


def test_admin_status_lists_the_remote_devices(core: None, smollm2_path: Path) -> None:
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.serve.client import admin_status
    from inferd.serve.daemon import Daemon

    async def status(servers: list[str]) -> dict[str, object]:
        with tempfile.TemporaryDirectory() as d:
            daemon = Daemon(LlamaCpp(smollm2_path, rpc_servers=servers, **HEAD), f"{d}/s.sock")
            await daemon.start()
            try:
                return await admin_status(daemon.socket_path, timeout_s=30)
            finally:
                await daemon.close()

    with _inferd_workers(2) as workers:
        servers = [w for w, _ in workers]
        got = asyncio.run(status(servers))
    remote = got["accelerator"]["rpc_devices"]  # type: ignore[index]
    assert [r["endpoint"] for r in remote] == servers
    assert all(r["memory_total"] > 0 and r["memory_free"] > 0 for r in remote)


@pytest.fixture(scope="module")
def rpc_server_bin() -> Path:
    try:
        from bench.peers import ensure_peer
    except ImportError as e:
        missing(f"bench.peers, which builds rpc-server ({e})")
        raise
    try:
        return Path(ensure_peer("rpc-server"))
    except Exception as e:  # a skip locally, a failure in CI
        missing(f"llama.cpp's rpc-server built from the vendored tree ({e})")
        raise


def test_split_over_llama_cpp_rpc_servers_matches_local_greedy(
    smollm2_path: Path, local_greedy: list[str], rpc_server_bin: Path
) -> None:
    with contextlib.ExitStack() as stack:
        servers = []
        for _ in range(2):
            port = _free_port()
            cmd = [str(rpc_server_bin), "-H", "127.0.0.1", "-p", str(port), "-t", "1"]
            stack.enter_context(_worker(cmd, port))
            servers.append(f"127.0.0.1:{port}")
        texts, _ = asyncio.run(_split_greedy(smollm2_path, servers))
    assert texts == local_greedy


# --------------------------------------------------------------------------- a worker dies


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped yet has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _stream_until_killed(backend: object, victim: subprocess.Popen[bytes]) -> int:
    req = Request.chat("Count from 1 to 500.", max_tokens=400, temperature=0, ignore_eos=True)
    got = 0
    with pytest.raises(BackendUnavailable, match="lost a worker"):
        async with asyncio.timeout(KILLED_STREAM_END_S):
            async for event in backend.generate(req):  # type: ignore[attr-defined]
                if isinstance(event, Text):
                    got += 1
                    if got == 1:
                        victim.send_signal(signal.SIGTERM)
    return got


def test_worker_killed_mid_stream_ends_it_and_a_restarted_worker_is_used_again(
    core: None, smollm2_path: Path
) -> None:
    from inferd.backends.llamacpp import LlamaCpp

    if not Path("/proc/self/fd").is_dir():
        missing("/proc/self/fd (open file descriptors are counted there)")
    with _inferd_workers(2) as workers:
        servers = [w for w, _ in workers]
        victim_port = int(servers[1].rsplit(":", 1)[1])

        async def scenario() -> None:
            fds = _open_fds()
            b = LlamaCpp(smollm2_path, rpc_servers=servers, **HEAD)
            try:
                child = b.child_pid
                assert child is not None
                assert await _stream_until_killed(b, workers[1][1]) >= 1
                with pytest.raises(ProcessLookupError):  # the child is gone and reaped
                    os.kill(child, 0)
                # the worker is still down: refused before the first event
                with pytest.raises(BackendUnavailable, match="unreachable"):
                    await _greedy(b, PROMPTS[0])
                with _worker(_inferd_worker_cmd(victim_port), victim_port):
                    assert await _greedy(b, PROMPTS[0])  # reloaded over the new worker
                    assert b.restarts == 1
            finally:
                await b.aclose()
            assert _open_fds() <= fds + 2
            assert not b._dir.exists()  # the socket and log directory is removed

        asyncio.run(scenario())


def test_head_child_dies_with_its_parent(core: None, smollm2_path: Path) -> None:
    """Nothing leaks when the head process itself is killed: its child exits too."""
    with _inferd_workers(1) as workers:
        code = (
            "import sys, time\n"
            "from inferd.backends.llamacpp import LlamaCpp\n"
            f"b = LlamaCpp({str(smollm2_path)!r}, rpc_servers=[{workers[0][0]!r}], "
            "n_ctx=512, n_threads=1, parallel=1)\n"
            "print(b.child_pid, flush=True)\n"
            "time.sleep(600)\n"
        )
        with tempfile.TemporaryFile() as err:
            head = subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err
            )
            assert head.stdout is not None
            child = int(head.stdout.readline())
            head.kill()
            head.wait()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not _running(child):
                    break
                time.sleep(0.1)
            else:
                os.kill(child, signal.SIGKILL)
                pytest.fail("the RPC split's child outlived its parent")
        # and the worker is free for the next head
        assert probe(workers[0][0]).devices


def _server_pid(supervisor: subprocess.Popen[bytes]) -> int:
    """The ggml server process under an ``inferd rpc-worker`` supervisor."""
    path = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
    try:
        kids = path.read_text().split()
    except OSError as e:
        missing(f"{path} (the worker's server process is found there: {e})")
        raise
    assert len(kids) == 1
    return int(kids[0])


def test_silent_worker_ends_the_stream_after_the_read_timeout(
    core: None, smollm2_path: Path
) -> None:
    """A worker host that vanishes without closing its socket (here: a stopped
    process) cannot hang the stream: it ends after ``rpc_read_timeout_s``."""
    from inferd.backends.llamacpp import LlamaCpp

    with _inferd_workers(2) as workers:
        servers = [w for w, _ in workers]
        frozen = _server_pid(workers[1][1])

        async def scenario() -> None:
            b = LlamaCpp(smollm2_path, rpc_servers=servers, rpc_read_timeout_s=10, **HEAD)
            req = Request.chat("Count to 500.", max_tokens=400, temperature=0, ignore_eos=True)
            try:
                with pytest.raises(BackendUnavailable, match="rpc_read_timeout_s"):
                    async with asyncio.timeout(KILLED_STREAM_END_S):
                        async for event in b.generate(req):
                            if isinstance(event, Text):
                                os.kill(frozen, signal.SIGSTOP)
                assert b.child_pid is None  # the stuck child was stopped
            finally:
                os.kill(frozen, signal.SIGCONT)
                await b.aclose()

        asyncio.run(scenario())
        assert probe(servers[1]).devices  # the thawed worker serves the next head


def test_router_fails_over_while_a_worker_is_down(core: None, smollm2_path: Path) -> None:
    """A worker that died between requests: the split's next request fails before its
    first event, so the Router serves it from the next backend."""
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.backends.mock import Mock
    from inferd.router import Router

    with _inferd_workers(1) as workers:
        servers = [workers[0][0]]

        async def scenario() -> tuple[str, str]:
            split = LlamaCpp(smollm2_path, rpc_servers=servers, **HEAD)
            async with Router([split, Mock(["from the fallback"])]) as router:
                first = await _greedy(router, PROMPTS[0])
                workers[0][1].send_signal(signal.SIGTERM)
                workers[0][1].wait(30)
                second = await _greedy(router, PROMPTS[0])
            return first, second

        first, second = asyncio.run(scenario())
    assert first and first != "from the fallback"
    assert second == "from the fallback"


def test_worker_cache_keeps_big_tensors_for_the_next_load(
    core: None, smollm2_path: Path, tmp_path: Path, local_greedy: list[str]
) -> None:
    """``--cache DIR``: tensors over ggml's hash threshold (10 MiB; SmolLM2's token
    embeddings are one) are stored on the worker, and a load over a filled cache gives
    the same greedy text."""
    cache = tmp_path / "rpc-cache"
    port = _free_port()
    with _worker([*_inferd_worker_cmd(port), "--cache", str(cache)], port):
        for _ in range(2):
            texts, _ = asyncio.run(_split_greedy(smollm2_path, [f"127.0.0.1:{port}"]))
            assert texts == local_greedy
            assert [p for p in cache.rglob("*") if p.is_file()]


@pytest.mark.parametrize("count", [0, MAX_DEVICES_PER_SERVER + 1])
def test_worker_reporting_no_or_too_many_devices_is_refused(count: int) -> None:
    with _fake_worker(RPC_PROTO_MAJOR, RPC_PROTO_MINOR, devices=count) as endpoint:
        with pytest.raises(ModelLoadError, match=f"{endpoint} reports {count} devices"):
            probe(endpoint)


def test_silent_listener_times_out_the_probe() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:  # accepts (backlog), never answers
        endpoint = f"127.0.0.1:{srv.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(ModelLoadError, match=r"did not answer within 0\.5s"):
            probe(endpoint, timeout_s=0.5)
        assert time.monotonic() - t0 < 30


def test_busy_worker_and_slow_load_give_clear_errors(core: None, smollm2_path: Path) -> None:
    """A worker serves one head at a time: a second head's probe says so; a split that
    does not load within ``load_timeout_s`` is stopped with a ModelLoadError."""
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.serve.rpc_split import RpcSplit

    with _inferd_workers(1) as workers:
        endpoint = workers[0][0]

        async def busy() -> None:
            async with LlamaCpp(smollm2_path, rpc_servers=[endpoint], **HEAD):
                with pytest.raises(ModelLoadError, match="serving another head"):
                    await asyncio.to_thread(probe, endpoint, 2.0)

        asyncio.run(busy())
        opts = LlamaCppOptions(rpc_servers=[endpoint], **HEAD)
        with pytest.raises(ModelLoadError, match="load_timeout_s"):
            RpcSplit(smollm2_path, opts, load_timeout_s=0.01)
        assert probe(endpoint).devices  # the stopped child let go of the worker
