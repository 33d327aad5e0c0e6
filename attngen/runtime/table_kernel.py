"""The tile tables of a CUDA tensor, built by one Triton kernel in a single pass over the tile
classes (and a block layout, read where it lies: no tile-sized copy of it): a program per table
row compacts the row's partial tiles and full runs with prefix sums. Every entry it writes is read
by the attention kernels; entries past a row's counts are left unwritten. On the CPU,
tiles.tile_lists (torch sorts) builds the same tables and is this kernel's reference in the tests.
Measured: docs/decisions/sparsity-tables.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_classes(BASE, LAYOUT, j, n_inner, s_bi, s_li, div_i, HAS_LAYOUT: tl.constexpr):
    # the classes of tiles j of one row (EMPTY outside [0, n_inner) and outside the layout)
    inside = (j >= 0) & (j < n_inner)
    cls = tl.load(BASE + j.to(tl.int64) * s_bi, mask=inside, other=0).to(tl.int32)
    if HAS_LAYOUT:
        seen = tl.load(LAYOUT + (j // div_i).to(tl.int64) * s_li, mask=inside, other=0)
        cls = tl.where(seen != 0, cls, 0)
    return cls


@triton.jit
def _build_lists(BASE, LAYOUT, COUNT, INDEX, n_outer, n_inner, heads, width,
                 s_bb, s_bh, s_bo, s_bi, s_lb, s_lh, s_lo, s_li, div_o, div_i,
                 HAS_LAYOUT: tl.constexpr, NESTED: tl.constexpr, CHUNK: tl.constexpr):
    out = tl.program_id(0).to(tl.int64)  # the table row: (batch, head, outer block)
    row = (out % n_outer).to(tl.int32)
    bh = (out // n_outer).to(tl.int32)
    b, h = bh // heads, bh % heads
    BASE += b.to(tl.int64) * s_bb + h.to(tl.int64) * s_bh + row.to(tl.int64) * s_bo
    LAYOUT += b.to(tl.int64) * s_lb + h.to(tl.int64) * s_lh + (row // div_o).to(tl.int64) * s_lo
    PARTIAL = INDEX + out * 2 * width
    FULL = PARTIAL + width
    n_partial = tl.full([], 0, tl.int32)
    n_runs = tl.full([], 0, tl.int32)
    n_rest = tl.full([], 0, tl.int32)  # the full tiles after the first run
    first = tl.full([], 0, tl.int32)
    end = tl.full([], 0, tl.int32)
    for c0 in range(0, n_inner, CHUNK):
        j = c0 + tl.arange(0, CHUNK)
        cls = _row_classes(BASE, LAYOUT, j, n_inner, s_bi, s_li, div_i, HAS_LAYOUT)
        before = _row_classes(BASE, LAYOUT, j - 1, n_inner, s_bi, s_li, div_i, HAS_LAYOUT)
        after = _row_classes(BASE, LAYOUT, j + 1, n_inner, s_bi, s_li, div_i, HAS_LAYOUT)
        partial = cls == 1
        starts = (cls == 2) & (before != 2)
        ends = (cls == 2) & (after != 2)
        tl.store(PARTIAL + n_partial + tl.cumsum(partial.to(tl.int32), 0) - 1, j, mask=partial)
        n_partial += tl.sum(partial.to(tl.int32), 0)
        run = n_runs + tl.cumsum(starts.to(tl.int32), 0)  # each tile's run, counted from 1
        if NESTED:  # [first, end) pairs
            tl.store(FULL + 2 * (run - 1), j, mask=starts)
            tl.store(FULL + 2 * (run - 1) + 1, j + 1, mask=ends)
        else:  # the first run's pair, then the other full tiles
            rest = (cls == 2) & (run > 1)
            tl.store(FULL + 2 + n_rest + tl.cumsum(rest.to(tl.int32), 0) - 1, j, mask=rest)
            n_rest += tl.sum(rest.to(tl.int32), 0)
            first += tl.sum(tl.where(starts & (run == 1), j, 0), 0)
            end += tl.sum(tl.where(ends & (run == 1), j + 1, 0), 0)
        n_runs += tl.sum(starts.to(tl.int32), 0)
    if NESTED:
        tl.store(COUNT + out * 2 + 1, n_runs)
    else:
        tl.store(FULL, first)
        tl.store(FULL + 1, end)
        tl.store(COUNT + out * 2 + 1, n_rest)
    tl.store(COUNT + out * 2, n_partial)


def check_tile_in_block(tile: tuple[int, int], block: tuple[int, int]) -> None:
    """A kernel tile must lie inside one layout block (both powers of two: the tile divides the block)."""
    if block[0] % tile[0] or block[1] % tile[1]:
        raise ValueError(f"a {tile[0]} x {tile[1]} kernel tile does not lie inside one {block[0]} x {block[1]} "
                         f"layout block")


def build_lists(classes: torch.Tensor, transposed: bool, nested: bool, layout: torch.Tensor | None = None,
                tile: tuple[int, int] = (1, 1), block: tuple[int, int] = (1, 1),
                chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """COUNT [B, H, n_outer, 2] and INDEX [B, H, n_outer, 2, n_inner + 1] (tiles.py's encodings)
    for tile classes int8 [B or 1, H or 1, n_m, n_n] inside `layout` (bool [B or 1, H or 1, n_qb,
    n_kb] of `block`s, each holding whole `tile`s; None: everywhere); B and H broadcast. A program
    walks its row `chunk` tiles at a time."""
    flat = classes.dim() == 2
    if flat:
        classes = classes[None, None]
    n_m, n_n = classes.shape[-2:]
    shapes = [classes.shape[:2]] + ([layout.shape[:2]] if layout is not None else [])
    B, H = torch.broadcast_shapes(*shapes)
    check_tile_in_block(tile, block)
    divs = (block[0] // tile[0], block[1] // tile[1])
    lay = layout if layout is not None else classes  # a placeholder pointer when there is none
    bs = [0 if classes.shape[i] == 1 else classes.stride(i) for i in (0, 1)] + list(classes.stride()[2:])
    ls = [0 if lay.shape[i] == 1 else lay.stride(i) for i in (0, 1)] + list(lay.stride()[2:])
    if transposed:
        n_m, n_n, divs = n_n, n_m, divs[::-1]
        bs[2:], ls[2:] = bs[:1:-1], ls[:1:-1]
    count = torch.empty(B, H, n_m, 2, dtype=torch.int32, device=classes.device)
    index = torch.empty(B, H, n_m, 2, n_n + 1, dtype=torch.int32, device=classes.device)
    if n_n == 0:  # nothing to list (the first run's pair would not fit a row of width 1)
        return (count.zero_()[0, 0], index.zero_()[0, 0]) if flat else (count.zero_(), index.zero_())
    if count.numel():
        chunk = min(chunk, max(16, triton.next_power_of_2(n_n)))
        _build_lists[(B * H * n_m,)](classes, lay.view(torch.uint8) if lay.dtype == torch.bool else lay, count, index,
                                   n_m, n_n, H, n_n + 1, *bs, *ls, *divs,
                                   HAS_LAYOUT=layout is not None, NESTED=nested, CHUNK=chunk)
    return (count[0, 0], index[0, 0]) if flat else (count, index)
