"""What the compiler made of a spec's kernels on this GPU: registers, spills, shared memory and the
instruction mix of the SASS (HGMMA = Hopper warpgroup MMA, HMMA = the older mma.sync path,
UTMALDG = TMA loads, LDL/STL = local-memory spills), for the cost model's tiling with pointer
loads and with TMA loads.

    python scripts/inspect_kernels.py specs/dense.yaml [--out DIR]

With --offline it needs no GPU: each kernel launch is replaced by a compilation for an sm90 target
(Triton's own binder decides the specialization, as on a GPU; inputs are CPU tensors), and the
SASS comes from the cubin. Run it under the Triton the GPU machines have, e.g. 3.6 unpacked beside
the installed one (the recipe is in scripts/gluon_probe.py's docstring):

    PYTHONPATH=/tmp/t36 python scripts/inspect_kernels.py specs/causal.yaml --offline

Offline differs from a GPU run in the inputs' alignment (CPU allocations, also 16-byte aligned)
and in FAST_TANH, which the host code sets only for CUDA tensors (softcap specs).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import triton

import attngen
from attngen.bench import BenchShape
from attngen.exhaustive import tiling_of, workload
from attngen.pipeline import compile_spec
from attngen.spec import load_spec

OPS = ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDG", "LDL", "STL", "MUFU.EX2", "MUFU.TANH", "BAR.SYNC", "SYNCS")


def compiled_kernels(fn):
    """Every CompiledKernel in a JITFunction's caches (the layout of the cache varies by version)."""
    out = []
    for entry in fn.device_caches.values():
        for part in entry if isinstance(entry, tuple) else (entry,):
            if isinstance(part, dict):
                out += [k for k in part.values() if hasattr(k, "asm")]
    return out


def cuobjdump(kernel, flag: str) -> str:
    """cuobjdump's output for the kernel's cubin: Triton's bundled copy, else the one on PATH."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(bundled) if bundled.exists() else shutil.which("cuobjdump") or "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def sass(kernel) -> str:
    try:
        return kernel.asm["sass"]
    except Exception:  # older versions: disassemble the cubin ourselves
        return cuobjdump(kernel, "-sass")


def offline_run(fn, sink: list, arch: int = 90):
    """A stand-in for JITFunction.run that compiles the launch for an NVIDIA `arch` target
    instead of running it: Triton 3.6's binder and argument packing, as a launch would use."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)

    def run(*args, grid, warmup, **kwargs):
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        sink.append(triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__))
    return run


def describe(kernel) -> str:
    text = sass(kernel)
    counts = collections.Counter()
    for op in OPS:
        counts[op] = len(re.findall(rf"\b{re.escape(op)}\b", text))
    meta = kernel.metadata
    regs = getattr(kernel, "n_regs", None)
    if regs is None:  # not loaded on a device (offline): the cubin's resource usage
        found = re.findall(r"REG:(\d+)", cuobjdump(kernel, "-res-usage"))
        regs = found[-1] if found else "?"
    return (f"regs {regs} spills {getattr(kernel, 'n_spills', '?')} "
            f"smem {getattr(meta, 'shared', '?')} warps {meta.num_warps} stages {meta.num_stages} | "
            + " ".join(f"{op} {counts[op]}" for op in OPS))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--shape", default="4x16x4096")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--offline", action="store_true", help="compile for sm90 on this machine instead of running")
    args = ap.parse_args()
    device = "cpu" if args.offline else "cuda"
    b, h, n = (int(x) for x in args.shape.split("x"))
    spec, compiled = load_spec(args.spec), compile_spec(args.spec, stop="tiling")
    kernels = {"fwd": "_attn_fwd", "bwd_dkdv": "_attn_bwd_dkdv", "bwd_dq": "_attn_bwd_dq"}
    for role, name in kernels.items():
        base = compiled.kernel(role).attr("tiling")["bf16"]
        for cfg in (replace(base, tma=False), replace(base, tma=True)):
            module = attngen.load(args.spec)
            fn = getattr(module, name)
            fn.device_caches.clear()  # so that only this variant is in the cache
            offline = []
            if args.offline:  # every kernel compiles instead of running; only this role's is kept
                for other in kernels.values():
                    getattr(module, other).run = offline_run(getattr(module, other), offline if other == name else [])
            with tiling_of(module, role, "bf16", cfg):
                try:
                    workload(module, spec, BenchShape(b, h, n), role, torch.bfloat16, device)()
                    if not args.offline:
                        torch.cuda.synchronize()
                except Exception as e:
                    print(f"{spec.name} {role} {cfg.short()}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
            for k in offline or compiled_kernels(fn):
                print(f"{spec.name} {role} {cfg.short()}: {describe(k)}")
                if args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / f"{spec.name}_{role}_{cfg.short().replace(' ', '_')}.sass").write_text(sass(k))


if __name__ == "__main__":
    main()
