"""Exhaustive search over tilings, to judge the cost model: time every legal candidate of one kernel
(role) on one shape and compare the cost model's pick with the fastest.

    rows = search("specs/causal.yaml", BenchShape(4, 16, 4096), role="bwd_dkdv", timer=median_ms)
    summary(rows)   # pick, best, pick / best throughput

A candidate is tried by swapping it into the generated module's TILINGS for the duration of one
measurement; the kernels themselves are unchanged (tile sizes are constexpr), so every candidate
computes the same function. Forward candidates are timed through the forward; backward
candidates through the backward alone (forward outputs computed once).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from . import runtime
from .bench import BenchShape, bench_documents, bench_layout
from .loader import load
from .passes import PassOptions, bucket_for
from .pipeline import compile_spec
from .tiling import TileConfig


@dataclass(frozen=True)
class Trial:
    rank: int  # 1 = the cost model's pick (at the shape's bucket: the module's)
    config: TileConfig
    predicted_ms: float
    measured_ms: float | None  # None: failed to compile or run
    error: str = ""


@contextlib.contextmanager
def tiling_of(module, role: str, dtype: str, cfg: TileConfig):
    """Temporarily runs `module`'s `role` kernel with `cfg`."""
    rt = runtime.of(module)
    saved, tuned = rt.tilings[role][dtype], dict(rt.tuned)
    buckets = rt.bucket_tilings
    shadowing = {key: buckets.pop(key) for key in list(buckets) if key[:2] == (role, dtype)}
    rt.tilings[role][dtype] = as_launch(cfg)
    rt.tuned.clear()  # autotuned entries and this kernel's per-bucket ones would shadow the candidate
    try:
        yield
    finally:
        rt.tilings[role][dtype] = saved
        rt.tuned.update(tuned)
        buckets.update(shadowing)


def as_launch(cfg: TileConfig) -> dict:
    """A TileConfig as the generated module's TILINGS entries spell it."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                HEAD_DIM_PAD=cfg.head_dim_pad, HEAD_DIM_V_PAD=cfg.head_dim_v_pad, TMA=cfg.tma)


def workload(module, spec, shape: BenchShape, role: str, dtype: torch.dtype, device) -> Callable[[], object]:
    """A closure that runs one role's kernels once on fixed random inputs (for the backward roles,
    the forward's outputs are computed beforehand)."""
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda n, d: torch.randn(shape.batch, shape.heads, n, d, generator=g, device=device).to(dtype)  # noqa: E731
    q, k, v = mk(shape.seq, spec.head_dim), mk(shape.seq, spec.head_dim), mk(shape.seq, spec.head_dim_v)
    rt = runtime.of(module)
    hp, scale = rt.head_param_rows(q, {}), spec.scale  # default per-head parameters
    # a document mask: the benchmark's documents (bench_documents), their tables built on the first run
    docs = runtime.Documents(bench_documents(shape, g)) if spec.mask.document else None
    # a layout per call: the benchmark's (bench_layout), its tables built on the first run
    blocks = runtime.BlockMask(bench_layout(spec, shape, device)) if rt.runtime_layout else None
    docs = runtime.Sparse(docs, blocks)
    if role == "fwd":
        return lambda: rt.forward(q, k, v, hp, scale, 0, 0.0, None, False, docs)
    o, lse = rt.forward(q, k, v, hp, scale, 0, 0.0, None, True, docs)
    do = mk(shape.seq, spec.head_dim_v)
    if role != "bwd_single":  # the form whose kernel is being tiled, whatever the module would choose
        return lambda: rt.backward(do, q, k, v, o, lse, hp, scale, 0, 0.0, docs, deterministic=True)

    def single():  # a tiling that does not fit falls back to the two kernels: not this candidate's time
        out = rt.backward(do, q, k, v, o, lse, hp, scale, 0, 0.0, docs, deterministic=False)
        if rt.last_backward != "single pass":
            raise RuntimeError(f"the single pass did not run ({rt.last_backward} instead): the tiling does not fit")
        return out
    return single


