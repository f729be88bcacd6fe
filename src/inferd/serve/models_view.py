"""Reading a model pool's state: the admin socket, ``inferd ps``, the bridge's ``/v1/models``.

Split from :mod:`inferd.serve.models_pool` because its readers (the CLI, the bridge in
front of a daemon) only need the status dict, not the pool
(docs/adr/0015-several-models-load-on-demand.md).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from inferd.backend import Backend

#: Largest admin status line read back (``inferd ps``, the bridge's ``/v1/models``).
MAX_ADMIN_REPLY_BYTES = 8 * 1024 * 1024
#: Seconds to wait for the daemon's admin socket to answer.
ADMIN_TIMEOUT_S = 5.0


async def read_admin_status(admin: Path, timeout_s: float = ADMIN_TIMEOUT_S) -> dict[str, Any]:
    """One status line from a daemon's admin socket (``OSError`` when nobody answers)."""
    import orjson

    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_unix_connection(admin, limit=MAX_ADMIN_REPLY_BYTES)
        try:
            writer.write(b'{"type":"status"}\n')
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
    if not line:
        raise ConnectionError(f"the daemon at {admin} closed the admin socket without a reply")
    status = orjson.loads(line)
    if not isinstance(status, dict):
        raise ConnectionError(f"the daemon at {admin} sent a malformed status")
    return status


async def pool_view(backend: Backend) -> dict[str, Any] | None:
    """``{"pool": ...}`` of an in-process pool or of the daemon behind a ``Client``;
    ``{}`` when no pool serves (one fixed backend list); ``None`` when unknown (the
    daemon does not answer)."""
    status = getattr(backend, "pool_status", None)
    if callable(status):
        return {"pool": status()}
    sock = getattr(backend, "socket_path", None)
    if sock is None:
        return {}
    from inferd.serve.config import admin_socket_path

    try:
        got = await read_admin_status(admin_socket_path(Path(sock)))
    except (OSError, TimeoutError, ValueError):
        return None
    pool = got.get("pool")
    return {"pool": pool} if isinstance(pool, dict) else {}


def served_names(pool: dict[str, Any]) -> list[str]:
    """Names a request may use, from a :meth:`ModelPool.pool_status` dict."""
    return [*(m["name"] for m in pool.get("models", ())), *pool.get("groups", {})]


def openai_model_list(pool: dict[str, Any], created: int) -> list[dict[str, Any]]:
    """``/v1/models`` entries: every model with its state, then the groups."""
    out = [
        {
            "id": m["name"],
            "object": "model",
            "created": created,
            "owned_by": "inferd",
            "state": m["state"],
        }
        for m in pool.get("models", ())
    ]
    for name, members in pool.get("groups", {}).items():
        out.append(
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "inferd",
                "state": "group",
                "models": members,
            }
        )
    return out


def format_ps(status: dict[str, Any]) -> str:
    """``inferd ps``: one line per model (name, state, memory, streams, idle), or the
    fixed backends of a daemon without ``[[model]]`` tables."""
    pool = status.get("pool")
    if not isinstance(pool, dict):
        names = ", ".join(str(b.get("name")) for b in status.get("backends") or ())
        return f"no model pool (fixed backends: {names or '-'}; status {status.get('status')})"
    lines = [f"{'NAME':24} {'STATE':10} {'MEMORY':>10} {'STREAMS':>7} {'IDLE':>8} UNTIL"]
    for m in pool.get("models", ()):
        idle = f"{m['idle_s']:.0f}s" if "idle_s" in m else "-"
        if m.get("state") == "loading":
            until = f"loading {100 * m.get('progress', 0):.0f}%"
        elif "expires_in_s" in m:
            until = f"unload in {m['expires_in_s']:.0f}s"
        elif "retry_in_s" in m:
            until = f"failed, retry in {m['retry_in_s']:.0f}s"
        else:
            until = "-"
        mem = f"{m.get('bytes', 0) / 1e6:.1f} MB"
        lines.append(
            f"{m['name']:24} {m['state']:10} {mem:>10} {m.get('streams', 0):>7} {idle:>8} {until}"
        )
    budget = pool.get("max_loaded_bytes")
    limit = f" of {budget / 1e6:.1f} MB" if budget else ""
    lines.append(f"loaded: {pool.get('loaded_bytes', 0) / 1e6:.1f} MB{limit}")
    return "\n".join(lines)
