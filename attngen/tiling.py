"""Tile configurations: the typed choice the tiling pass makes, and its legality check.

A `TileConfig` fixes BLOCK_M (query rows per program), BLOCK_N (keys per loop step), the warps
per program, the software-pipelining depth and the head dims padded to powers of two (tl.arange
and tl.dot need powers of two; 80 and 96 pad to 128, 192 to 256; padded lanes load zeros), or for
a head dim that only contracts (the forward's QK^T), to a few equal power-of-two chunks (96 = 3 x
32, 192 = 3 x 64: tiling.pad_chunked), and
on Hopper (sm90) whether the tiles come through the tensor memory accelerator (`tma`) from
host-built descriptors (out-of-bounds rows and padded columns arrive as zeros, no masks).
Not a candidate: Triton's warp specialization (`tl.range(warp_specialize=True)`): no SASS change on
sm90 where it compiled, a crash elsewhere (docs/decisions/no-warp-specialization.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from .errors import TilingError
from .runtime.roles import COSTED, chunk_width, width

BLOCK_M = (32, 64, 128)
BLOCK_N = (32, 64, 128)
NUM_WARPS = (4, 8)
NUM_STAGES = (1, 2, 3, 4)
MAX_REGS_PER_THREAD = 255
REG_OVERHEAD = 40  # pointers, offsets, loop state, m_i / l_i rows
# Two warpgroups splitting the streamed dimension (64 resident rows on 8 warps): cross-warpgroup row
# reductions and layout conversions; fitted offline (docs/decisions/head-dims-256.md)
SPLIT_OVERHEAD = 32


@dataclass(frozen=True, order=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    head_dim_pad: int
    head_dim_v_pad: int
    tma: bool = False

    def describe(self) -> str:
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} num_warps={self.num_warps} "
                f"num_stages={self.num_stages} head_dim_pad={self.head_dim_pad} head_dim_v_pad={self.head_dim_v_pad}"
                + (" tma" if self.tma else ""))

    def short(self) -> str:
        """e.g. 128x64 w8 s3 tma"""
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}" + (" tma" if self.tma else "")


def pad_head_dim(d: int) -> int:
    """The next power of two, at least 16 (the smallest tl.dot reduction size)."""
    return max(16, 1 << (d - 1).bit_length())


MAX_CHUNKS = 4


def pad_chunked(d: int) -> int:
    """A head dim that only contracts (QK^T), padded for loading in equal power-of-two column chunks
    of at least 32: the smallest of the next power of two and chunk x ceil(d / chunk) over at most
    MAX_CHUNKS chunks (96 = 3 x 32, 192 = 3 x 64, 80 -> 96, 160 -> 192)."""
    pads = [pad_head_dim(d)] + [c * -(-d // c) for c in (32, 64, 128) if -(-d // c) <= MAX_CHUNKS]
    return min(pads)


def chunks(pad: int) -> int:
    return pad // chunk_width(pad)


def candidates(head_dim: int, head_dim_v: int, tma: bool = False, chunked: bool = False) -> list[TileConfig]:
    """Every combination; with `tma` (a Hopper target, 16-bit dtypes) each with and without TMA loads;
    `chunked`: the kernel loads head_dim in chunks (roles' chunked_d), so it pads by pad_chunked."""
    dp, dvp = (pad_chunked if chunked else pad_head_dim)(head_dim), pad_head_dim(head_dim_v)
    return [TileConfig(m, n, w, s, dp, dvp, t)
            for m, n, w, s, t in product(BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, (False, True) if tma else (False,))]


def shared_memory_bytes(cfg: TileConfig, elem_bytes: int, role: str = "fwd") -> int:
    """The tiles a program keeps resident, plus the streamed ones once per pipeline stage
    (runtime/roles.py: fwd and bwd_dq keep a query block and stream K, V; bwd_dkdv keeps K, V and
    streams Q, dO). A reduced tile (bwd_single's dQ) is staged in fp32 for TMA's bulk reduction."""
    r, d, dv = COSTED[role], cfg.head_dim_pad, cfg.head_dim_v_pad
    outer, inner = r.outer(cfg.block_m, cfg.block_n), r.inner(cfg.block_m, cfg.block_n)
    staged = 4 * inner * width(r.reduced, d, dv) if cfg.tma else 0
    return elem_bytes * (outer * width(r.resident, d, dv) + cfg.num_stages * inner * width(r.streamed, d, dv)) + staged


def splits_n(cfg: TileConfig, role: str, wgmma: bool) -> bool:
    """64 resident rows on 8 warps under wgmma: the two warpgroups split the streamed dimension
    (as FlashAttention-3 does at d256), each holding whole rows of P / dS."""
    return wgmma and COSTED[role].outer(cfg.block_m, cfg.block_n) == 64 and cfg.num_warps == 8


def registers_per_thread(cfg: TileConfig, elem_bytes: int, role: str = "fwd", wgmma: bool = False) -> int:
    """fp32 accumulators and score-sized temporaries, plus the converted P and, for mma.sync (not
    wgmma, which reads them from shared memory), the resident operand fragments; wgmma with pointer
    loads also stages the streamed tiles through registers. With wgmma=False, the estimate the cost
    model's occupancy uses (docs/decisions/head-dims-256.md)."""
    r, m, n, d, dv = COSTED[role], cfg.block_m, cfg.block_n, cfg.head_dim_pad, cfg.head_dim_v_pad
    outer, inner, threads = r.outer(m, n), r.inner(m, n), 32 * cfg.num_warps
    spread = outer * width(r.accumulators, d, dv)
    scores = r.score_tiles * m * n + m * n * elem_bytes // 4
    # a reduced tile: through TMA its fp32 values take the dead dS registers and are staged in shared
    # memory; per-element atomics also hold an address per element (64-bit) in registers
    scores += 0 if cfg.tma else 2 * inner * width(r.reduced, d, dv)
    if not wgmma:
        scores += m * width(r.fragments, d, dv) * elem_bytes // 4
    elif not cfg.tma:
        spread += inner * width(r.streamed, d, dv) * elem_bytes // 4
    if splits_n(cfg, role, wgmma):
        return REG_OVERHEAD + SPLIT_OVERHEAD + -(-spread // threads) + -(-scores // 128)
    return REG_OVERHEAD + -(-(spread + scores) // threads)


def check_legal(cfg: TileConfig, *, smem_per_block: int, elem_bytes: int, role: str = "fwd",
                rows_per_warp: int = 8, wgmma: bool = False) -> None:
    """Raises TilingError with the reason when `cfg` cannot run well on the target (`wgmma`: sm90's
    warpgroup MMAs, 16-bit inputs)."""
    smem = shared_memory_bytes(cfg, elem_bytes, role)
    if smem > smem_per_block:
        raise TilingError(f"needs {smem // 1024} KiB of shared memory, the target allows {smem_per_block // 1024} KiB")
    regs = registers_per_thread(cfg, elem_bytes, role, wgmma)
    if regs > MAX_REGS_PER_THREAD:
        raise TilingError(f"needs about {regs} registers per thread, over {MAX_REGS_PER_THREAD}: it would spill")
    r = COSTED[role]
    rows = r.outer(cfg.block_m, cfg.block_n)  # the dimension the warps split
    if rows < rows_per_warp * cfg.num_warps and not (splits_n(cfg, role, wgmma) and cfg.num_stages >= 2):
        raise TilingError(f"{r.outer_block}={rows} is too few rows for {cfg.num_warps} warps (needs at least "
                          f"{rows_per_warp} * num_warps to keep every warp's MMA busy)")
