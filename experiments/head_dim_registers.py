"""Ran on: Triton 3.9.0 (offline sm90 compile, no GPU), 2026-12-06; raw: data/registers_head_dims_2026-12-06_sm90_offline.txt

What Triton really needs at head dims up to 256 (issue 16): causal's three kernels (fwd, bwd_dq,
bwd_dkdv), bf16, compiled offline for sm90 (attngen/tools/inspect_kernels.offline_run: Triton's own
binder, CPU tensors of shape B=1 H=2 N=256, no launch) at a grid of tilings around those sm90 can
run (resident rows >= 16 * num_warps, plus 64 rows on 8 warps, and 32 keys on 4 warps for bwd_dkdv),
for (head_dim, head_dim_v) = (256, 256) and (192, 128), and for comparison (128, 128) and (64, 64).
Per kernel: registers per thread and the local-memory spills of the SASS (LDL / STL instructions,
STACK bytes of cuobjdump -res-usage), the shared memory Triton allocates (metadata.shared; Triton
checks it against the device only when it loads a kernel, so offline "smem-over" means the launch
would fail with OutOfResources), and a compile error if any; beside them attngen.tiling's estimates
(registers_per_thread, shared_memory_bytes), whether check_legal admits the tiling today, and the
estimate this experiment proposes (proposed_registers: wgmma reads the resident operands from shared
memory; pointer loads pass the streamed tiles through registers).

To get a module at d256 at all (today "no legal tiling on sm90"), the spec is loaded with
attngen.tiling.MAX_REGS_PER_THREAD raised, in this process only; each launch then overrides the
module's tiling (KernelModule._launch's cfg), so the module's own choice does not matter. Under the
Triton the GPU machines run (3.6), unpack it as inspect_kernels.py says and put it first on PYTHONPATH.

    PYTHONPATH=. python experiments/head_dim_registers.py [--jobs 2] [--dims 256:256,192:128,128:128,64:64]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
os.environ.setdefault("ATTNGEN_CACHE", str(Path(tempfile.gettempdir()) / "attngen_head_dim_registers"))
os.environ.pop("TRITON_INTERPRET", None)  # the offline compile needs the real compiler

import torch  # noqa: E402

from attngen import runtime, tiling  # noqa: E402
from attngen.cost_model import TARGETS  # noqa: E402
from attngen.errors import TilingError  # noqa: E402
from attngen.loader import load  # noqa: E402
from attngen.runtime.sparse import NO_SPARSE  # noqa: E402
from attngen.runtime.roles import ROLES as ROLES_, width  # noqa: E402
from attngen.tiling import TileConfig, pad_head_dim  # noqa: E402
from attngen.tools.inspect_kernels import cuobjdump, offline_run, sass  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "registers_head_dims_2026-12-06_sm90_offline.txt"
SM90 = TARGETS["sm90"]
ELEM = 2  # bf16
B, H, N = 1, 2, 256
ROLES = ("fwd", "bwd_dq", "bwd_dkdv")
# resident rows (BLOCK_M in fwd and bwd_dq, BLOCK_N in bwd_dkdv) and warps: those sm90's rule (rows >=
# 16 * warps) admits, and 64 rows on 8 warps (two warpgroups splitting the MMAs' N, as FlashAttention-3's
# d256 backward does); for bwd_dkdv also 32 rows on 4 warps (below wgmma's 64: mma.sync)
OUTER = {"fwd": ((64, 4), (64, 8), (128, 4), (128, 8)), "bwd_dq": ((64, 4), (64, 8), (128, 4), (128, 8)),
         "bwd_dkdv": ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))}
STREAMED = (32, 64, 128)
STAGES = (1, 2, 3)


def spec_path(d: int, dv: int) -> Path:
    """causal.yaml at this head dim, under a name of its own (the loader caches by path and text)."""
    text = (ROOT / "specs" / "causal.yaml").read_text().replace("head_dim: 128", f"head_dim: {d}\nhead_dim_v: {dv}")
    path = Path(os.environ["ATTNGEN_CACHE"]) / "specs" / f"causal_hd{d}_{dv}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


_MODULES: dict = {}
_SINK: list = []


def module(d: int, dv: int):
    if (d, dv) not in _MODULES:
        saved = tiling.MAX_REGS_PER_THREAD
        tiling.MAX_REGS_PER_THREAD = 10 ** 6  # the module's own tiling choice; overridden per launch below
        try:
            mod = load(spec_path(d, dv))
        finally:
            tiling.MAX_REGS_PER_THREAD = saved
        rt = runtime.of(mod)
        for fn in rt.kernels.values():
            fn.run = offline_run(fn, _SINK)
        _MODULES[d, dv] = rt
    return _MODULES[d, dv]


def launch(rt, role: str, cfg: dict, d: int, dv: int) -> None:
    bf = torch.bfloat16
    q, k, v = (torch.empty(B, H, N, w, dtype=bf) for w in (d, d, dv))
    do, o = torch.empty(B, H, N, dv, dtype=bf), torch.empty(B, H, N, dv, dtype=bf)
    lse, delta = torch.empty(B, H, N), torch.empty(B, H, N)
    hp = rt.head_param_rows(q, {})
    scale = d ** -0.5
    if role == "fwd":
        rt._launch("fwd", (q, k, v, o, lse, hp), (scale * 1.4426950408889634, 0, 0.0), 0, (True, False), NO_SPARSE, cfg)
        return
    scalars = (scale * 1.4426950408889634, scale, 0, 0.0)
    if role == "bwd_dq":
        part = runtime.module.placeholder(q.device, torch.float32)
        rt._launch("bwd_dq", (q, k, v, do, o, torch.empty_like(q), lse, delta, hp, part), scalars, 0, (False,), NO_SPARSE, cfg)
    else:
        rt._launch("bwd_dkdv", (q, k, v, do, torch.empty_like(k), torch.empty_like(v), lse, delta, hp), scalars, 0,
                   (False,), NO_SPARSE, cfg)


def measure(job: tuple) -> dict:
    d, dv, role, tc = job
    rt = module(d, dv)
    cfg = dict(BLOCK_M=tc.block_m, BLOCK_N=tc.block_n, num_warps=tc.num_warps, num_stages=tc.num_stages,
               HEAD_DIM_PAD=tc.head_dim_pad, HEAD_DIM_V_PAD=tc.head_dim_v_pad, TMA=tc.tma)
    row = dict(d=d, dv=dv, role=role, cfg=tc)
    _SINK.clear()
    rt.plans.clear()
    t0 = time.time()
    try:
        launch(rt, role, cfg, d, dv)
    except Exception as e:  # a tiling the compiler rejects is a finding
        row.update(error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}", seconds=time.time() - t0)
        return row
    row["seconds"] = time.time() - t0
    (kernel,) = _SINK
    res = cuobjdump(kernel, "-res-usage")
    field = lambda name: int((re.findall(rf"{name}:(\d+)", res) or [-1])[-1])  # noqa: E731
    ops = Counter(re.findall(r"\b(LDL|STL|HGMMA|HMMA|UTMALDG)\b", sass(kernel)))
    row.update(regs=field("REG"), local=field("LOCAL"), stack=field("STACK"), ldl=ops["LDL"], stl=ops["STL"],
               hgmma=ops["HGMMA"], hmma=ops["HMMA"], tma_loads=ops["UTMALDG"], smem=kernel.metadata.shared)
    return row


def jobs(dims) -> list:
    out = []
    for d, dv in dims:
        dp, dvp = pad_head_dim(d), pad_head_dim(dv)
        for role in ROLES:
            transposed = role == "bwd_dkdv"
            for (rows, warps) in OUTER[role]:
                for streamed in STREAMED:
                    bm, bn = (streamed, rows) if transposed else (rows, streamed)
                    for stages in STAGES:
                        out.append((d, dv, role, TileConfig(bm, bn, warps, stages, dp, dvp, True)))
                    if streamed <= 64:  # pointer loads at two depths
                        out += [(d, dv, role, TileConfig(bm, bn, warps, s, dp, dvp, False)) for s in (1, 2)]
    return out


def current(tc: TileConfig, role: str) -> tuple[int, int, str]:
    """attngen.tiling's estimates and verdict today."""
    est_regs = tiling.registers_per_thread(tc, ELEM, role)
    est_smem = tiling.shared_memory_bytes(tc, ELEM, role)
    try:
        tiling.check_legal(tc, smem_per_block=SM90.smem_per_block, elem_bytes=ELEM, role=role,
                           rows_per_warp=SM90.rows_per_warp)
        legal = "legal"
    except TilingError as e:
        text = str(e)
        legal = "x:smem" if "shared memory" in text else "x:regs" if "registers" in text else "x:rows"
    return est_regs, est_smem, legal


