"""Ran on: Triton 3.9.0 (unused by the torch forms), torch 2.13.0+cpu, the 2-core CPU machine: the torch forms only; the kernel path is untimed on a GPU so far.

NSA's gate mix three ways: the sum of upcast products (the first form, "summed"), the torch ops
that replaced it (runtime/nsa_mix.py `_mix_torch`: a product, two in-place multiply-adds, the cast;
about 32 bytes moved per bf16 output element against about 72), and the module's kernels (`_mix`
with the NSA module: `_nsa_mix`, one pass reading the three outputs and the gates, writing o: about
8 bytes an element). Outputs compared, then medians of each on the device given; with --backward
the forward and backward together (autograd through the torch forms; `_nsa_mix_bwd` for the
kernels) and the gradients compared. On the CPU the kernels run in Triton's interpreter (set here):
their times there say nothing of a GPU's.

    python experiments/nsa_mix.py --device cpu --shape 1x4x1024x128 [--backward]
    PYTHONPATH=. python3 experiments/nsa_mix.py --device cuda --shape 1x64x32768x128 [--backward]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="1x4x1024x128")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backward", action="store_true", help="time the forward and backward together")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the module's kernels are made
    import torch

    import attngen
    from attngen.resources import resolve_spec
    from attngen.runtime.nsa_mix import _mix, _mix_torch

    rt = attngen.load(resolve_spec("nsa")).RUNTIME  # the kernels take any Dv: the shape's

    def summed(gates, o_cmp, o_slc, o_swa, dtype):
        g = gates.to(torch.float32)
        return (g[..., 0:1] * o_cmp.float() + g[..., 1:2] * o_slc.float() + g[..., 2:3] * o_swa.float()).to(dtype)

    def torch_ops(gates, o_cmp, o_slc, o_swa, dtype):
        return _mix_torch(gates, o_cmp, o_slc, o_swa, dtype)

    def kernels(gates, o_cmp, o_slc, o_swa, dtype):
        return _mix(gates, o_cmp, o_slc, o_swa, dtype, rt)

    B, H, N, D = (int(x) for x in args.shape.split("x"))
    g = torch.Generator(device=args.device).manual_seed(0)
    inputs = [torch.rand(B, H, N, 3, generator=g, device=args.device).to(torch.bfloat16)]
    inputs += [torch.randn(B, H, N, D, generator=g, device=args.device).to(torch.bfloat16) for _ in range(3)]
    do = torch.randn(B, H, N, D, generator=g, device=args.device).to(torch.bfloat16)
    forms = (summed, torch_ops, kernels)

    def call(f):
        if not args.backward:
            with torch.no_grad():
                return f(*inputs, torch.bfloat16), None
        leaves = [x.detach().requires_grad_() for x in inputs]
        o = f(*leaves, torch.bfloat16)
        o.backward(do)
        return o.detach(), [x.grad for x in leaves]

    (a, ga), (b, gb), (c, gc) = (call(f) for f in forms)
    print(f"max |torch_ops - summed| {float((b.float() - a.float()).abs().max()):.3g}, "
          f"max |kernels - torch_ops| {float((c.float() - b.float()).abs().max()):.3g}")
    if args.backward:
        for name, x, y in zip(("gates", "o_cmp", "o_slc", "o_swa"), gc, gb):
            print(f"  d {name}: max |kernels - torch_ops| {float((x.float() - y.float()).abs().max()):.3g}")
    for f in forms + forms:
        times = []
        for _ in range(args.repeats):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            call(f)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"{f.__name__:>9}{' fwd+bwd' if args.backward else ''}: {statistics.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
