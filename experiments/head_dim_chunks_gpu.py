"""Ran on: Triton 3.6.0, torch 2.11.0+cu130 (the device machine; written 2026-12-06 and not yet run there, no GPU being lent; results: data/head_dim_chunks_<date>_<gpu>.json).

The forward with the head dim loaded in power-of-two column chunks (192 = 3 x 64, 96 = 3 x 32:
PassOptions.chunked_head_dims) against the same spec's module padding it to the next power of two
(the option off, each with the cost model's tilings), SDPA's cuDNN forward, and the chunked forward
at the cost model's next-best tilings, in one process: bf16, the specs' causal
masks on square shapes, forward only, medians of do_bench in ms and TFLOP/s over the visible
entries' 2 x (D + Dv) FLOPs.

    PYTHONPATH=. python3 experiments/head_dim_chunks_gpu.py --json $OUT/head_dim_chunks.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen
from attngen.bench import environment
from attngen.exhaustive import tiling_of
from attngen.passes import PassOptions
from attngen.pipeline import compile_spec
from attngen.spec import load_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", default="head_dim_192,head_dim_96")
    ap.add_argument("--shapes", default="4x16x4096,1x16x16384")
    ap.add_argument("--top", type=int, default=6, help="the chunked forward at the model's N best tilings")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.specs.split(","):
        path = Path("specs") / f"{name}.yaml"
        spec, module = load_spec(path), attngen.load(path, chunked_head_dims=True)
        base = attngen.load(path, chunked_head_dims=False)  # the padded form (chunks are the default since)
        options = PassOptions(chunked_head_dims=True)
        ranked = compile_spec(path, options=options, stop="tiling").rankings["fwd"]["bf16"].ranked[:args.top]
        for text in args.shapes.split(","):
            B, H, N = (int(x) for x in text.split("x"))
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, H, N, spec.head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, H, N, spec.head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, H, N, spec.head_dim_v, generator=g, device="cuda", dtype=torch.bfloat16)
            causal = spec.mask.causal is not None
            flops = 2 * B * H * (N * (N + 1) // 2 if causal else N * N) * (spec.head_dim + spec.head_dim_v)
            fns = {"chunked (model's pick)": lambda: module.attention(q, k, v)}
            fns["padded (model's pick)"] = lambda: base.attention(q, k, v)

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, scale=spec.scale, is_causal=causal)
            fns["sdpa_cudnn"] = cudnn  # (square shapes: either causal alignment is SDPA's)
            out, ref = {}, None
            for label, fn in fns.items():
                try:
                    with torch.no_grad():
                        got = fn().float()
                        ref = got if ref is None else ref
                        if (got - ref).abs().max().item() > 2e-2:
                            out[label] = "differs"
                            continue
                        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    out[label] = {"ms": ms, "tflops": flops / ms / 1e9}
                except Exception as e:
                    out[label] = f"{type(e).__name__}: {str(e)[:120]}"
            for rank, p in enumerate(ranked, 1):
                label = f"chunked #{rank} {p.config.short()}"
                try:
                    with tiling_of(module, "fwd", "bf16", p.config), torch.no_grad():
                        fn = lambda: module.attention(q, k, v)  # noqa: E731
                        assert (fn().float() - ref).abs().max().item() < 2e-2
                        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    out[label] = {"ms": ms, "tflops": flops / ms / 1e9, "predicted_ms": p.time_s * 1e3}
                except Exception as e:
                    out[label] = f"{type(e).__name__}: {str(e)[:120]}"
            print(f"{name} {text}: " + ", ".join(f"{k_} {v_['tflops']:.0f} TF/s" if isinstance(v_, dict) else f"{k_} {v_}"
                                               for k_, v_ in out.items()), flush=True)
            rows.append({"spec": name, "shape": text, "results": out})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
