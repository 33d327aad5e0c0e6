"""Ran on: Triton 3.6.0, NVIDIA H200 (torch 2.11.0+cu130), 2026-12-01; results:
docs/lab/benchmarks-log.md ("Host time per launch and per step"), docs/decisions/direct-launch.md.
Ported to attngen.runtime since (not rerun).

Host microseconds per call of each piece of a generated module's launch path, at a shape whose
GPU work is negligible (so nothing waits on the GPU), then a cProfile of the forward and the
backward on the main thread. bf16, GPU only.

    python experiments/launch_cost.py sliding_window:128

Pieces: a whole training step through autograd (and with its backward on this thread, and a
no-op autograd Function's step); attention() without autograd; the runtime's forward and
backward called directly (rt = attngen.runtime.of(module); and rt.backward on another Python
thread, as autograd's device thread runs it); each kernel's Triton launch alone (its arguments
prepared once, so only Triton's binding, cache lookup and launcher run); the compiled kernel's
launcher called directly, as a launch plan does from a signature's second call (Triton's binding
and cache lookup skipped); building TMA descriptors. (Before attngen.runtime, the same pieces
were the module's _forward, _backward and _operands, as the logged tables name them.)
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
import time

import torch
import triton

from attngen import runtime
from attngen.bench import parse_case
from attngen.loader import load
from attngen.runtime.launch import descriptors
from attngen.runtime.roles import ROLES


class _Identity(torch.autograd.Function):
    """The cheapest custom autograd Function: what the engine costs by itself."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def host_us(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return elapsed


def on_a_thread(fn):
    """host_us(fn) with another Python thread running it, as autograd's device thread runs a backward
    (which, like this one, makes the GPU current first)."""
    result = []

    def run():
        torch.cuda.set_device(torch.cuda.current_device())
        torch.cuda.synchronize()  # a runtime call: makes the device's context current on this thread
        result.append(host_us(fn))
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return result[0]


class Spy:
    """Stands in for a kernel in the runtime's table: records the launches its plans ask for and
    passes them on."""

    def __init__(self, fn):
        self.fn, self.calls, self.arg_names = fn, [], fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.fn[grid](*args, **kwargs)
        return launch


def direct(fn, grid, args, kwargs):
    """The compiled kernel's launcher with the launch's arguments, as a launch plan calls it from a
    signature's second call on (attngen.runtime.launch.Plan): the constexprs are the trailing
    parameters, the stream the current device's current stream."""
    compiled = fn[grid](*args, **kwargs)
    runner = compiled[grid]
    constexprs = [kwargs[name] for name in fn.arg_names[len(args):]]
    return lambda: runner(*args, *constexprs,
                          stream=torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice()))


def main():
    path, _ = parse_case(sys.argv[1])
    module = load(path)
    rt = runtime.of(module)
    d, dv = rt.head_dim, rt.head_dim_v
    b, h, n = 1, 2, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda dim: torch.randn(b, h, n, dim, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, do = mk(d), mk(d), mk(dv), mk(dv)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    hp = rt.head_param_rows(q, {})  # the default per-head parameters (ALiBi slopes, temperatures), if any
    scale = rt.scale
    # a document spec: one document per row (the host path is the same for any ids)
    docs = runtime.Documents(torch.zeros(b, n, dtype=torch.long, device="cuda")) if rt.document else None
    kw = {"documents": docs} if docs is not None else {}
    sparse = runtime.Sparse(docs)
    o, lse = rt.forward(q, k, v, hp, scale, 0, 0.0, None, True, sparse)
    dq_cfg = rt.config("bwd_dq", "bf16", n, n)
    bm, bn, dp, dvp = dq_cfg["BLOCK_M"], dq_cfg["BLOCK_N"], dq_cfg["HEAD_DIM_PAD"], dq_cfg["HEAD_DIM_V_PAD"]
    dq_blocks = {0: (bm, dp), 3: (bm, dvp), 1: (bn, dp), 2: (bn, dvp)}

    def step():
        module.attention(qg, kg, vg, training=False, **kw).backward(do)
        qg.grad = kg.grad = vg.grad = None

    def step_one_thread():
        with torch.autograd.set_multithreading_enabled(False):
            step()

    x = torch.randn(8, device="cuda", requires_grad=True)

    def identity_step():
        _Identity.apply(x).backward(x)
        x.grad = None

    cases = {
        "step (autograd fwd+bwd)": step,
        "no-op autograd Function step": identity_step,
        "step, backward on this thread": step_one_thread,
        "attention, no grad": lambda: module.attention(q, k, v, training=False, **kw),
        "rt.forward": lambda: rt.forward(q, k, v, hp, scale, 0, 0.0, None, True, sparse),
        "rt.backward, main thread": lambda: rt.backward(do, q, k, v, o, lse, hp, scale, 0, 0.0, sparse),
        "torch.empty x3": lambda: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)),
        "current stream": lambda: torch.cuda.current_stream().cuda_stream,
        "descriptors (bwd_dq: 4)": lambda: descriptors(dq_cfg, (q, k, v, do), dq_blocks),
    }
    kernels = dict(rt.kernels)
    spies = {role: Spy(fn) for role, fn in kernels.items()}
    rt.kernels.update(spies)
    rt.plans.clear()  # plans made from here on launch through the spies
    rt.forward(q, k, v, hp, scale, 0, 0.0, None, True, sparse)
    rt.backward(do, q, k, v, o, lse, hp, scale, 0, 0.0, sparse)
    rt.kernels.update(kernels)
    rt.plans.clear()
    for role, fn in kernels.items():
        name = ROLES[role].kernel
        grid, args, kwargs = spies[role].calls[-1]
        cases[f"{name}[grid](...) alone"] = lambda fn=fn, grid=grid, args=args, kwargs=kwargs: fn[grid](*args, **kwargs)
        cases[f"{name} compiled launcher direct"] = direct(fn, grid, args, kwargs)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; "
          f"{sys.argv[1]} at {b}x{h}x{n}; host us per call")
    threaded = on_a_thread(lambda: rt.backward(do, q, k, v, o, lse, hp, scale, 0, 0.0, sparse))
    print(f"{'rt.backward, on another thread':<34} {threaded:8.1f}")
    for label, fn in cases.items():
        try:
            print(f"{label:<34} {host_us(fn):8.1f}")
        except Exception as e:  # a probe that fails is reported, the others still run
            print(f"{label:<34} failed: {type(e).__name__}: {e}")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(100):
        step_one_thread()
    profile.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(35)
    print(out.getvalue())


if __name__ == "__main__":
    main()
