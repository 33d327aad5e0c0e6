"""Ran on: Triton 3.6.0, NVIDIA H200 (torch 2.11.0+cu130), 2026-12-01; results:
docs/lab/benchmarks-log.md ("The same mask three ways"), docs/decisions/nested-runs.md.

Where the document kernels' time goes, on the GPU: the causal spec's kernels (closed-form loop
bounds) against the document spec's (per-batch tile tables) with every row one document, which
is the same mask, and with four documents per row (bench_documents), forward and forward+backward,
bf16, medians of do_bench in ms.

    PYTHONPATH=. python experiments/document_ab.py [--shapes 4x16x4096,1x16x16384] [--head-dim 128]
"""

from __future__ import annotations

import argparse

import torch
import triton

import attngen
from attngen.bench import bench_documents, parse_shapes, with_head_dim
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ms(fn, backward, inputs, do):
    if not backward:
        return triton.testing.do_bench(lambda: fn(*inputs), warmup=25, rep=100, return_mode="median")
    return triton.testing.do_bench(lambda: fn(*inputs).backward(do), warmup=25, rep=100,
                                   grad_to_none=list(inputs), return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4x16x4096,1x16x16384")
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    causal = attngen.load(with_head_dim(ROOT / "specs" / "causal.yaml", args.head_dim))
    document = attngen.load(with_head_dim(ROOT / "specs" / "document.yaml", args.head_dim))
    for shape in parse_shapes(args.shapes):
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda: torch.randn(shape.batch, shape.heads, shape.seq, args.head_dim, generator=g, device="cuda",  # noqa: E731
                                 dtype=torch.bfloat16).requires_grad_()
        q, k, v, do = mk(), mk(), mk(), mk().detach()
        one = document.Documents(torch.zeros(shape.batch, shape.seq, dtype=torch.int32, device="cuda"))
        four = document.Documents(bench_documents(shape, g))
        cases = {"causal": lambda q, k, v: causal.attention(q, k, v),
                 "document, one doc": lambda q, k, v: document.attention(q, k, v, documents=one),
                 "document, four docs": lambda q, k, v: document.attention(q, k, v, documents=four)}
        for backward in (False, True):
            times = {name: _ms(fn, backward, (q, k, v), do) for name, fn in cases.items()}
            print(f"{shape} {'fwd+bwd' if backward else 'fwd':8} " + "  ".join(f"{n}: {t:.3f}" for n, t in times.items()),
                  flush=True)


if __name__ == "__main__":
    main()
