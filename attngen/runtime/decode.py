"""Decoding against a KV cache: `attention_with_kvcache`, FlashAttention's `flash_attn_with_kvcache`
semantics for every spec. The queries are each sequence's last Nq positions; the cache is
contiguous [B, Hkv, S, D] or paged [pages, page_size, Hkv, D] with a block table. The module's
`_attn_decode` kernel (templates/fa2/decode.jinja) packs a KV head's query heads into the rows of
one tile and splits the keys over programs (flash-decoding) when the batch would leave SMs idle;
`_combine_splits` merges the splits by their LSE. No host synchronisation on the way when the
inputs' checks are skipped (they are while a CUDA graph is being captured), and every buffer is
sized from the shapes: a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import memory
from .decode_gate import NO_GATE, Gate
from .tl_lib import _wait_prior

MAX_SPLITS = 128


@dataclass(frozen=True)
class DecodePlan:
    block_m: int  # packed rows per program: (query heads of a KV head) x queries
    block_n: int  # keys per loop step
    splits: int  # programs over one sequence's keys
    # keys per split at the plan's bound (the capacity, or a window's span), a multiple of block_n (the
    # kernel splits each sequence's visible keys as evenly: fewer where its length bounds them)
    split_len: int
    stages: int = 3  # software pipelining depth of the key loop
    warps: int = 4
    # splits merged by the last split of each tile, else by a second kernel (the default: fused measured
    # slower, docs/decisions/decode-plan.md)
    fused: bool = False
    # the merge kernel launched as a programmatic dependent of the splits' (sm90+ GPUs), its launch
    # overlapping theirs: measured no faster, off; paged caches: page numbers loaded a step ahead of
    # the K/V loads they address: measured faster, on (docs/decisions/decode-plan.md)
    pdl: bool = False
    pages_ahead: bool = True

    def describe(self, layout: bool = False, documents: bool = False) -> str:
        """One line; `layout` / `documents`: the spec gates keys by a block layout / document ids."""
        merge = (", merged by the last" if self.fused else ", merged by a second kernel"
                 + (" (PDL where the GPU has it: sm90+)" if self.pdl else "")) if self.splits > 1 else ""
        keys = "the tiles of the layout's visible key blocks (listed per sequence and KV head)" if layout \
            else "a sequence's visible keys"
        keys += " within the span of the queries' documents" if documents else ""
        return (f"{self.block_m} rows x {self.block_n} keys per step, {self.warps} warps, {self.stages} stages, "
                f"{self.splits} split(s) of {keys} (at most {self.split_len} keys each){merge}")


def decode_span(width: tuple[int, int] | None, n_q: int) -> int | None:
    """The most keys n_q decoding rows of one sequence may see, a + b n_q from the mask's
    (mask_analysis.decode_key_width, the module's DECODE_WIDTH); None where the length bounds them."""
    return None if width is None else max(1, width[0] + width[1] * n_q)


def num_splits(tiles: int, key_blocks: int, sms: int, max_splits: int = MAX_SPLITS) -> int:
    """FlashAttention-3's rule: no split while the tiles fill 80% of the SMs; else the fewest
    splits whose wave efficiency is at least 0.85 of the best, at most max_splits and key_blocks."""
    if tiles >= 0.8 * sms:
        return 1
    most = max(1, min(max_splits, sms, key_blocks))
    efficiency = []
    for s in range(1, most + 1):
        waves = tiles * s / sms
        efficiency.append(waves / -(-waves // 1))
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, 1) if e >= 0.85 * best)


def decode_plan(batch: int, heads_kv: int, rows: int, max_keys: int, head_dim: int, sms: int,
                splits: int | None = None, block_n: int | None = None, stages: int = 3, block_m: int | None = None,
                warps: int | None = None, key_block: int | None = None, fused: bool = False,
                pdl: bool = False, pages_ahead: bool = True, span: int | None = None) -> DecodePlan:
    """The tiles and splits of a decode call: `rows` = group size x Nq packed rows per KV head,
    `max_keys` the cache's capacity (a static bound: no host read of the lengths); a key tile lies
    within one block of `key_block` keys (a block layout's), when given; `span`: the most keys a
    sequence's rows may see, from the mask (decode_span), when it bounds them (a window)."""
    # 128 rows on 8 warps once there are that many (chunked prefill; docs/decisions/decode-plan.md);
    # fewer pad to 16-64
    block_m = block_m or (128 if rows >= 128 else max(16, min(64, triton.next_power_of_2(max(rows, 1)))))
    block_n = min(block_n or (64 if head_dim <= 128 else 32), key_block or 1 << 30)
    warps = warps or (8 if block_m >= 128 else 4)
    key_blocks = max(1, -(-max_keys // block_n))
    if span is not None:  # the tiles (or the layout's blocks of tiles) a span of that many keys meets
        align = key_block or block_n
        key_blocks = min(key_blocks, (-(-max(span - 1, 0) // align) + 1) * (align // block_n))
    tiles = batch * heads_kv * -(-rows // block_m)
    splits = num_splits(tiles, key_blocks, sms) if splits is None else max(1, min(int(splits), key_blocks, MAX_SPLITS))
    # the kernel shares each sequence's visible tiles among the splits; split_len is a split's at the bound
    split_len = -(-key_blocks // splits) * block_n
    return DecodePlan(block_m, block_n, splits, split_len, stages, warps, bool(fused), bool(pdl), bool(pages_ahead))


@triton.jit
def _combine_splits(O_PART, LSE_PART, O, LSE, n_splits, DV: tl.constexpr, DV_PAD: tl.constexpr,
                    SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    # One (batch, head, query) row: the splits' normalized rows (float32, or a half dtype: summed in
    # float32) weighted by exp(lse - max).
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    _wait_prior(PDL)  # the splits' partial rows
    lse = tl.load(LSE_PART + row * n_splits + s, mask=s < n_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_use)
    total = tl.sum(w, 0)
    d = tl.arange(0, DV_PAD)
    o = tl.load(O_PART + (row * n_splits + s[:, None]) * DV + d[None, :],
                mask=(s[:, None] < n_splits) & (d[None, :] < DV), other=0.0)
    total_use = tl.where(total == 0.0, 1.0, total)  # a row no split saw: zeros, LSE -inf
    tl.store(O + row * DV + d, tl.sum(o * w[:, None], 0) / total_use, mask=d < DV)
    tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), m_use + tl.log(total_use)))


_LOCKS: dict = {}
_SUPERSEDED: list = []


def _locks(device, n: int) -> torch.Tensor:
    """int32 [>= n] zeros, one counter per tile of rows, for the fused split merge: kept per device
    and stream (calls on one stream run in order; each call leaves its counters at 0 again). Made
    outside a CUDA graph capture where possible: one made during capture is the graph's own."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    have = _LOCKS.get(key)
    if have is None or have.numel() < n:
        have = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _SUPERSEDED.append(_LOCKS.get(key))  # a captured graph may still use the smaller one
            _LOCKS[key] = have
    return have


_PDL: dict = {}


def pdl_supported(device) -> bool:
    """Programmatic dependent launch: an sm90+ NVIDIA GPU and a Triton whose launcher takes launch_pdl."""
    if device.type != "cuda" or torch.version.hip:
        return False
    if device not in _PDL:  # (once per device: this is on every decode call's path)
        try:
            from triton.backends.nvidia.compiler import CUDAOptions

            _PDL[device] = (torch.cuda.get_device_capability(device)[0] >= 9
                            and "launch_pdl" in CUDAOptions.__dataclass_fields__)
        except Exception:
            _PDL[device] = False
    return _PDL[device]


def sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's, so that the interpreter runs the splits a GPU would


def check(name: str, dtypes, head_dims, q, k_cache, v_cache, cache_seqlens, block_table, k, v) -> None:
    """Raises with the argument and what is allowed. The lengths and the block table's values are read
    on the host, except while a CUDA graph is captured or torch.compile traces."""
    if q.dim() != 4:
        raise ValueError(f"attention_with_kvcache: q must be 4-d [batch, heads, Nq, head_dim]; got {q.dim()}-d")
    if q.dtype not in dtypes or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"attention_with_kvcache: q, k_cache, v_cache must share one dtype of spec {name!r}'s "
                        f"({', '.join(map(str, dtypes))}); got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device == cache_seqlens.device):
        raise ValueError(f"attention_with_kvcache: q, the caches and cache_seqlens must be on one device; got "
                         f"{q.device}, {k_cache.device}, {v_cache.device}, {cache_seqlens.device}")
    B, Hq, Nq, D = q.shape
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("attention_with_kvcache: k_cache and v_cache must be 4-d: [B, Hkv, S, D], or paged "
                         "[pages, page_size, Hkv, D] with block_table")
    if block_table is None:
        Hkv, capacity = k_cache.shape[1], k_cache.shape[2]
        want_k, want_v = (B, Hkv, capacity, head_dims[0]), (B, Hkv, capacity, head_dims[1])
    else:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
            raise TypeError(f"attention_with_kvcache: block_table must be int32 [batch={B}, pages per sequence]; got "
                            f"{block_table.dtype} of shape {list(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"attention_with_kvcache: block_table is on {block_table.device}, q on {q.device}")
        pages, page_size, Hkv = k_cache.shape[:3]
        if page_size % 16:
            raise ValueError(f"attention_with_kvcache: the page size (k_cache.shape[1]) must be a multiple of 16; "
                             f"got {page_size}")
        capacity = block_table.shape[1] * page_size
        want_k, want_v = (pages, page_size, Hkv, head_dims[0]), (pages, page_size, Hkv, head_dims[1])
    if tuple(k_cache.shape) != want_k or tuple(v_cache.shape) != want_v:
        raise ValueError(f"attention_with_kvcache: k_cache must be {list(want_k)} and v_cache {list(want_v)} "
                         f"(head_dim {head_dims[0]}, head_dim_v {head_dims[1]}); got {list(k_cache.shape)}, "
                         f"{list(v_cache.shape)}")
    if D != head_dims[0]:
        raise ValueError(f"attention_with_kvcache: q's head dim must be {head_dims[0]}; got {D}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention_with_kvcache: query heads ({Hq}) must be a multiple of the cache's heads ({Hkv})")
    if B * Hkv > 65535 or Hq * Nq // Hkv > 65535 * 64:
        raise ValueError(f"attention_with_kvcache: batch x KV heads ({B * Hkv}) and query heads per KV head x Nq "
                         f"({Hq * Nq // Hkv}, in blocks of 64 rows) are over the launch grid's limits")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (B,):
        raise TypeError(f"attention_with_kvcache: cache_seqlens must be int32 [{B}]; got {cache_seqlens.dtype} of "
                        f"shape {list(cache_seqlens.shape)}")
    if (k is None) != (v is None):
        raise ValueError("attention_with_kvcache: give both k and v to append, or neither")
    if k is not None:
        for arg, t, dim in (("k", k, head_dims[0]), ("v", v, head_dims[1])):
            if tuple(t.shape) != (B, Hkv, Nq, dim) or t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"attention_with_kvcache: {arg} must be {q.dtype} [{B}, {Hkv}, {Nq}, {dim}] on "
                                 f"{q.device}; got {t.dtype} of shape {list(t.shape)} on {t.device}")
        # the append writes each new row once, in place, into the caller's caches (never into a copy)
        for arg, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if memory.internal_overlap(cache):
                raise ValueError(f"attention_with_kvcache: appending k, v is not supported because {arg} has "
                                 f"overlapping elements (strides {list(cache.stride())} for shape {list(cache.shape)}: "
                                 f"a stride 0, e.g. an expanded dim): a cache written in place needs its own memory "
                                 f"per element")
        if not torch.compiler.is_compiling():  # (traced tensors have no addresses)
            pairs = [("k_cache", k_cache, "v_cache", v_cache)] + [
                (arg, t, c_arg, c) for arg, t in (("k", k), ("v", v)) for c_arg, c in (("k_cache", k_cache),
                                                                                      ("v_cache", v_cache))]
            for arg, t, other_arg, other in pairs:
                if memory.shares_memory(t, other):
                    raise ValueError(f"attention_with_kvcache: appending k, v is not supported because {arg} shares "
                                     f"memory with {other_arg}: the append writes the caches in place, so the caches "
                                     f"and the appended k, v must be separate tensors")
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return  # no host reads: the values are the caller's to keep in range
    if not B:
        return
    ends = [cache_seqlens.min(), cache_seqlens.max()]
    if block_table is not None and block_table.numel():
        ends += [block_table.min(), block_table.max()]
    ends = torch.stack(ends).tolist()  # one host read
    longest = ends[1] + (Nq if k is not None else 0)
    if ends[0] < 0 or longest > capacity:
        raise ValueError(f"attention_with_kvcache: cache_seqlens{' + Nq' if k is not None else ''} must lie in "
                         f"[0, {capacity}] (the cache's capacity); got [{ends[0]}, {longest}]")
    if len(ends) == 4:
        lo, hi = ends[2:]
        if lo < 0 or hi >= k_cache.shape[0]:
            raise ValueError(f"attention_with_kvcache: block_table entries must be pages in [0, {k_cache.shape[0]}); "
                             f"got [{lo}, {hi}]")


def append(k_cache, v_cache, block_table, cache_seqlens, k, v) -> None:
    """Writes k, v [B, Hkv, Nq, *] into the caches at positions cache_seqlens .. + Nq, in place."""
    B, _, Nq, _ = k.shape
    pos = cache_seqlens.long()[:, None] + torch.arange(Nq, device=k.device)  # [B, Nq]
    if block_table is None:
        b = torch.arange(B, device=k.device)[:, None].expand(B, Nq)
        k_cache[b, :, pos] = k.transpose(1, 2)
        v_cache[b, :, pos] = v.transpose(1, 2)
    else:
        page_size = k_cache.shape[1]
        pages = torch.gather(block_table.long(), 1, pos // page_size)
        k_cache[pages, pos % page_size] = k.transpose(1, 2)
        v_cache[pages, pos % page_size] = v.transpose(1, 2)


def cache_strides(cache: torch.Tensor, paged: bool) -> tuple[int, ...]:
    """A cache's strides as the kernels take them: (a sequence, a head, a slot, a feature) of [B,
    Hkv, S, D], or of paged [pages, page_size, Hkv, D] (a page, the cache's head, a slot, a feature)."""
    return (cache.stride(0), cache.stride(2), cache.stride(1), cache.stride(3)) if paged else cache.stride()


def run(kernel, q, k_cache, v_cache, hp, seqlens, block_table, scale: float, plan: DecodePlan, Hkv: int,
        head_dim_v: int, native: bool, gate: Gate = NO_GATE) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, Hq, Nq, Dv] and lse [B, Hq, Nq] (float32, natural log) from the decode kernel (and the
    combine kernel when the keys are split); `gate`: the call's document ids and block layout."""
    B, Hq, Nq, D = q.shape
    if gate.layout is not None and (plan.block_n > gate.block[1] or gate.block[1] % plan.block_n):
        raise ValueError(f"a block layout's key block ({gate.block[1]}) must hold whole key tiles; got block_n "
                         f"{plan.block_n}")
    seqlens = seqlens.contiguous()  # the kernel reads both with unit stride (no copy when already so)
    block_table = None if block_table is None else block_table.contiguous()
    o = torch.empty(B, Hq, Nq, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    split = plan.splits > 1
    o_part = torch.empty(B, Hq, Nq, plan.splits, head_dim_v, dtype=torch.float32, device=q.device) if split else o
    lse_part = torch.empty(B, Hq, Nq, plan.splits, dtype=torch.float32, device=q.device) if split else lse
    os_ = o_part.stride() if split else (*o.stride()[:3], 0, o.stride(3))
    ls_ = lse_part.stride() if split else (*lse.stride(), 0)
    fused = split and plan.fused
    pdl = split and not fused and plan.pdl and native and pdl_supported(q.device)  # (not the interpreter)
    group, rows = Hq // Hkv, Hq // Hkv * Nq
    grid = (plan.splits, B * Hkv, -(-rows // plan.block_m))
    locks = _locks(q.device, grid[1] * grid[2]) if fused else seqlens
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[2]
    ks, vs = cache_strides(k_cache, paged), cache_strides(v_cache, paged)
    pages = block_table if paged else seqlens
    kernel[grid](q, k_cache, v_cache, o_part, lse_part, o, lse, locks, hp, pages, seqlens,
                 *gate.tensors(seqlens, seqlens, Hkv, Nq, capacity),
                 *q.stride(), *ks, *vs, *os_, *ls_, *o.stride(), *lse.stride(), pages.stride(0), *gate.strides(),
                 Hq, Hkv, group, Nq,
                 scale * 1.4426950408889634, HEAD_DIM=D, HEAD_DIM_V=head_dim_v,
                 HEAD_DIM_PAD=max(16, triton.next_power_of_2(D)), HEAD_DIM_V_PAD=max(16, triton.next_power_of_2(head_dim_v)),
                 BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, PAGE_SIZE=k_cache.shape[1] if paged else 0,
                 PAGES_AHEAD=paged and plan.pages_ahead,
                 LAYOUT_BQ=gate.block[0], LAYOUT_BK=gate.block[1], LAYOUT_ROW0=gate.row0 is not None, FUSED_MERGE=fused, PDL=pdl,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                 FAST_TANH=native and q.is_cuda and q.dtype != torch.float32, num_warps=plan.warps, num_stages=plan.stages)
    if split and not fused:
        _combine_splits[(B * Hq * Nq,)](o_part, lse_part, o, lse, plan.splits, DV=head_dim_v,
                                        DV_PAD=max(16, triton.next_power_of_2(head_dim_v)),
                                        SPLITS_PAD=max(2, triton.next_power_of_2(plan.splits)), PDL=pdl, num_warps=4,
                                        **({"launch_pdl": True} if pdl else {}))
    return o, lse
