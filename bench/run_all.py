"""Run every benchmark in ``bench/`` and print what each reports.

``python bench/run_all.py --smoke`` is what CI runs: every benchmark must run (they do
not gate on speed). Without ``--smoke`` the full sizes are used; results go to
``bench/results/`` (git-ignored) and the figures we quote live in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="small sizes, for CI")
    p.add_argument("--only", default=None, help="run only benchmarks whose name contains this")
    args = p.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if args.only in s.stem]
    if not scripts:
        print("no benchmarks found", file=sys.stderr)
        return 1
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    failed = []
    for i, script in enumerate(scripts, 1):
        print(f"\n=== [{i}/{len(scripts)}] {script.stem} ===", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(script)] + (["--smoke"] if args.smoke else [])
        rc = subprocess.run(cmd, env=env, check=False).returncode
        print(
            f"=== {script.stem}: {'ok' if rc == 0 else f'FAILED ({rc})'} "
            f"in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        if rc != 0:
            failed.append(script.stem)
    if failed:
        print(f"\nbenchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"\nall {len(scripts)} benchmarks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
