"""Ran on: Triton 3.6.0, NVIDIA H200 (torch 2.11.0+cu130, CUDA 13.0), 2026-12-01; raw:
data/document_setup_2026-12-01_h200.json. Ported to attngen.runtime since (not rerun).

What a batch of packed sequences costs before its first attention call, on the GPU: our
Documents (the tile tables of the forward and both backward kernels, from the ids) against
FlexAttention's create_block_mask for the same causal document mask (eager, and with _compile=True).
Median wall time of 20 runs each, synchronized, after 3 warm-up runs.

    PYTHONPATH=. python experiments/document_setup_cost.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import attngen
from attngen import runtime
from attngen.bench import BenchShape, bench_documents, environment
from attngen.runtime.roles import ROLES

ROOT = Path(__file__).resolve().parent.parent
SHAPES = (BenchShape(16, 16, 1024), BenchShape(4, 16, 4096), BenchShape(1, 16, 16384))


def _median_ms(fn, runs: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rt = runtime.of(attngen.load(ROOT / "specs" / "document.yaml"))
    rows = []
    for shape in SHAPES:
        ids = bench_documents(shape, torch.Generator(device="cuda").manual_seed(0))
        # the kernels' tables depend on q's and k's shape and device only: empty stand-ins
        qk = torch.empty(shape.batch, 1, shape.seq, 0, device="cuda")

        def ours():
            docs = runtime.Documents(ids)
            for role in ROLES:  # the runtime's own table building (an internal of KernelModule)
                rt._tables(role, rt.config(role, "bf16", shape.seq, shape.seq), qk, qk, runtime.Sparse(docs))

        def mask_mod(b, h, q_idx, kv_idx):
            return (ids[b, q_idx] == ids[b, kv_idx]) & (kv_idx <= q_idx)

        row = {"shape": str(shape), "ours_ms": _median_ms(ours),
               "flex_eager_ms": _median_ms(lambda: create_block_mask(mask_mod, shape.batch, None, shape.seq, shape.seq, device="cuda")),
               "flex_compiled_ms": _median_ms(lambda: create_block_mask(mask_mod, shape.batch, None, shape.seq, shape.seq,
                                                                         device="cuda", _compile=True))}
        print(row, flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
