"""The ``inferd`` command line.

Every command prints one clear line on error (``inferd: error: ...``) and exits
non-zero; tracebacks are for bugs only (``INFERD_DEBUG=1`` shows them anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from inferd import __version__, about, catalog, hub, models
from inferd.backend import Backend
from inferd.errors import InferdError
from inferd.serve.config import (
    BackendSpec,
    ConfigError,
    add_llamacpp_arguments,
    build_backend,
    llamacpp_overrides,
)
from inferd.types import Done, Request, Text, Thinking, ToolUse

BACKENDS = ("llamacpp", "openai", "anthropic", "mock")
DIM, RESET = "\x1b[2m", "\x1b[0m"


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"inferd: error: {message}\n")
    return code


def _add_run(sub: Any) -> None:
    """``inferd run``'s flags (they become a backend spec: :func:`backend_spec`)."""
    run = sub.add_parser(
        "run",
        help="stream a reply to PROMPT",
        description="Stream a reply to PROMPT as it is generated.",
    )
    run.add_argument("prompt", help="the user message")
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        default="llamacpp",
        help="where the model runs (default: llamacpp)",
    )
    run.add_argument(
        "--model",
        default=None,
        help=f"model name or .gguf path (llamacpp, default {models.DEFAULT_MODEL}) "
        "or upstream model id (openai, anthropic)",
    )
    run.add_argument(
        "--base-url",
        default=None,
        help="upstream base URL (openai: an OpenAI-compatible server; anthropic: a "
        "Messages API server, default Anthropic's)",
    )
    run.add_argument("--system", default=None, help="system message")
    run.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    run.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    run.add_argument("--seed", type=int, default=None, help="sampling seed")
    run.add_argument(
        "--n-gpu-layers", type=int, default=None, help="layers to offload to a GPU (llamacpp)"
    )
    run.add_argument("--threads", type=int, default=None, help="CPU threads (llamacpp)")
    run.add_argument(
        "--rpc",
        default=None,
        metavar="HOST:PORT,...",
        help="split the model over these `inferd rpc-worker` / rpc-server processes "
        "(llamacpp; docs/adr/0019-rpc-backend.md)",
    )
    run.add_argument("--json", action="store_true", help="print one JSON event per line")
    _add_media_arguments(run)
    add_llamacpp_arguments(run)  # the context's knobs and LoRA (ADR 0026)


def _add_media_arguments(run: argparse.ArgumentParser) -> None:
    """``inferd run``'s images, audio and projector (ADR 0028)."""
    run.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="an image (PNG, JPEG, GIF, BMP) before the prompt; repeatable (needs a "
        "projector: --mmproj, or a store model pulled with one; ADR 0028)",
    )
    run.add_argument(
        "--audio",
        action="append",
        default=[],
        metavar="FILE",
        help="an audio clip (WAV, MP3, FLAC) before the prompt; repeatable",
    )
    run.add_argument(
        "--mmproj",
        default=None,
        metavar="FILE_OR_NAME",
        help="the model's multimodal projector (llamacpp): a .gguf path or a store name",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inferd",
        description="Run chat models locally (llama.cpp) or against any OpenAI-compatible "
        "upstream, with one typed event stream.",
    )
    p.add_argument("--version", action="store_true", help="print version and build info")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    _add_run(sub)

    pull = sub.add_parser(
        "pull",
        help="fetch a model into the store",
        description="Fetch and verify a model into the content-addressed "
        "store. NAME is a known model or a local .gguf file.",
    )
    pull.add_argument(
        "name",
        help=f"one of {', '.join(sorted(models.KNOWN_MODELS))}, a path, or "
        "hf://owner/repo[:QUANT | /file.gguf][@revision]",
    )
    pull.add_argument(
        "--name", dest="names", action="append", default=[], help="also call it NAME (repeatable)"
    )
    sub.add_parser("show", help="what the store knows about a model").add_argument("model")
    sub.add_parser("rm", help="remove a name (files go when no name uses them)").add_argument(
        "model"
    )

    sub.add_parser(
        "models",
        help="list models in the store",
        description="List the store's models with names and sizes, and the known "
        "models that can be pulled.",
    )
    sub.add_parser("about", help="version, compiled cores and llama.cpp build")
    ps = sub.add_parser(
        "ps",
        help="models the daemon has loaded",
        description="Ask the daemon's admin socket which models are loaded: memory, "
        "streams, idle time (docs/adr/0015-several-models-load-on-demand.md).",
    )
    ps.add_argument("--socket", default=None, help="daemon socket (default: the daemon's)")
    ps.add_argument("--json", action="store_true", help="print the admin status as JSON")
    for name, text in (
        ("serve", "run the inferd daemon on a Unix socket (see 'inferd serve --help')"),
        ("bridge", "run the OpenAI-compatible HTTP bridge (see 'inferd bridge --help')"),
        ("rpc-worker", "serve this host's devices to a head over ggml RPC (private networks)"),
    ):
        sub.add_parser(name, help=text, add_help=False)
    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite (from a source checkout)",
        description="Run bench/run_all.py from the current checkout.",
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return p


