"""Ran on: Triton 3.9.0 (unused), torch 2.13.0+cpu, the 2-core CPU machine; on the GPU: torch's own kernels.

NSA's gate mix (runtime/nsa.py `_mix`) against the form it replaced, the sum of upcast products:
outputs compared, medians of each on the device given. Bytes per row element: the old form about
72 (eleven passes), the new one 32 (a product, two in-place multiply-adds, the cast).

    python experiments/nsa_mix.py --device cpu --shape 1x16x8192x128
    PYTHONPATH=. python3 experiments/nsa_mix.py --device cuda --shape 1x64x32768x128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attngen.runtime.nsa import _mix


def summed(gates, o_cmp, o_slc, o_swa, dtype):
    g = gates.to(torch.float32)
    return (g[..., 0:1] * o_cmp.float() + g[..., 1:2] * o_slc.float() + g[..., 2:3] * o_swa.float()).to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="1x16x8192x128")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    B, H, N, D = (int(x) for x in args.shape.split("x"))
    g = torch.Generator(device=args.device).manual_seed(0)
    o_cmp, o_slc, o_swa = (torch.randn(B, H, N, D, generator=g, device=args.device).to(torch.bfloat16) for _ in range(3))
    gates = torch.rand(B, H, N, 3, generator=g, device=args.device).to(torch.bfloat16)
    a, b = (f(gates, o_cmp, o_slc, o_swa, torch.bfloat16) for f in (summed, _mix))
    print(f"max |new - old| {float((a.float() - b.float()).abs().max()):.3g}")
    for f in (summed, _mix, summed, _mix):
        times = []
        for _ in range(args.repeats):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            f(gates, o_cmp, o_slc, o_swa, torch.bfloat16)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"{f.__name__:>7}: {statistics.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
