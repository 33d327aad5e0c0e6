"""Where a forward+backward step's time goes, ours against FlexAttention: the do_bench median (as
`attngen bench` times it), the GPU time of each kernel per step (torch.profiler), their sum, and
the host time to issue one step (no synchronization, after warm-up). A median well above the
kernel sum means the GPU waits for the host. A document spec runs on the benchmark's documents
(bench_documents), its Documents and Flex's block mask made before timing.

    python scripts/profile_step.py sliding_window:128:4x16x4096 dense:128:16x16x1024 [--fwd]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from attngen.bench import _flex, bench_documents, parse_case
from attngen.loader import load
from attngen.spec import load_spec


def kernel_times(step, n=20):
    """{kernel name: GPU ms per step} over n profiled steps."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:60]] += e.device_time / 1e3 / n
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def host_ms(step, n=20):
    step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - t) * 1e3 / n
    torch.cuda.synchronize()
    return host


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+", help="spec:head_dim:BxHxN")
    ap.add_argument("--fwd", action="store_true", help="forward only")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16")
    for case in args.cases:
        path, shape = parse_case(case)
        b, h, n = shape.batch, shape.heads, shape.seq
        spec, module = load_spec(path), load(path)
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda dd: torch.randn(b, h, n, dd, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(spec.head_dim), mk(spec.head_dim), mk(spec.head_dim_v), mk(spec.head_dim_v)
        ids = bench_documents(shape, g) if spec.mask.document else None  # the benchmark's documents
        extra = {"documents": module.Documents(ids)} if ids is not None else {}
        impls = {"ours": lambda q, k, v: module.attention(q, k, v, training=False, **extra),
                 "flex": _flex(spec, shape, module, ids)}
        for impl, fn in impls.items():
            qg, kg, vg = (t.clone().requires_grad_(not args.fwd) for t in (q, k, v))
            if args.fwd:
                step = lambda: fn(qg, kg, vg)  # noqa: E731
            else:
                def step():
                    fn(qg, kg, vg).backward(do)
                    qg.grad = kg.grad = vg.grad = None
            med = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
            kt = kernel_times(step)
            hm = host_ms(step)
            print(f"\n{case} {impl}: median {med:.3f} ms, kernels {sum(kt.values()):.3f} ms, host issue {hm:.3f} ms")
            for kname, ms in kt.items():
                print(f"    {ms:8.4f}  {kname}")


if __name__ == "__main__":
    main()
