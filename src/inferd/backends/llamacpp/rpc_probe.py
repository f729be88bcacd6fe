"""ggml RPC endpoints: checked as settings, and probed before libllama connects.

Why probe in Python: ggml-rpc aborts the whole process when a server cannot be reached
or answers the handshake with another protocol version (``GGML_ABORT`` in its
dispatcher). A head therefore opens its own short connection to every worker first,
speaks the real ``HELLO`` (command 14: 24 bytes of transport capabilities, all zero:
plain TCP) and reads the version, then asks for the device count and each device's
memory. Only when every worker answers as this build expects does libllama connect
(docs/adr/0019-rpc-backend.md). The byte layout is ggml-rpc.cpp's: one command byte,
a little-endian u64 size and the payload; the reply is a u64 size and the payload.

A worker serves one head at a time (ggml's accept loop); a second head's hello waits
in the worker's backlog, which the probe reports as "busy" after its timeout.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from inferd.errors import InvalidRequest, ModelLoadError
from inferd.limits import echo

#: Most RPC servers one model may use (ggml-rpc.h GGML_RPC_MAX_SERVERS; a test checks
#: that the compiled core agrees).
MAX_RPC_SERVERS = 16
#: The RPC protocol version this build speaks (ggml-rpc.h RPC_PROTO_*_VERSION; checked
#: against the compiled core by a test).
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
#: Seconds a probe waits to connect and for each reply.
DEFAULT_PROBE_TIMEOUT_S = 5.0
#: Most devices one worker may report (a lying worker cannot make us loop for long).
MAX_DEVICES_PER_SERVER = 64

#: A host name (letters, digits, dots, dashes, underscores) or an IPv4 address.
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")
_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_CONN_CAPS_SIZE = 24
_HELLO_RSP_SIZE = 4 + _CONN_CAPS_SIZE


@dataclass(frozen=True, slots=True)
class WorkerDevice:
    """One device of an RPC worker, as the worker reports it."""

    endpoint: str
    index: int
    memory_free: int
    memory_total: int


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a probe learned: the worker's protocol version and devices."""

    endpoint: str
    version: tuple[int, int, int]
    devices: tuple[WorkerDevice, ...]


def check_endpoint(value: object, field: str = "rpc_servers") -> str:
    """``value`` as a ``host:port`` endpoint, or ``InvalidRequest`` naming ``field``.

    ggml splits an endpoint at its first colon, so an IPv6 literal cannot be given;
    the host is a name or an IPv4 address, the port 1..65535."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{field}: {echo(value)} must be a 'host:port' string")
    host, sep, port = value.partition(":")
    ok_host = bool(_HOST.fullmatch(host))
    if not sep or not ok_host or ":" in port or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(
            f"{field}: {echo(value)} is not 'host:port' (a host name or IPv4 address and a "
            "port 1..65535; ggml RPC cannot take IPv6 literals)"
        )
    return f"{host}:{int(port)}"


def check_servers(values: Iterable[object] | str | None) -> tuple[str, ...]:
    """The ``rpc_servers`` setting: a list (or a comma-separated string) of endpoints,
    at most :data:`MAX_RPC_SERVERS`, no repeats."""
    if values is None:
        return ()
    items = [v.strip() for v in values.split(",")] if isinstance(values, str) else list(values)
    out = tuple(check_endpoint(v) for v in items)
    if len(out) > MAX_RPC_SERVERS:
        raise InvalidRequest(
            f"rpc_servers: {len(out)} servers; ggml RPC takes at most {MAX_RPC_SERVERS} "
            "(GGML_RPC_MAX_SERVERS)"
        )
    if len(set(out)) != len(out):
        raise InvalidRequest("rpc_servers: a server is listed twice")
    return out


def check_bind_host(host: str, allow_remote: bool) -> str:
    """The address an ``inferd rpc-worker`` may listen on.

    ggml's server binds IPv4 addresses only. The RPC protocol has no authentication and
    lets a client write any memory of the worker's buffers, so anything but loopback
    (127.0.0.0/8) needs ``allow_remote`` (a private network the operator trusts)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidRequest(
            f"--host {echo(host)} is not an IPv4 address (ggml RPC listens on IPv4 only)"
        ) from None
    if addr.version != 4:
        raise InvalidRequest(f"--host {echo(host)}: ggml RPC listens on IPv4 addresses only")
    if not addr.is_loopback and not allow_remote:
        raise InvalidRequest(
            f"--host {host} is reachable from other machines, and the RPC protocol has no "
            "authentication: anyone who can connect can run code on this worker's devices. "
            "Bind 127.0.0.1, or pass --allow-remote on a private network you trust."
        )
    return host


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        buf += chunk
    return bytes(buf)


def _call(sock: socket.socket, cmd: int, payload: bytes, reply_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != reply_size:
        raise ConnectionError(f"reply of {size} bytes to command {cmd}, expected {reply_size}")
    return _recv_exact(sock, size)


def _hello(sock: socket.socket, endpoint: str) -> tuple[int, int, int]:
    rsp = _call(sock, _CMD_HELLO, bytes(_CONN_CAPS_SIZE), _HELLO_RSP_SIZE)
    version = (rsp[0], rsp[1], rsp[2])
    if version[0] != RPC_PROTO_MAJOR or version[1] > RPC_PROTO_MINOR:
        raise ModelLoadError(
            f"RPC worker {endpoint} speaks protocol {'.'.join(map(str, version))}, this "
            f"inferd speaks {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}.x: run the same inferd (or a "
            "llama.cpp rpc-server of the same ggml) on both ends"
        )
    return version


def probe(endpoint: str, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S) -> WorkerInfo:
    """Connect to ``endpoint``, check its protocol version, list its devices; a
    ``ModelLoadError`` naming the worker says what failed."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            version = _hello(sock, endpoint)
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            if not 0 < count <= MAX_DEVICES_PER_SERVER:
                raise ModelLoadError(f"RPC worker {endpoint} reports {count} devices")
            devices = []
            for i in range(count):
                free, total = struct.unpack(
                    "<QQ", _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16)
                )
                devices.append(WorkerDevice(endpoint, i, free, total))
    except TimeoutError:
        raise ModelLoadError(
            f"RPC worker {endpoint} did not answer within {timeout_s:g}s (is it serving "
            "another head? a worker serves one at a time)"
        ) from None
    except (ConnectionRefusedError, socket.gaierror) as e:
        raise ModelLoadError(
            f"RPC worker {endpoint} is unreachable: {e.strerror or e} (start it with "
            "`inferd rpc-worker` and check the address)"
        ) from None
    except OSError as e:
        raise ModelLoadError(f"RPC worker {endpoint} failed the RPC handshake: {e}") from None
    return WorkerInfo(endpoint, version, tuple(devices))


def probe_all(
    endpoints: Sequence[str], timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
) -> tuple[WorkerInfo, ...]:
    """:func:`probe` every endpoint in order (the first failure raises)."""
    return tuple(probe(e, timeout_s) for e in endpoints)
