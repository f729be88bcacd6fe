"""The ``--model``, ``--gpu-layers`` and ``--threads`` options of the benchmarks that
``bench/gpu/run.sh`` points at its synthetic model (issue 20's tables): one definition,
one default model, one label for the report line."""

from __future__ import annotations

import argparse

DEFAULT_LABEL = "SmolLM2-135M"


def add_model_arg(p: argparse.ArgumentParser) -> None:
    """``--model`` alone, for a benchmark whose peers' threads and offload are fixed."""
    p.add_argument(
        "--model", default=None, help=f"GGUF path or catalog name (default: {DEFAULT_LABEL})"
    )


def add_model_args(p: argparse.ArgumentParser, threads: int) -> None:
    add_model_arg(p)
    p.add_argument("--gpu-layers", type=int, default=0, help="offload, every peer (-1 = all)")
    p.add_argument("--threads", type=int, default=threads)


def model_path(args: argparse.Namespace) -> tuple[str, str]:
    """``(path, label)``: ``--model`` (a path, or a catalog name such as ``gemma3-270m``,
    pulled if missing), or the store's SmolLM2-135M."""
    from inferd import models

    if args.model:
        path = models.resolve(args.model, pull=True, progress=False)
        return str(path), args.model if args.model in models.KNOWN_MODELS else path.name
    return str(models.resolve("smollm2-135m", pull=True, progress=False)), DEFAULT_LABEL
