"""A/B of one lowering option (a PassOptions flag): the module compiled with it on against off,
same tilings, bf16: the forward and the backward alone (forward outputs computed once) replayed as
CUDA graphs (GPU time, no host overhead), and forward+backward through autograd as `bench` times it.
For an option the passes set per role (split_loops, nested_runs), on and off force it for every
kernel: neither arm is the shipped per-role default.

    python scripts/option_ab.py --option longest_first specs/causal.yaml --shape 4x16x4096
    python scripts/option_ab.py --option split_loops sliding_window:128 softcap:64 --shape 16x16x1024
"""

from __future__ import annotations

import argparse

import torch
import triton

import attngen
from attngen.bench import bench_documents, parse_case, parse_shapes
from attngen.exhaustive import workload
from attngen.spec import load_spec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--option", required=True)
    ap.add_argument("--shape", default="4x16x4096")
    args = ap.parse_args()
    shapes = parse_shapes(args.shape)
    bench = lambda fn, **kw: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median", **kw)  # noqa: E731
    graph = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")  # noqa: E731
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; bf16; "
          f"median ms (fwd, bwd: CUDA graphs; fwd+bwd: do_bench); {args.option} on / off")
    for arg in args.specs:
        path, _ = parse_case(arg)
        spec = load_spec(path)
        for shape in shapes:
            g = torch.Generator(device="cuda").manual_seed(0)
            mk = lambda d: torch.randn(shape.batch, shape.heads, shape.seq, d, generator=g, device="cuda",  # noqa: E731
                                       dtype=torch.bfloat16)
            q, k, v, do = mk(spec.head_dim), mk(spec.head_dim), mk(spec.head_dim_v), mk(spec.head_dim_v)
            ids = bench_documents(shape, g) if spec.mask.document else None  # the benchmark's documents
            out = {}
            for value in (True, False):
                module = attngen.load(path, **{args.option: value})
                extra = {"documents": module.Documents(ids)} if ids is not None else {}
                fwd = lambda: module.attention(q, k, v, training=False, **extra)  # noqa: E731
                bwd = workload(module, spec, shape, "bwd_dq", torch.bfloat16, "cuda")
                qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
                step = lambda: module.attention(qg, kg, vg, training=False, **extra).backward(do)  # noqa: E731
                out[value] = (graph(fwd), graph(bwd), bench(step, grad_to_none=[qg, kg, vg]))
            on, off = out[True], out[False]
            print(f"{spec.name:<18} {str(shape):<16} " + " | ".join(
                f"{what} {a:.3f} / {b:.3f} ms ({b / a:.3f}x)" for what, a, b in zip(("fwd", "bwd", "fwd+bwd"), on, off)))


if __name__ == "__main__":
    main()
