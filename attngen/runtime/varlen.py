"""Packed variable-length batches (FlashAttention's varlen layout): sequence i's queries are rows
cu_seqlens_q[i]:cu_seqlens_q[i + 1] of q [total_q, H, D], its keys rows cu_seqlens_k[i]:.. of k and
v, and the spec's mask applies inside each sequence with that sequence's own Nq and Nk.

The kernels read the cumulative lengths themselves (a program per query block of the longest
sequence and per (sequence, head); programs past their sequence's end return at once). The host
reads them once per Seqlens, to check them and, for specs whose kernels walk tile tables, to build
per-sequence tables.
"""

from __future__ import annotations

import torch

from .tiles import EMPTY, document_classes, layout_tiles, oriented_lists


class Seqlens:
    """Checked cumulative sequence lengths (int32 [B + 1], from 0 to the totals, non-decreasing) and
    the longest lengths, with the per-sequence tile tables built from them. attention_varlen keeps
    one per pair of cu_seqlens tensors while they are unchanged, so every layer of a step shares it."""

    def __init__(self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                 total_q: int, total_k: int):
        lengths, starts = [], []
        for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                                         ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k)):
            if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
                got = f"{cu.dtype} of shape {list(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
                raise TypeError(f"{name} must be an int32 tensor [batch + 1]; got {got}")
            host = cu.tolist()  # one read per Seqlens: the checks and the tables need the values
            if host[0] != 0 or any(b < a for a, b in zip(host, host[1:])):
                raise ValueError(f"{name} must start at 0 and be non-decreasing; got {host[:8]}{' ...' if len(host) > 8 else ''}")
            if host[-1] != total:
                raise ValueError(f"{name}'s last entry must be the total number of rows, {total}; got {host[-1]}")
            seq = [b - a for a, b in zip(host, host[1:])]
            starts.append(host[:-1])
            if seq and max(seq) > longest:
                raise ValueError(f"max_seqlen_{name[-1]} = {longest} is below the longest sequence, {max(seq)}")
            lengths.append(seq)
        if len(lengths[0]) != len(lengths[1]):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one length (batch + 1); got "
                             f"{len(lengths[0]) + 1} and {len(lengths[1]) + 1}")
        if cu_seqlens_q.device != cu_seqlens_k.device:
            raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device}, cu_seqlens_k on {cu_seqlens_k.device}")
        self.cu_q, self.cu_k = cu_seqlens_q.clone(), cu_seqlens_k.clone()
        self.max_q, self.max_k = int(max_seqlen_q), int(max_seqlen_k)
        self.lengths = list(zip(*lengths))  # (Nq_i, Nk_i) per sequence
        self.starts = list(zip(*starts))  # (first query row, first key row) per sequence
        self._tables: dict = {}

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def tables(self, key: tuple, static, bm: int, bn: int, transposed: bool, nested: bool, documents=None,
               layout=None, block=None, keep=None):
        """COUNT and INDEX [B, H', n_outer, ...] over the longest sequence's blocks: per sequence,
        `static(Nq_i, Nk_i)`'s tile classes (by rows when transposed) and, with `documents`
        (packed ids [1, total]), the ids' classes, inside `layout(i, Nq_i, Nk_i)` (a bool block
        layout of `block`s, or None); EMPTY past each sequence's end. Kept under `key` (`keep`
        holds what its identities name)."""
        hit = self._tables.get(key)
        if hit is None:
            n_m, n_n = -(-self.max_q // bm), -(-self.max_k // bn)
            rows = []
            for (Nq, Nk), (q0, k0) in zip(self.lengths, self.starts):
                if Nq == 0 or Nk == 0:
                    classes = torch.zeros(1, 1, -(-Nq // bm), -(-Nk // bn), dtype=torch.int8, device=self.cu_q.device)
                else:
                    by_keys, by_rows = static(Nq, Nk)
                    classes = by_rows if transposed else by_keys
                if documents is not None and Nq and Nk:
                    classes = document_classes(classes, documents.q_ids[:, q0:q0 + Nq], documents.kv_ids[:, k0:k0 + Nk],
                                               bm, bn)
                if layout is not None and Nq and Nk:
                    tiles = layout_tiles(layout(len(rows), Nq, Nk), classes.shape[-2], classes.shape[-1], bm, bn, *block)
                    classes = torch.where(tiles, classes, EMPTY).to(torch.int8)
                pad = (0, n_n - classes.shape[-1], 0, n_m - classes.shape[-2])
                rows.append(torch.nn.functional.pad(classes, pad, value=EMPTY))
            heads = max(r.shape[1] for r in rows)
            classes = torch.cat([r.expand(1, heads, n_m, n_n) for r in rows])
            hit = self._tables[key] = (oriented_lists(classes, transposed, nested), (documents, keep))
        return hit[0]
