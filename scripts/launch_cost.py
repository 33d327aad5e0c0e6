"""Host microseconds per call of each piece of a generated module's launch path, at a shape whose
GPU work is negligible (so nothing waits on the GPU), then a cProfile of the forward and the
backward on the main thread. bf16, GPU only.

    python scripts/launch_cost.py sliding_window:128

Pieces: a whole training step through autograd (and with its backward on this thread, and a
no-op autograd Function's step); attention() without autograd; _forward and _backward called
directly (and _backward on another Python thread, as autograd's device thread runs it); each
kernel's Triton launch alone (its arguments prepared once, so only
Triton's binding, cache lookup and launcher run); the compiled kernel's launcher called directly
(Triton's binding and cache lookup skipped); building TMA descriptors.
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
    """Stands in for a kernel: records the launches it is asked for and passes them on."""

    def __init__(self, fn):
        self.fn, self.calls, self.arg_names = fn, [], fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.fn[grid](*args, **kwargs)
        return launch


def direct(fn, grid, args, kwargs):
    """The compiled kernel's launcher with the bound arguments, as JITFunction.run calls it."""
    compiled = fn[grid](*args, **kwargs)
    params = dict(zip(fn.arg_names, args))
    params.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound = [params[name] for name in fn.arg_names]
    g = tuple(grid) + (1,) * (3 - len(grid))
    stream = torch.cuda.current_stream().cuda_stream
    return lambda: compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None,
                                None, None, *bound)


def main():
    path, _ = parse_case(sys.argv[1])
    module = load(path)
    d, dv = module.HEAD_DIM, module.HEAD_DIM_V
    b, h, n = 1, 2, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda dim: torch.randn(b, h, n, dim, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, do = mk(d), mk(d), mk(dv), mk(dv)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    slopes = module.default_alibi_slopes(h, "cuda") if module.SPEC["score"]["alibi"] else q.new_empty(0, dtype=torch.float32)
    scale = d ** -0.5
    # a document spec: one document per row (the host path is the same for any ids)
    docs = (module.Documents(torch.zeros(b, n, dtype=torch.long, device="cuda")),) if module.SPEC["mask"].get("document") else ()
    kw = {"documents": docs[0]} if docs else {}
    o, lse = module._forward(q, k, v, slopes, scale, 0, 0.0, None, True, *docs)

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
        "_forward": lambda: module._forward(q, k, v, slopes, scale, 0, 0.0, None, True, *docs),
        "_backward, main thread": lambda: module._backward(do, q, k, v, o, lse, slopes, scale, 0, 0.0, *docs),
        "torch.empty x3": lambda: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)),
        "current stream": lambda: torch.cuda.current_stream().cuda_stream,
        "_operands (4 descriptors)": lambda: module._operands(module.TILINGS["bwd_dq"]["bf16"], (q, do), (k, v)),
    }
    kernels = {name: getattr(module, name) for name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv")}
    spies = {name: Spy(fn) for name, fn in kernels.items()}
    for name, spy in spies.items():
        setattr(module, name, spy)
    module._PLANS.clear()  # plans made from here on launch through the spies
    module._forward(q, k, v, slopes, scale, 0, 0.0, None, True, *docs)
    module._backward(do, q, k, v, o, lse, slopes, scale, 0, 0.0, *docs)
    module._PLANS.clear()
    for name, fn in kernels.items():
        setattr(module, name, fn)
        grid, args, kwargs = spies[name].calls[-1]
        cases[f"{name}[grid](...) alone"] = lambda fn=fn, grid=grid, args=args, kwargs=kwargs: fn[grid](*args, **kwargs)
        cases[f"{name} compiled.run direct"] = direct(fn, grid, args, kwargs)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; "
          f"{sys.argv[1]} at {b}x{h}x{n}; host us per call")
    threaded = on_a_thread(lambda: module._backward(do, q, k, v, o, lse, slopes, scale, 0, 0.0, *docs))
    print(f"{'_backward, on another thread':<34} {threaded:8.1f}")
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
