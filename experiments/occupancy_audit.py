"""Ran on: Triton 3.6.0, no GPU (offline compilation for sm90), 2026-12-02; raw:
data/occupancy_audit_2026-12-02_triton36_sm90.txt.

Programs per SM: what the cost model counted on against what the compiled kernels get.

For each spec and head dim, each kernel role and each of its tilings (the nominal one and the
sequence-length buckets'), compiles the kernel for sm90 without a GPU (as `attngen inspect
--offline` does: run under the Triton the GPU machines have, 3.6) and derives the programs per SM
from its shared memory (CUDA reserves 1 KiB per program besides), registers and warps. A row marked
`<` runs fewer programs per SM than the cost model ranked it with: a tiling that was chosen for
co-resident programs it does not get (e.g. the document forward's 24 bytes too many, before
`shallow_partial`).

    PYTHONPATH=/tmp/t36 python experiments/occupancy_audit.py [causal:128 document:64 ...] [--tokens 16384]

Without cases it audits those of its data file (the benchmark's six specs at d128 and d64, the
document spec at d64, dilated at d128, chunked).
"""

from __future__ import annotations

import argparse
import re

import torch

import attngen
from attngen import runtime
from attngen.bench import BenchShape, parse_case
from attngen.cost_model import TARGETS, predict
from attngen.exhaustive import tiling_of, workload
from attngen.passes import PassOptions, bucket_workload
from attngen.pipeline import compile_spec
from attngen.runtime.roles import ROLES
from attngen.spec import load_spec
from attngen.tools.inspect_kernels import check_offline, cuobjdump, offline_run

AUDITED = [f"{s}:{d}" for s in ("dense", "causal", "sliding_window", "prefix_lm", "softcap", "alibi") for d in (128, 64)] \
    + ["document:64", "dilated:128", "chunked:128"]
RESERVED = 1024  # shared memory CUDA keeps per program (sm80 and later)


def programs_per_sm(kernel, target) -> tuple[int, int, int]:
    """(programs per SM, shared memory bytes, registers per thread) of a compiled kernel."""
    found = re.findall(r"REG:(\d+)", cuobjdump(kernel, "-res-usage"))
    regs = int(found[-1]) if found else 255
    smem, warps = kernel.metadata.shared, kernel.metadata.num_warps
    regs_per_program = -(-regs * 32 // 256) * 256 * warps  # allocated per warp in units of 256
    return (min(target.smem_per_sm // (smem + RESERVED), target.regs_per_sm // regs_per_program,
                target.max_warps_per_sm // warps), smem, regs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", default=AUDITED, help="spec:head_dim (default: the data file's)")
    ap.add_argument("--tokens", type=int, default=16384, help="batch x seq of the workloads")
    args = ap.parse_args()
    check_offline()
    target, options = TARGETS["sm90"], PassOptions()
    print(f"{'kernel':<28} {'seq':>6} {'tiling':<24} {'model':>5} {'real':>5} {'smem':>7} {'regs':>4}")
    for case in args.cases:
        path, _ = parse_case(case)
        spec, compiled = load_spec(path), compile_spec(path, stop="tiling")
        for role in ROLES:
            kernel = compiled.kernel(role)
            plan = kernel.attr("mask_plan")
            tilings = [(options.workload.seq_q, kernel.attr("tiling")["bf16"])]
            tilings += [(seq, t["bf16"]) for seq, t in kernel.attr("bucket_tilings").by_seq]
            for seq, cfg in tilings:
                work = bucket_workload(options.workload, seq)
                model = predict(cfg, plan, target, work, role).occupancy
                module = attngen.load(path)
                rt = runtime.of(module)
                rt.plans.clear()
                sink = []
                for other, fn in rt.kernels.items():
                    fn.device_caches.clear()
                    fn.run = offline_run(fn, sink if other == role else [])
                heads = 16 if spec.head_dim > 64 else 32
                shape = BenchShape(max(1, args.tokens // seq), heads, seq)
                with tiling_of(module, role, "bf16", cfg):
                    workload(module, spec, shape, role, torch.bfloat16, "cpu")()
                real, smem, regs = programs_per_sm(sink[-1], target)
                flag = "<" if real < model else (">" if real > model else "")
                print(f"{spec.name + ' ' + role:<28} {seq:>6} {cfg.short():<24} {model:>5} {real:>5} {smem:>7} {regs:>4} {flag}",
                      flush=True)


if __name__ == "__main__":
    main()
