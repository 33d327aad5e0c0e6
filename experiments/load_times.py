"""Ran on: Triton 3.9.0, CPU only (torch 2.13.0+cpu, numpy 2.4.6, Python 3.11, 2 cores), 2026-12-06;
results: data/load_times_2026-12-06_cpu.txt, BENCHMARKS.md ("Loading").

Seconds of `attngen.load(spec)` in a new process, for every shipped spec: first (an empty
$ATTNGEN_CACHE: compile, write, import) and cached (a second new process: read, check, import). Each
process imports torch, triton and attngen before the clock starts, as a user's program has; the
median of --repeats processes per cell.

    python experiments/load_times.py [--repeats 3] > data/load_times_<date>_cpu.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = ("import time, torch, triton, attngen, sys; t = time.perf_counter(); attngen.load(sys.argv[1]); "
         "print(time.perf_counter() - t)")


def once(spec: Path, cache: str) -> float:
    env = dict(os.environ, ATTNGEN_CACHE=cache, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, str(spec)], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'spec':<22} {'first s':>8} {'cached s':>9}")
    firsts, cacheds = [], []
    for spec in sorted((ROOT / "specs").glob("*.yaml")):
        first, cached = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                first.append(once(spec, cache))
                cached.append(once(spec, cache))
        firsts.append(statistics.median(first))
        cacheds.append(statistics.median(cached))
        print(f"{spec.stem:<22} {firsts[-1]:8.2f} {cacheds[-1]:9.3f}", flush=True)
    print(f"{'max':<22} {max(firsts):8.2f} {max(cacheds):9.3f}")


if __name__ == "__main__":
    main()
