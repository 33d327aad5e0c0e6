"""Cost model: ranks legal tile configurations for a target GPU at a nominal shape.

For each candidate it predicts the kernel time from first principles:

  per tile    MMA time   2·BM·BN·(D+Dv) FLOPs at the tensor-core rate of one SM, derated for small
                         tiles and shallow pipelines;
              softmax    BM·BN exponentials at the SFU rate, plus mask arithmetic on PARTIAL tiles;
              memory     K and V tiles from L2 at one SM's share of L2 bandwidth;
              the three overlap partly (max plus a fraction of the rest).
  per program tiles visited (from the mask analysis' tile counts) x tile time, plus loading Q and
              storing O from HBM.
  grid        programs run in waves of SMs x occupancy (shared memory, registers and warps per SM
              bound it); the last wave's quantization is counted.

The target rates are datasheet rates derated to measured ones where we have them (sm90: the H100's
MMA and copy rates; docs/decisions/cost-model-rates.md); the efficiency and overlap factors are
`Constants`, fitted to measured runs by attngen/calibrate.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import resources
from .errors import AttngenError, TilingError
from .mask_analysis import MaskPlan, TileCounts, tile_counts
from .runtime.roles import COSTED, width
from .tiling import TileConfig, candidates, check_legal, registers_per_thread, shared_memory_bytes

ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Target:
    name: str
    sms: int
    clock_hz: float
    smem_per_block: int  # bytes one program may use
    smem_per_sm: int
    regs_per_sm: int
    max_warps_per_sm: int
    mma_flops: dict  # dtype -> FLOP/s of the whole chip for tl.dot
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    sfu_per_sm_per_clock: int = 16
    alu_per_sm_per_clock: int = 64  # integer
    fp32_per_sm_per_clock: int = 128
    tma: bool = False  # has the tensor memory accelerator (Hopper)
    # MMA rows per warp: Hopper's wgmma takes 64 per warpgroup of 4 warps (16 per warp; fewer run
    # slower), Ampere's mma.sync 16, of which 8 keep it busy (docs/decisions/cost-model-rates.md).
    rows_per_warp: int = 8
    wgmma: bool = False  # warpgroup MMAs for 16-bit inputs (Hopper)


TARGETS = {
    "sm90": Target("sm90", sms=132, clock_hz=1.83e9, smem_per_block=232448, smem_per_sm=233472,
                   regs_per_sm=65536, max_warps_per_sm=64,
                   mma_flops={"fp16": 790e12, "bf16": 790e12, "fp32": 60e12},
                   hbm_bytes_per_s=3.0e12, l2_bytes_per_s=10e12, tma=True, rows_per_warp=16, wgmma=True),
    "sm80": Target("sm80", sms=108, clock_hz=1.41e9, smem_per_block=166912, smem_per_sm=167936,
                   regs_per_sm=65536, max_warps_per_sm=64,
                   mma_flops={"fp16": 300e12, "bf16": 300e12, "fp32": 19e12},
                   hbm_bytes_per_s=1.8e12, l2_bytes_per_s=5e12, fp32_per_sm_per_clock=64),
}


@dataclass(frozen=True)
class Workload:
    """The nominal shape candidates are ranked at (one shape bucket)."""

    batch: int = 2
    heads: int = 16
    seq_q: int = 4096
    seq_k: int = 4096
    dtype: str = "bf16"
    score_sfu: int = 1  # special-function ops per score: exp2, plus tanh with softcap

    def describe(self) -> str:
        return f"B={self.batch} H={self.heads} Nq={self.seq_q} Nk={self.seq_k} {self.dtype}"


@dataclass(frozen=True)
class Prediction:
    config: TileConfig
    time_s: float | None  # None when rejected
    occupancy: int = 0
    counts: TileCounts | None = None
    rejected: str | None = None


@dataclass(frozen=True)
class Constants:
    """The cost model's free constants: estimates until fitted to measurements (attngen/calibrate.py
    fits them from exhaustive-search timings and writes data/cost_constants.json, read at import)."""

    rows_exponent: float = 0.5  # MMA efficiency ~ (rows / 128) ** this, for tiles under 128 rows
    streamed_exponent: float = 0.25  # ... and (streamed / 128) ** this
    one_stage: float = 0.6  # efficiency without software pipelining
    two_stages: float = 0.9
    overlap: float = 0.3  # the non-dominant parts of a tile (MMA, softmax, loads) that do not overlap
    mask_ops: float = 8.0  # integer ops per score element of a partial tile
    alu_ops: float = 4.0  # fp32 ops per score element (scale, max, subtract, sum, convert)
    hiding: float = 0.5  # co-resident programs hide the non-overlapped parts: overlap / occupancy ** this
    occupancy_gain: float = 0.15  # speed-up per extra co-resident program
    occupancy_gain_cap: float = 1.15
    tma_gain: float = 1.0  # tile-time speed-up of TMA loads over pointer loads, forward
    tma_gain_bwd: float = 1.0  # ... and in the backward kernels (their tiles are MMA-heavier)
    atomic_cost: float = 2.0  # L2 bytes moved per byte of a tile added atomically (unfitted default; fit: docs/decisions/single-pass-backward.md)
    scale: float = 1.0  # measured / predicted, overall

    @classmethod
    def load(cls, path: Path) -> "Constants":
        if not path.is_file():
            raise AttngenError(f"{path}: the cost model's fitted constants are missing: restore "
                               "data/cost_constants.json from the repository, or reinstall attngen")
        return cls(**json.loads(path.read_text()))


def load_fitted() -> Constants:
    """The fitted constants (resources.cost_constants_path()); an error if the file is missing. The
    unfitted estimates are `Constants()`: pass them, or any others, as `k=` to predict and rank."""
    return Constants.load(resources.cost_constants_path())


FITTED = resources.cost_constants_path()
CONSTANTS = load_fitted()


def _mma_efficiency(cfg: TileConfig, role: str, k: Constants, reduced: bool = False) -> float:
    """Small tiles issue more, smaller MMAs. The rows of the resident block (queries in fwd and
    bwd_dq, keys in bwd_dkdv) are the MMAs' M dimension and weigh more than the streamed one; a
    reduced tile's product (bwd_single's dS K) has the streamed rows as its M dimension."""
    r = COSTED[role]
    rows, streamed = r.outer(cfg.block_m, cfg.block_n), r.inner(cfg.block_m, cfg.block_n)
    if reduced:
        rows, streamed = streamed, rows
    eff = (min(rows, 128) / 128) ** k.rows_exponent * (min(streamed, 128) / 128) ** k.streamed_exponent
    return eff * {1: k.one_stage, 2: k.two_stages}.get(cfg.num_stages, 1.0)


def predict(cfg: TileConfig, plan: MaskPlan, target: Target, work: Workload, role: str = "fwd",
            k: Constants | None = None, wgmma_estimate: bool = False) -> Prediction:
    """`wgmma_estimate`: judge registers by sm90's wgmma model (rank() falls back to it)."""
    k = CONSTANTS if k is None else k
    elem = ELEM_BYTES[work.dtype]
    try:
        wgmma = wgmma_estimate and target.wgmma and work.dtype != "fp32"  # fp32 (ieee) runs no wgmma
        check_legal(cfg, smem_per_block=target.smem_per_block, elem_bytes=elem, role=role,
                    rows_per_warp=8 if work.dtype == "fp32" else target.rows_per_warp, wgmma=wgmma)
    except TilingError as e:
        return Prediction(cfg, None, rejected=str(e))
    smem = shared_memory_bytes(cfg, elem, role)
    regs = registers_per_thread(cfg, elem, role, wgmma) * 32 * cfg.num_warps
    occupancy = max(1, min(target.smem_per_sm // smem, target.regs_per_sm // regs,
                           target.max_warps_per_sm // cfg.num_warps))
    counts = tile_counts(plan, work.seq_q, work.seq_k, cfg.block_m, cfg.block_n)

    bm, bn, d, dv = cfg.block_m, cfg.block_n, cfg.head_dim_pad, cfg.head_dim_v_pad
    sm_flops = target.mma_flops[work.dtype] / target.sms
    r = COSTED[role]
    nd, ndv = r.products  # matrix products per tile, as multiples of BM*BN*(D, Dv)
    red = width(r.reduced, d, dv)  # the reduced tile's product (one of the nd) at its own efficiency
    mma = 2 * bm * bn * ((nd * d + ndv * dv - red) / _mma_efficiency(cfg, role, k)
                         + red / _mma_efficiency(cfg, role, k, reduced=True)) / sm_flops
    softmax = bm * bn * (work.score_sfu / target.sfu_per_sm_per_clock + k.alu_ops / target.fp32_per_sm_per_clock) / target.clock_hz
    masking = k.mask_ops * bm * bn / (target.alu_per_sm_per_clock * target.clock_hz)
    streamed = r.inner(bm, bn)  # rows of the tiles the loop streams in
    memory = streamed * (d + dv) * elem / (target.l2_bytes_per_s / target.sms)
    parts = (mma, softmax, memory)
    full_tile = max(parts) + k.overlap / occupancy ** k.hiding * (sum(parts) - max(parts))
    # a reduced tile's fp32 read-modify-writes at L2 (bwd_single's dQ), after the tile's products
    # and before its staging buffer is reused: not overlapped
    full_tile += streamed * width(r.reduced, d, dv) * 4 * k.atomic_cost / (target.l2_bytes_per_s / target.sms)
    if cfg.tma:
        full_tile /= k.tma_gain_bwd if r.backward else k.tma_gain
    n_outer = -(-(work.seq_k if r.transposed else work.seq_q) // r.outer(bm, bn))
    tiles_per_program = counts.visited / n_outer
    partial_per_program = counts.partial / n_outer
    resident = r.outer(bm, bn) * (d + dv) * elem * (2 if r.backward else 1)
    edges = resident / (target.hbm_bytes_per_s / target.sms)
    program = tiles_per_program * full_tile + partial_per_program * masking + edges

    programs = n_outer * work.batch * work.heads
    slots = target.sms * occupancy
    waves = -(-programs // slots)
    boost = min(k.occupancy_gain_cap, 1 + k.occupancy_gain * (occupancy - 1))  # co-residents hide latency
    time = k.scale * waves * program * occupancy / boost
    if r.reduced:  # the passes around it: zero the fp32 buffer, delta = rowsum(dO * O), convert into the dtype
        rows = work.batch * work.heads * work.seq_q
        time += rows * (width(r.reduced, d, dv) * (4 + 4 + elem) + 2 * dv * elem + 4) / target.hbm_bytes_per_s
    return Prediction(cfg, time, occupancy, counts)


@dataclass(frozen=True)
class Ranking:
    target: Target
    work: Workload
    ranked: tuple[Prediction, ...]  # legal, fastest first
    rejected: tuple[Prediction, ...]

    @property
    def best(self) -> TileConfig:
        if not self.ranked:
            raise TilingError(f"no legal tiling on {self.target.name} for {self.work.describe()}")
        return self.ranked[0].config


def rank(head_dim: int, head_dim_v: int, plan: MaskPlan, target: Target, work: Workload,
         role: str = "fwd", k: Constants | None = None, chunked: bool = False) -> Ranking:
    """`chunked`: a role that can load the head dim in column chunks (roles' chunked_d) pads it by
    tiling.pad_chunked (PassOptions.chunked_head_dims)."""
    tma = target.tma and work.dtype in ("fp16", "bf16")
    configs = candidates(head_dim, head_dim_v, tma, chunked=chunked and COSTED[role].chunked_d)
    if plan.sparsity is not None:  # a tile lies inside one layout block (runtime/block_mask.py)
        bq, bk = plan.sparsity.block
        configs = [c for c in configs if c.block_m <= bq and c.block_n <= bk]
    preds = [predict(c, plan, target, work, role, k) for c in configs]
    if not any(p.time_s is not None for p in preds) and target.wgmma and work.dtype != "fp32":
        # Past head dim 128 the mma.sync estimate rejects every tiling; wgmma's is right there, but
        # at d64 it admitted dQ tilings that timed slower (docs/decisions/head-dims-256.md).
        preds = [predict(c, plan, target, work, role, k, wgmma_estimate=True) for c in configs]
    legal = sorted((p for p in preds if p.time_s is not None), key=lambda p: (p.time_s, p.config))
    return Ranking(target, work, tuple(legal), tuple(p for p in preds if p.time_s is None))


def format_ranking(r: Ranking, top: int = 8) -> str:
    """The table `attngen show --emit tiling` prints."""
    lines = [f"target {r.target.name}, nominal shape {r.work.describe()}",
             f"{'rank':>4}  {'BLOCK_M':>7} {'BLOCK_N':>7} {'warps':>5} {'stages':>6} {'loads':>6}  {'occ':>3}  "
             f"{'visited':>7} {'partial':>7}  {'pred ms':>8}"]
    for i, p in enumerate(r.ranked[:top]):
        c = p.config
        loads = "tma" if c.tma else "ptr"
        lines.append(f"{i + 1:>4}  {c.block_m:>7} {c.block_n:>7} {c.num_warps:>5} {c.num_stages:>6} {loads:>6}  "
                     f"{p.occupancy:>3}  {p.counts.visited:>7} {p.counts.partial:>7}  {p.time_s * 1e3:>8.3f}")
    lines.append(f"({len(r.ranked)} legal, {len(r.rejected)} rejected)")
    for p in r.rejected[:3]:
        c = p.config
        lines.append(f"  rejected BLOCK_M={c.block_m} BLOCK_N={c.block_n} warps={c.num_warps} "
                     f"stages={c.num_stages}: {p.rejected}")
    return "\n".join(lines) + "\n"
