"""What gates a decode call's key tiles beyond the spec's element mask: document ids and block
layouts (specs with `document: true` or a `sparsity:` section). The decode kernel
(templates/fa2/decode.jinja, `_decode_gate`) reads them per key tile and leaves the keys no packed
row may see out of its loads. It walks only what some row may see: a layout's visible key blocks
(`visible_blocks`, a list per sequence and KV head), within the mask's closed-form bounds (a
window's start, the length) and the span of the queries' documents (`document_span`), which the
kernel applies to the list by binary search; the splits share those tiles (BENCHMARKS.md, "Gated
decoding").

Positions are absolute, as for the mask: the cache's slot p holds the key at position p, and a
sequence of length L decodes the last Nq rows of the square L x L problem. So
- document ids are per cache position, kv_ids [B, S]; the queries' ids are those at their positions
  (or given, q_ids [B, Nq]);
- a call-time layout is over the cache's positions: bool [B or 1, Hq or 1, ceil(S / bq), ceil(S /
  bk)] for a cache of capacity S, and a sequence uses its top-left ceil(L / bq) x ceil(L / bk)
  blocks, which is the layout of its own square problem;
- the spec's static layout terms (local, global, stride) do not depend on L, so one layout at the
  capacity serves every sequence; the random term does (runtime/layouts.py draws it per shape), so
  its rows are drawn per sequence length on the host: eager calls only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .tiles import Documents, _ids, check_ids


@dataclass(frozen=True)
class Gate:
    q_ids: torch.Tensor | None = None  # [B, Nq] the queries' document ids
    kv_ids: torch.Tensor | None = None  # [B, S'] the cache positions' document ids
    layout: torch.Tensor | None = None  # uint8 [B', H', rows, key blocks]
    row0: torch.Tensor | None = None  # int32 [B]: the layout's first row per sequence (None: row 0)
    block: tuple[int, int] = (16, 16)  # the layout's block (bq, bk)

    def tensors(self, placeholder: torch.Tensor, seqlens: torch.Tensor, Hkv: int, Nq: int, capacity: int):
        """The kernel's QIDS, KVIDS, LAYOUT, ROW0, SPAN, BLOCKS pointers (`placeholder` where absent:
        never read)."""
        span = None if self.kv_ids is None else document_span(self.q_ids, self.kv_ids[:, :capacity], seqlens)
        blocks = None if self.layout is None else visible_blocks(self.layout, self.row0, self.block, seqlens, Hkv, Nq)
        return tuple(placeholder if t is None else t
                     for t in (self.q_ids, self.kv_ids, self.layout, self.row0, span, blocks))

    def strides(self) -> tuple[int, ...]:
        """stride_ib, stride_jb, stride_yb, stride_yh, stride_yr, stride_yc, n_ids, stride_zb (a
        row of visible_blocks')."""
        ids = (self.q_ids.stride(0), self.kv_ids.stride(0)) if self.q_ids is not None else (0, 0)
        lay = self.layout
        lay = tuple(0 if lay.shape[i] == 1 else lay.stride(i) for i in range(4)) if lay is not None else (0,) * 4
        return (*ids, *lay, 0 if self.kv_ids is None else self.kv_ids.shape[1],
                0 if self.layout is None else self.layout.shape[-1] + 2)


NO_GATE = Gate()


_GRID1 = 65535  # CUDA's limit on a grid's second dimension


def document_span(q_ids: torch.Tensor, kv_ids: torch.Tensor, seqlens: torch.Tensor,
                  chunk: int | None = None) -> torch.Tensor:
    """int32 [B, 2]: the first and one past the last of each sequence's positions p < L whose id is
    one of its queries' (lo > hi where none is): no visible key lies outside, so the decode kernel
    walks only the tiles between. One fill and one kernel launch (a launch per torch op was the
    likely cost of gated steps: docs/decisions/decode-plan.md), its programs `chunk` positions each
    (by default 4 of its blocks, at most 4096), so no program walks a long sequence serially; the
    grid follows the capacity S, no host read."""
    B, S = kv_ids.shape
    # -1: above every position as unsigned (lo's atomic min), below as signed (hi's atomic max)
    out = torch.full((B, 2), -1 if S else 0, dtype=torch.int32, device=kv_ids.device)
    if B and S:
        n_q = q_ids.shape[1]
        nq_chunk = max(2, min(64, triton.next_power_of_2(n_q)))  # query ids compared at a time
        block = 4096 // nq_chunk  # positions compared at a time
        chunk = min(4096, 4 * block) if chunk is None else chunk
        block = min(block, triton.next_power_of_2(chunk))
        grid = (B, min(triton.cdiv(S, chunk), _GRID1))  # past it, a program takes several chunks
        _document_span[grid](q_ids, kv_ids, seqlens.contiguous(), out, q_ids.stride(0), q_ids.stride(1),
                             kv_ids.stride(0), kv_ids.stride(1), n_q, S, CHUNK=chunk, NQ_CHUNK=nq_chunk, BLOCK=block)
    return out


@triton.jit
def _document_span(QIDS, KVIDS, SEQLENS, OUT, stride_qb, stride_qj, stride_kb, stride_kp, n_q, S,
                   CHUNK: tl.constexpr, NQ_CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # Program (sequence, c): chunks c, c + grid, ... of CHUNK positions (none past the length),
    # BLOCK positions at a time against the sequence's n_q query ids, NQ_CHUNK of them at a time;
    # its span joins the row's by atomic min and max, chunk 0's always (the row's start: S, 0).
    b = tl.program_id(0)
    c = tl.program_id(1)
    L = tl.minimum(tl.load(SEQLENS + b), S)
    lo = S + 0 * L
    hi = 0 * L
    kv = KVIDS + b.to(tl.int64) * stride_kb
    q = QIDS + b.to(tl.int64) * stride_qb
    n_chunks = L // CHUNK + (L % CHUNK > 0).to(tl.int32)
    for k in range(c, n_chunks, tl.num_programs(1)):
        c0 = k * CHUNK
        for i0 in range(0, tl.minimum(CHUNK, L - c0), BLOCK):  # offsets in the chunk: no int32 wrap
            i = i0 + tl.arange(0, BLOCK)
            inside = (i < CHUNK) & (i < L - c0)
            p = c0 + i
            ids = tl.load(kv + p.to(tl.int64) * stride_kp, mask=inside, other=0)
            found = tl.zeros([BLOCK], dtype=tl.int32)
            for j0 in range(0, n_q, NQ_CHUNK):
                j = j0 + tl.arange(0, NQ_CHUNK)
                qid = tl.load(q + j.to(tl.int64) * stride_qj, mask=j < n_q, other=0)
                found = found | tl.max(((ids[:, None] == qid[None, :]) & (j < n_q)[None, :]).to(tl.int32), 1)
            hit = (found != 0) & inside
            lo = tl.minimum(lo, tl.min(tl.where(hit, p, S), 0))
            hi = tl.maximum(hi, tl.max(tl.where(hit, p + 1, 0), 0))
    offer = (c == 0) | (hi > 0)
    tl.atomic_min(OUT.to(tl.pointer_type(tl.uint32)) + b * 2, lo.to(tl.uint32), mask=offer, sem="relaxed")
    tl.atomic_max(OUT + b * 2 + 1, hi, mask=offer, sem="relaxed")


def visible_blocks(layout: torch.Tensor, row0: torch.Tensor | None, block: tuple[int, int], seqlens: torch.Tensor,
                   Hkv: int, Nq: int) -> torch.Tensor:
    """int32 [B * Hkv, 2 + key blocks]: per (sequence, KV head), how many of the layout's key blocks
    some packed row sees (a query head of the group, at one of the last Nq positions), then those
    blocks ascending, then padding (the key-block count: past every key). The decode kernel walks
    the tiles of those that meet its keys' bounds (the length, the mask's, the documents'), and its
    gate keeps each row to its own bits. One kernel launch, a program per sequence and KV head (the
    layout's rows at the queries' positions, at most (Nq - 1) // bq + 2, OR-ed over the group's
    heads and compacted); no host read."""
    B = seqlens.shape[0]
    _, Hl, R, n_kb = layout.shape
    out = torch.empty(B * Hkv, 2 + n_kb, dtype=torch.int32, device=seqlens.device)
    if B * Hkv:
        strides = [0 if layout.shape[i] == 1 else layout.stride(i) for i in range(4)]
        seqlens = seqlens.contiguous()
        _visible_blocks[(B * Hkv,)](layout, seqlens if row0 is None else row0.contiguous(), seqlens, out, *strides, R,
                                    n_kb, Nq, 1 if Hl == 1 else Hl // Hkv, Hkv, BQ=block[0], HAS_ROW0=row0 is not None,
                                    BLOCK_K=min(1024, max(16, triton.next_power_of_2(n_kb))))
    return out


@triton.jit
def _visible_blocks(LAYOUT, ROW0, SEQLENS, OUT, stride_lb, stride_lh, stride_lr, stride_lc, n_rows, n_kb, n_q,
                    heads, HKV, BQ: tl.constexpr, HAS_ROW0: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (sequence x KV head): visible_blocks' row, BLOCK_K key blocks at a time: the bits of
    # the layout rows of its queries' positions (first .. last, from row0) and of the group's
    # `heads` layout heads OR-ed, the seen blocks stored at their running count, then the padding.
    b = tl.program_id(0) // HKV
    hk = tl.program_id(0) % HKV
    L = tl.load(SEQLENS + b)
    base = tl.load(ROW0 + b) if HAS_ROW0 else 0
    first = tl.maximum(L - n_q, 0) // BQ - base
    last = tl.maximum(L - 1, 0) // BQ - base
    out = OUT + tl.program_id(0).to(tl.int64) * (n_kb + 2)
    lay = LAYOUT + b.to(tl.int64) * stride_lb + (hk * heads).to(tl.int64) * stride_lh
    count = 0 * L
    for c0 in range(0, n_kb, BLOCK_K):
        kb = c0 + tl.arange(0, BLOCK_K)
        seen = tl.zeros([BLOCK_K], dtype=tl.int32)
        for row in range(first, last + 1):  # a row before the layout's first reads its first
            at = lay + tl.minimum(tl.maximum(row, 0), n_rows - 1).to(tl.int64) * stride_lr + kb.to(tl.int64) * stride_lc
            for h in range(0, heads):  # the group's layout heads (one where the layout has one)
                bits = tl.load(at, mask=kb < n_kb, other=0)
                seen = seen | (bits != 0).to(tl.int32)
                at += stride_lh  # (a pointer step: 64-bit, where h * stride_lh could wrap)
        tl.store(out + 1 + count + tl.cumsum(seen, 0) - 1, kb, mask=seen != 0)
        count += tl.sum(seen, 0)
    tl.store(out, count)
    for c0 in range(0, n_kb + 1, BLOCK_K):  # the padding: past every key
        i = c0 + tl.arange(0, BLOCK_K)
        tl.store(out + 1 + i, n_kb + 0 * i, mask=(i >= count) & (i <= n_kb))


def _capturing() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def documents(documents, B: int, Nq: int, capacity: int, seqlens: torch.Tensor, name: str):
    """(q_ids [B, Nq], kv_ids [B, S']) from kv ids [B, S' >= capacity] (the queries take their
    positions' ids), a (q_ids, kv_ids) pair or a Documents."""
    if documents is None:
        raise ValueError(f"spec {name!r} has a document mask: pass documents= (ids per cache position [batch, "
                         f"cache length], or a (q_ids [batch, Nq], kv_ids) pair)")
    if isinstance(documents, Documents):
        q_ids, kv_ids = documents.q_ids, documents.kv_ids
    elif isinstance(documents, (tuple, list)):
        q_ids, kv_ids = documents
    else:
        q_ids, kv_ids = None, documents
    for arg, ids in (("kv_ids", kv_ids), ("q_ids", q_ids)):
        if ids is None:
            continue
        check_ids(f"attention_with_kvcache: documents {arg}", ids, "positions")
        if ids.device != seqlens.device:
            raise ValueError(f"attention_with_kvcache: documents {arg} is on {ids.device}, q on {seqlens.device}")
    if kv_ids.shape[0] != B or kv_ids.shape[1] < capacity:
        raise ValueError(f"attention_with_kvcache: documents kv_ids must be [batch={B}, at least the cache's "
                         f"{capacity} positions]; got {list(kv_ids.shape)}")
    kv_ids = _ids(kv_ids)
    if q_ids is None:  # the ids at the queries' positions, L - Nq .. L - 1 (clamped: rows before 0 see nothing)
        pos = seqlens.long()[:, None] - Nq + torch.arange(Nq, device=seqlens.device)
        q_ids = torch.gather(kv_ids, 1, pos.clamp(0, kv_ids.shape[1] - 1))
    elif tuple(q_ids.shape) != (B, Nq):
        raise ValueError(f"attention_with_kvcache: documents q_ids must be [batch={B}, Nq={Nq}]; got {list(q_ids.shape)}")
    else:  # one integer type for both, the wider: equal ids stay equal, distinct ones distinct
        q_ids = _ids(q_ids)
        if q_ids.dtype != kv_ids.dtype:
            q_ids, kv_ids = q_ids.to(torch.int64), kv_ids.to(torch.int64)
    return q_ids.contiguous(), kv_ids


def layout(rt, given, B: int, Hq: int, Nq: int, capacity: int, seqlens: torch.Tensor):
    """(uint8 layout [B', H', rows, key blocks], row0 int32 [B] or None) for a spec with a
    `sparsity:` section: the call's layout (checked, at the cache's capacity) with the static terms
    added."""
    bq, bk = rt.layout_block
    n_qb, n_kb = -(-capacity // bq), -(-capacity // bk)
    device = seqlens.device
    if rt.runtime_layout and given is None:
        raise ValueError(f"spec {rt.name!r} has a runtime block layout: pass layout= (bool [B or 1, Hq or 1, "
                         f"{n_qb}, {n_kb}]: query and key blocks of {bq} and {bk} over the cache's {capacity} "
                         f"positions, or a BlockMask)")
    runtime = rt.block_mask(given, B, Hq, capacity, capacity, device)  # checks it, or refuses a layout
    runtime = None if runtime is None else runtime.layout
    if rt.sparsity.get("random"):
        return _per_length(rt, runtime, B, Hq, Nq, seqlens)
    static = _static(rt, capacity, device)
    if static is None:
        both = runtime
    elif runtime is None:
        both = static
    else:
        both = static | runtime
    assert both.shape[-2:] == (n_qb, n_kb)
    return both.view(torch.uint8), None


def _static(rt, capacity: int, device):
    """The static terms at the capacity, bool [1, 1, n_qb, n_kb], kept per capacity and never
    evicted (a captured CUDA graph may read it); not kept when made during a capture, whose pool
    owns it."""
    key = (capacity, str(device))
    if key in rt._decode_layouts:
        return rt._decode_layouts[key]
    made = rt.static_layout(capacity, capacity, 1, device)
    if not _capturing():
        rt._decode_layouts[key] = made
    return made


def _per_length(rt, runtime, B: int, Hq: int, Nq: int, seqlens: torch.Tensor):
    """A random term's rows near each sequence's queries: its layout at the sequence's own length L
    (runtime/layouts.py draws it per shape), rows (L - Nq) // bq .. (L - 1) // bq, and row0 = the
    first. Reads the lengths on the host."""
    if _capturing():
        raise RuntimeError(f"spec {rt.name!r}: its random sparsity blocks depend on each sequence's length, drawn "
                           f"on the host; attention_with_kvcache runs it eagerly only, not under torch.compile or "
                           f"CUDA graph capture")
    bq, bk = rt.layout_block
    device = seqlens.device
    lengths = seqlens.tolist()
    first = [max(0, L - Nq) // bq for L in lengths]
    rows = max(1, max((max(L - 1, 0) // bq - f + 1 for L, f in zip(lengths, first)), default=1))
    n_kb = max(1, -(-max(lengths, default=1) // bk))
    out = torch.zeros(B, Hq, rows, n_kb, dtype=torch.bool, device=device)
    drawn = {}
    for b, (L, f) in enumerate(zip(lengths, first)):
        if L == 0:
            continue
        shape = (-(-L // bq), -(-L // bk))
        if shape not in drawn:
            drawn[shape] = rt.static_layout(L, L, Hq, device)[0]  # [H', n_qb(L), n_kb(L)]
        own = drawn[shape][:, f:f + rows]
        if runtime is not None:
            rb = runtime[b if runtime.shape[0] > 1 else 0]
            own = own | rb[:, f:f + own.shape[1], :shape[1]]
        out[b, :, :own.shape[1], :shape[1]] = own
    return out.view(torch.uint8), torch.tensor(first, dtype=torch.int32, device=device)
