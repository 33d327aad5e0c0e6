"""Tile tables: which tiles of the score matrix a kernel visits, for masks without closed-form
loop bounds (a per-shape table) and for document masks (per-batch tables from the call's ids).

A table holds, per outer block (a query block; a key block for the transposed dK/dV kernel),
COUNT [.., 2] = (partial tiles, full-tile entries) and INDEX [.., 2, n_inner + 1]: the partial
tiles' block numbers, then the full tiles in one of two encodings (`nested`): runs of consecutive
blocks as [first, end) pairs, or the first run's pair followed by the other full tiles' numbers.
"""

from __future__ import annotations

import torch

from .table_kernel import build_lists, check_tile_in_block

EMPTY, PARTIAL, FULL = 0, 1, 2


def kept(cache: dict, key, make):
    """cache[key], made by make() on first use, outside inference mode: a tensor kept across calls
    may be saved for a later call's backward, which an inference tensor cannot be."""
    if key not in cache:
        with torch.inference_mode(False):
            cache[key] = make()
    return cache[key]


def cell_visibility(visible, Nq: int, Nk: int, gm: int, gn: int, device="cpu",
                    envelope=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per gm x gn cell of the score matrix: whether any in-bounds pair is visible under
    `visible(q_idx, kv_idx, Nq, Nk)` (None: every pair), and whether every in-bounds one is; bool
    [ceil(Nq / gm), ceil(Nk / gn)] twice. The mask is evaluated densely a band of rows at a time,
    so memory stays bounded at long sequences. (The cost model's tile counts use it too.)
    `envelope(first, last)`, when given, bounds the keys rows first..last may see: [lo, hi], ints;
    the mask is evaluated only there (a window's band instead of the whole matrix)."""
    c_m, c_n = -(-Nq // gm), -(-Nk // gn)
    kv = torch.arange(c_n * gn, device=device)[None, :]
    band = max(gm, (1 << 22) // (c_n * gn) // gm * gm)  # rows per band: about 4M pairs
    any_c, all_c = [], []
    for m0 in range(0, c_m * gm, band):
        q = torch.arange(m0, min(m0 + band, c_m * gm), device=device)[:, None]
        if envelope is not None and visible is not None and m0 < Nq:
            # Outside [lo, hi] nothing is visible: a cell there has all its in-bounds pairs visible
            # only when it has none. Evaluate the cell-aligned columns that hold [lo, hi].
            lo, hi = envelope(m0, min(m0 + band, Nq) - 1)
            k0, k1 = max(0, lo) // gn * gn, min(c_n * gn, -(-(hi + 1) // gn) * gn)
            cells_m = q.shape[0] // gm
            any_b = torch.zeros(cells_m, c_n, dtype=torch.bool, device=device)
            all_b = (q[::gm] >= Nq) | (kv[:, ::gn] >= Nk)
            if k0 < k1:
                inb = (q < Nq) & (kv[:, k0:k1] < Nk)
                vis = inb & visible(q, kv[:, k0:k1], Nq, Nk)
                shape = (-1, gm, (k1 - k0) // gn, gn)
                any_b[:, k0 // gn:k1 // gn] = vis.reshape(shape).any(dim=3).any(dim=1)
                all_b[:, k0 // gn:k1 // gn] = (vis == inb).reshape(shape).all(dim=3).all(dim=1)
            any_c.append(any_b)
            all_c.append(all_b)
            continue
        inb = (q < Nq) & (kv < Nk)
        vis = inb if visible is None else inb & visible(q, kv, Nq, Nk)
        shape = (-1, gm, c_n, gn)
        any_c.append(vis.reshape(shape).any(dim=3).any(dim=1))
        all_c.append((vis == inb).reshape(shape).all(dim=3).all(dim=1))
    return torch.cat(any_c), torch.cat(all_c)


def tile_classes(visible, Nq: int, Nk: int, block_m: int, block_n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [n_m, n_n] classes (EMPTY, PARTIAL, FULL) of the tiles under `visible`; twice: for
    loops over keys and for loops over queries (a FULL tile skips the bounds check of the dimension
    its loop walks: ragged edges stay PARTIAL)."""
    any_vis, all_vis = cell_visibility(visible, Nq, Nk, block_m, block_n, device)
    classes = any_vis.to(torch.int8) + (any_vis & all_vis).to(torch.int8)
    n_m, n_n = classes.shape
    keys_ok = (torch.arange(n_n * block_n, device=device) < Nk).reshape(n_n, block_n).all(dim=1)[None, :]
    rows_ok = (torch.arange(n_m * block_m, device=device) < Nq).reshape(n_m, block_m).all(dim=1)[:, None]
    return (torch.where((classes == FULL) & ~keys_ok, PARTIAL, classes),
            torch.where((classes == FULL) & ~rows_ok, PARTIAL, classes))


def _first(selected: torch.Tensor) -> torch.Tensor:
    """The positions of the True entries of bool [..., n], in increasing order, first along the last dim."""
    return torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices  # a stable sort keeps their order


def tile_lists(classes: torch.Tensor, nested: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """From tile classes [..., n, n_other]: COUNT [..., n, 2] and INDEX [..., n, 2, n_other + 1]
    (the module docstring's encodings)."""
    n = classes.shape[-1]
    full = classes == FULL
    before = torch.nn.functional.pad(full[..., :-1], (1, 0))  # is the tile before full?
    after = torch.nn.functional.pad(full[..., 1:], (0, 1))
    if nested:
        firsts, lasts = _first(full & ~before), _first(full & ~after)
        lists = torch.stack([firsts, lasts + 1], dim=-1).flatten(-2)[..., :n + 1]  # at most (n + 1) // 2 runs
        second = (full & ~before).sum(dim=-1)  # the runs
    else:
        any_full = full.any(dim=-1, keepdim=True)
        first = torch.where(any_full, _first(full & ~before)[..., :1], 0)
        end = torch.where(any_full, _first(full & ~after)[..., :1] + 1, 0)
        pos = torch.arange(n, device=classes.device)
        rest = full & ((pos < first) | (pos >= end))  # (none lie before the first run)
        lists = torch.cat([first, end, _first(rest)], dim=-1)[..., :n + 1]  # 2 + (full tiles - 1) <= n + 1
        second = rest.sum(dim=-1)  # the full tiles after the first run
    partial = torch.nn.functional.pad(_first(classes == PARTIAL), (0, 1))
    count = torch.stack([(classes == PARTIAL).sum(dim=-1), second], dim=-1).to(torch.int32)
    return count.contiguous(), torch.stack([partial, lists], dim=-2).to(torch.int32).contiguous()


def layout_tiles(layout: torch.Tensor, n_m: int, n_n: int, bm: int, bn: int, bq: int, bk: int) -> torch.Tensor:
    """bool [.., n_m, n_n]: the layout [.., n_qb, n_kb] of bq x bk blocks read at the kernel's bm x bn
    tiles, each of which lies inside one block (bm divides bq, bn divides bk)."""
    check_tile_in_block((bm, bn), (bq, bk))
    rows = torch.arange(n_m, device=layout.device) * bm // bq
    cols = torch.arange(n_n, device=layout.device) * bn // bk
    return layout.index_select(-2, rows).index_select(-1, cols)


def oriented_lists(classes: torch.Tensor, transposed: bool, nested: bool, layout: torch.Tensor | None = None,
                   tile: tuple[int, int] = (1, 1), block: tuple[int, int] = (1, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """tile_lists of classes [..., n_m, n_n] inside a block `layout` (bool [.., n_qb, n_kb] of
    `block`s, read at `tile`s; None: everywhere) for a kernel that walks queries (transposed: the
    dK/dV kernel) or keys, made outside inference mode (a kept table may serve a later call's
    backward). CUDA tensors: one Triton kernel (table_kernel.py); elsewhere torch."""
    with torch.inference_mode(False):
        if classes.is_cuda:
            return build_lists(classes, transposed, nested, layout, tile, block)
        if layout is not None:
            inside = layout_tiles(layout, classes.shape[-2], classes.shape[-1], *tile, *block)
            classes = torch.where(inside, classes, EMPTY).to(torch.int8)
        return tile_lists(classes.transpose(-1, -2) if transposed else classes, nested)


def block_ranges(ids: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The least and the greatest id of each block of `block` positions: [B, n_blocks] twice."""
    B, n = ids.shape
    if n % block:  # a ragged last block: repeat its last id, which changes neither
        ids = torch.cat([ids, ids[:, -1:].expand(B, block - n % block)], dim=1)
    blocks = ids.reshape(B, -1, block)
    return blocks.amin(dim=2), blocks.amax(dim=2)


def document_classes(static: torch.Tensor, q_ids: torch.Tensor, kv_ids: torch.Tensor, block_m: int,
                     block_n: int) -> torch.Tensor:
    """Per batch, the classes of the tiles under the static mask's classes `static` [1, H', n_m, n_n]
    and the documents together: EMPTY where the mask's tile is or its query and key id ranges do not
    meet, FULL where the mask's is and all its ids are one, else PARTIAL. Sound for any ids; tight
    where each document is one run of positions. [B, H', n_m, n_n]."""
    q_lo, q_hi = block_ranges(q_ids, block_m)
    k_lo, k_hi = block_ranges(kv_ids, block_n)
    meet = ((q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None]))[:, None]
    one = ((q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :] & (q_lo[:, :, None] == k_lo[:, None, :]))[:, None]
    return torch.where(meet & (static > EMPTY), 1 + (one & (static == FULL)).to(torch.int8), 0).to(torch.int8)


def check_ids(what: str, ids, positions: str) -> None:
    """Document ids are an integer tensor [batch, positions]; else a TypeError naming `what`."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point \
            or ids.dtype.is_complex or ids.dtype == torch.bool:
        got = f"{ids.dtype} of shape {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{what} must be an integer tensor [batch, {positions}]; got {got}")


def _ids(t: torch.Tensor) -> torch.Tensor:
    """A copy of document ids as the kernels read them: int32 or int64 as given, narrower types as
    int32, uint32 as int64, uint64 reinterpreted as int64 (equal ids stay equal, distinct ones distinct)."""
    if t.dtype == getattr(torch, "uint64", None):
        t = t.contiguous().view(torch.int64)
    elif t.dtype == getattr(torch, "uint32", None):
        t = t.to(torch.int64)
    elif t.dtype not in (torch.int32, torch.int64):
        t = t.to(torch.int32)
    return t.clone(memory_format=torch.contiguous_format)


class Documents:
    """Which document each query and each key is in, per batch: integer ids, q_ids [B, Nq] and
    kv_ids [B, Nk] (the same tensor for both by default). A query sees the keys of its own
    document that the spec's mask lets it see; a query whose document has no key gets zeros.
    The tile tables the kernels walk are built from the ids on first use per kernel module and
    tiling, and kept: make one Documents per batch of packed sequences and pass it to every
    layer's call, as with FlexAttention's block mask. The ids are copied, so changing the tensors
    given has no effect on a Documents made from them."""

    def __init__(self, q_ids: torch.Tensor, kv_ids: torch.Tensor | None = None):
        kv_ids = q_ids if kv_ids is None else kv_ids
        for name, ids in (("q_ids", q_ids), ("kv_ids", kv_ids)):
            check_ids(f"document {name}", ids, "seq")
        if q_ids.shape[0] != kv_ids.shape[0] or q_ids.device != kv_ids.device:
            raise ValueError(f"document q_ids and kv_ids must have one batch size on one device; got "
                             f"{tuple(q_ids.shape)} on {q_ids.device}, {tuple(kv_ids.shape)} on {kv_ids.device}")
        self.q_ids, self.kv_ids = _ids(q_ids), _ids(kv_ids)
        self._classes, self._tables = {}, {}

    def classes(self, owner: str, static, block_m: int, block_n: int, transposed: bool, heads: int = 1) -> torch.Tensor:
        """[B, H', n_m, n_n] tile classes for kernels of module `owner` (its key) at these blocks and
        query heads; `static()` gives that module's static tile classes for the ids' shape (by keys
        and by rows)."""
        key = (owner, block_m, block_n, transposed, heads)
        if key not in self._classes:
            by_keys, by_rows = static()
            with torch.inference_mode(False):
                self._classes[key] = document_classes(by_rows if transposed else by_keys, self.q_ids, self.kv_ids,
                                                      block_m, block_n)
        return self._classes[key]

    def tables(self, owner: str, static, block_m: int, block_n: int, transposed: bool, nested: bool, heads: int = 1):
        """COUNT and INDEX [B, H', n_outer, ...] for a kernel of module `owner` at these blocks (see
        classes). Kernels with one tiling and orientation share the classes; each encoding gets its
        own lists."""
        key = (owner, block_m, block_n, transposed, nested, heads)
        if key not in self._tables:
            self._tables[key] = oriented_lists(self.classes(owner, static, block_m, block_n, transposed, heads),
                                               transposed, nested)
        return self._tables[key]


def as_documents(documents, batch: int, Nq: int, Nk: int, device, spec_name: str) -> Documents:
    """The call's Documents (made from ids or a pair of ids if need be), checked against q and k."""
    if documents is None:
        raise ValueError(f"spec {spec_name!r} has a document mask: pass documents= (document ids "
                         f"[batch, seq], a (q_ids, kv_ids) pair, or a Documents)")
    if not isinstance(documents, Documents):
        documents = Documents(*documents) if isinstance(documents, (tuple, list)) else Documents(documents)
    if tuple(documents.q_ids.shape) != (batch, Nq) or tuple(documents.kv_ids.shape) != (batch, Nk):
        raise ValueError(f"documents: ids must be [batch, Nq] = [{batch}, {Nq}] for the queries and [batch, Nk] = "
                         f"[{batch}, {Nk}] for the keys; got {tuple(documents.q_ids.shape)} and {tuple(documents.kv_ids.shape)}")
    if documents.q_ids.device != device:
        raise ValueError(f"documents: ids are on {documents.q_ids.device}, q on {device}")
    return documents
