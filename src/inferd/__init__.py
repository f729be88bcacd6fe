"""inferd: one async Backend over local llama.cpp and any OpenAI-compatible upstream.

The public surface is re-exported here. ``LlamaCpp``, ``OpenAICompat``, ``Router`` and
``Client`` import lazily (PEP 562) so a plain ``import inferd`` never pays for
aiohttp sessions or the compiled llama.cpp core.
"""

from __future__ import annotations

import asyncio
import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import TYPE_CHECKING, Any

from inferd import types as _types
from inferd.backend import Backend
from inferd.backends.mock import Mock
from inferd.errors import (
    BackendUnavailable,
    EmbedUnsupported,
    InferdError,
    InternalError,
    InvalidRequest,
    ModelLoadError,
    NotReady,
    QueueFull,
)
from inferd.types import *  # noqa: F403 (the public types: inferd.types.__all__)
from inferd.types import Request, Response

if TYPE_CHECKING:
    from inferd.backends.anthropic_compat import AnthropicCompat
    from inferd.backends.llamacpp import LlamaCpp
    from inferd.backends.openai_compat import OpenAICompat
    from inferd.router import Router
    from inferd.serve.client import Client

try:
    __version__ = _dist_version("inferd")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+src"

_LAZY = {
    "LlamaCpp": "inferd.backends.llamacpp",
    "OpenAICompat": "inferd.backends.openai_compat",
    "AnthropicCompat": "inferd.backends.anthropic_compat",
    "Router": "inferd.router",
    "Client": "inferd.serve.client",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'inferd' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def about() -> dict[str, Any]:
    """Version, which fast cores are compiled and which twin each one uses, llama.cpp."""
    from inferd import _fast

    cores = _fast.cores_in_use()
    kinds = set(cores.values())
    info: dict[str, Any] = {
        "version": __version__,
        "extensions_disabled": _fast.NO_EXTENSIONS,
        "compiled_cores": _fast.compiled_cores(),
        # "c" or "py" when every core agrees, else "mixed"; "cores" says which is which.
        "cores_in_use": kinds.pop() if len(kinds) == 1 else "mixed",
        "cores": cores,
        "llama_cpp": None,
    }
    try:
        llama = importlib.import_module("inferd._fast._llama")
    except ImportError as e:
        info["llama_cpp"] = f"not built ({e.__class__.__name__})"
    else:
        build_info = getattr(llama, "build_info", None)
        info["llama_cpp"] = build_info() if callable(build_info) else "built"
    return info


async def acollect(backend: Backend, request: Request) -> Response:
    """Run ``request`` on ``backend`` and collect the whole stream into a ``Response``."""
    events = [ev async for ev in backend.generate(request)]
    return Response.collect(events)


def complete(backend: Backend, request: Request | str) -> Response:
    """Synchronous helper for scripts: the collected reply to ``request``.

    A string is taken as a one-turn user prompt. Must not be called from inside a
    running event loop (use :func:`acollect` there).
    """
    req = Request.chat(request) if isinstance(request, str) else request
    return asyncio.run(acollect(backend, req))


__all__ = [
    "AnthropicCompat",
    "Backend",
    "BackendUnavailable",
    "Client",
    "EmbedUnsupported",
    "InferdError",
    "InternalError",
    "InvalidRequest",
    "LlamaCpp",
    "Mock",
    "ModelLoadError",
    "NotReady",
    "OpenAICompat",
    "QueueFull",
    "Router",
    "about",
    "acollect",
    "complete",
    *_types.__all__,
]
