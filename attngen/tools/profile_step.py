"""Where a forward+backward step's time goes, ours against FlexAttention: the do_bench median (as
`attngen bench` times it), the GPU time of each kernel per step (torch.profiler), their sum, and
the host time to issue one step (no synchronization, after warm-up). A median well above the
kernel sum means the GPU waits for the host. A document spec runs on the benchmark's documents
(bench_documents), its Documents and Flex's block mask made before timing. GPU only.

    attngen profile sliding_window:128:4x16x4096 dense:128:16x16x1024 [--fwd]
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Iterable


def kernel_times(step, n: int = 20) -> dict[str, float]:
    """{kernel name: GPU ms per step} over n profiled steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:60]] += e.device_time / 1e3 / n
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def host_ms(step, n: int = 20) -> float:
    """Host milliseconds to issue one step, after one warm-up step, without synchronizing between steps."""
    import torch

    step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - t) * 1e3 / n
    torch.cuda.synchronize()
    return host


def profile_cases(cases: Iterable[str], forward_only: bool = False, log: Callable[[str], None] = print) -> None:
    """For each case 'spec:head_dim:BxHxN' (or 'spec:head_dim', or a spec file: at 4x16x4096), ours
    and Flex: median, kernel sum and host issue time, then each kernel's GPU ms per step."""
    import torch
    import triton

    from attngen.bench import BenchShape, _flex, bench_documents, parse_case
    from attngen.loader import load
    from attngen.runtime import Documents
    from attngen.spec import load_spec

    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16")
    for case in cases:
        path, shape = parse_case(case)
        shape = shape or BenchShape(4, 16, 4096)
        b, h, n = shape.batch, shape.heads, shape.seq
        spec, module = load_spec(path), load(path)
        g = torch.Generator(device="cuda").manual_seed(0)
        mk = lambda dd: torch.randn(b, h, n, dd, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        q, k, v, do = mk(spec.head_dim), mk(spec.head_dim), mk(spec.head_dim_v), mk(spec.head_dim_v)
        ids = bench_documents(shape, g) if spec.mask.document else None  # the benchmark's documents
        extra = {"documents": Documents(ids)} if ids is not None else {}
        impls = {"ours": lambda q, k, v: module.attention(q, k, v, training=False, **extra),
                 "flex": _flex(spec, shape, module, ids)}
        for impl, fn in impls.items():
            qg, kg, vg = (t.clone().requires_grad_(not forward_only) for t in (q, k, v))
            if forward_only:
                step = lambda: fn(qg, kg, vg)  # noqa: E731
            else:
                def step():
                    fn(qg, kg, vg).backward(do)
                    qg.grad = kg.grad = vg.grad = None
            med = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
            kt = kernel_times(step)
            hm = host_ms(step)
            log(f"\n{case} {impl}: median {med:.3f} ms, kernels {sum(kt.values()):.3f} ms, host issue {hm:.3f} ms")
            for kname, ms in kt.items():
                log(f"    {ms:8.4f}  {kname}")
