"""The ``--model``, ``--gpu-layers`` and ``--threads`` options of the benchmarks that
``bench/gpu/run.sh`` points at its synthetic model (issue 20's tables): one definition,
one default model, one label for the report line."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_LABEL = "SmolLM2-135M"


def add_model_arg(p: argparse.ArgumentParser) -> None:
    """``--model`` alone, for a benchmark whose peers' threads and offload are fixed."""
    p.add_argument("--model", default=None, help=f"GGUF (default: {DEFAULT_LABEL})")


def add_model_args(p: argparse.ArgumentParser, threads: int) -> None:
    add_model_arg(p)
    p.add_argument("--gpu-layers", type=int, default=0, help="offload, every peer (-1 = all)")
    p.add_argument("--threads", type=int, default=threads)


def model_path(args: argparse.Namespace) -> tuple[str, str]:
    """``(path, label)``: ``--model``, or the store's SmolLM2-135M (pulled if missing)."""
    if args.model:
        return str(args.model), Path(args.model).name
    from inferd import models

    return str(models.resolve("smollm2-135m", pull=True, progress=False)), DEFAULT_LABEL
