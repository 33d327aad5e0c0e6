"""What the compiler made of a spec's kernels on this GPU: registers, spills, shared memory and the
instruction mix of the SASS (HGMMA = Hopper warpgroup MMA, HMMA = the older mma.sync path,
UTMALDG = TMA loads, LDL/STL = local-memory spills), for the cost model's tiling with pointer
loads and with TMA loads.

    python scripts/inspect_kernels.py specs/dense.yaml [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

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


def sass(kernel) -> str:
    try:
        return kernel.asm["sass"]
    except Exception:  # older versions: disassemble the cubin ourselves
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            return subprocess.run(["cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout


def describe(kernel) -> str:
    text = sass(kernel)
    counts = collections.Counter()
    for op in OPS:
        counts[op] = len(re.findall(rf"\b{re.escape(op)}\b", text))
    meta = kernel.metadata
    return (f"regs {getattr(kernel, 'n_regs', '?')} spills {getattr(kernel, 'n_spills', '?')} "
            f"smem {getattr(meta, 'shared', '?')} warps {meta.num_warps} stages {meta.num_stages} | "
            + " ".join(f"{op} {counts[op]}" for op in OPS))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--shape", default="4x16x4096")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    b, h, n = (int(x) for x in args.shape.split("x"))
    spec, compiled = load_spec(args.spec), compile_spec(args.spec, stop="tiling")
    kernels = {"fwd": "_attn_fwd", "bwd_dkdv": "_attn_bwd_dkdv", "bwd_dq": "_attn_bwd_dq"}
    for role, name in kernels.items():
        base = compiled.kernel(role).attr("tiling")["bf16"]
        for cfg in (replace(base, tma=False), replace(base, tma=True)):
            module = attngen.load(args.spec)
            fn = getattr(module, name)
            fn.device_caches.clear()  # so that only this variant is in the cache
            with tiling_of(module, role, "bf16", cfg):
                try:
                    workload(module, spec, BenchShape(b, h, n), role, torch.bfloat16, "cuda")()
                    torch.cuda.synchronize()
                except Exception as e:
                    print(f"{spec.name} {role} {cfg.short()}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
            for k in compiled_kernels(fn):
                print(f"{spec.name} {role} {cfg.short()}: {describe(k)}")
                if args.out:
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / f"{spec.name}_{role}_{cfg.short().replace(' ', '_')}.sass").write_text(sass(k))


if __name__ == "__main__":
    main()
