"""Ran on: Triton 3.6.0, NVIDIA H200 (torch 2.11.0+cu130, Python 3.12.3), 2026-12-02; raw:
data/host_after_compile_2026-12-02_h200.txt.

Does compiling FlexAttention in a process slow our host path later in it, and why?

`attngen bench` times the sliding window's 16k shape after two Flex compilations in the process,
and there our step's host time rose from 0.63 to 0.77 ms (docs/lab/benchmarks-log.md). This script
times one case's forward+backward step (do_bench median and host issue time) before and after
compiling and running Flex for the same spec, records the process state that could explain a change
(gc counts, threads, profiler and trace hooks, torch function / dispatch mode stacks, Triton's
launch hooks), profiles the host path with cProfile both times (--profile), and then retimes after
gc.freeze().

    python experiments/host_after_compile.py sliding_window:128:1x16x16384 [--flex-shapes 1x16x1024,4x16x4096]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
import threading
import time

import torch
import triton

from attngen.bench import _flex, parse_case, parse_shapes
from attngen.loader import load
from attngen.spec import load_spec
from attngen.tools.profile_step import host_ms


def state():
    s = {"gc_counts": gc.get_count(), "gc_objects": len(gc.get_objects()), "gc_thresholds": gc.get_threshold(),
         "threads": [t.name for t in threading.enumerate()], "switch_interval": sys.getswitchinterval(),
         "trace": sys.gettrace(), "profile": sys.getprofile(),
         "torch_function_stack": torch._C._len_torch_function_stack(),
         "dispatch_stack": torch._C._len_torch_dispatch_stack(),
         "autograd_profiler": torch.autograd.profiler._is_profiler_enabled,
         "anomaly": torch.is_anomaly_enabled(), "grad": torch.is_grad_enabled()}
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        s["launch_enter_hook"] = knobs.runtime.launch_enter_hook
        s["launch_exit_hook"] = knobs.runtime.launch_exit_hook
        s["jit_post_compile_hook"] = getattr(knobs.runtime, "jit_post_compile_hook", None)
    return s


def measure(label, step, n_host=50):
    med = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    hosts = sorted(host_ms(step, n_host) for _ in range(5))
    print(f"{label:34s} median {med:.3f} ms, host issue {hosts[2]:.3f} ms (min {hosts[0]:.3f})", flush=True)
    return med, hosts[2]


def profiled(label, step, n=200):
    step()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        step()
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(18)
    print(f"--- cProfile {label}, {n} steps, by tottime\n" + "\n".join(out.getvalue().splitlines()[6:30]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case", help="spec:head_dim:BxHxN")
    ap.add_argument("--flex-shapes", default="", help="also compile and run Flex at these shapes first")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, "
          f"Python {sys.version.split()[0]}; bf16", flush=True)
    path, shape = parse_case(args.case)
    spec, module = load_spec(path), load(path)
    b, h, n = shape.batch, shape.heads, shape.seq
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda d: torch.randn(b, h, n, d, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, do = mk(spec.head_dim), mk(spec.head_dim), mk(spec.head_dim_v), mk(spec.head_dim_v)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def ours():
        module.attention(qg, kg, vg).backward(do)
        qg.grad = kg.grad = vg.grad = None

    before = state()
    measure("ours, fresh process", ours)
    measure("ours, fresh process (again)", ours)
    if args.profile:
        profiled("ours, fresh", ours)

    flex_shapes = [*parse_shapes(args.flex_shapes), shape] if args.flex_shapes else [shape]
    for fs in flex_shapes:
        fq, fk, fv, fdo = (torch.randn(fs.batch, fs.heads, fs.seq, d, device="cuda", dtype=torch.bfloat16)
                           for d in (spec.head_dim, spec.head_dim, spec.head_dim_v, spec.head_dim_v))
        fq, fk, fv = (t.requires_grad_() for t in (fq, fk, fv))
        flex = _flex(spec, fs, module)
        t = time.perf_counter()
        for _ in range(3):
            flex(fq, fk, fv).backward(fdo)
        torch.cuda.synchronize()
        print(f"flex {fs.batch}x{fs.heads}x{fs.seq} compiled and run in {time.perf_counter() - t:.1f} s", flush=True)
        if fs == shape:
            measure("flex", lambda: flex(fq, fk, fv).backward(fdo))
        del fq, fk, fv, fdo

    after = state()
    for key in before:
        if before[key] != after[key]:
            print(f"state {key}: {before[key]!r} -> {after[key]!r}")
    measure("ours, after flex", ours)
    measure("ours, after flex (again)", ours)
    if args.profile:
        profiled("ours, after flex", ours)
    gc.collect()
    gc.freeze()
    measure("ours, after gc.freeze()", ours)
    gc.disable()
    measure("ours, gc disabled", ours)
    gc.enable()
    gc.unfreeze()
    torch._dynamo.reset()
    measure("ours, after dynamo reset", ours)
    torch.cuda.empty_cache()
    measure("ours, after empty_cache", ours)


if __name__ == "__main__":
    main()
