"""Ran on: Triton 3.6.0, torch 2.11.0+cu130, NVIDIA H100 80GB HBM3, 2026-12-06; raw: data/varlen_tma_2026-12-06_h100.txt.

What packed sequences cost by themselves: one causal sequence of N tokens (16 heads, d128, bf16)
through attention (TMA loads) and through attention_varlen (pointer loads, the sequence start read
from cu_seqlens), forward and forward+backward, medians of do_bench in ms. The same FLOPs and the
same tilings: the difference is the loads (docs/decisions/sparsity-tables.md).
Run: PYTHONPATH=. python3 experiments/varlen_tma_gpu.py"""

import torch
import triton

import attngen


def main():
    mod = attngen.load("specs/causal.yaml")
    for n in (4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, 16, n, 128, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
                   for _ in range(3))
        do = torch.randn_like(q)
        packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        runs = {"attention": (lambda: mod.attention(q, k, v), do),
                "attention_varlen": (lambda: mod.attention_varlen(*packed, cu, cu, n, n), do[0].transpose(0, 1).contiguous())}
        for name, (fn, grad) in runs.items():
            fwd = triton.testing.do_bench(lambda: fn(), warmup=25, rep=100, return_mode="median")
            both = triton.testing.do_bench(lambda: fn().backward(grad), warmup=25, rep=100, return_mode="median",
                                           grad_to_none=list(q for q in (q, k, v, *packed)))
            print(f"N={n} {name}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms, bwd {both - fwd:.3f} ms")


if __name__ == "__main__":
    main()
