"""Block masks: a block-sparse layout given at call time (specs with `sparsity: {layout: runtime}`),
with the tile tables the kernels walk built from it on the device in O(blocks).

A kernel tile never straddles two layout blocks: the tiling pass caps BLOCK_M and BLOCK_N at the
spec's layout block (both powers of two), so each tile lies in one block and takes its value.
"""

from __future__ import annotations

import torch

from .tiles import oriented_lists


def _flex_layout(num: torch.Tensor, indices: torch.Tensor | None, n_kb: int) -> torch.Tensor:
    """bool [B, H, n_qb, n_kb] from FlexAttention's (kv_num_blocks, kv_indices) pair: per query
    block, the first num entries of its index row are its key blocks."""
    B, H, n_qb = num.shape
    out = torch.zeros(B, H, n_qb, max(n_kb, indices.shape[-1]) + 1, dtype=torch.bool, device=num.device)
    used = torch.arange(indices.shape[-1], device=num.device) < num[..., None]
    sink = out.shape[-1] - 1  # the unused entries scatter into a column that is dropped
    out.scatter_(-1, torch.where(used, indices.long(), sink), True)
    return out[..., :n_kb]


class BlockMask:
    """A block layout passed at call time: bool [B or 1, H or 1, ceil(Nq / bq), ceil(Nk / bk)], True
    where a (query block, key block) pair may attend; batch and heads broadcast where the layout has
    size 1 (one table is stored for them). The spec's element mask still applies inside the visible
    blocks, and its static sparsity terms are added to the layout.

    The tile tables are built from the layout on its device on first use per kernel module, tiling
    and documents, and kept: make one BlockMask per step and pass it to every layer's call (as
    FlexAttention's BlockMask). Building costs O(blocks) time and memory, never Nq x Nk. The layout
    is copied. `block`, when given (from_flex does), must equal the spec's layout block."""

    def __init__(self, layout: torch.Tensor, block: tuple[int, int] | None = None):
        if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() != 4:
            got = f"{layout.dtype} of shape {list(layout.shape)}" if isinstance(layout, torch.Tensor) else type(layout).__name__
            raise TypeError(f"a block layout must be a torch.bool tensor [B or 1, H or 1, query blocks, key blocks]; got {got}")
        self.layout = layout.clone(memory_format=torch.contiguous_format)
        self.block = None if block is None else (int(block[0]), int(block[1]))
        self._tables: dict = {}

    @classmethod
    def from_flex(cls, block_mask) -> "BlockMask":
        """The layout of a FlexAttention BlockMask (torch.nn.attention.flex_attention): its partial
        and full key blocks per query block, both visible here; its mask_mod is not carried (the
        spec's element mask applies instead). O(blocks), on the block mask's device."""
        bq, bk = block_mask.BLOCK_SIZE
        Nq, Nk = block_mask.seq_lengths
        n_qb, n_kb = -(-Nq // bq), -(-Nk // bk)
        layout = _flex_layout(block_mask.kv_num_blocks, block_mask.kv_indices, n_kb)
        if block_mask.full_kv_num_blocks is not None:
            layout |= _flex_layout(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kb)
        return cls(layout[:, :, :n_qb], (bq, bk))

    def check(self, batch: int, heads: int, Nq: int, Nk: int, block: tuple[int, int], name: str) -> None:
        bq, bk = block
        if self.block is not None and self.block != (bq, bk):
            raise ValueError(f"spec {name!r} has layout blocks of {bq} x {bk}; this BlockMask's are "
                             f"{self.block[0]} x {self.block[1]}")
        shape, want = tuple(self.layout.shape), (-(-Nq // bq), -(-Nk // bk))
        if shape[0] not in (1, batch) or shape[1] not in (1, heads) or shape[2:] != want:
            raise ValueError(f"spec {name!r}: the layout must be [{batch} or 1, {heads} or 1, {want[0]}, {want[1]}] "
                             f"(batch, query heads, query blocks of {bq}, key blocks of {bk}); got {list(shape)}")

    def tables(self, key: tuple, base, n_m: int, n_n: int, bm: int, bn: int, block: tuple[int, int],
               transposed: bool, nested: bool, keep=None, static=None):
        """COUNT and INDEX [B', H', n_outer, ...] for a kernel whose tile classes without any layout
        are `base()` (int8 [.., n_m, n_n]), in the union of this layout and `static()` (the spec's
        static terms, or None); cached under `key` (module, shape, heads, tiling, orientation,
        encoding, and the documents' identity: `keep` holds them, so the identity is not reused)."""
        hit = self._tables.get(key)
        if hit is None:
            with torch.inference_mode(False):
                extra = None if static is None else static()
                layout = self.layout if extra is None else self.layout | extra
                lists = oriented_lists(base(), transposed, nested, layout, (bm, bn), block)
                hit = self._tables[key] = (lists, keep)
        return hit[0]