def backend_spec(args: argparse.Namespace) -> BackendSpec:
    """The ``[[backend]]`` table ``inferd run``'s flags stand for: the CLI, the TOML
    config and the daemon then build a backend through one function
    (:func:`inferd.serve.config.build_backend`)."""
    opts: dict[str, Any] = {}
    if args.backend == "mock":
        opts["tokens"] = ["This ", "is ", "the ", "mock ", "backend."]
    elif args.backend in ("openai", "anthropic"):
        if args.base_url:
            opts["base_url"] = args.base_url
        if args.model:
            opts["model"] = args.model
    else:
        # a store name is resolved (and pulled, with progress) once, by LlamaCpp
        opts["model"] = args.model or models.DEFAULT_MODEL
        opts["pull_progress"] = True
        if args.n_gpu_layers is not None:
            opts["n_gpu_layers"] = args.n_gpu_layers
        if args.threads is not None:
            opts["n_threads"] = args.threads
        if getattr(args, "rpc", None):
            opts["rpc_servers"] = args.rpc
        mmproj = getattr(args, "mmproj", None)
        if mmproj is None and (getattr(args, "image", None) or getattr(args, "audio", None)):
            # a store name pulled with a projector keeps it in its entry (ADR 0028)
            named = args.model or models.DEFAULT_MODEL
            mmproj = None if os.path.exists(named) else named
        if mmproj:
            opts["mmproj"] = mmproj
        opts.update(llamacpp_overrides(args))
    return BackendSpec(args.backend, opts)


def make_backend(args: argparse.Namespace) -> Backend:
    """The backend ``inferd run`` streams from."""
    progress = _load_progress if sys.stderr.isatty() else None
    return build_backend(backend_spec(args), None, progress)


def _load_progress(fraction: float) -> bool:
    """Model-load progress on one stderr line (llama.cpp calls this while loading)."""
    sys.stderr.write(f"\rloading model: {100 * fraction:5.1f}%")
    if fraction >= 1.0:
        sys.stderr.write("\r\x1b[K")
    sys.stderr.flush()
    return True


async def _stream(backend: Backend, request: Request, as_json: bool, out: TextIO) -> Done | None:
    tty = out.isatty() and not os.environ.get("NO_COLOR")
    done: Done | None = None
    in_thinking = False
    async with backend:
        async for ev in backend.generate(request):
            if as_json:
                out.write(orjson.dumps(ev.to_dict()).decode() + "\n")
            elif isinstance(ev, Thinking):
                if not in_thinking and tty:
                    out.write(DIM)
                in_thinking = True
                out.write(ev.text)
            else:
                if in_thinking:
                    out.write(RESET + "\n" if tty else "\n")
                    in_thinking = False
                if isinstance(ev, Text):
                    out.write(ev.text)
                elif isinstance(ev, ToolUse):
                    out.write("\n" + orjson.dumps(ev.to_dict()).decode() + "\n")
            if isinstance(ev, Done):
                done = ev
            out.flush()
    if in_thinking and tty:
        out.write(RESET)
    return done


