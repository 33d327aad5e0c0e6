"""Host time to issue one call of each piece of a training step (no synchronization, after
warm-up: the GPU keeps up or queues), then a cProfile of the backward: where the per-step host
overhead comes from. bf16, GPU only.

    python scripts/host_breakdown.py sliding_window:128:4x16x4096
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch

from attngen.bench import parse_case
from attngen.loader import load


class _Identity(torch.autograd.Function):
    """The cheapest custom autograd Function: what the engine costs by itself."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def host_ms(fn, n=100):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = (time.perf_counter() - start) / n * 1e3
    torch.cuda.synchronize()
    return elapsed


def main():
    path, shape = parse_case(sys.argv[1])
    b, h, n = shape.batch, shape.heads, shape.seq
    module = load(path)
    d = module.HEAD_DIM
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda: torch.randn(b, h, n, d, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, do = make(), make(), make(), make()
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    alibi = module.SPEC["score"]["alibi"]
    slopes = module.default_alibi_slopes(h, "cuda") if alibi else q.new_empty(0, dtype=torch.float32)
    scale = d ** -0.5
    o, lse = module._forward(q, k, v, slopes, scale, 0, 0.0, None, True)
    cfg = module.TILINGS["bwd_dq"]["bf16"]

    def step():
        module.attention(qg, kg, vg, training=False).backward(do)
        qg.grad = kg.grad = vg.grad = None

    def identity_step():
        _Identity.apply(qg).backward(do)
        qg.grad = None

    def backward():
        module._backward(do, q, k, v, o, lse, slopes, scale, 0, 0.0)

    cases = {
        "step (autograd fwd+bwd)": step,
        "attention, no grad": lambda: module.attention(q, k, v, training=False),
        "_forward": lambda: module._forward(q, k, v, slopes, scale, 0, 0.0, None, True),
        "_backward, main thread": backward,
        "no-op autograd Function": identity_step,
        "_operands (4 descriptors)": lambda: module._operands(cfg, (q, do), (k, v)),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {sys.argv[1]}; host ms per call")
    for label, fn in cases.items():
        print(f"{label:<28} {host_ms(fn):.4f}")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(50):
        backward()
    profile.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
    print(out.getvalue())


if __name__ == "__main__":
    main()
