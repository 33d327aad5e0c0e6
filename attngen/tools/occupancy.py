"""Programs per SM: what the cost model ranked a tiling with, against what the kernel compiled for
sm90 gets (offline, without a GPU, under the installed Triton: run it under the GPU's Triton to
audit what the GPU runs). A kernel that gets fewer runs with fewer co-resident programs than its
tiling was chosen for (docs/decisions/shallow-partial.md: the 24 bytes that cost a document
forward its second program).

    python -m attngen.tools.occupancy document:128 causal:64 [--role fwd] [--seq 1024] [--tokens 16384]

Needs TRITON_INTERPRET unset (the kernels must be Triton JIT functions) and Triton's NVIDIA backend
with its bundled ptxas and cuobjdump (attngen.tools.inspect_kernels.check_offline).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

RESERVED = 1024  # shared memory CUDA keeps per program (sm80 and later)


@dataclass(frozen=True)
class Audit:
    spec: str
    role: str
    seq: int
    tiling: str
    model: int  # programs per SM the cost model ranked the tiling with
    real: int  # programs per SM of the compiled kernel
    smem: int
    regs: int


def programs_per_sm(kernel, target) -> tuple[int, int, int]:
    """(programs per SM, shared memory bytes, registers per thread) of a compiled kernel."""
    from .inspect_kernels import registers

    regs = registers(kernel) or 255
    smem, warps = kernel.metadata.shared, kernel.metadata.num_warps
    regs_per_program = -(-regs * 32 // 256) * 256 * warps  # allocated per warp in units of 256
    return (min(target.smem_per_sm // (smem + RESERVED), target.regs_per_sm // regs_per_program,
                target.max_warps_per_sm // warps), smem, regs)


def audit(case: str, roles=None, seqs=None, tokens: int = 16384, options=None) -> list[Audit]:
    """Each kernel of `case` ("spec:head_dim" or a spec path) at its bf16 tilings (the nominal one
    and the sequence-length buckets'), or only `roles` / `seqs`, compiled for sm90 offline."""
    import torch

    import attngen
    from attngen import runtime
    from attngen.bench import BenchShape, parse_case
    from attngen.cost_model import TARGETS, predict
    from attngen.exhaustive import tiling_of, workload
    from attngen.passes import PassOptions, bucket_workload
    from attngen.pipeline import compile_spec
    from attngen.spec import load_spec

    from .inspect_kernels import check_offline, offline_run

    check_offline()
    options = options or PassOptions()
    target = TARGETS["sm90"]
    path, _ = parse_case(case)
    spec = load_spec(path)
    compiled = compile_spec(path, options=options, stop="triton")
    module = attngen.load(path, **{k: v for k, v in vars(options).items() if k in ("shallow_partial", "nested_runs")
                                   and v is not None})
    rt = runtime.of(module)
    rows = []
    for role in roles or runtime.ROLES:
        kernel = compiled.kernel(role)
        tilings = [(options.workload.seq_q, kernel.attr("tiling")["bf16"])]
        tilings += [(seq, t["bf16"]) for seq, t in kernel.attr("bucket_tilings").by_seq]
        for seq, cfg in tilings:
            if seqs and seq not in seqs:
                continue
            model = predict(cfg, kernel.attr("mask_plan"), target, bucket_workload(options.workload, seq), role).occupancy
            rt.plans.clear()
            sink = []
            for other, fn in rt.kernels.items():
                fn.device_caches.clear()
                fn.run = offline_run(fn, sink if other == role else [])
            shape = BenchShape(max(1, tokens // seq), 16 if spec.head_dim > 64 else 32, seq)
            with tiling_of(module, role, "bf16", cfg):
                workload(module, spec, shape, role, torch.bfloat16, "cpu")()
            real, smem, regs = programs_per_sm(sink[-1], target)
            rows.append(Audit(spec.name, role, seq, cfg.short(), model, real, smem, regs))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", help="spec:head_dim")
    ap.add_argument("--role", action="append", help="only these kernel roles")
    ap.add_argument("--seq", type=int, action="append", help="only these sequence-length buckets")
    ap.add_argument("--tokens", type=int, default=16384, help="batch x seq of the workloads")
    ap.add_argument("--no-shallow-partial", action="store_true", help="compile with shallow_partial off (an A/B)")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    args = ap.parse_args()
    from attngen.passes import PassOptions

    options = PassOptions(shallow_partial=False) if args.no_shallow_partial else PassOptions()
    rows = [r for case in args.cases for r in audit(case, args.role, args.seq, args.tokens, options)]
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return
    print(f"{'kernel':<28} {'seq':>6} {'tiling':<24} {'model':>5} {'real':>5} {'smem':>7} {'regs':>4}")
    for r in rows:
        flag = "<" if r.real < r.model else (">" if r.real > r.model else "")
        print(f"{r.spec + ' ' + r.role:<28} {r.seq:>6} {r.tiling:<24} {r.model:>5} {r.real:>5} {r.smem:>7} {r.regs:>4} {flag}")


if __name__ == "__main__":
    main()