def _media_blocks(args: argparse.Namespace) -> list[Any]:
    """``--image`` / ``--audio`` files as blocks (read here: a missing file is named)."""
    from inferd.errors import InvalidRequest
    from inferd.types import AudioBlock, ImageBlock

    def read(flag: str, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise InvalidRequest(f"{flag} {path}: {e.strerror or e}") from None

    blocks: list[Any] = []
    for path in getattr(args, "image", None) or ():
        suffix = Path(path).suffix.lower().lstrip(".") or "png"
        mime = "image/jpeg" if suffix in ("jpg", "jpeg") else f"image/{suffix}"
        blocks.append(ImageBlock(data=read("--image", path), media_type=mime))
    for path in getattr(args, "audio", None) or ():
        fmt = Path(path).suffix.lower().lstrip(".") or "wav"
        blocks.append(AudioBlock(data=read("--audio", path), format=fmt))
    return blocks


def cmd_run(args: argparse.Namespace) -> int:
    request = Request.chat(
        args.prompt,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    media = _media_blocks(args)
    if media:
        from dataclasses import replace

        from inferd.types import Message, TextBlock

        *head, _ = request.messages
        user = Message.user((*media, TextBlock(args.prompt)))
        request = replace(request, messages=(*head, user))
    backend = make_backend(args)
    done = asyncio.run(_stream(backend, request, args.json, sys.stdout))
    if done is not None and not args.json:
        sys.stdout.write("\n")
        t = done.timings
        ttft = f"{t.ttft_s:.3f} s" if t.ttft_s is not None else "n/a"
        tps = f"{t.tokens_per_s:.1f} tok/s" if t.tokens_per_s is not None else "n/a"
        sys.stderr.write(
            f"[{done.backend}: {done.usage.input_tokens} prompt + {done.usage.output_tokens} "
            f"generated tokens, TTFT {ttft}, {tps}, {done.stop_reason.value}]\n"
        )
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    progress = models.print_progress if sys.stderr.isatty() else None  # quiet when piped
    if hub.is_hub_source(args.name):
        entry = hub.pull(args.name, names=args.names, progress=progress)
        print(f"{entry.name}: {entry.record.get('chosen')}")
        print(entry.model_path)
        return 0
    path = models.pull(args.name, progress=progress, quiet=False)
    for name in args.names:
        catalog.add_name(name, str(path))
    print(path)
    return 0


def cmd_models(_: argparse.Namespace) -> int:
    print(f"store: {models.store_dir()}")
    rows = [catalog.describe(e) for e in catalog.entries()]
    if not rows:
        print("(empty; try: inferd pull smollm2-135m)")
    for r in rows:
        if "error" in r:
            print(f"  {r['name']:32} unreadable: {r['error']}")
            continue
        print(
            f"  {r['name']:32} {catalog.human(r['size'], 'B'):>7} {r['quant']:8} "
            f"{r['architecture']:10} {catalog.human(r['parameters']):>6} params "
            f"ctx {r['context_length'] or '?'!s:>6}  template {r['template']:8} tools {r['tools']}"
        )
    print("known models:")
    for k in sorted(models.KNOWN_MODELS.values(), key=lambda k: k.name):
        print(f"  {k.name:24} {k.size / 1e6:9.1f} MB  {k.description} ({k.license})")
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from pathlib import Path

    from inferd.serve.config import admin_socket_path, default_socket_path
    from inferd.serve.models_pool import format_ps, read_admin_status

    admin = admin_socket_path(Path(args.socket) if args.socket else default_socket_path())
    try:
        status = asyncio.run(read_admin_status(admin))
    except (OSError, TimeoutError, ValueError) as e:
        return _fail(
            f"no inferd daemon answers at {admin} ({type(e).__name__}); start one "
            "with: inferd serve"
        )
    print(orjson.dumps(status).decode() if args.json else format_ps(status))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    entry = catalog.get(args.model)
    facts = catalog.describe(entry)
    facts["aliases"] = ", ".join(catalog.aliases(entry)) or "-"
    for key in ("source", "revision", "chosen"):
        facts[key] = entry.record.get(key)
    facts["files"] = ", ".join(str(p) for p in entry.parts)
    facts["load"] = str(entry.model_path)
    facts["mmproj"] = str(entry.mmproj_path or "-")
    for key, value in facts.items():
        if value is not None:
            print(f"{key}: {value}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    deleted, kept = catalog.remove(args.model)
    print(f"removed {args.model}: {len(deleted)} file(s) deleted, {len(kept)} kept (in use)")
    return 0


def cmd_about(_: argparse.Namespace) -> int:
    for key, value in about().items():
        print(f"{key}: {value}")
    return 0


def cmd_delegate(args: argparse.Namespace) -> int:
    mod = importlib.import_module(args.module)
    try:
        return int(mod.main(list(args.args)) or 0)
    except SystemExit as e:  # argparse --help / usage errors inside the delegate
        return int(e.code or 0) if isinstance(e.code, int) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    script = os.path.join("bench", "run_all.py")
    if not os.path.exists(script):
        return _fail("inferd bench runs from a source checkout (bench/run_all.py not found here)")
    import runpy

    sys.argv = [script, *args.args]
    runpy.run_path(script, run_name="__main__")
    return 0


COMMANDS = {
    "run": cmd_run,
    "pull": cmd_pull,
    "models": cmd_models,
    "show": cmd_show,
    "rm": cmd_rm,
    "about": cmd_about,
    "ps": cmd_ps,
    "bench": cmd_bench,
}


#: Commands whose options belong to another module's parser (passed through whole).
DELEGATED = {
    "serve": "inferd.serve.daemon",
    "bridge": "inferd.serve.bridge",
    "rpc-worker": "inferd.rpc_worker",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        # argparse.REMAINDER drops options that start with '-', so hand over the rest raw.
        return cmd_delegate(argparse.Namespace(module=DELEGATED[argv[0]], args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        info = about()
        print(
            f"inferd {__version__} (cores: {info['cores_in_use']}, llama.cpp: {info['llama_cpp']})"
        )
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        sys.stderr.write("\ninferd: interrupted\n")
        return 130
    except InferdError as e:
        if os.environ.get("INFERD_DEBUG"):
            raise
        return _fail(e.message)
    except ConfigError as e:  # the backend could not be built from the flags
        if os.environ.get("INFERD_DEBUG"):
            raise
        return _fail(str(e))
    except (OSError, ImportError) as e:
        if os.environ.get("INFERD_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