def search(spec_path: str | Path, shape: BenchShape, role: str, timer: Callable[[Callable], float],
           dtype: str = "bf16", device: str = "cuda", top: int | None = None,
           part: tuple[int, int] | None = None) -> list[Trial]:
    """Times the `top` best-ranked legal candidates (all when None), in the cost model's order at
    the shape's sequence-length bucket, so the first is the tiling a module picks for that shape.
    part=(i, n): only runs candidates i, i + n, ... once each, untimed (a warm-up worker: Triton's
    compile cache is shared between processes); returns no trials."""
    c = compile_spec(spec_path, options=bucket_options(shape.seq), stop="tiling")
    module = load(spec_path)
    if role not in c.rankings:  # bwd_single where the spec's backward has no single pass
        return []
    ranked = c.rankings[role][dtype].ranked[:top]
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    run = workload(module, c.spec, shape, role, torch_dtype, device)
    trials = []
    for i, p in enumerate(ranked, start=1):
        if part:
            if (i - 1) % part[1] == part[0]:
                with tiling_of(module, role, dtype, p.config), contextlib.suppress(Exception):
                    run()
            continue
        with tiling_of(module, role, dtype, p.config):
            try:
                ms, error = timer(run), ""
            except Exception as e:  # a candidate the compiler rejects is a finding, not a crash
                ms, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        trials.append(Trial(i, p.config, p.time_s * 1e3, ms, error))
    return trials


def warm(args: list[str], workers: int) -> None:
    """Compiles every candidate of an `attngen bench --exhaustive` run (its command-line `args`) in
    `workers` processes at once, each running a share of them once, untimed; the timed run then finds
    them in Triton's cache."""
    import subprocess
    import sys

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"worker{i}.log" for i in range(workers)]
        procs = [subprocess.Popen([sys.executable, "-m", "cli.main", "bench", *args, "--part", f"{i}/{workers}"],
                                  stdout=subprocess.DEVNULL, stderr=log.open("w")) for i, log in enumerate(logs)]
        for i, (proc, log) in enumerate(zip(procs, logs)):
            if proc.wait():  # the timed run still compiles what the worker did not: slower, not wrong
                err = log.read_text().strip().splitlines()
                print(f"bench --exhaustive --warm: worker {i} of {workers} failed ({proc.returncode}): "
                      f"{err[-1] if err else 'no message'}", file=sys.stderr)


def trial_rows(spec_path: str | Path, shape: BenchShape, role: str, dtype: str, trials: list[Trial]) -> list[dict]:
    """The measurements as attngen/calibrate.py reads them."""
    return [{"spec": Path(spec_path).stem, "spec_path": str(spec_path), "shape": [shape.batch, shape.heads, shape.seq],
             "role": role, "dtype": dtype, "config": asdict(t.config), "predicted_ms": t.predicted_ms,
             "measured_ms": t.measured_ms, "error": t.error} for t in trials]


def bucket_options(seq: int) -> PassOptions:
    """The pass options whose nominal shape is the bucket a module takes its tiling from for
    sequences of `seq` tokens (runtime/module.py config(); the nominal shape or one of BUCKETS)."""
    options = PassOptions()
    return replace(options, workload=bucket_for(options.workload, seq)) if options.shape_buckets else options


def summary(trials: list[Trial]) -> dict:
    """The pick against the fastest measured candidate."""
    timed = [t for t in trials if t.measured_ms is not None]
    pick = trials[0]
    best = min(timed, key=lambda t: t.measured_ms) if timed else None
    ratio = best.measured_ms / pick.measured_ms if best and pick.measured_ms else None
    return {"pick": pick, "best": best, "pick_over_best_throughput": ratio, "timed": len(timed), "tried": len(trials)}


def median_ms(fn: Callable[[], object]) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def format_markdown(results: list[tuple[str, BenchShape, str, dict]]) -> str:
    lines = ["| spec | shape | kernel | cost-model pick | ms | exhaustive best | ms | pick / best | rank of best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for spec, shape, role, s in results:
        pick, best = s["pick"], s["best"]
        show = lambda t: t.config.short()  # noqa: E731
        if best is None:
            lines.append(f"| {spec} | {shape} | {role} | {show(pick)} | – | none timed | – | – | – |")
            continue
        pick_ms = f"{pick.measured_ms:.3f}" if pick.measured_ms else "failed"
        ratio = f"{s['pick_over_best_throughput']:.2f}" if s["pick_over_best_throughput"] else "–"
        lines.append(f"| {spec} | {shape} | {role} | {show(pick)} | {pick_ms} | {show(best)} | "
                     f"{best.measured_ms:.3f} | {ratio} | {best.rank} of {s['tried']} |")
    return "\n".join(lines) + "\n"
