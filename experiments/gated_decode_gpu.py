"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (the device machine; see data/gated_decode_<date>_<gpu>.json).

What gating decode tiles by document ids or a block layout costs and saves (runtime/decode_gate.py):
attention_with_kvcache of the causal spec beside the document and block_sparse specs (d128, bf16,
Hq 32, Hkv 8, one query per sequence), each step replayed as a CUDA graph (median), with
- documents: one document over the whole cache (every tile is read, each also gated), and
  documents of 2048 positions (only the last document's tiles are read);
- layouts: every block visible, and the diagonal plus 1 block in 8 (top-left, as static_layout);
and, with --kernels, each call's GPU time per kernel (torch.profiler, outside a graph): where a
gate that skips nothing loses to causal (the span's and the list's ops, or the decode kernel).

    PYTHONPATH=. python3 experiments/gated_decode_gpu.py --json $OUT/gated_decode.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

import attngen
from attngen.bench import environment
from attngen.resources import resolve_spec

CASES = ((1, 131072), (8, 32768), (32, 8192))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", action="store_true", help="also each call's GPU us per kernel")
    args = ap.parse_args()
    mods = {n: attngen.load(resolve_spec(n)) for n in ("causal", "document", "block_sparse")}
    rows = []
    for B, ctx in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, 32, 1, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, 8, ctx, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, 8, ctx, 128, generator=g, device="cuda", dtype=torch.bfloat16)
        lengths = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        pos = torch.arange(ctx, device="cuda")
        n_b = -(-ctx // 128)
        blocks = torch.arange(n_b, device="cuda")
        sparse = (blocks[:, None] == blocks[None, :]) | (blocks[None, :] % 8 == 0)
        calls = {
            "causal": (mods["causal"], {}),
            "document, 1 doc": (mods["document"], {"documents": torch.zeros(B, ctx, dtype=torch.int32, device="cuda")}),
            "document, docs of 2048": (mods["document"], {"documents": (pos // 2048).int().expand(B, ctx).contiguous()}),
            "block_sparse, all blocks": (mods["block_sparse"],
                                         {"layout": torch.ones(1, 1, n_b, n_b, dtype=torch.bool, device="cuda")}),
            "block_sparse, diagonal + 1 in 8": (mods["block_sparse"], {"layout": sparse[None, None]}),
        }
        row = {"case": f"{B}x{ctx}"}
        ref = None
        for name, (mod, kw) in calls.items():
            fn = lambda mod=mod, kw=kw: mod.attention_with_kvcache(q, k, v, cache_seqlens=lengths, **kw)  # noqa: E731
            with torch.no_grad():
                out = fn()
                if name == "causal":
                    ref = out
                elif "1 doc" in name or "all blocks" in name:  # the same attention as causal's
                    assert (out.float() - ref.float()).abs().max().item() < 2e-2, name
                ms = triton.testing.do_bench_cudagraph(fn, rep=200)
            row[name] = ms * 1e3
            if args.kernels:
                from attngen.tools.profile_step import kernel_times

                with torch.no_grad():
                    row[f"{name} kernels"] = {k: t * 1e3 for k, t in kernel_times(fn).items()}
        print(row, flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
