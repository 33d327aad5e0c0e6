"""A/B of the schedule pass: programs launched longest-first (the pass's choice where later blocks
have more work) against block order, same tilings, forward and forward+backward, bf16.

    python scripts/schedule_ab.py specs/causal.yaml specs/prefix_lm.yaml --shape 4x16x4096
"""

from __future__ import annotations

import argparse

import torch
import triton

import attngen
from attngen.spec import load_spec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--shape", default="4x16x4096")
    args = ap.parse_args()
    b, h, n = (int(x) for x in args.shape.split("x"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; "
          f"B{b} H{h} N{n} bf16; median ms of do_bench")
    for path in args.specs:
        spec = load_spec(path)
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda d: torch.randn(b, h, n, d, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(spec.head_dim), mk(spec.head_dim), mk(spec.head_dim_v), mk(spec.head_dim_v)
        out = {}
        for order in (True, False):
            module = attngen.load(path, longest_first=order)
            fwd = lambda: module.attention(q, k, v, training=False)  # noqa: E731
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            step = lambda: module.attention(qg, kg, vg, training=False).backward(do)  # noqa: E731
            out[order] = (triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median"),
                          triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=[qg, kg, vg],
                                                  return_mode="median"))
        (f1, b1), (f0, b0) = out[True], out[False]
        print(f"{spec.name:<20} fwd: longest-first {f1:.3f} ms, block order {f0:.3f} ms ({f0 / f1:.3f}x) | "
              f"fwd+bwd: {b1:.3f} vs {b0:.3f} ms ({b0 / b1:.3f}x)")


if __name__ == "__main__":
    main()