SPLIT_OVERHEAD = 32  # proposed: two warpgroups splitting N (row reductions across them, layout conversions)


def split_n(tc: TileConfig, role: str) -> bool:
    """64 resident rows on 8 warps: with wgmma (64 rows a warpgroup) the two warpgroups split the MMAs' N."""
    return ROLES_[role].outer(tc.block_m, tc.block_n) == 64 and tc.num_warps == 8


def proposed_registers(tc: TileConfig, role: str, wgmma: bool = True) -> int:
    """The estimate this experiment proposes. With wgmma (sm90, 16-bit): no register fragments of the
    resident operands (wgmma reads them from shared memory; only the computed P and dS are register
    operands); with pointer loads, one word per 4 bytes of the streamed tiles (the addresses and masks
    of cp.async's 16-byte copies, or the data itself without pipelining); and where two warpgroups split
    N of 64 rows, the score-sized tiles counted per warpgroup (each needs whole rows of P / dS as its
    MMA's A operand) plus SPLIT_OVERHEAD. Without wgmma (sm80, fp32) it is today's estimate."""
    r, m, n, d, dv = ROLES_[role], tc.block_m, tc.block_n, tc.head_dim_pad, tc.head_dim_v_pad
    outer, inner = r.outer(m, n), r.inner(m, n)
    spread = outer * width(r.accumulators, d, dv)  # split over every thread
    scores = r.score_tiles * m * n + m * n * ELEM // 4
    if not wgmma:
        scores += m * width(r.fragments, d, dv) * ELEM // 4
    elif not tc.tma:
        spread += inner * width(r.streamed, d, dv) * ELEM // 4
    if wgmma and split_n(tc, role):
        return tiling.REG_OVERHEAD + SPLIT_OVERHEAD + -(-spread // (32 * tc.num_warps)) + -(-scores // 128)
    return tiling.REG_OVERHEAD + -(-(spread + scores) // (32 * tc.num_warps))


def proposed(tc: TileConfig, role: str) -> tuple[int, str]:
    """The proposed estimate and verdict: today's shared memory check, the proposed registers, and the
    rows rule with one exception: 64 rows on 8 warps (split N) when software-pipelined (num_stages >= 2;
    at 1 stage every such tiling near the limit spilled)."""
    regs = proposed_registers(tc, role)
    rows = ROLES_[role].outer(tc.block_m, tc.block_n)
    legal = ("x:smem" if tiling.shared_memory_bytes(tc, ELEM, role) > SM90.smem_per_block else
             "x:regs" if regs > tiling.MAX_REGS_PER_THREAD else
             "x:rows" if rows < SM90.rows_per_warp * tc.num_warps and not (split_n(tc, role) and tc.num_stages >= 2)
             else "legal")
    return regs, legal


def verdict(row: dict) -> str:
    if "error" in row:
        return "compile-error"
    if row["smem"] > SM90.smem_per_block:
        return "smem-over"
    if row["ldl"] or row["stl"] or row["local"] > 0 or row["stack"] > 0:
        return "spills"
    return "ok"


def format_row(row: dict) -> str:
    tc = row["cfg"]
    est_regs, est_smem, legal = current(tc, row["role"])
    new_regs, new_legal = proposed(tc, row["role"])
    head = (f"{row['d']:>3}/{row['dv']:<3} {row['role']:<8} {tc.block_m:>3}x{tc.block_n:<3} w{tc.num_warps} "
            f"s{tc.num_stages} {'tma' if tc.tma else 'ptr'} | est regs {est_regs:>3} smem {est_smem:>6} {legal:<6} "
            f"| proposed {new_regs:>3} {new_legal:<6}")
    if "error" in row:
        return f"{head} | {verdict(row)} {row['error']}"
    return (f"{head} | regs {row['regs']:>3} "
            f"LDL {row['ldl']:>4} STL {row['stl']:>4} stack {row['stack']:>4} smem {row['smem']:>6} "
            f"HGMMA {row['hgmma']:>3} HMMA {row['hmma']:>3} | {verdict(row):<13} {row['seconds']:5.1f}s")


def summarize(rows: list) -> list[str]:
    """Per head dims and role: the measured good tilings (ok: compiles, no spill, fits) against those each
    model admits; "rule" = the tilings sm90's rows rule admits (rows >= 16 * warps), which both models keep."""
    out = ["Summary per head dims and role: n tilings; ok = measured spill-free and fitting; for today's check_legal "
           "and the proposed one: legal&ok, legal but spills/over (false legal), ok but illegal (missed; rows-rule "
           "misses counted apart as 'rows')"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["d"], r["dv"], r["role"]), []).append(r)
    for (d, dv, role), rs in groups.items():
        ok = [verdict(r) == "ok" for r in rs]
        parts = [f"{d:>3}/{dv:<3} {role:<8} n {len(rs):>3} ok {sum(ok):>3}"]
        for name, legal in (("today", lambda r: current(r["cfg"], role)[2]), ("proposed", lambda r: proposed(r["cfg"], role)[1])):
            v = [legal(r) for r in rs]
            good = sum(o and x == "legal" for o, x in zip(ok, v))
            false = sum(not o and x == "legal" for o, x in zip(ok, v))
            rows_missed = sum(o and x == "x:rows" for o, x in zip(ok, v))
            missed = sum(o and x not in ("legal", "x:rows") for o, x in zip(ok, v))
            parts.append(f"{name}: legal&ok {good:>3} false-legal {false:>2} missed {missed:>2} rows {rows_missed:>2}")
        out.append("  " + " | ".join(parts))
    return out


def main() -> None:
    import triton

    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--dims", default="256:256,192:128,128:128,64:64")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--json", type=Path, help="also write the raw rows there")
    args = p.parse_args()
    dims = [tuple(int(x) for x in pair.split(":")) for pair in args.dims.split(",")]
    todo = jobs(dims)
    for d, dv in dims:  # generate and import each module once before the workers fork
        module(d, dv)
    t0 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"Offline sm90 compile (no GPU), Triton {triton.__version__}, 2026-12-06, commit {commit or '?'}: causal, bf16, B={B} H={H} N={N} "
             f"(CPU tensors), roles fwd / bwd_dq / bwd_dkdv. Columns: head_dim/head_dim_v role BLOCK_MxBLOCK_N "
             f"warps stages loads | attngen.tiling today: registers_per_thread, shared_memory_bytes, check_legal on "
             f"sm90 (x:why) | the estimate proposed here (proposed_registers) and its verdict | measured: registers per thread, LDL/STL instructions in the SASS, STACK bytes "
             f"(cuobjdump -res-usage: the spill frame), metadata.shared, HGMMA/HMMA count | verdict (ok, spills, smem-over = "
             f"over sm90's {SM90.smem_per_block} bytes per block, compile-error), compile time.",
             f"Command: PYTHONPATH=. python {' '.join(['experiments/head_dim_registers.py', *sys.argv[1:]])}"]
    print("\n".join(lines), flush=True)
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(measure, todo):
            rows.append(row)
            print(format_row(row), flush=True)
    order = {r: i for i, r in enumerate(ROLES)}
    rows.sort(key=lambda r: (-r["d"], -r["dv"], order[r["role"]], ROLES_[r["role"]].outer(r["cfg"].block_m, r["cfg"].block_n),
                             r["cfg"].num_warps, ROLES_[r["role"]].inner(r["cfg"].block_m, r["cfg"].block_n),
                             not r["cfg"].tma, r["cfg"].num_stages))
    lines += [format_row(r) for r in rows]
    lines += summarize(rows)
    lines.append(f"{len(rows)} compiles in {time.time() - t0:.0f} s with {args.jobs} processes")
    args.out.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps([{**r, "cfg": asdict(r["cfg"])} for r in rows], indent=0))
    print(lines[-1], "->", args.out)


if __name__ == "__main__":
    main()
